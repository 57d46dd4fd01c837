"""A shared watch: every follower of one prefix on one backend in a process reads one backend watch.

Nobody owns a task: followers take turns reading the watch. A follower either pulls (`Subscription.next`: the one
that asks for an item nobody has read yet reads it, the others wait for it) or is pushed to (``deliver=``: the
reading follower hands every item it reads to each pushed follower's callback, in its own task, so a change reaches
a thousand followers with one task waking instead of a thousand; the other pushed followers sleep until the reader
leaves). The feed keeps the current state, so a follower that subscribes late starts from it, and decodes each
value once for every follower that uses the same codec (`decoded`). If the reading follower is cancelled mid-read,
the watch is reopened from the last revision by the next reader: nothing is lost.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any, final
from weakref import WeakKeyDictionary

import anyio

from ._backends.protocol import Backend
from ._backends.types import EventType, KeyValue, WatchBatch
from ._codec import Codec
from ._watch import Snapshot, Watch, apply

Deliver = Callable[[Snapshot | WatchBatch], None]


class _Feed:
    """One watch of a prefix, shared by every follower of it on one backend; followers take turns reading it.

    Pulling followers have a cursor into ``_log`` (kept until every cursor passed it); pushed followers have a
    callback that the reader calls with each item it reads.
    """

    def __init__(self, backend: Backend, prefix: bytes) -> None:
        self.backend, self.prefix = backend, prefix
        self.state: dict[bytes, KeyValue] = {}
        self.revision = 0
        self._log: list[Snapshot | WatchBatch] = []
        self._base = 0  # absolute index of _log[0]
        self._cursors: dict[int, int] = {}  # pulling subscriber id -> next absolute index
        self._deliver: dict[int, Deliver] = {}  # pushed subscriber id -> callback
        # key -> id(codec) -> (codec, mod revision, (decoded value, decoding error))
        self._decoded: dict[bytes, dict[int, tuple[Codec[Any], int, tuple[Any, Exception | None]]]] = {}
        self._watch: Watch | None = None  # the open watch, and what closes it
        self._closer: AsyncExitStack | None = None
        self._items: AsyncGenerator[Snapshot | WatchBatch, None] | None = None
        self._reading = False
        self._arrived = anyio.Event()  # set when an item was read: pulling followers look for theirs
        self._vacant = anyio.Event()  # set when the reader stopped: a pushed follower takes over
        self.streams_opened = 0

    async def _read(self) -> None:
        """Read one item (the caller holds the turn, see `_turn`), keep it for the pullers, hand it to the pushed."""
        if self._items is None:
            # The first time: a snapshot, then changes. After a broken read: resume after what we have.
            start = self.revision + 1 if self.revision else None
            async with AsyncExitStack() as stack:
                self._watch = await stack.enter_async_context(
                    Watch(self.backend, self.prefix, prefix=True, start_revision=start)
                )
                self._items = aiter(self._watch)
                self._closer = stack.pop_all()
            self.streams_opened += 1
        try:
            item = await anext(self._items)
        except BaseException:
            # Cancelled (or failed) mid-read: this generator is finished. Reopen from our revision next time.
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        self._forget_decoded(item)
        self.state = apply(self.state, item)
        self.revision = item.revision
        if self._cursors:
            self._log.append(item)
        for deliver in list(self._deliver.values()):
            deliver(item)
        self._arrived.set()
        self._arrived = anyio.Event()

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the reader's turn; on leaving it, wake whoever waits for items or for the turn."""
        self._reading = True
        try:
            yield
        finally:
            self._reading = False
            self._arrived.set()
            self._arrived = anyio.Event()
            self._vacant.set()
            self._vacant = anyio.Event()

    def decoded(self, codec: Codec[Any], kv: KeyValue) -> tuple[Any, Exception | None]:
        """``codec.decode(kv.value)``, computed once per key version and codec for every follower of the feed.

        Returns ``(value, None)``, or ``(None, error)`` with what the codec raised (the same exception object for
        every follower: never raised again here, so its traceback does not grow).
        """
        per_codec = self._decoded.setdefault(kv.key, {})
        cached = per_codec.get(id(codec))
        if cached is None or cached[0] is not codec or cached[1] != kv.mod_revision:
            try:
                cached = (codec, kv.mod_revision, (codec.decode(kv.value), None))
            except Exception as exc:  # kept, and handed to every follower asking for this version
                cached = (codec, kv.mod_revision, (None, exc))
            per_codec[id(codec)] = cached
        result: tuple[Any, Exception | None] = cached[2]
        return result

    def _forget_decoded(self, item: Snapshot | WatchBatch) -> None:
        if isinstance(item, Snapshot):
            present = {kv.key for kv in item.kvs}
            for key in [key for key in self._decoded if key not in present]:
                del self._decoded[key]
        else:
            for event in item.events:
                if event.type is EventType.DELETE:
                    self._decoded.pop(event.kv.key, None)

    async def item(self, subscriber: int) -> Snapshot | WatchBatch:
        """The next item for pulling ``subscriber``, reading it from the store if nobody has yet."""
        index = self._cursors[subscriber]
        while index >= self._base + len(self._log):
            if self._reading:
                await self._arrived.wait()
                continue
            with self._turn():
                await self._read()
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

    async def follow(self) -> None:
        """Keep the pushed followers fed: read whenever nobody else does. Returns only by raising.

        Raises:
            Whatever reading the watch raised (the turn passes to another follower; call again to rejoin).
        """
        while True:
            if self._reading:
                await self._vacant.wait()
                continue
            with self._turn():
                while True:
                    await self._read()

    async def subscribe(self, subscriber: int, deliver: Deliver | None) -> tuple[dict[bytes, KeyValue], int]:
        """Start following: the current state and revision (read from the store for the first subscriber).

        A pushed subscriber (``deliver``) is registered in the same step as the state is taken, so it is given
        every item after that revision and none before.
        """
        while not self.revision:
            self._cursors[subscriber] = self._base + len(self._log)
            await self.item(subscriber)
        if deliver is None:
            self._cursors[subscriber] = self._base + len(self._log)
        else:
            self._cursors.pop(subscriber, None)
            self._deliver[subscriber] = deliver
        return dict(self.state), self.revision

    @property
    def followers(self) -> int:
        return len(self._cursors) + len(self._deliver)

    def unsubscribe(self, subscriber: int) -> bool:
        """Stop following; True when nobody follows any more."""
        self._cursors.pop(subscriber, None)
        self._deliver.pop(subscriber, None)
        self._trim()
        return not self._cursors and not self._deliver

    def _trim(self) -> None:
        lowest = min(self._cursors.values(), default=self._base + len(self._log))
        drop = lowest - self._base
        if drop > 0:
            del self._log[:drop]
            self._base = lowest

    async def aclose(self) -> None:
        """Close the backend watch, if one is open (the next read opens another)."""
        closer, self._closer, self._watch, self._items = self._closer, None, None, None
        if closer is not None:
            await closer.aclose()


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
        """The next change (a `Snapshot` with ``resync=True`` after a compaction). For pulling subscriptions."""
        return await self.feed.item(self._subscriber)

    async def follow(self) -> None:
        """Take turns reading the shared watch for the pushed subscribers; returns only by raising (see
        `_Feed.follow`). For pushed subscriptions (``deliver=``), whose callback gets every item."""
        await self.feed.follow()

    def decoded(self, codec: Codec[Any], kv: KeyValue) -> tuple[Any, Exception | None]:
        """``kv``'s value decoded by ``codec``, once for every follower of the prefix (see `_Feed.decoded`)."""
        return self.feed.decoded(codec, kv)

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


async def subscribe(backend: Backend, prefix: bytes, *, deliver: Deliver | None = None) -> Subscription:
    """Follow ``prefix``, sharing the backend watch with every other follower of it in this process.

    Without ``deliver``, read the changes with `Subscription.next`. With it, every change after the returned
    state is handed to ``deliver`` (synchronously, in whichever follower's task read it; it must not raise), and
    the subscriber runs `Subscription.follow` in a task of its own to take its turn at reading.
    """
    feeds = _feeds.setdefault(backend, {})
    feed = feeds.get(prefix)
    if feed is None:
        feed = feeds[prefix] = _Feed(backend, prefix)
    subscriber = next(_subscriber_ids)
    try:
        state, revision = await feed.subscribe(subscriber, deliver)
    except BaseException:
        await Subscription(feed, subscriber, {}, 0).aclose()
        raise
    return Subscription(feed, subscriber, state, revision)
