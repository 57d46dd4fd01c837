"""A shared watch: every follower of one prefix on one backend in a process reads one backend watch.

Followers pull from it, nobody owns a task: the follower that asks for an item nobody has read yet reads it from
the watch, the others wait for it. The feed keeps the current state, so a follower that subscribes late starts
from it. If the reading follower is cancelled mid-read, the watch is reopened from the last revision by the next
reader: nothing is lost.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator
from typing import Any, final
from weakref import WeakKeyDictionary

import anyio

from ._backends.protocol import Backend
from ._backends.types import KeyValue, WatchBatch
from ._watch import Snapshot, Watch, apply


class _Feed:
    """One watch of a prefix, shared by every view of it on one backend; views pull from it, nobody owns a task.

    The view that asks for an item nobody has read yet reads it from the watch; the others wait for it. The feed
    keeps the current state, so a view that subscribes late starts from it. If the reading view is cancelled
    mid-read, the watch is reopened from the last revision by the next reader: nothing is lost.
    """

    def __init__(self, backend: Backend, prefix: bytes) -> None:
        self.backend, self.prefix = backend, prefix
        self.state: dict[bytes, KeyValue] = {}
        self.revision = 0
        self._log: list[Snapshot | WatchBatch] = []
        self._base = 0  # absolute index of _log[0]
        self._cursors: dict[int, int] = {}  # subscriber id -> next absolute index
        self._watch: Watch | None = None
        self._items: AsyncGenerator[Snapshot | WatchBatch, None] | None = None
        self._reading = False
        self._arrived = anyio.Event()
        self.streams_opened = 0

    async def _read(self) -> None:
        if self._items is None:
            # The first time: a snapshot, then changes. After a broken read: resume after what we have.
            start = self.revision + 1 if self.revision else None
            self._watch = Watch(self.backend, self.prefix, prefix=True, start_revision=start)
            await self._watch.__aenter__()
            self._items = aiter(self._watch)
            self.streams_opened += 1
        try:
            item = await anext(self._items)
        except BaseException:
            # Cancelled (or failed) mid-read: this generator is finished. Reopen from our revision next time.
            watch, self._watch, self._items = self._watch, None, None
            if watch is not None:
                with anyio.CancelScope(shield=True):
                    await watch.__aexit__(None, None, None)
            raise
        self.state = apply(self.state, item)
        self.revision = item.revision
        self._log.append(item)

    async def item(self, subscriber: int) -> Snapshot | WatchBatch:
        """The next item for ``subscriber``, reading it from the store if nobody has yet."""
        index = self._cursors[subscriber]
        while index >= self._base + len(self._log):
            if self._reading:
                await self._arrived.wait()
                continue
            self._reading = True
            try:
                await self._read()
            finally:
                self._reading = False
                self._arrived.set()
                self._arrived = anyio.Event()
        self._cursors[subscriber] = index + 1
        item = self._log[index - self._base]
        if len(self._log) > 64:  # trimming costs one pass over the subscribers: do it now and then
            self._trim()
        return item

    def item_nowait(self, subscriber: int) -> Snapshot | WatchBatch | None:
        """The next item for ``subscriber`` if it was already read from the store, else None (no waiting)."""
        index = self._cursors[subscriber]
        if index >= self._base + len(self._log):
            return None
        self._cursors[subscriber] = index + 1
        return self._log[index - self._base]

    async def subscribe(self, subscriber: int) -> tuple[dict[bytes, KeyValue], int]:
        """Start following: the current state and revision (read from the store for the first subscriber)."""
        while not self.revision:
            self._cursors[subscriber] = self._base + len(self._log)
            await self.item(subscriber)
        self._cursors[subscriber] = self._base + len(self._log)
        return dict(self.state), self.revision

    @property
    def followers(self) -> int:
        return len(self._cursors)

    def unsubscribe(self, subscriber: int) -> bool:
        """Stop following; True when nobody follows any more."""
        self._cursors.pop(subscriber, None)
        self._trim()
        return not self._cursors

    def _trim(self) -> None:
        lowest = min(self._cursors.values(), default=self._base + len(self._log))
        drop = lowest - self._base
        if drop > 0:
            del self._log[:drop]
            self._base = lowest

    async def aclose(self) -> None:
        if self._watch is not None:
            await self._watch.__aexit__(None, None, None)
        self._watch = self._items = None


# backend -> prefix -> feed
_feeds: WeakKeyDictionary[Any, dict[bytes, _Feed]] = WeakKeyDictionary()
_subscriber_ids = itertools.count(1)


@final
class Subscription:
    """One follower of a shared watch.

    Attributes:
        state: the prefix's keys when the subscription started.
        revision: the revision of ``state``; `next` returns the changes after it, in order.
    """

    def __init__(self, feed: _Feed, subscriber: int, state: dict[bytes, KeyValue], revision: int) -> None:
        self.feed = feed
        self.state = state
        self.revision = revision
        self._subscriber = subscriber

    async def next(self) -> Snapshot | WatchBatch:
        """The next change (a `Snapshot` with ``resync=True`` after a compaction)."""
        return await self.feed.item(self._subscriber)

    def next_nowait(self) -> Snapshot | WatchBatch | None:
        """The next change if another follower (or an earlier `next`) already read it, else None; never waits."""
        return self.feed.item_nowait(self._subscriber)

    async def aclose(self) -> None:
        """Stop following; the last follower closes the backend watch."""
        feed = self.feed
        if feed.unsubscribe(self._subscriber):
            feeds = _feeds.get(feed.backend, {})
            if feeds.get(feed.prefix) is feed:
                del feeds[feed.prefix]
            with anyio.CancelScope(shield=True):
                await feed.aclose()


async def subscribe(backend: Backend, prefix: bytes) -> Subscription:
    """Follow ``prefix``, sharing the backend watch with every other follower of it in this process."""
    feeds = _feeds.setdefault(backend, {})
    feed = feeds.get(prefix)
    if feed is None:
        feed = feeds[prefix] = _Feed(backend, prefix)
    subscriber = next(_subscriber_ids)
    try:
        state, revision = await feed.subscribe(subscriber)
    except BaseException:
        await Subscription(feed, subscriber, {}, 0).aclose()
        raise
    return Subscription(feed, subscriber, state, revision)
