"""Reliable watch: a snapshot, then every change, with no gap and no duplicate across reconnects.

A backend watch breaks (network, server restart) and can start too late (compaction). `Watch` hides the
first: it resumes from the last delivered revision + 1, so the caller sees each revision exactly once. It makes
the second explicit: after a compaction it delivers a fresh `Snapshot` with ``resync=True``, which the
caller must take as the whole state (events between the two were lost for good and cannot be replayed).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import final

import anyio

from . import _telemetry
from ._backends.protocol import Backend
from ._backends.types import EventType, KeyValue, Range, WatchBatch, check_start_revision
from ._errors import CompactedError, UnavailableError
from ._retry import Backoff, retry_call


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole state of the watched key or prefix at ``revision``.

    Attributes:
        kvs: the keys, in key order.
        revision: the store revision the snapshot reflects; changes follow from ``revision + 1``.
        resync: True when this snapshot replaces the state after a compaction made the missed events
            unrecoverable; the first snapshot of a watch has False.
    """

    kvs: tuple[KeyValue, ...]
    revision: int
    resync: bool = False


@dataclass(frozen=True, slots=True)
class WatchStatistics:
    """Counters of a `Watch`.

    Attributes:
        revision: the revision of the state delivered so far (0 before the first item).
        reconnects: times the backend stream broke and was resumed.
        resyncs: snapshots delivered after a compaction (``Snapshot.resync``).
        batches: batches of events delivered.
    """

    revision: int
    reconnects: int
    resyncs: int
    batches: int


@final
class Watch:
    """Follow a key or a prefix reliably.

    ``async with Watch(backend, b"cfg/", prefix=True) as watch: async for item in watch: ...`` yields a
    `Snapshot` first, then one `WatchBatch` per revision that touched the range. With
    ``start_revision`` it yields batches from that revision on, without a first snapshot.

    Guarantees: revisions strictly increase; a break of the backend stream (UnavailableError) is retried with
    jittered backoff and resumes at the last delivered revision + 1, so nothing is lost or repeated; a
    compaction is reported as a ``Snapshot(resync=True)``. The iteration never ends by itself: cancel it, or
    leave the ``async with``. Errors other than unavailability and compaction propagate.

    Args:
        backend: the store.
        key: the key, or the prefix when ``prefix`` is true.
        start_revision: deliver changes from this revision on instead of starting with a snapshot.
    """

    def __init__(self, backend: Backend, key: bytes, *, prefix: bool = False, start_revision: int | None = None):
        if not isinstance(key, bytes):
            raise TypeError(f"keys are bytes, not {type(key).__name__}")
        if not key and not prefix:
            raise ValueError("the empty key is only allowed as a prefix")
        if start_revision is not None:
            check_start_revision(start_revision)
            if start_revision < 1:
                raise ValueError(f"start_revision must be an int >= 1, not {start_revision!r}")
        self._backend = backend
        self._key = key
        self._prefix = prefix
        self._start = start_revision
        self._revision = 0 if start_revision is None else start_revision - 1
        self._reconnects = 0
        self._resyncs = 0
        self._batches = 0
        self._items: AsyncGenerator[Snapshot | WatchBatch, None] | None = None

    @property
    def revision(self) -> int:
        """The revision of the state delivered so far (0 before the first item)."""
        return self._revision

    def statistics(self) -> WatchStatistics:
        """The revision delivered so far, and how often the watch reconnected and resynchronised."""
        return WatchStatistics(self._revision, self._reconnects, self._resyncs, self._batches)

    async def __aenter__(self) -> Watch:
        if self._items is not None:
            raise RuntimeError("a Watch can be entered once")
        self._items = self._follow()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._items is not None:
            await self._items.aclose()

    def __aiter__(self) -> AsyncGenerator[Snapshot | WatchBatch, None]:
        if self._items is None:
            raise RuntimeError("use 'async with Watch(...) as watch' before iterating")
        return self._items

    async def _snapshot(self, *, resync: bool) -> Snapshot:
        result = await retry_call(lambda: self._backend.range(Range(self._key, prefix=self._prefix)))
        if resync:
            self._resyncs += 1
            _telemetry.watch_resyncs.add(1, _telemetry.attributes(backend=self._backend.name))
        self._revision = result.revision
        return Snapshot(result.kvs, result.revision, resync)

    async def _follow(self) -> AsyncGenerator[Snapshot | WatchBatch, None]:
        backoff = Backoff()
        snapshot_due = self._start is None
        resync = False
        while True:
            try:
                # A first (or resync) snapshot is read after a watch "from now" is registered, so no change can
                # fall between the two; the watch's batches up to the snapshot's revision are then skipped.
                # Otherwise resume one revision early, at the last one delivered (its batch is skipped below): etcd
                # lets a watch start *at* the compact revision but without the deletions made at it (compaction
                # removes those tombstones), so only a start below the next revision we need is sure to be told,
                # by CompactedError, that some of it is gone.
                start = 0 if snapshot_due else max(self._revision, 1)
                async with self._backend.watch(self._key, prefix=self._prefix, start_revision=start) as batches:
                    if snapshot_due:
                        await anext(batches)  # the notice: registered
                        yield await self._snapshot(resync=resync)
                        snapshot_due = False
                    async for batch in batches:
                        if batch.revision <= self._revision or not batch.events:
                            continue  # covered by the snapshot, or already delivered before a reconnect
                        backoff.reset()
                        self._revision = batch.revision
                        self._batches += 1
                        yield batch
                raise UnavailableError("watch stream ended")
            except UnavailableError:
                self._reconnects += 1
                await anyio.sleep(backoff.next_delay())
            except CompactedError:
                snapshot_due = resync = True


def apply(state: dict[bytes, KeyValue], item: Snapshot | WatchBatch) -> dict[bytes, KeyValue]:
    """Bring a key -> KeyValue map up to date with one item of a `Watch`; returns the map to use from now on.

    A batch updates ``state`` in place; a snapshot replaces it (a new dict is returned).
    """
    if isinstance(item, Snapshot):
        return {kv.key: kv for kv in item.kvs}
    for event in item.events:
        if event.type is EventType.PUT:
            state[event.kv.key] = event.kv
        else:
            state.pop(event.kv.key, None)
    return state


async def wait_deleted(backend: Backend, key: bytes, *, revision: int) -> None:
    """Wait until ``key``, which existed at ``revision``, is deleted (returns at once if it already was).

    Only that incarnation counts: a key deleted and created again after ``revision`` was deleted. The watch is
    registered before the key is read, so a deletion cannot slip between the two; a broken stream is
    re-established with backoff, and a stream that fell behind a compaction at once (the read after the new
    notice finds a deletion it missed). Cancel it to stop waiting.
    """
    backoff = Backoff()
    while True:
        try:
            async with backend.watch(key, start_revision=0) as batches:
                notice = await anext(batches)  # every deletion from here on arrives on this stream
                if notice.revision > revision:  # the store moved on since the caller's read: look again
                    current = await backend.range(Range(key))
                    if not current.kvs or current.kvs[0].create_revision > revision:
                        return
                async for batch in batches:
                    if any(event.type is EventType.DELETE for event in batch.events):
                        return
            raise UnavailableError("watch stream ended")
        except CompactedError:
            pass  # a slow stream is cancelled when compaction passes it (etcd does so too): start again from now
        except UnavailableError:
            await anyio.sleep(backoff.next_delay())
