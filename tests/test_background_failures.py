"""One lost path for every failure of a background task, on both backends.

Every error class a store (or a third-party backend, or a malformed reply) can raise is injected into the calls
the background tasks make: lease refresh (the session's keepalive), watch (a ConfigView's follower, a Scheduler's
followers) and txn (a Scheduler's claims). Whatever the class, nothing escapes as an ``ExceptionGroup`` or an
untyped error: a permanent refusal ends what the task serves at once with a typed error; a transient failure is
retried (for a session, until its deadline, and then the session is lost).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from coordkit import (
    AuthenticationError,
    BackendError,
    ConfigView,
    CoordkitError,
    JobSpec,
    LeaseExpiredError,
    Lock,
    LockLostError,
    OwnershipLostError,
    RequestTooLargeError,
    RunContext,
    Scheduler,
    Session,
    UnavailableError,
    publish,
)
from coordkit.testing import FaultyBackend, Harness

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Injected:
    name: str
    make: Callable[[], BaseException]
    permanent: bool


ERRORS = [
    Injected("unavailable", lambda: UnavailableError("injected: connection reset"), permanent=False),
    Injected("malformed reply", lambda: BackendError("malformed reply from etcd: injected"), permanent=False),
    Injected("5xx", lambda: BackendError("injected: etcdserver: unknown error (gRPC code 2)"), permanent=False),
    Injected("too large", lambda: RequestTooLargeError("injected"), permanent=False),
    Injected("untyped", lambda: KeyError("injected: a third-party backend's own error"), permanent=False),
    Injected("timeout", lambda: TimeoutError("injected"), permanent=False),
    Injected("lease not found", lambda: LeaseExpiredError(1), permanent=True),
    Injected("auth refused", lambda: AuthenticationError("injected: permission denied"), permanent=True),
]
PERMANENT = [e for e in ERRORS if e.permanent]
TRANSIENT = [e for e in ERRORS if not e.permanent]


def ids(errors: list[Injected]) -> list[str]:
    return [e.name for e in errors]


@asynccontextmanager
async def faulty_client(harness: Harness) -> AsyncIterator[FaultyBackend]:
    """A client of the harness's store whose calls can be made to fail (a FaultyBackend on both backends)."""
    async with harness.client() as client:
        yield client if isinstance(client, FaultyBackend) else FaultyBackend(client)


def assert_caused_by(error: BaseException, injected: Injected) -> None:
    causes = []
    cause: BaseException | None = error
    while cause is not None:
        causes.append(type(cause))
        cause = cause.__cause__
    assert type(injected.make()) in causes, f"the injected error is kept as the cause: {causes}"


# -- refresh: the session's keepalive ---------------------------------------------------------------------------


@pytest.mark.parametrize("injected", PERMANENT, ids=ids(PERMANENT))
async def test_refused_keepalive_loses_the_session_at_once(harness: Harness, injected: Injected) -> None:
    name = harness.namespace.decode() + "refused"
    async with faulty_client(harness) as client, Session(client, ttl=3) as session:
        deadline_then = session.deadline
        with pytest.raises(LockLostError) as caught:
            async with Lock(session, name):
                client.inject(injected.make, into=["refresh"])
                await anyio.sleep(30)
        lost_at = anyio.current_time()
        assert session.lost
        assert lost_at < deadline_then, "a refusal loses the session at the next keepalive, not at the deadline"
        assert_caused_by(caught.value, injected)
    # (the session's exit above raised nothing: no ExceptionGroup, no untyped error)


@pytest.mark.parametrize("injected", TRANSIENT, ids=ids(TRANSIENT))
async def test_failing_keepalive_is_retried_until_the_deadline(harness: Harness, injected: Injected) -> None:
    name = harness.namespace.decode() + "flaky"
    async with faulty_client(harness) as client, Session(client, ttl=2) as session:
        with pytest.raises(LockLostError) as caught:
            async with Lock(session, name):
                client.inject(injected.make, into=["refresh"])
                await anyio.sleep(30)
        assert session.lost
        assert anyio.current_time() >= session.deadline, "retried until the deadline, not given up before"
        assert session.statistics().keepalive_failures >= 2, "retried, not given up after one failure"
        assert_caused_by(caught.value, injected)
        assert type(injected.make()).__name__ in str(caught.value), "the reason names the last failure"


@pytest.mark.parametrize("injected", TRANSIENT, ids=ids(TRANSIENT))
async def test_session_survives_transient_keepalive_failures(harness: Harness, injected: Injected) -> None:
    async with faulty_client(harness) as client, Session(client, ttl=3) as session:
        client.inject(injected.make, into=["refresh"], count=2)
        with anyio.fail_after(10):
            while session.statistics().keepalives < 1:  # noqa: ASYNC110 (a counter: no event to wait on)
                await anyio.sleep(0.05)
        stats = session.statistics()
        assert stats.keepalive_failures == 2 and not session.lost
        async with session.guarded():
            pass  # still usable


async def test_refused_revoke_on_exit_raises_nothing(harness: Harness) -> None:
    async with faulty_client(harness) as client:
        async with Session(client, ttl=3) as session:
            client.inject(lambda: AuthenticationError("injected"), into=["revoke"])
        assert not session.lost
        client.heal()
        await client.revoke(session.lease_id)  # still there: the exit could not revoke it, and said nothing


# -- watch: a ConfigView's follower -----------------------------------------------------------------------------


@pytest.mark.parametrize("injected", PERMANENT, ids=ids(PERMANENT))
async def test_refused_view_raises_typed_from_its_block(harness: Harness, injected: Injected) -> None:
    prefix = harness.namespace.decode() + "cfg/"
    body_cancelled = False
    async with faulty_client(harness) as client:
        with pytest.raises(type(injected.make())):
            async with ConfigView(client, prefix) as view:
                client.inject(injected.make, into=["watch"])
                try:
                    async for _ in view.changes():
                        pass
                except anyio.get_cancelled_exc_class():
                    body_cancelled = True
                    raise
    assert body_cancelled, "the view's body is cancelled, not left waiting on a view that no longer follows"


@pytest.mark.parametrize("injected", TRANSIENT, ids=ids(TRANSIENT))
async def test_view_retries_transient_watch_failures(harness: Harness, injected: Injected) -> None:
    prefix = harness.namespace.decode() + "cfg/"
    async with faulty_client(harness) as client, harness.client() as writer:
        async with ConfigView(client, prefix) as view:
            client.inject(injected.make, into=["watch"], count=3)
            await publish(writer, prefix + "k", 1, expected_revision=None)
            with anyio.fail_after(10):
                await view.wait_for(lambda values: values.get("k") == 1)
            await publish(writer, prefix + "k", 2, expected_revision=None)
            with anyio.fail_after(10):
                await view.wait_for(lambda values: values.get("k") == 2)


async def test_refused_view_fails_its_waiters_outside_the_block(harness: Harness) -> None:
    """A task waiting on a view (outside its block) gets the typed error, never waits forever."""
    prefix = harness.namespace.decode() + "cfg/"
    seen: list[BaseException] = []
    async with faulty_client(harness) as client:
        view = ConfigView(client, prefix)

        async def wait() -> None:
            try:
                await view.wait_for(lambda values: "never" in values)
            except CoordkitError as exc:
                seen.append(exc)

        with pytest.raises(AuthenticationError):
            async with view, anyio.create_task_group() as waiters:
                waiters.start_soon(wait)
                await anyio.wait_all_tasks_blocked()  # the waiter waits on the view
                client.inject(lambda: AuthenticationError("injected"), into=["watch"])
                await anyio.sleep(30)
        assert [type(e) for e in seen] in ([], [AuthenticationError])  # a waiter inside the block is cancelled
        with anyio.fail_after(1):
            with pytest.raises(AuthenticationError):
                await view.wait_for(lambda values: "never" in values)


# -- the Scheduler: watch and txn -------------------------------------------------------------------------------


BASE = datetime(2026, 1, 1, tzinfo=UTC)


def loop_clock() -> datetime:
    return BASE + timedelta(seconds=anyio.current_time())


@pytest.mark.parametrize("call", ["watch", "txn"])
@pytest.mark.parametrize("injected", PERMANENT, ids=ids(PERMANENT))
async def test_refused_scheduler_raises_typed(harness: Harness, injected: Injected, call: str) -> None:
    prefix = harness.namespace.decode() + "cron"
    async with faulty_client(harness) as client, Session(client, ttl=5) as session:
        scheduler = Scheduler(session, prefix, now=loop_clock)

        async def job(context: RunContext) -> None:
            pass

        scheduler.register("job", job)
        await scheduler.put_job(JobSpec("tick", "job", interval=0.2))
        # A claim refused for "lease not found" (its running marker is bound to the session's lease) is the
        # session's loss: the worker stops as it does for any loss. Any other refusal stops it with itself.
        lease_gone = call == "txn" and injected.name == "lease not found"
        with pytest.raises(OwnershipLostError if lease_gone else type(injected.make())) as caught:
            async with scheduler:
                client.inject(injected.make, into=[call])
                await anyio.sleep(30)
        assert session.lost == lease_gone
        assert_caused_by(caught.value, injected)


@pytest.mark.parametrize("call", ["watch", "txn"])
@pytest.mark.parametrize("injected", TRANSIENT, ids=ids(TRANSIENT))
async def test_scheduler_rides_out_transient_failures(harness: Harness, injected: Injected, call: str) -> None:
    prefix = harness.namespace.decode() + "cron"
    ran = anyio.Event()
    async with faulty_client(harness) as client, Session(client, ttl=5) as session:
        scheduler = Scheduler(session, prefix, now=loop_clock)

        async def job(context: RunContext) -> None:
            ran.set()

        scheduler.register("job", job)
        async with scheduler:
            client.inject(injected.make, into=[call], count=3)
            # Published past the injection: the followers must come back to see it (watch), the claims must be
            # tried again at later ticks (txn).
            spec = {"name": "tick", "target": "job", "interval": 0.2}
            await publish(client.inner, f"{prefix}/jobs/tick", spec, expected_revision=None)
            with anyio.fail_after(10):
                await ran.wait()
        assert not session.lost
