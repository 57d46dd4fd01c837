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
from ._backend import Backend
from ._errors import CompactedError, UnavailableError
from ._retry import Backoff, retry_unavailable
from ._types import EventType, KeyValue, Range, WatchBatch


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
    """Counters of a `Watch`."""

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
        if start_revision is not None and (not isinstance(start_revision, int) or start_revision < 1):
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
        async for attempt in retry_unavailable():
            with attempt:
                result = await self._backend.range(Range(self._key, prefix=self._prefix))
        if resync:
            self._resyncs += 1
            _telemetry.watch_resyncs.add(1, _telemetry.attributes(backend=self._backend.name))
        self._revision = result.revision
        return Snapshot(result.kvs, result.revision, resync)

    async def _follow(self) -> AsyncGenerator[Snapshot | WatchBatch, None]:
        if self._start is None:
            yield await self._snapshot(resync=False)
        backoff = Backoff()
        while True:
            try:
                async with self._backend.watch(
                    self._key, prefix=self._prefix, start_revision=self._revision + 1
                ) as batches:
                    async for batch in batches:
                        if batch.revision <= self._revision:
                            continue  # a backend resending what was delivered must not produce a duplicate
                        backoff.reset()
                        self._revision = batch.revision
                        self._batches += 1
                        yield batch
                raise UnavailableError("watch stream ended")
            except UnavailableError:
                self._reconnects += 1
                await anyio.sleep(backoff.next_delay())
            except CompactedError:
                yield await self._snapshot(resync=True)


async def wait_deleted(backend: Backend, key: bytes, *, revision: int) -> None:
    """Wait until ``key``, which existed at ``revision``, is deleted (returns at once if it already was).

    Only that incarnation counts: a key deleted and created again after ``revision`` was deleted. Reconnects
    and compaction are handled as in `Watch`. Cancel it to stop waiting.
    """
    async with Watch(backend, key, start_revision=revision + 1) as watch:
        async for item in watch:
            if isinstance(item, Snapshot):
                if not item.kvs or item.kvs[0].create_revision > revision:
                    return
            elif any(event.type is EventType.DELETE for event in item.events):
                return
