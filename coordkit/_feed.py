"""A shared watch: every follower of one prefix on one backend in a process reads one backend watch.

Followers pull from it, nobody owns a task: the follower that asks for an item nobody has read yet reads it from
the watch, the others wait for it. The feed keeps the current state, so a follower that subscribes late starts
from it. If the reading follower is cancelled mid-read, the watch is reopened from the last revision by the next
reader: nothing is lost.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
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
        self._stack: AsyncExitStack | None = None  # holds the open watch, if any
        self._items: AsyncGenerator[Snapshot | WatchBatch, None] | None = None
        self._reading = False
        self._arrived = anyio.Event()
        self.streams_opened = 0

    async def _read(self) -> None:
        if self._items is None:
            # The first time: a snapshot, then changes. After a broken read: resume after what we have.
            start = self.revision + 1 if self.revision else None
            self._stack = AsyncExitStack()
            self._watch = watch = await self._stack.enter_async_context(
                Watch(self.backend, self.prefix, prefix=True, start_revision=start)
            )
            self._items = aiter(watch)
            self.streams_opened += 1
        try:
            item = await anext(self._items)
        except BaseException:
            # Cancelled (or failed) mid-read: this generator is finished. Reopen from our revision next time.
            with anyio.CancelScope(shield=True):
                await self.aclose()
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
        """Close the backend watch, if one is open (the next read opens another)."""
        stack, self._stack, self._watch, self._items = self._stack, None, None, None
        if stack is not None:
            await stack.aclose()


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
