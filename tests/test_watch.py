"""Reliable watch: no gap and no duplicate across broken streams; explicit resync after compaction."""

from __future__ import annotations

import anyio
import pytest

from coordkit import Delete, MemoryBackend, Put, Range, Snapshot, Watch, WatchBatch, wait_deleted
from coordkit.testing import Harness

pytestmark = pytest.mark.anyio


async def test_snapshot_then_every_change_across_broken_streams(harness: Harness) -> None:
    ns = harness.namespace + b"cfg/"
    async with harness.client() as writer, harness.client() as reader:
        await writer.txn([], [Put(ns + b"seq", b"0"), Put(ns + b"static", b"s")])
        seen: list[int] = []
        async with Watch(reader, ns, prefix=True) as watch:
            items = aiter(watch)
            first = await anext(items)
            assert isinstance(first, Snapshot) and not first.resync
            assert {kv.key: kv.value for kv in first.kvs} == {ns + b"seq": b"0", ns + b"static": b"s"}
            for i in range(1, 41):
                await writer.txn([], [Put(ns + b"seq", str(i).encode())])
                if i % 10 == 5:
                    # Catch up, so the stream is open, then break it: the next writes land while it is down.
                    with anyio.fail_after(30):
                        while len(seen) < i:
                            item = await anext(items)
                            assert isinstance(item, WatchBatch)
                            seen.extend(int(e.kv.value) for e in item.events)
                    harness.break_watches(reader)
            with anyio.fail_after(30):
                while len(seen) < 40:
                    item = await anext(items)
                    assert isinstance(item, WatchBatch)
                    seen.extend(int(e.kv.value) for e in item.events)
            assert watch.revision == (await writer.range(Range(ns, prefix=True))).revision
        assert seen == list(range(1, 41)), "no gap, no duplicate"
        assert watch.statistics().reconnects == 4


async def test_compaction_gives_explicit_resync(harness: Harness) -> None:
    ns = harness.namespace + b"cmp/"
    async with harness.client() as b:
        first = (await b.txn([], [Put(ns + b"a", b"1")])).revision
        await b.txn([], [Put(ns + b"a", b"2"), Put(ns + b"b", b"x")])
        current = (await b.txn([], [Delete(ns + b"b")])).revision
        await harness.compact(current)
        async with Watch(b, ns, prefix=True, start_revision=first) as watch:
            items = aiter(watch)
            with anyio.fail_after(10):
                resync = await anext(items)
            assert isinstance(resync, Snapshot) and resync.resync and resync.revision >= current
            assert [(kv.key, kv.value) for kv in resync.kvs] == [(ns + b"a", b"2")]
            later = (await b.txn([], [Put(ns + b"c", b"3")])).revision
            with anyio.fail_after(10):
                batch = await anext(items)
            assert isinstance(batch, WatchBatch) and batch.revision == later
        assert watch.statistics().resyncs == 1


async def test_a_deletion_at_the_compact_revision_is_never_missed(harness: Harness) -> None:
    """etcd lets a watch start *at* the compact revision but drops the deletions made at it (compaction removes
    their tombstones; etcd-io/etcd#18089, fixed in 2024 patch releases, present in 3.5.1), with no CompactedError.
    Watch resumed at last + 1 and so could miss a deletion silently (found by the differential test once
    MemoryBackend did the same; chaos schedule 110 then broke). It resumes one revision early now, so the
    compaction is reported and the state resynchronised."""
    ns = harness.namespace + b"tomb/"
    async with harness.client() as b:
        await b.txn([], [Put(ns + b"a", b"1"), Put(ns + b"b", b"2")])
        async with Watch(b, ns, prefix=True) as watch:
            items = aiter(watch)
            with anyio.fail_after(10):
                assert isinstance(await anext(items), Snapshot)
            delivered = (await b.txn([], [Delete(ns + b"a")])).revision
            with anyio.fail_after(10):
                batch = await anext(items)
            assert isinstance(batch, WatchBatch) and batch.revision == delivered
            harness.break_watches(b)  # the stream breaks; while it is down, b is deleted and that compacted
            gone = (await b.txn([], [Delete(ns + b"b")])).revision
            assert gone == delivered + 1
            await harness.compact(gone)
            later = (await b.txn([], [Put(ns + b"c", b"3")])).revision
            with anyio.fail_after(30):
                item = await anext(items)
            assert isinstance(item, Snapshot) and item.resync, f"the deletion of b was skipped: {item}"
            assert [kv.key for kv in item.kvs] == [ns + b"c"] and item.revision >= later
        # a start at the compact revision itself is reported too (its deletions are gone)
        async with Watch(b, ns, prefix=True, start_revision=gone) as watch:
            with anyio.fail_after(10):
                item = await anext(aiter(watch))
            assert isinstance(item, Snapshot) and item.resync


async def test_wait_deleted(harness: Harness) -> None:
    key = harness.namespace + b"pred"
    async with harness.client() as b, harness.client() as other:
        created = (await b.txn([], [Put(key, b"")])).revision
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def waiter() -> None:
                await wait_deleted(other, key, revision=created)
                done.set()

            tg.start_soon(waiter)
            await b.txn([], [Put(key, b"still here")])
            with anyio.move_on_after(0.3):
                await done.wait()
            assert not done.is_set(), "an update is not a deletion"
            await b.txn([], [Delete(key)])
            with anyio.fail_after(10):
                await done.wait()
        # Already deleted before the wait began (seen in history), and after compaction too.
        await wait_deleted(other, key, revision=created)
        current = (await b.txn([], [Put(key, b"reborn")])).revision
        await harness.compact(current)
        with anyio.fail_after(10):
            await wait_deleted(other, key, revision=created)


async def test_watch_argument_errors(harness: Harness) -> None:
    async with harness.client() as b:
        with pytest.raises(ValueError, match="empty key"):
            Watch(b, b"")
        with pytest.raises(ValueError, match="start_revision"):
            Watch(b, b"k", start_revision=0)
        with pytest.raises(TypeError):
            Watch(b, "k")  # type: ignore[arg-type]
        watch = Watch(b, b"k")
        with pytest.raises(RuntimeError):
            aiter(watch)


@pytest.mark.parametrize("kind", ["memory"])  # makes a watch lag on purpose: latency is a MemoryBackend fault
async def test_wait_deleted_starts_over_when_its_stream_falls_behind_a_compaction(harness: Harness) -> None:
    """A watch that falls behind a compaction fails with CompactedError (etcd cancels a slow watcher so too):
    wait_deleted looks again from now instead of raising, and still sees the deletion (found by test_chaos)."""
    key, other = harness.namespace + b"waited", harness.namespace + b"other"
    async with harness.client() as waiter, harness.client() as writer:
        assert isinstance(waiter, MemoryBackend)
        created = (await writer.txn([], [Put(key, b"")])).revision
        await writer.txn([], [Put(other, b"0")])  # the store moves on: the waiter reads the key after its notice
        deleted = anyio.Event()

        async def wait() -> None:
            await wait_deleted(waiter, key, revision=created)
            deleted.set()

        async with anyio.create_task_group() as tg:
            waiter.faults.set_latency(1)
            tg.start_soon(wait)
            await anyio.sleep(1.5)  # registered at 1 s, its read of the key answers at 2 s
            for value in (b"1", b"2"):
                latest = (await writer.txn([], [Put(other, value)])).revision
            await harness.compact(latest)  # the stream resumes after the read, behind this
            await anyio.sleep(2)
            assert not deleted.is_set()
            await writer.txn([], [Delete(key)])
            with anyio.fail_after(10):
                await deleted.wait()
