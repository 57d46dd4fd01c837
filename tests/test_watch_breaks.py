"""Watches under broken streams, concurrent writers and compaction, judged by coordkit.testing's watch validators.

One reader client follows a prefix three ways at once: a raw `Backend.watch` resumed by start revision after every
break, coordkit's reliable `Watch`, and a `ConfigView` (its shared feed). Writers meanwhile put keys, write several
keys in one transaction, delete prefixes and let leases expire or revoke them, also outside the prefix; a breaker
breaks the reader's watch streams (`Harness.break_watches`: MemoryBackend's fault hook, FaultyBackend on etcd);
some schedules also compact, after the ground truth has caught up. The ground truth is a second watch on a client
without faults, from before the first write. Then every stream is checked: no gap, no duplicate, every revision in
one batch, resumed where asked, and a compaction that passed a lagging watch announced (CompactedError on the raw
watch, ``Snapshot(resync=True)`` from `Watch`, ``resync=True`` changes from the view), never a silent skip.

``COORDKIT_WATCH_BREAKS`` (default 1200) is the number of breaks spread over the memory schedules (about 300
each), ``COORDKIT_WATCH_BREAKS_ETCD`` (default 200) the number on etcd (200 per schedule); ``nox -s chaos``
raises both, to 40,000 and 2,000.
"""

from __future__ import annotations

import bisect
import json
import os
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pytest

from coordkit import (
    Backend,
    CompactedError,
    ConfigChange,
    ConfigView,
    Delete,
    Event,
    EventType,
    KeyValue,
    MemoryBackend,
    Put,
    Range,
    Snapshot,
    UnavailableError,
    Watch,
    WatchBatch,
)
from coordkit._watch import apply
from coordkit.testing import Harness, check_resumable, check_watch, check_watch_items

pytestmark = [pytest.mark.anyio, pytest.mark.chaos]

MEMORY_BREAKS = int(os.environ.get("COORDKIT_WATCH_BREAKS", "1200"))
ETCD_BREAKS = int(os.environ.get("COORDKIT_WATCH_BREAKS_ETCD", "200"))
MEMORY_SCHEDULES = max(4, MEMORY_BREAKS // 300)  # test items the memory breaks are spread over; odd seeds compact
ETCD_SCHEDULES = max(1, ETCD_BREAKS // 200)


class Progress:
    """The highest revision a follower has delivered, and a way to wait for one."""

    def __init__(self) -> None:
        self.revision = 0
        self._changed = anyio.Event()

    def advance(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        self._changed.set()
        self._changed = anyio.Event()

    async def reach(self, revision: int) -> None:
        while self.revision < revision:
            await self._changed.wait()


@dataclass
class Piece:
    """What one raw watch stream delivered before it broke."""

    start: int
    batches: list[WatchBatch] = field(default_factory=list)
    compacted: int = 0  # the compact revision its CompactedError announced


@dataclass
class Run:
    prefix: str
    initial: Snapshot  # the prefix before the followers started; the reference follows from its revision + 1
    reference: list[WatchBatch] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    items: list[Snapshot | WatchBatch] = field(default_factory=list)
    view_start: tuple[dict[str, Any], int] = ({}, 0)
    changes: list[ConfigChange[Any]] = field(default_factory=list)
    breaks: int = 0  # break_watches calls
    paced: int = 0  # of which after every follower had caught up: each of these breaks an open stream of each
    compactions: int = 0
    raw_breaks: int = 0
    raw_compacted: int = 0
    watch_reconnects: int = 0
    watch_resyncs: int = 0
    view_reconnects: int = 0
    view_streams: int = 0  # watches the view's feed opened (more than one: reopened after a reader left mid-read)
    flickers: int = 0  # short-lived views that shared the feed
    final: dict[bytes, KeyValue] = field(default_factory=dict)
    final_view: dict[str, Any] = field(default_factory=dict)
    writes: list[tuple[int, list[Put]]] = field(default_factory=list)  # puts under the prefix, by revision
    leases: list[int] = field(default_factory=list)  # granted and not revoked by the writers
    stuck: list[str] = field(default_factory=list)  # why the run stopped early, if it did


@dataclass
class Scene:
    """A run in progress: the clients, the prefix, the followers' progress."""

    run: Run
    writer: Backend
    reader: Backend  # every follower under test reads through this client: faults go here
    ns: bytes
    progress: dict[str, Progress]
    release: anyio.Event = field(default_factory=anyio.Event)  # the first view of the prefix leaves

    async def compact(self, harness: Harness) -> None:
        """Compact the store at a fresh write, once the ground truth (which runs without faults) has it."""
        marker = (await self.writer.txn([], [Put(self.ns + b"marker", b"-1")])).revision
        with anyio.fail_after(30):
            await self.progress["truth"].reach(marker)
        await harness.compact(marker)
        self.run.compactions += 1


@asynccontextmanager
async def followed(harness: Harness) -> AsyncIterator[Scene]:
    """The ground truth and the three followers run for the duration of the block, then catch up and stop."""
    ns = harness.namespace + b"wb/"
    async with harness.client() as writer, harness.client() as reader, harness.client() as truth:
        await writer.txn([], [Put(ns + b"k0", b"0"), Put(ns + b"d/0", b"0")])
        first = await truth.range(Range(ns, prefix=True))
        run = Run(ns.decode(), Snapshot(first.kvs, first.revision))
        progress = {name: Progress() for name in ("truth", "raw", "watch", "view")}
        async with anyio.create_task_group() as followers:
            followers.start_soon(follow_truth, truth, ns, run, progress["truth"])
            followers.start_soon(follow_raw, reader, ns, run, progress["raw"])
            followers.start_soon(follow_watch, reader, ns, run, progress["watch"])
            # A first view of the prefix reads the store for every later one (the shared feed): when it leaves,
            # mid-read, the feed must reopen its watch for the followed view without a gap.
            scene = Scene(run, writer, reader, ns, progress)
            await followers.start(hold_view, scene)
            view_ready = anyio.Event()
            followers.start_soon(follow_view, reader, ns, run, progress["view"], view_ready)
            await view_ready.wait()
            yield scene
            scene.release.set()
            for lease_id in run.leases:  # nothing may change after the last write: no lease may expire later
                await writer.revoke(lease_id)
            last = (await writer.txn([], [Put(ns + b"marker", b"1")])).revision
            await caught_up(progress, last, progress, run)
            followers.cancel_scope.cancel()
        final = await writer.range(Range(ns, prefix=True))
        # Nothing under the prefix changed after the last write (no lease expired later). Judged on the prefix: the
        # store's own revision may move, other tests' leases expiring in the same etcd.
        at_last = {kv.key: kv for kv in run.initial.kvs}
        for batch in run.reference:
            if batch.revision <= last:
                at_last = apply(at_last, batch)
        assert {kv.key: kv for kv in final.kvs} == at_last or run.stuck
        run.final = {kv.key: kv for kv in final.kvs}


async def run_schedule(harness: Harness, *, breaks: int, seed: int, compact: float, gap: float, pace: float) -> Run:
    """Followers on one client, writers on another, ``breaks`` breaks about every ``gap`` seconds.

    After a break the store is compacted with probability ``compact``. With probability ``pace`` a break first
    waits until every follower has caught up with a fresh write (so that it hits open streams); the others may
    hit a follower that is still reconnecting or behind.
    """
    rng = random.Random(seed)
    async with followed(harness) as scene:
        run, writer, ns = scene.run, scene.writer, scene.ns
        async with anyio.create_task_group() as work:
            stop = anyio.Event()
            for w in range(2):
                work.start_soon(write, writer, ns, harness.namespace, random.Random(seed * 10 + w), stop, gap, run)
            work.start_soon(flicker, scene, random.Random(seed), stop, gap)
            for n in range(breaks):
                if rng.random() < pace:
                    run.paced += 1
                    # Let every follower reconnect and catch up first, so that this break lands on open streams.
                    marker = (await writer.txn([], [Put(ns + b"marker", b"%d" % n)])).revision
                    if not await caught_up(scene.progress, marker, ("raw", "watch", "view"), run):
                        break
                await anyio.sleep(rng.uniform(0, 2 * gap))
                harness.break_watches(scene.reader)
                run.breaks += 1
                if n == breaks // 2:
                    scene.release.set()
                if rng.random() < compact:
                    if isinstance(scene.reader, MemoryBackend):
                        # a slow link: the reader's followers reconnect late, so a compaction often passes them
                        scene.reader.faults.set_latency(rng.choice((0, 0, 0.2, 1.0)))
                    await scene.compact(harness)
            stop.set()
    return run


async def hold_view(scene: Scene, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    async with ConfigView(scene.reader, scene.ns.decode()):
        task_status.started()
        await scene.release.wait()


async def flicker(scene: Scene, rng: random.Random, stop: anyio.Event, gap: float) -> None:
    """Short-lived views of the same prefix on the reader: they share the followed view's feed, and when one leaves
    while it is the one reading the store for both, the feed reopens its watch (which must lose nothing)."""
    while not stop.is_set():
        async with ConfigView(scene.reader, scene.ns.decode()):
            await anyio.sleep(rng.uniform(0, 4 * gap))
        scene.run.flickers += 1
        await anyio.lowlevel.checkpoint()


async def caught_up(progress: dict[str, Progress], revision: int, names: Iterable[str], run: Run) -> bool:
    """Wait until the followers ``names`` delivered ``revision``; after 30 s, note which did not in ``run.stuck``.

    A follower that never gets there has lost something: the run stops, so that `check_run` names what.
    """
    with anyio.move_on_after(30):
        for name in names:
            await progress[name].reach(revision)
        return True
    run.stuck = [f"{name} at {progress[name].revision}" for name in names if progress[name].revision < revision]
    run.stuck.insert(0, f"followers never delivered revision {revision}:")
    return False


async def follow_truth(backend: Backend, ns: bytes, run: Run, progress: Progress) -> None:
    async with backend.watch(ns, prefix=True, start_revision=run.initial.revision + 1) as batches:
        async for batch in batches:
            run.reference.append(batch)
            progress.advance(batch.revision)


async def follow_raw(backend: Backend, ns: bytes, run: Run, progress: Progress) -> None:
    """A raw watch resumed by start revision: after a break from the next revision, after a compaction from it."""
    start = run.initial.revision + 1
    while True:
        piece = Piece(start)
        run.pieces.append(piece)
        try:
            async with backend.watch(ns, prefix=True, start_revision=start) as batches:
                async for batch in batches:
                    piece.batches.append(batch)
                    start = batch.revision + 1
                    progress.advance(batch.revision)
            raise AssertionError("a watch stream ended by itself")
        except UnavailableError:
            run.raw_breaks += 1
        except CompactedError as exc:
            run.raw_compacted += 1
            piece.compacted = exc.compact_revision
            assert exc.compact_revision > start, "a compaction announced to a watch that was not behind it"
            start = exc.compact_revision
        await anyio.lowlevel.checkpoint()


async def follow_watch(backend: Backend, ns: bytes, run: Run, progress: Progress) -> None:
    watch = Watch(backend, ns, prefix=True)
    try:
        async with watch:
            async for item in watch:
                run.items.append(item)
                progress.advance(item.revision)
    finally:
        stats = watch.statistics()
        run.watch_reconnects, run.watch_resyncs = stats.reconnects, stats.resyncs


async def follow_view(backend: Backend, ns: bytes, run: Run, progress: Progress, ready: anyio.Event) -> None:
    view: ConfigView[Any] = ConfigView(backend, ns.decode())
    async with view:
        changes = view.changes()
        run.view_start = (dict(view.snapshot()), view.revision)
        ready.set()
        assert view._subscription is not None
        feed = view._subscription.feed
        watches: set[Watch] = set()  # ConfigView does not count its feed's reconnects: its feed's Watches do
        try:
            async for change in changes:
                run.changes.append(change)
                progress.advance(change.revision)
                if feed._watch is not None:
                    watches.add(feed._watch)
        finally:
            run.final_view = dict(view.snapshot())
            run.view_reconnects = sum(w.statistics().reconnects for w in watches)
            run.view_streams = view.statistics().watch_streams


async def write(
    writer: Backend, ns: bytes, outside: bytes, rng: random.Random, stop: anyio.Event, gap: float, run: Run
) -> None:
    """Puts, multi-key transactions, prefix deletes, lease expiries and revokes, and writes outside the prefix.

    Every put under the prefix is recorded with the revision the store answered, to check the ground truth with.
    """
    counter = 0
    while not stop.is_set():
        counter += 1
        value = str(counter).encode()  # JSON, for the view
        kind = rng.choices(("put", "txn", "delete prefix", "lease", "outside"), (4, 3, 1, 1, 1))[0]
        puts: list[Put] = []
        if kind == "put":
            puts = [Put(ns + b"k%d" % rng.randrange(6), value)]
        elif kind == "txn":
            keys = rng.sample([b"k0", b"k1", b"k2", b"d/1", b"d/2", b"d/3"], rng.randint(2, 4))
            puts = [Put(ns + key, value) for key in keys]
        elif kind == "delete prefix":
            await writer.txn([], [Delete(ns + b"d/", prefix=True)])
        elif kind == "lease":
            lease = await writer.grant(1 if writer.name == "memory" else 2)
            run.leases.append(lease.id)
            puts = [Put(ns + b"l/%d" % i, value, lease.id) for i in range(rng.randint(1, 3))]
        else:
            await writer.txn([], [Put(outside + b"other", value)])
        if puts:
            run.writes.append(((await writer.txn([], puts)).revision, puts))
        if kind == "lease" and rng.random() < 0.5:
            lease_id = puts[0].lease
            run.leases.remove(lease_id)
            await writer.revoke(lease_id)  # else it expires by itself: its keys go at one revision
        await anyio.sleep(rng.uniform(0, 2 * gap))


# -- checking a run ---------------------------------------------------------------------------------------------


def check_run(run: Run) -> None:
    reference = run.reference
    # The ground truth is a watch too: it must have every put the writers were told was applied.
    by_revision = {b.revision: b for b in reference}
    for revision, puts in run.writes:
        events = by_revision[revision].events if revision in by_revision else ()
        got = [(e.type, e.kv.key, e.kv.value, e.kv.lease) for e in events]
        assert got == [(EventType.PUT, p.key, p.value, p.lease) for p in puts], f"revision {revision}: {got}"
    revisions = [b.revision for b in reference]
    # The raw watch: between compactions one stream, resumed after every break; each piece starts where asked.
    era: list[WatchBatch] = []
    era_start = run.initial.revision + 1
    for piece in run.pieces:
        # (only the reference's first batch at or after the start matters: pass just that, it is much cheaper)
        first = bisect.bisect_left(revisions, piece.start)
        check_resumable(piece.batches, reference[first : first + 1], start_revision=piece.start)
        era.extend(piece.batches)
        if piece.compacted:
            check_watch(era, reference, start_revision=era_start)
            era, era_start = [], piece.compacted
    check_watch(era, reference, start_revision=era_start)
    # The reliable Watch: a snapshot, then every change; a skip only through an announced resync.
    check_watch_items(run.items, reference, initial=run.initial)
    assert sum(isinstance(i, Snapshot) and i.resync for i in run.items) == run.watch_resyncs
    if not run.compactions:
        assert run.watch_resyncs == 0 and run.raw_compacted == 0
    # The view: its changes, read as a stream of (key, decoded value) events, the same way.
    check_view(run)
    assert not run.stuck, " ".join(run.stuck)
    assert run.final_view == {k.decode().removeprefix(run.prefix): json.loads(kv.value) for k, kv in run.final.items()}


def _project(key: str, value: object, revision: int, *, deleted: bool) -> Event:
    """An event reduced to what a ConfigView reports: the relative key and the decoded value."""
    kv = KeyValue(key.encode(), b"" if deleted else repr(value).encode(), 0, revision, 0)
    return Event(EventType.DELETE if deleted else EventType.PUT, kv)


def check_view(run: Run) -> None:
    prefix = run.prefix

    def relative(key: bytes) -> str:
        return key.decode().removeprefix(prefix)

    projected = [
        WatchBatch(
            b.revision,
            tuple(
                _project(
                    relative(e.kv.key),
                    json.loads(e.kv.value or b"null"),
                    b.revision,
                    deleted=e.type is EventType.DELETE,
                )
                for e in b.events
            ),
        )
        for b in run.reference
    ]
    state, revision = run.view_start
    state = dict(state)
    assert state == store_state(run, revision)
    era: list[WatchBatch] = []
    era_start = revision + 1
    changes = run.changes
    i = 0
    while i < len(changes):
        j = i
        while j < len(changes) and (changes[j].revision, changes[j].resync) == (changes[i].revision, changes[i].resync):
            j += 1
        group = changes[i:j]
        for c in group:
            if c.deleted:
                state.pop(c.key, None)
            else:
                state[c.key] = c.value
        if group[0].resync:
            # Changes found by a resync: the view's state must then be the store's at that revision.
            check_watch(era, projected, start_revision=era_start)
            expected = store_state(run, group[0].revision)
            if j < len(changes):
                assert state == expected, f"after the resync at {group[0].revision} the view is not the store"
            else:  # the run stopped as soon as this group's first change was read: the rest was not collected
                assert all(expected.get(c.key) == c.value for c in group), f"resync at {group[0].revision}"
            era, era_start = [], group[0].revision + 1
        else:
            era.append(
                WatchBatch(
                    group[0].revision, tuple(_project(c.key, c.value, c.revision, deleted=c.deleted) for c in group)
                )
            )
        i = j
    check_watch(era, projected, start_revision=era_start)


def store_state(run: Run, revision: int) -> dict[str, Any]:
    state = {kv.key: kv for kv in run.initial.kvs}
    for batch in run.reference:
        if batch.revision > revision:
            break
        for e in batch.events:
            if e.type is EventType.PUT:
                state[e.kv.key] = e.kv
            else:
                state.pop(e.kv.key, None)
    prefix = run.prefix
    return {k.decode().removeprefix(prefix): json.loads(kv.value) for k, kv in state.items()}


def report(kind: str, run: Run) -> str:
    return (
        f"{kind}: {run.breaks} breaks injected, {run.compactions} compactions, {len(run.reference)} revisions; "
        f"survived: raw watch {run.raw_breaks} (compacted {run.raw_compacted}), Watch {run.watch_reconnects} "
        f"(resyncs {run.watch_resyncs}), ConfigView feed {run.view_reconnects} (streams opened {run.view_streams}, "
        f"{run.flickers} views came and went)"
    )


async def test_compaction_behind_a_watch_is_announced(harness: Harness) -> None:
    """The reader is cut off while the store changes and is compacted past it, three times: on its return the raw
    watch gets CompactedError, Watch a ``Snapshot(resync=True)`` and the view ``resync=True`` changes, each showing
    the store's state; nothing is skipped silently (check_run)."""
    async with followed(harness) as scene:
        run, writer, ns = scene.run, scene.writer, scene.ns
        for n in range(3):
            caught = (await writer.txn([], [Put(ns + b"k1", b"%d" % n)])).revision
            assert await caught_up(scene.progress, caught, scene.progress, run), run.stuck
            harness.partition(scene.reader)
            await writer.txn([], [Put(ns + b"d/1", b"1"), Put(ns + b"d/2", b"2"), Put(ns + b"k2", b"3")])
            await writer.txn([], [Delete(ns + b"d/", prefix=True)])
            lease = await writer.grant(5)
            await writer.txn([], [Put(ns + b"l/1", b"4", lease.id), Put(ns + b"l/2", b"5", lease.id)])
            await harness.expire_lease(lease.id)
            await scene.compact(harness)
            harness.heal(scene.reader)
            scene.release.set()
    check_run(run)
    assert (run.compactions, run.raw_compacted, run.watch_resyncs) == (3, 3, 3), report(run.prefix, run)
    assert len({c.revision for c in run.changes if c.resync}) == 3, "the view announced each resync"


def assert_survived(run: Run, kind: str) -> None:
    """Every follower went through at least the breaks that surely hit an open stream of it."""
    assert min(run.raw_breaks, run.watch_reconnects, run.view_reconnects) >= run.paced > 0, report(kind, run)


@pytest.mark.parametrize("kind", ["memory"])
@pytest.mark.parametrize("seed", range(MEMORY_SCHEDULES))
async def test_memory_watches_survive_breaks(harness: Harness, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    run = await run_schedule(
        harness, breaks=MEMORY_BREAKS // MEMORY_SCHEDULES, seed=seed, compact=0.05 * (seed % 2), gap=0.1, pace=0.5
    )
    check_run(run)
    assert_survived(run, "memory")
    with capsys.disabled():
        print("\n" + report("memory", run))


@pytest.mark.parametrize("kind", ["etcd"])
@pytest.mark.parametrize("seed", range(ETCD_SCHEDULES))
async def test_etcd_watches_survive_breaks(harness: Harness, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    breaks = ETCD_BREAKS // ETCD_SCHEDULES
    run = await run_schedule(harness, breaks=breaks, seed=seed, compact=0.03, gap=0.01, pace=0.2)
    check_run(run)
    assert_survived(run, "etcd")
    with capsys.disabled():
        print("\n" + report("etcd", run))
