"""Counter, Barrier and DoubleBarrier on both backends: no lost update, release, arrival and departure, crashes."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import pytest

from coordkit import (
    Barrier,
    BarrierLostError,
    Counter,
    CounterValue,
    CounterValueError,
    DoubleBarrier,
    Put,
    Range,
    Session,
    TooManyParticipantsError,
)
from coordkit.testing import Harness

from .helpers import queue_length, reply_faults, sessions

pytestmark = pytest.mark.anyio


# -- Counter ----------------------------------------------------------------------------------------------------


async def test_concurrent_adds_lose_no_update(harness: Harness) -> None:
    name = harness.namespace.decode() + "hits"
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(harness.client()) for _ in range(4)]

        async def add_many(counter: Counter) -> None:
            for _ in range(10):
                await counter.add(1)
                await counter.add(2)
                await counter.add(-1)

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(add_many, Counter(client, name))
                tg.start_soon(add_many, Counter(client, name))  # two objects of one process race too
        value = await Counter(clients[0], name).get()
    assert value.value == 8 * 10 * 2 and value.revision > 0


async def test_get_compare_and_set_and_foreign_values(harness: Harness) -> None:
    name = harness.namespace.decode() + "gauge"
    key = name.encode()
    async with harness.client() as backend:
        counter = Counter(backend, name)
        assert await counter.get() == CounterValue(0, 0)
        revision = await counter.compare_and_set(10, expected_revision=0)
        assert revision is not None
        assert await counter.compare_and_set(99, expected_revision=0) is None, "stale: nothing written"
        assert await counter.get() == CounterValue(10, revision)
        await backend.txn([], [Put(key, b"41")])  # another language writes the decimal value
        assert await counter.add() == 42
        assert (await backend.range(Range(key))).kvs[0].value == b"42", "stored as decimal text"
        await backend.txn([], [Put(key, b"banana")])
        with pytest.raises(CounterValueError, match="banana"):
            await counter.get()
        with pytest.raises(CounterValueError):
            await counter.add(1)
        await backend.txn([], [Put(key, str(2**63 - 1).encode())])
        with pytest.raises(OverflowError):
            await counter.add(1)
        assert (await backend.range(Range(key))).kvs[0].value == str(2**63 - 1).encode(), "nothing written"
        with pytest.raises(TypeError):
            await counter.add(1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            Counter(backend, "")


# -- Barrier ----------------------------------------------------------------------------------------------------


async def test_barrier_holds_every_waiter_until_released(harness: Harness) -> None:
    name = harness.namespace.decode() + "gate"
    released: list[int] = []
    async with harness.client() as admin, harness.client() as workers:
        gate = Barrier(admin, name)
        with anyio.fail_after(5):
            await Barrier(workers, name).wait()  # not held: returns at once
        assert await gate.hold()
        assert not await gate.hold(), "already held"
        assert await gate.held()

        async def wait(i: int) -> None:
            await Barrier(workers, name).wait()
            released.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(wait, i)
            await anyio.sleep(0.3)
            assert released == []
            assert await gate.release()
        assert sorted(released) == [0, 1, 2]
        assert not await gate.release(), "not held any more"


async def test_barrier_bound_to_a_session_falls_with_it(harness: Harness) -> None:
    name = harness.namespace.decode() + "leased-gate"
    async with harness.client() as admin, harness.client() as worker:
        async with Session(admin, ttl=3) as session:
            assert await Barrier(admin, name).hold(session=session)
            assert await Barrier(worker, name).held()
        with anyio.fail_after(5):
            await Barrier(worker, name).wait()  # the session's exit revoked the lease, and the barrier with it


# -- DoubleBarrier ----------------------------------------------------------------------------------------------


async def test_double_barrier_enters_together_and_leaves_together(harness: Harness) -> None:
    name = harness.namespace.decode() + "phase"
    events: list[tuple[str, int]] = []

    async def participant(session: Session, i: int, work: float) -> None:
        events.append(("arrive", i))
        async with DoubleBarrier(session, name, count=3):
            events.append(("enter", i))
            await anyio.sleep(work)
            events.append(("leave", i))
        events.append(("left", i))

    def check_together() -> None:
        kinds = [kind for kind, _ in events]
        assert kinds.count("enter") == 3 and kinds.count("left") == 3
        assert kinds.index("enter") > max(i for i, k in enumerate(kinds) if k == "arrive"), "nobody enters early"
        assert kinds.index("left") > max(i for i, k in enumerate(kinds) if k == "leave"), "nobody leaves early"

    async with sessions(harness, 3) as group, anyio.create_task_group() as tg:
        for i, session in enumerate(group):
            tg.start_soon(participant, session, i, 0.1 * (i + 1))
            await anyio.sleep(0.2)  # they arrive one by one
    check_together()
    async with harness.client() as backend:
        assert await queue_length(backend, name) == 0, "no key left, ready included: the next round starts closed"

    events.clear()  # a second round on the same name works the same way
    async with sessions(harness, 3) as group, anyio.create_task_group() as tg:
        for i, session in enumerate(group):
            tg.start_soon(participant, session, i, 0.3 - 0.1 * i)
            await anyio.sleep(0.1)
    check_together()


async def test_double_barrier_crashes_and_too_many(harness: Harness) -> None:
    name = harness.namespace.decode() + "crash"
    async with sessions(harness, 4) as (a, b, c, d), harness.client() as gone_client:
        # One arrives and crashes before the barrier opens: it no longer counts.
        async with Session(gone_client, ttl=2) as gone:
            with anyio.move_on_after(0.3):
                await DoubleBarrier(gone, name, count=3).enter()
        inside: list[str] = []

        async def join(session: Session, label: str, stay: float) -> None:
            async with DoubleBarrier(session, name, count=3):
                inside.append(label)
                await anyio.sleep(stay)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(join, a, "a", 0.2)
                tg.start_soon(join, b, "b", 0.2)
                await anyio.sleep(0.5)
                assert inside == [], "two of three: still closed (the crashed one does not count)"
                tg.start_soon(join, c, "c", 0.2)
                await anyio.sleep(0.1)
                with pytest.raises(TooManyParticipantsError):
                    await DoubleBarrier(d, name, count=3).enter()
        assert sorted(inside) == ["a", "b", "c"]
        async with harness.client() as backend:
            assert await queue_length(backend, name) == 0, "the refused participant left no key"


async def test_a_participant_lost_inside_is_not_waited_for(harness: Harness) -> None:
    name = harness.namespace.decode() + "lost"
    async with harness.client() as fragile_client, sessions(harness, 1) as (steady,):
        async with Session(fragile_client, ttl=2) as fragile:

            async def fragile_participant() -> None:
                with pytest.raises(BarrierLostError):
                    async with DoubleBarrier(fragile, name, count=2):
                        harness.suspend_keepalives(fragile_client)
                        await anyio.sleep(60)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fragile_participant)
                    async with DoubleBarrier(steady, name, count=2):
                        pass  # leaves at once; waits for the fragile one, whose lease then ends
            harness.heal(fragile_client)


async def test_barrier_hold_survives_a_lost_reply_and_a_cancelled_hold_leaves_it_down(harness: Harness) -> None:
    name = harness.namespace.decode() + "ambiguous-gate"
    async with harness.client() as admin, harness.client() as observer:
        gate, seen = Barrier(admin, name), Barrier(observer, name)
        reply_faults(admin).lose_replies(1)
        assert await gate.hold(), "the retried attempt recognises the write whose reply was lost"
        assert await seen.held()
        assert await gate.release()
        reply_faults(admin).delay_replies(2)
        with anyio.move_on_after(1):
            await gate.hold()
            pytest.fail("the hold's reply comes after the cancellation")
        reply_faults(admin).delay_replies(0)
        assert not await seen.held(), "a hold cancelled with its write in flight lowers the barrier again"


async def test_double_barrier_entry_cancelled_with_its_write_in_flight_leaves_no_key(harness: Harness) -> None:
    name = harness.namespace.decode() + "ambiguous-phase"
    async with harness.client() as client, harness.client() as observer, Session(client, ttl=10) as session:
        reply_faults(client).delay_replies(2)
        with anyio.move_on_after(1):
            await DoubleBarrier(session, name, count=2).enter()
            pytest.fail("the entry's reply comes after the cancellation")
        reply_faults(client).delay_replies(0)
        assert await queue_length(observer, name) == 0, "a participant that never entered is not counted"
