"""WorkQueue on both backends: exclusive leases, FIFO and priority, crash and timeout re-delivery, dead letters."""

from __future__ import annotations

from contextlib import suppress

import anyio
import pytest

from coordkit import ClaimLostError, Session, WorkQueue
from coordkit.testing import Harness

from .helpers import sessions

pytestmark = pytest.mark.anyio


async def test_producers_and_consumers_each_item_done_once(harness: Harness) -> None:
    name = harness.namespace.decode() + "jobs"
    done: list[bytes] = []
    in_hand: set[bytes] = set()
    async with sessions(harness, 6) as group:
        producers, consumers = group[:2], group[2:]

        async def produce(session: Session, tag: str) -> None:
            queue = WorkQueue(session, name)
            for i in range(15):
                await queue.put(f"{tag}-{i}".encode())

        async def consume(session: Session) -> None:
            queue = WorkQueue(session, name)
            while len(done) < 30:
                with anyio.move_on_after(2):
                    async with queue.lease(visibility_timeout=10) as task:
                        assert task.payload not in in_hand, "two consumers hold one item"
                        in_hand.add(task.payload)
                        await anyio.sleep(0.01)
                        in_hand.discard(task.payload)
                        done.append(task.payload)

        async with anyio.create_task_group() as tg:
            for session in consumers:
                tg.start_soon(consume, session)
            for session, tag in zip(producers, ("p", "q"), strict=True):
                tg.start_soon(produce, session, tag)
        assert sorted(done) == sorted([f"{t}-{i}".encode() for t in "pq" for i in range(15)])
        depth = await WorkQueue(group[0], name).depth()
        assert (depth.pending, depth.leased, depth.dead) == (0, 0, 0)


async def test_fifo_and_priority(harness: Harness) -> None:
    name = harness.namespace.decode() + "order"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name)
        for i in range(5):
            await queue.put(str(i).encode())
        await queue.put(b"urgent", priority=10)
        order = []
        for _ in range(6):
            async with queue.lease() as task:
                order.append(task.payload)
        assert order == [b"urgent", b"0", b"1", b"2", b"3", b"4"]


async def test_crashed_consumer_item_is_redelivered(harness: Harness) -> None:
    name = harness.namespace.decode() + "crash"
    async with harness.client() as crashing, sessions(harness, 2) as (producer, survivor):
        await WorkQueue(producer, name).put(b"index shard 7")
        holding = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def doomed() -> None:
                with suppress(ClaimLostError):
                    async with Session(crashing, ttl=2) as session:
                        async with WorkQueue(session, name).lease(visibility_timeout=3):
                            holding.set()
                            await anyio.sleep_forever()

            tg.start_soon(doomed)
            await holding.wait()
            harness.partition(crashing)  # no completion, no release, no more heartbeats
            started = anyio.current_time()
            with anyio.fail_after(3 + 2):
                async with WorkQueue(survivor, name).lease() as task:
                    assert task.payload == b"index shard 7" and task.attempt == 2
            assert anyio.current_time() - started <= 3 + 1
            harness.heal(crashing)
            tg.cancel_scope.cancel()
        assert (await WorkQueue(producer, name).depth()).pending == 0


async def test_visibility_timeout_cancels_late_consumer_and_fences_it(harness: Harness) -> None:
    name = harness.namespace.decode() + "slow"
    async with sessions(harness, 2) as (slow, fast):
        await WorkQueue(slow, name).put(b"job")
        with pytest.raises(ClaimLostError, match="visibility"):
            async with WorkQueue(slow, name).lease(visibility_timeout=2) as task:
                await anyio.sleep(10)  # never extends
        assert task.attempt == 1
        async with WorkQueue(fast, name).lease(visibility_timeout=2) as again:
            assert again.id == task.id and again.attempt == 2
            await anyio.sleep(1.2)
            await again.extend()  # extending keeps it past the original timeout
            await anyio.sleep(1.2)
        depth = await WorkQueue(fast, name).depth()
        assert (depth.pending, depth.leased) == (0, 0)


async def test_failures_retry_then_dead_letter_and_requeue(harness: Harness) -> None:
    name = harness.namespace.decode() + "poison"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name, max_attempts=3)
        item_id = await queue.put(b"poison")
        attempts = []
        for _ in range(3):
            with pytest.raises(ValueError, match="bad input"):
                async with queue.lease() as task:
                    attempts.append(task.attempt)
                    raise ValueError("bad input")
        assert attempts == [1, 2, 3]
        depth = await queue.depth()
        assert (depth.pending, depth.leased, depth.dead) == (0, 0, 1)
        (letter,) = await queue.dead_letters()
        assert (letter.id, letter.payload, letter.attempts) == (item_id, b"poison", 3)
        assert "ValueError: bad input" in letter.error
        assert await queue.requeue(item_id)
        assert not await queue.requeue(item_id)
        async with queue.lease() as task:
            assert task.payload == b"poison" and task.attempt == 1
        assert await queue.depth() == type(depth)(0, 0, 0)


async def test_cancelled_consumer_gives_item_back_uncounted(harness: Harness) -> None:
    name = harness.namespace.decode() + "cancelled"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name)
        await queue.put(b"job")
        with anyio.move_on_after(0.5):
            async with queue.lease() as task:
                await anyio.sleep_forever()
        async with queue.lease() as again:
            assert again.id == task.id and again.attempt == 1


async def test_lease_needs_an_open_session_and_timeouts_are_recorded(harness: Harness) -> None:
    from coordkit import SessionClosedError

    name = harness.namespace.decode() + "closed"
    async with harness.client() as client:
        async with Session(client, ttl=5) as session:
            queue = WorkQueue(session, name, max_attempts=1)
            await queue.put(b"job")
        with pytest.raises(SessionClosedError):
            async with WorkQueue(Session(client, ttl=5), name).lease():
                pass
        async with Session(client, ttl=5) as session:
            queue = WorkQueue(session, name, max_attempts=1)
            assert (await queue.depth()).pending == 1, "the closed session claimed nothing"
            with pytest.raises(ClaimLostError):
                async with queue.lease(visibility_timeout=2):
                    await anyio.sleep(10)
            (letter,) = await queue.dead_letters()
            assert "visibility timeout" in letter.error
