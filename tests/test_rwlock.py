"""ReadWriteLock on both backends: shared reads, exclusive writes, fairness, fencing, lease loss, misuse."""

from __future__ import annotations

import random

import anyio
import pytest

from coordkit import Put, Range, ReadWriteLock, ReadWriteLockLostError, Session
from coordkit.testing import Harness

from .helpers import queue_length, sessions

pytestmark = pytest.mark.anyio


async def test_readers_share_and_writers_exclude(harness: Harness) -> None:
    name = harness.namespace.decode() + "rw"
    readers = writers = peak_readers = 0
    counter = harness.namespace + b"counter"
    tokens: list[int] = []

    async def worker(session: Session, seed: int) -> None:
        nonlocal readers, writers, peak_readers
        rng = random.Random(seed)
        rw = ReadWriteLock(session, name)
        for _ in range(6):
            if rng.random() < 0.4:
                async with rw.write() as held:
                    writers += 1
                    assert writers == 1 and readers == 0, "a writer holds alone"
                    tokens.append(held.token)
                    current = await session.backend.range(Range(counter))
                    value = int(current.kvs[0].value) if current.kvs else 0
                    await anyio.sleep(0.01)
                    fenced = await session.backend.txn([held.guard()], [Put(counter, str(value + 1).encode())])
                    assert fenced.succeeded
                    writers -= 1
            else:
                async with rw.read():
                    readers += 1
                    peak_readers = max(peak_readers, readers)
                    assert writers == 0, "no reader while a writer holds"
                    await anyio.sleep(0.01)
                    readers -= 1

    async with sessions(harness, 4) as group, anyio.create_task_group() as tg:
        for i, session in enumerate(group):
            tg.start_soon(worker, session, i)
            tg.start_soon(worker, session, 100 + i)  # two tasks of one process contend like two processes
    assert peak_readers >= 2, "readers held the lock together"
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), "write tokens strictly increase"
    async with harness.client() as backend:
        written = (await backend.range(Range(counter))).kvs
        assert int(written[0].value if written else 0) == len(tokens), "no lost update between writers"
        assert await queue_length(backend, name) == 0, "every key released"


async def test_a_waiting_writer_is_not_starved_by_later_readers(harness: Harness) -> None:
    name = harness.namespace.decode() + "fair"
    order: list[str] = []
    async with sessions(harness, 3) as (first, writer, late), anyio.create_task_group() as tg:
        reading = ReadWriteLock(first, name).read()
        await reading.acquire()

        async def write() -> None:
            async with ReadWriteLock(writer, name).write():
                order.append("writer")

        async def read_late() -> None:
            async with ReadWriteLock(late, name).read():
                order.append("late reader")

        tg.start_soon(write)
        async with harness.client() as observer:
            with anyio.fail_after(10):
                while await queue_length(observer, name) < 2:  # noqa: ASYNC110 (the writer's key is queued)
                    await anyio.sleep(0.01)
        tg.start_soon(read_late)
        with anyio.fail_after(10):
            async with harness.client() as observer:
                while await queue_length(observer, name) < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert order == [], "the late reader queues behind the waiting writer, even though a reader holds"
        await reading.release()
    assert order == ["writer", "late reader"]


async def test_lost_session_cancels_the_writer_and_admits_readers(harness: Harness) -> None:
    name = harness.namespace.decode() + "lost"
    async with harness.client() as client, harness.client() as other_client:
        async with Session(client, ttl=2) as session, Session(other_client, ttl=5) as other:
            entered = anyio.Event()
            with pytest.raises(ReadWriteLockLostError):
                async with ReadWriteLock(session, name).write():
                    entered.set()
                    harness.suspend_keepalives(client)
                    await anyio.sleep(30)
            assert session.lost
            harness.heal(client)
            with anyio.fail_after(10):
                async with ReadWriteLock(other, name).read() as held:
                    assert held.token > 0


async def test_no_upgrade_no_reentry_and_bad_names(harness: Harness) -> None:
    name = harness.namespace.decode() + "misuse"
    async with sessions(harness, 1) as (session,):
        rw = ReadWriteLock(session, name)
        async with rw.read():
            with pytest.raises(RuntimeError, match="cannot be upgraded"):
                async with rw.write():
                    pass
            with pytest.raises(RuntimeError, match="not re-entrant"):
                async with rw.read():
                    pass
        async with rw.write():
            with pytest.raises(RuntimeError):
                async with rw.read():
                    pass
        with pytest.raises(ValueError, match="empty"):
            ReadWriteLock(session, "")
        with pytest.raises(TypeError):
            ReadWriteLock(object(), name)  # type: ignore[arg-type]
        async with harness.client() as backend:
            assert await queue_length(backend, name) == 0


async def test_try_acquire_and_cancelled_waiter_leave_no_key(harness: Harness) -> None:
    name = harness.namespace.decode() + "try"
    async with sessions(harness, 2) as (a, b):
        writing = ReadWriteLock(a, name).write()
        assert await writing.try_acquire()
        assert not await ReadWriteLock(b, name).read().try_acquire()
        with anyio.move_on_after(0.2):
            async with ReadWriteLock(b, name).write():
                pytest.fail("a second writer while one holds")
        await writing.release()
        reading = ReadWriteLock(b, name).read()
        assert await reading.try_acquire()
        assert await ReadWriteLock(a, name).read().try_acquire(), "readers share"
        async with harness.client() as backend:
            assert await queue_length(backend, name) == 2, "the cancelled writer and the refused reader left no key"
