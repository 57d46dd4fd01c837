"""What the conformance suite needs from a backend under test, and harnesses for the two shipped backends."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Literal, Protocol, TypeVar, final

import anyio
import anyio.to_thread

from .._backends.memory import MemoryBackend, MemoryStore
from .._backends.protocol import Backend
from .._backends.types import Compare, Lease, Op, Range, RangeResult, TxnResult, WatchBatch
from .._errors import BackendError, UnavailableError

_T = TypeVar("_T")
_namespaces = itertools.count(1)


class Harness(Protocol):
    """A backend under test: clients of one store, and the faults the suite injects.

    Time passes with ``anyio.sleep``: harnesses of in-memory backends run under a virtual clock.
    """

    #: keys a check writes start with this (unique per harness, so checks can share one real server)
    namespace: bytes

    def client(self) -> AbstractAsyncContextManager[Backend]:
        """A new client of the store (a separate simulated process)."""
        ...

    async def compact(self, revision: int) -> None:
        """Compact the store's history up to ``revision``."""
        ...

    async def expire_lease(self, lease_id: int) -> None:
        """Make the lease vanish now, as its expiry would (revoking is acceptable where expiry cannot be forced)."""
        ...

    def suspend_keepalives(self, client: Backend) -> None:
        """Make ``client``'s lease refreshes hang until `heal`."""
        ...

    def partition(self, client: Backend) -> None:
        """Cut ``client`` off (a crashed or isolated process): every call hangs until `heal`, watches break."""
        ...

    def break_watches(self, client: Backend) -> None:
        """Break ``client``'s open watch streams (they raise UnavailableError)."""
        ...

    def heal(self, client: Backend) -> None:
        """Undo the faults injected on ``client``."""
        ...


def new_namespace(tag: str) -> bytes:
    return f"ck-{tag}-{next(_namespaces)}/".encode()


@final
class MemoryHarness:
    """Harness for `MemoryBackend`: one fresh store, native fault hooks."""

    def __init__(self, *, seed: int = 0) -> None:
        self.store = MemoryStore(seed=seed)
        self.namespace = new_namespace("mem")

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Backend]:
        async with MemoryBackend(store=self.store) as backend:
            yield backend

    async def compact(self, revision: int) -> None:
        self.store.compact(revision)

    async def expire_lease(self, lease_id: int) -> None:
        self.store.revoke(lease_id)

    def suspend_keepalives(self, client: Backend) -> None:
        _memory(client).faults.suspend_keepalives()

    def partition(self, client: Backend) -> None:
        _memory(client).faults.partition()

    def break_watches(self, client: Backend) -> None:
        _memory(client).faults.break_watches()

    def heal(self, client: Backend) -> None:
        _memory(client).faults.heal()


def _memory(client: Backend) -> MemoryBackend:
    assert isinstance(client, MemoryBackend), "MemoryHarness faults apply to its own clients"
    return client


#: The calls `FaultyBackend.inject` can make fail.
CALLS = frozenset(("range", "txn", "grant", "refresh", "revoke", "watch"))


@final
class FaultyBackend:
    """Wraps any backend and injects client-side faults: a partition, hanging keepalives, broken watch streams,
    errors of any class, lost and delayed replies.

    For backends with no fault hooks of their own (a real etcd): what the wrapped client sees is what a lost
    network, or a store that refuses it, would show it. Calls held by a fault wait, cancellably, until `heal`.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self._partitioned = False
        self._keepalives_suspended = False
        self._healed = anyio.Event()
        self._watch_scopes: set[anyio.CancelScope] = set()
        self._watch_epoch = 0  # streams opened before the latest break_watches() are broken
        self._injected: dict[str, tuple[Callable[[], BaseException], int | None]] = {}
        self._lose_replies = 0
        self._reply_delay = 0.0

    async def __aenter__(self) -> FaultyBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def partition(self) -> None:
        """Every call hangs until `heal`, and open watch streams break: the client is cut off."""
        self._partitioned = True
        self.break_watches()

    def suspend_keepalives(self) -> None:
        """Lease refreshes hang until `heal`."""
        self._keepalives_suspended = True

    def break_watches(self) -> None:
        """Every open watch stream raises UnavailableError: at once if it is waiting, else at its next read."""
        self._watch_epoch += 1
        for scope in self._watch_scopes:
            scope.cancel()

    def inject(self, error: Callable[[], BaseException], *, into: Iterable[str], count: int | None = None) -> None:
        """Make calls fail with ``error()`` (a new exception each time) before they reach the store.

        Args:
            error: makes the exception to raise: any class, a coordkit error or not (a third-party backend's
                own, a malformed reply).
            into: the calls to fail, from `CALLS`: "range", "txn", "grant", "refresh", "revoke", "watch" (a
                watch fails when opened; open streams break, so their reopening fails).
            count: fail this many calls of each kind, then let them through; None: every call until `heal`.
        """
        kinds = set(into)
        if not kinds <= CALLS:
            raise ValueError(f"calls to fail are among {sorted(CALLS)}, not {sorted(kinds - CALLS)}")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 (or None: until heal)")
        for kind in kinds:
            self._injected[kind] = (error, count)
        if "watch" in kinds:
            self.break_watches()

    def lose_replies(self, count: int) -> None:
        """The next ``count`` calls reach the wrapped backend, then raise UnavailableError (the reply is lost)."""
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, not {count!r}")
        self._lose_replies = count

    def delay_replies(self, seconds: float) -> None:
        """Every call's reply (or error) is handed back ``seconds`` after the wrapped backend gave it (0 ends it)."""
        if not seconds >= 0 or seconds == math.inf:
            raise ValueError(f"reply delay must be a finite number of seconds >= 0, not {seconds!r}")
        self._reply_delay = seconds

    def heal(self) -> None:
        """End partitions, suspended keepalives and injected errors (reply faults stay: set them to 0 to end them)."""
        self._partitioned = self._keepalives_suspended = False
        self._injected.clear()
        self._healed.set()
        self._healed = anyio.Event()

    async def _gate(self, kind: str, *, keepalive: bool = False) -> None:
        while self._partitioned or (keepalive and self._keepalives_suspended):
            await self._healed.wait()
        injected = self._injected.get(kind)
        if injected is not None:
            error, count = injected
            if count is not None:
                if count > 1:
                    self._injected[kind] = (error, count - 1)
                else:
                    del self._injected[kind]
            raise error()

    async def _call(self, kind: str, call: Callable[[], Awaitable[_T]], *, keepalive: bool = False) -> _T:
        await self._gate(kind, keepalive=keepalive)
        try:
            result = await call()
        except BackendError:
            await self._reply(kind)
            raise
        await self._reply(kind)
        return result

    async def _reply(self, kind: str) -> None:
        if self._reply_delay:
            await anyio.sleep(self._reply_delay)
            while self._partitioned:  # a late reply also waits for the partition to end
                await self._healed.wait()
        if self._lose_replies:
            self._lose_replies -= 1
            raise UnavailableError("reply lost (FaultyBackend.lose_replies): the request was sent")

    async def range(self, request: Range) -> RangeResult:
        return await self._call("range", lambda: self.inner.range(request))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        return await self._call("txn", lambda: self.inner.txn(compare, success, failure))

    async def grant(self, ttl: int) -> Lease:
        return await self._call("grant", lambda: self.inner.grant(ttl))

    async def refresh(self, lease_id: int) -> int:
        return await self._call("refresh", lambda: self.inner.refresh(lease_id), keepalive=True)

    async def revoke(self, lease_id: int) -> None:
        await self._call("revoke", lambda: self.inner.revoke(lease_id))

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        return self._watch(self.inner.watch(key, prefix=prefix, start_revision=start_revision))

    @asynccontextmanager
    async def _watch(
        self, inner: AbstractAsyncContextManager[AsyncIterator[WatchBatch]]
    ) -> AsyncIterator[AsyncIterator[WatchBatch]]:
        await self._gate("watch")
        async with inner as batches, aclosing(self._breakable(batches)) as breakable:
            yield breakable

    async def _breakable(self, batches: AsyncIterator[WatchBatch]) -> AsyncGenerator[WatchBatch, None]:
        epoch = self._watch_epoch
        iterator = aiter(batches)
        while True:
            if epoch != self._watch_epoch:
                raise UnavailableError("watch stream broken (FaultyBackend.break_watches)")
            with anyio.CancelScope() as scope:
                self._watch_scopes.add(scope)
                try:
                    batch = await anext(iterator)
                finally:
                    self._watch_scopes.discard(scope)
            if not scope.cancelled_caught:
                yield batch

    async def aclose(self) -> None:
        await self.inner.aclose()


@final
class EtcdHarness:
    """Harness for `EtcdBackend` against a running etcd; faults come from FaultyBackend.

    ``transport`` picks the backend's transport: ``"gateway"`` (JSON gateway) or ``"grpc"`` (etcd's gRPC API).
    """

    def __init__(self, endpoint: str, *, compact: Compactor, transport: Literal["gateway", "grpc"] = "gateway") -> None:
        self.endpoint = endpoint
        self.transport: Literal["gateway", "grpc"] = transport
        self.namespace = new_namespace("etcd" if transport == "gateway" else f"etcd-{transport}")
        self._compact = compact

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Backend]:
        from .._backends.etcd import EtcdBackend

        async with EtcdBackend(self.endpoint, transport=self.transport) as backend:
            yield FaultyBackend(backend)

    async def compact(self, revision: int) -> None:
        await anyio.to_thread.run_sync(self._compact, revision)

    async def expire_lease(self, lease_id: int) -> None:
        async with self.client() as client:
            await client.revoke(lease_id)

    def suspend_keepalives(self, client: Backend) -> None:
        _faulty(client).suspend_keepalives()

    def partition(self, client: Backend) -> None:
        _faulty(client).partition()

    def break_watches(self, client: Backend) -> None:
        _faulty(client).break_watches()

    def heal(self, client: Backend) -> None:
        _faulty(client).heal()


class Compactor(Protocol):
    def __call__(self, revision: int) -> object: ...


def _faulty(client: Backend) -> FaultyBackend:
    assert isinstance(client, FaultyBackend), "EtcdHarness faults apply to its own clients"
    return client
