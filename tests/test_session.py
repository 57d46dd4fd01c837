"""Session: keepalive, revoke on exit, and the lease-loss guarantee, on both backends."""

from __future__ import annotations

import math

import anyio
import pytest

from coordkit import (
    EventType,
    LeaseExpiredError,
    OwnershipLostError,
    Put,
    Range,
    Session,
    SessionClosedError,
    Watch,
    WatchBatch,
)
from coordkit.testing import Harness, MemoryHarness

pytestmark = pytest.mark.anyio


class HeldLost(OwnershipLostError):
    pass


async def test_keepalive_outlives_ttl_and_exit_revokes(harness: Harness) -> None:
    key = harness.namespace + b"member"
    async with harness.client() as backend, harness.client() as observer:
        async with Session(backend, ttl=2) as session:
            await backend.txn([], [Put(key, b"", session.lease_id)])
            await anyio.sleep(session.ttl * 2.5)
            assert not session.lost
            assert (await observer.range(Range(key))).count == 1
            stats = session.statistics()
            assert stats.keepalives >= 6 and stats.keepalive_failures == 0
            assert session.deadline > anyio.current_time()
        assert (await observer.range(Range(key))).count == 0, "exit revokes the lease at once"


async def test_suspended_keepalives_cancel_guarded_block_before_server_expiry(harness: Harness) -> None:
    key = harness.namespace + b"held"
    async with harness.client() as backend, harness.client() as observer:
        start = (await observer.range(Range(key))).revision
        cancelled_at = math.inf
        deleted_at = math.inf

        async def observe_expiry() -> None:
            nonlocal deleted_at
            async with Watch(observer, key, start_revision=start + 1) as watch:
                async for item in watch:
                    assert isinstance(item, WatchBatch)
                    if any(e.type is EventType.DELETE for e in item.events):
                        deleted_at = anyio.current_time()
                        return

        async with Session(backend, ttl=2) as session, anyio.create_task_group() as tg:
            await backend.txn([], [Put(key, b"", session.lease_id)])
            tg.start_soon(observe_expiry)
            harness.suspend_keepalives(backend)
            with pytest.raises(HeldLost):
                async with session.guarded(HeldLost):
                    try:
                        await anyio.sleep_forever()
                    finally:
                        cancelled_at = anyio.current_time()
            assert session.lost
            await session.wait_lost()
            with pytest.raises(HeldLost):
                async with session.guarded(HeldLost):
                    pytest.fail("a lost session must not open a guarded block")
        assert cancelled_at < deleted_at < math.inf, (cancelled_at, deleted_at)
        harness.heal(backend)


async def test_lease_gone_on_server_loses_session(harness: Harness) -> None:
    async with harness.client() as backend, Session(backend, ttl=5) as session:
        with pytest.raises(OwnershipLostError, match="expired"):
            async with session.guarded():
                await harness.expire_lease(session.lease_id)
                await anyio.sleep_forever()
        assert session.lost


async def test_a_write_refused_for_a_gone_lease_loses_the_session_at_once(harness: Harness) -> None:
    """A write bound to the session's lease, refused because the store no longer has the lease (revoked from
    elsewhere, before any keepalive noticed): the guarded block raises OwnershipLostError, not the raw
    LeaseExpiredError, and every other guarded block of the session is cancelled at once."""
    async with (
        harness.client() as backend,
        harness.client() as other,
        Session(backend, ttl=30) as session,
        anyio.create_task_group() as tg,
    ):
        other_lost = anyio.Event()

        async def other_block() -> None:
            with pytest.raises(OwnershipLostError):
                async with session.guarded():
                    await anyio.sleep_forever()
            other_lost.set()

        tg.start_soon(other_block)
        await anyio.wait_all_tasks_blocked()
        await other.revoke(session.lease_id)
        with pytest.raises(OwnershipLostError, match="expired") as caught:
            async with session.guarded():
                await backend.txn([], [Put(harness.namespace + b"k", b"v", session.lease_id)])
        assert isinstance(caught.value.__cause__, LeaseExpiredError)
        assert session.lost
        with anyio.fail_after(5):
            await other_lost.wait()


async def test_outside_cancellation_passes_through_guarded_block(harness: Harness) -> None:
    async with harness.client() as backend, Session(backend, ttl=5) as session:
        with anyio.move_on_after(0.5) as scope:
            async with session.guarded():
                await anyio.sleep_forever()
        assert scope.cancelled_caught and not session.lost


async def test_guarded_block_needs_open_session(harness: Harness) -> None:
    async with harness.client() as backend:
        session = Session(backend, ttl=5)
        with pytest.raises(SessionClosedError):
            async with session.guarded():
                pass
        async with session:
            pass
        with pytest.raises(SessionClosedError):
            async with session.guarded():
                pass
        with pytest.raises(RuntimeError):
            async with session:
                pass


async def test_closing_session_cancels_guarded_blocks_in_other_tasks(harness: Harness) -> None:
    async with harness.client() as backend:
        errors: list[BaseException] = []

        async def holder(session: Session, started: anyio.Event) -> None:
            try:
                async with session.guarded():
                    started.set()
                    await anyio.sleep_forever()
            except OwnershipLostError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg, Session(backend, ttl=5) as session:
            started = anyio.Event()
            tg.start_soon(holder, session, started)
            await started.wait()
        assert len(errors) == 1 and "closed" in str(errors[0])


@pytest.mark.parametrize("kind", ["memory"])
@pytest.mark.parametrize(("ttl", "margin"), [(0, None), (-1, None), (10, 7.0), (10, -1.0), (10, math.nan)])
async def test_bad_arguments(harness: Harness, ttl: int, margin: float | None) -> None:
    async with harness.client() as backend:
        with pytest.raises(ValueError, match=r"ttl|margin"):
            Session(backend, ttl=ttl, safety_margin=margin)


@pytest.mark.parametrize("kind", ["memory"])
async def test_keepalive_survives_transient_failures(harness: Harness) -> None:
    assert isinstance(harness, MemoryHarness)
    async with harness.client() as backend, Session(backend, ttl=6) as session:
        backend.faults.fail_calls(2)  # type: ignore[attr-defined]
        await anyio.sleep(10)
        stats = session.statistics()
        assert not session.lost and stats.keepalive_failures == 2 and stats.keepalives >= 3
