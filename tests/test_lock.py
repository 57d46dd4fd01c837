"""Lock and Semaphore, on both backends: exclusion, fencing, FIFO, lease loss, crashes, cancellation, misuse."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import anyio
import pytest

from coordkit import (
    Backend,
    Compare,
    Held,
    Lock,
    LockLostError,
    Op,
    Put,
    Range,
    RangeResult,
    Semaphore,
    Session,
    TxnResult,
    WatchBatch,
)
from coordkit.testing import Harness

from .helpers import StuckWrites, queue_length, sessions, wait_queue

pytestmark = pytest.mark.anyio


async def fenced_increment(backend: Backend, held: Held, counter: bytes) -> bool:
    current = await backend.range(Range(counter))
    value = int(current.kvs[0].value) if current.kvs else 0
    result = await backend.txn([held.guard()], [Put(counter, str(value + 1).encode())])
    return result.succeeded


async def test_mutual_exclusion_fencing_and_no_lost_update(harness: Harness) -> None:
    name = harness.namespace.decode() + "mutex"
    counter = harness.namespace + b"counter"
    inside = 0
    tokens: list[int] = []

    async def worker(session: Session, rounds: int) -> None:
        nonlocal inside
        lock = Lock(session, name)
        for _ in range(rounds):
            async with lock as held:
                inside += 1
                assert inside == 1, "two holders at once"
                tokens.append(held.token)
                assert await fenced_increment(session.backend, held, counter)
                await anyio.sleep(0.001)
                inside -= 1

    async with sessions(harness, 4) as group, anyio.create_task_group() as tg:
        for session in group:
            tg.start_soon(worker, session, 3)
            tg.start_soon(worker, session, 3)  # two tasks of one process contend like two processes
    async with harness.client() as backend:
        assert int((await backend.range(Range(counter))).kvs[0].value) == 24
        assert await queue_length(backend, name) == 0, "every key released"
    assert tokens == sorted(tokens) and len(set(tokens)) == 24, "tokens strictly increase across holders"


async def test_fifo_order_and_one_wakeup_per_release(harness: Harness) -> None:
    name = harness.namespace.decode() + "fifo"
    order: list[int] = []
    async with sessions(harness, 6) as group, anyio.create_task_group() as tg:
        first = Lock(group[0], name)
        await first.acquire()

        async def waiter(i: int) -> None:
            async with Lock(group[i], name):
                order.append(i)

        for i in range(1, 6):
            tg.start_soon(waiter, i)
            await wait_queue(group[0].backend, name, i + 1)  # arrival order is queue order
        await first.release()
    assert order == [1, 2, 3, 4, 5]


async def test_release_wakes_exactly_one_waiter(harness: Harness) -> None:
    """Each waiter watches only its predecessor: a release reaches one waiter, the others read nothing."""
    name = harness.namespace.decode() + "herd"
    reads: dict[int, int] = {}
    waits: dict[int, int] = {}

    class Counting:
        """Counts the reads each waiter makes after it started waiting."""

        def __init__(self, inner: Backend, index: int) -> None:
            self.inner, self.index, self.name = inner, index, inner.name

        def __getattr__(self, attribute: str) -> object:
            return getattr(self.inner, attribute)

        async def range(self, request: Range) -> RangeResult:
            reads[self.index] = reads.get(self.index, 0) + 1
            return await self.inner.range(request)

        async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
            reads[self.index] = reads.get(self.index, 0) + 1
            return await self.inner.txn(compare, success, failure)

        def watch(
            self, key: bytes, *, prefix: bool = False, start_revision: int
        ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
            waits[self.index] = waits.get(self.index, 0) + 1
            return self.inner.watch(key, prefix=prefix, start_revision=start_revision)

    async with AsyncExitStack() as stack:
        holder_client = await stack.enter_async_context(harness.client())
        holder = await stack.enter_async_context(Session(holder_client, ttl=5))
        lock = Lock(holder, name)
        await lock.acquire()
        acquired: list[int] = []
        waiters = []
        for i in range(4):
            client = await stack.enter_async_context(harness.client())
            waiters.append(await stack.enter_async_context(Session(Counting(client, i), ttl=5)))  # type: ignore[arg-type]

        async def wait(session: Session, i: int) -> None:
            async with Lock(session, name):
                acquired.append(i)

        async with anyio.create_task_group() as tg:
            for i, session in enumerate(waiters):
                tg.start_soon(wait, session, i)
                await wait_queue(holder_client, name, i + 2)
            await lock.release()
        # Each waiter watched once (its predecessor) and was woken once. Reads: one txn to enqueue, one to find
        # its predecessor, at most one to look at it again once the watch is registered (skipped when nothing
        # changed meanwhile), one after the wake-up (no predecessor left, own key still there), one to release.
        assert acquired == [0, 1, 2, 3]
        assert waits == {0: 1, 1: 1, 2: 1, 3: 1}, waits
        assert all(4 <= count <= 5 for count in reads.values()), reads


async def test_lease_loss_cancels_holder_before_anyone_else_acquires(harness: Harness) -> None:
    name = harness.namespace.decode() + "lost"
    counter = harness.namespace + b"fenced"
    async with harness.client() as stale_client, harness.client() as other_client:
        async with Session(stale_client, ttl=2) as stale, Session(other_client, ttl=5) as other:
            cancelled_at = math.inf
            acquired_at = math.inf
            stale_held: Held | None = None

            async def successor() -> None:
                nonlocal acquired_at
                async with Lock(other, name) as held:
                    acquired_at = anyio.current_time()
                    assert stale_held is not None and held.token > stale_held.token
                    assert await fenced_increment(other.backend, held, counter)

            async with anyio.create_task_group() as tg:
                with pytest.raises(LockLostError):
                    async with Lock(stale, name) as held:
                        stale_held = held
                        tg.start_soon(successor)
                        await wait_queue(other_client, name, 2)
                        harness.suspend_keepalives(stale_client)
                        try:
                            await anyio.sleep_forever()
                        finally:
                            cancelled_at = anyio.current_time()
            assert cancelled_at < acquired_at < math.inf, (cancelled_at, acquired_at)
            # The stale holder's fenced write fails: its key is gone.
            assert stale_held is not None
            assert not (await other_client.txn([stale_held.guard()], [Put(counter, b"stale")])).succeeded
            assert (await other_client.range(Range(counter))).kvs[0].value == b"1"
            harness.heal(stale_client)


async def test_crashed_holder_is_replaced_within_ttl(harness: Harness) -> None:
    """A holder whose process dies (no release, no revoke) blocks the lock for at most its TTL + 1 s."""
    name = harness.namespace.decode() + "crash"
    async with harness.client() as crashing, harness.client() as survivor_client:
        async with Session(survivor_client, ttl=5) as survivor:
            holder_ready = anyio.Event()

            async def holder() -> None:
                async with Session(crashing, ttl=2) as session:
                    await Lock(session, name).acquire()
                    holder_ready.set()
                    await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await holder_ready.wait()
                harness.partition(crashing)  # the process is gone: no keepalive, no release, no revoke
                started = anyio.current_time()
                with anyio.fail_after(2 + 1):
                    async with Lock(survivor, name):
                        waited = anyio.current_time() - started
                harness.heal(crashing)
                tg.cancel_scope.cancel()
            assert waited <= 2 + 1, waited


async def test_cancelled_and_timed_out_waiters_leave_no_key(harness: Harness) -> None:
    name = harness.namespace.decode() + "timeout"
    async with sessions(harness, 2) as (a, b):
        lock = Lock(a, name)
        await lock.acquire()
        with anyio.move_on_after(0.5) as scope:
            await Lock(b, name).acquire()
        assert scope.cancelled_caught
        assert await queue_length(a.backend, name) == 1
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.3):
                async with Lock(b, name):
                    pass
        assert await queue_length(a.backend, name) == 1
        assert not await Lock(b, name).try_acquire()
        assert await queue_length(a.backend, name) == 1, "a failed try_acquire leaves no key"
        await lock.release()
        other = Lock(b, name)
        assert await other.try_acquire()
        held = other.held
        assert held is not None and held.token > 0
        assert other.statistics().held and other.statistics().token == held.token
        await other.release()
        assert await queue_length(a.backend, name) == 0
        with pytest.raises(RuntimeError, match="not held"):
            await other.release()


async def test_not_reentrant_raises_instead_of_deadlocking(harness: Harness) -> None:
    name = harness.namespace.decode() + "reentrant"
    async with sessions(harness, 1) as (session,):
        async with Lock(session, name):
            with pytest.raises(RuntimeError, match=r"re-entrant|already"):
                await Lock(session, name).acquire()
            with anyio.fail_after(5), pytest.raises(RuntimeError):
                async with Lock(session, name):
                    pass
        assert await queue_length(session.backend, name) == 0


async def test_body_exception_releases(harness: Harness) -> None:
    name = harness.namespace.decode() + "raises"
    async with sessions(harness, 1) as (session,):
        with pytest.raises(ZeroDivisionError):
            async with Lock(session, name):
                1 / 0  # noqa: B018
        assert await queue_length(session.backend, name) == 0


@pytest.mark.parametrize("kind", ["memory"])
@pytest.mark.parametrize(
    ("name", "error"),
    [("", ValueError), ("bad\udcff", ValueError), ("nul\x00", ValueError), (b"bytes", TypeError), (None, TypeError)],
)
async def test_bad_names(harness: Harness, name: object, error: type[Exception]) -> None:
    async with sessions(harness, 1) as (session,):
        with pytest.raises(error):
            Lock(session, name)  # type: ignore[arg-type]
        with pytest.raises(error):
            Semaphore(session, name, limit=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["memory"])
async def test_bad_limits(harness: Harness) -> None:
    async with sessions(harness, 1) as (session,):
        for limit, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
            with pytest.raises(error):
                Semaphore(session, "s", limit=limit)  # type: ignore[arg-type]


async def test_semaphore_admits_limit_holders_fifo(harness: Harness) -> None:
    name = harness.namespace.decode() + "sem"
    inside: set[int] = set()
    order: list[int] = []
    tokens: list[int] = []
    entered = {i: anyio.Event() for i in range(2, 5)}
    leave = {i: anyio.Event() for i in range(2, 5)}
    async with sessions(harness, 5) as group:
        holders = [Semaphore(group[i], name, limit=2) for i in range(2)]
        for sem in holders:
            await sem.acquire()
        async with anyio.create_task_group() as tg:

            async def waiter(i: int) -> None:
                async with Semaphore(group[i], name, limit=2) as permit:
                    inside.add(i)
                    assert len(inside) <= 2, f"more than 2 holders: {inside}"
                    order.append(i)
                    tokens.append(permit.token)
                    entered[i].set()
                    await leave[i].wait()
                    inside.discard(i)

            for i in range(2, 5):
                tg.start_soon(waiter, i)
                await wait_queue(group[0].backend, name, i + 1)
            assert order == [], "no permit while two are held"
            await holders[1].release()
            await entered[2].wait()
            await holders[0].release()
            await entered[3].wait()
            assert not entered[4].is_set(), "a third holder while 2 and 3 hold"
            leave[2].set()
            await entered[4].wait()
            leave[3].set()
            leave[4].set()
        assert order == [2, 3, 4]
        assert tokens == sorted(tokens)
        assert await queue_length(group[0].backend, name) == 0


async def test_semaphore_limit_mismatch_is_refused(harness: Harness) -> None:
    name = harness.namespace.decode() + "mismatch"
    async with sessions(harness, 2) as (a, b):
        async with Semaphore(a, name, limit=2):
            with pytest.raises(ValueError, match="limit"):
                await Semaphore(b, name, limit=3).acquire()
            assert await queue_length(a.backend, name) == 1, "the refused contender left no key"


async def test_semaphore_lease_loss(harness: Harness) -> None:
    from coordkit import PermitLostError

    name = harness.namespace.decode() + "semlost"
    async with harness.client() as client, Session(client, ttl=2) as session:
        with pytest.raises(PermitLostError):
            async with Semaphore(session, name, limit=3):
                harness.suspend_keepalives(client)
                await anyio.sleep_forever()
        harness.heal(client)


async def test_body_cancelled_from_outside_still_releases(harness: Harness) -> None:
    name = harness.namespace.decode() + "outside"
    async with sessions(harness, 2) as (a, b):
        with anyio.move_on_after(0.3) as scope:
            async with Lock(a, name):
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert await queue_length(a.backend, name) == 0, "the holder's key was deleted despite the cancellation"
        assert await Lock(b, name).try_acquire()


async def test_shared_object_try_acquire_never_waits_and_release_from_another_task(harness: Harness) -> None:
    name = harness.namespace.decode() + "shared"
    async with sessions(harness, 1) as (session,):
        lock = Lock(session, name)
        holding = anyio.Event()
        results: list[bool] = []

        async def other_task() -> None:
            await holding.wait()
            results.append(await lock.try_acquire())  # this object is busy in another task: False at once
            await lock.release()  # a release may come from another task than the acquiring one

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            await lock.acquire()
            holding.set()
        assert results == [False]
        assert lock.held is None and await queue_length(session.backend, name) == 0
        waiting = anyio.Event()

        async def waiter() -> None:
            waiting.set()
            async with lock:
                pass

        async with anyio.create_task_group() as tg:
            await lock.acquire()
            tg.start_soon(waiter)
            await waiting.wait()  # the waiter ran on until it blocked in the object's turn queue
            assert lock.statistics().waiters == 1
            await lock.release()
        assert lock.statistics() == lock.statistics().__class__(False, None, 0)


async def test_lost_error_names_the_session(harness: Harness) -> None:
    name = harness.namespace.decode() + "named"
    async with harness.client() as client, Session(client, ttl=2) as session:
        with pytest.raises(LockLostError) as caught:
            async with Lock(session, name):
                harness.suspend_keepalives(client)
                await anyio.sleep_forever()
        assert caught.value.session is session
        harness.heal(client)


async def test_release_stuck_past_the_deadline_still_deletes_while_the_session_lives(harness: Harness) -> None:
    """Regression: a release whose delete outlasted the session's deadline *as it was when the release began*
    gave up, although keepalives had moved the deadline on. It returned with the key still in the store: the
    lock stayed held (by nobody) for as long as the session lived, and the next acquire in that session reused
    the key and its token. Seen on a 3-member etcd cluster: a write sent to a follower just as the leader was
    killed waits for etcd's request timeout (~5 s) while keepalives reach the new leader.
    """
    name = harness.namespace.decode() + "stuck-release"
    async with harness.client() as inner, Session(StuckWrites(inner), ttl=3) as session:
        writes = session.backend
        assert isinstance(writes, StuckWrites)
        lock = Lock(session, name)
        first = await lock.acquire()
        released = anyio.Event()

        async def release() -> None:
            await lock.release()
            released.set()

        async with anyio.create_task_group() as tg:
            writes.stick()
            deadline_at_release = session.deadline
            tg.start_soon(release)
            await anyio.sleep(deadline_at_release - anyio.current_time() + 1)
            assert not session.lost, "keepalives go through: the session is valid"
            assert not released.is_set(), "the key is still there: the release must not have given up"
            writes.unstick()
        assert await queue_length(inner, name) == 0
        async with lock as again:
            assert again.token > first.token
