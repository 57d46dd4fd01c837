"""What the conformance suite needs from a backend under test, and harnesses for the two shipped backends."""

from __future__ import annotations

import abc
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Literal, Protocol, TypeVar, final

import anyio
import anyio.to_thread

from .._backends.faults import ClientFaults
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


class HarnessBase(abc.ABC):
    """A `Harness` for a backend with no fault hooks of its own: subclass it to run the conformance suite.

    Implement `connect` (a new client of the store under test) and `compact`; every client the suite gets from
    `client` is wrapped in a `FaultyBackend`, which injects the faults the suite needs (hanging keepalives, a
    partition, broken watch streams) on the client's side, as a lost network would. `expire_lease` revokes the
    lease: override it where the store can force a real expiry. A backend with fault hooks of its own overrides
    `client` to hand out its clients unwrapped, as `MemoryHarness` does (the fault methods then use a
    `MemoryBackend`'s own hooks).

    Args:
        tag: goes into `namespace` (``ck-<tag>-<n>/``), unique per harness in a process, so that checks
            can share one server.
    """

    def __init__(self, *, tag: str = "backend") -> None:
        self.namespace = new_namespace(tag)

    @abc.abstractmethod
    def connect(self) -> AbstractAsyncContextManager[Backend]:
        """A new client of the store under test, not wrapped: `client` wraps it. Closed when the context exits."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Compact the store's history up to ``revision``."""

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Backend]:
        """A new client (`connect`) wrapped in a `FaultyBackend`, for the fault methods below."""
        async with self.connect() as backend:
            yield FaultyBackend(backend)

    async def expire_lease(self, lease_id: int) -> None:
        """Revoke the lease from a new client (expiry cannot be forced from the client side)."""
        async with self.client() as client:
            await client.revoke(lease_id)

    def suspend_keepalives(self, client: Backend) -> None:
        """``client``'s lease refreshes hang until `heal`."""
        client_faults(client).suspend_keepalives()

    def partition(self, client: Backend) -> None:
        """Cut ``client`` off until `heal`: its calls hang, its watch streams break."""
        client_faults(client).partition()

    def break_watches(self, client: Backend) -> None:
        """Break ``client``'s open watch streams (they raise UnavailableError)."""
        client_faults(client).break_watches()

    def heal(self, client: Backend) -> None:
        """Undo the faults injected on ``client``."""
        client_faults(client).heal()


@final
class MemoryHarness(HarnessBase):
    """Harness for `MemoryBackend`: one fresh store, native fault hooks."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(tag="mem")
        self.store = MemoryStore(seed=seed)

    def connect(self) -> AbstractAsyncContextManager[Backend]:
        return MemoryBackend(store=self.store)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Backend]:
        """A new client of the store, not wrapped: its own fault hooks serve."""
        async with self.connect() as backend:
            yield backend

    async def compact(self, revision: int) -> None:
        self.store.compact(revision)

    async def expire_lease(self, lease_id: int) -> None:
        self.store.revoke(lease_id)


def client_faults(client: Backend) -> ClientFaults:
    """The fault hooks of a harness's client: a MemoryBackend's own, or those of the FaultyBackend wrapping it."""
    if isinstance(client, MemoryBackend):
        return client.faults
    assert isinstance(client, FaultyBackend), "a harness's faults apply to its own clients"
    return client


#: The calls `FaultyBackend.inject` can make fail.
CALLS = frozenset(("range", "txn", "grant", "refresh", "revoke", "watch"))


@final
class FaultyBackend(ClientFaults):
    """Wraps any backend and injects client-side faults: a partition, hanging keepalives, broken watch streams,
    errors of any class, lost and delayed replies.

    For backends with no fault hooks of their own (a real etcd): what the wrapped client sees is what a lost
    network, or a store that refuses it, would show it. Calls held by a fault wait, cancellably, until `heal`.
    The faults it shares with `MemoryFaults` (all but `inject`) are the same code (``ClientFaults``).
    """

    _hook = "FaultyBackend"

    def __init__(self, inner: Backend) -> None:
        super().__init__()
        self.inner = inner
        self.name = inner.name
        self._watch_scopes: set[anyio.CancelScope] = set()
        self._injected: dict[str, tuple[Callable[[], BaseException], int | None]] = {}

    async def __aenter__(self) -> FaultyBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

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

    def heal(self) -> None:
        """End partitions, suspended keepalives and injected errors (reply faults stay: set them to 0 to end them)."""
        super().heal()
        self._injected.clear()

    def _wake_watches(self) -> None:
        for scope in self._watch_scopes:  # the wrapped stream knows nothing of the break: stop waiting for it
            scope.cancel()

    async def _gate(self, kind: str, *, keepalive: bool = False) -> None:
        await self._wait_connected(keepalive=keepalive)
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
            await self._reply()
            raise
        await self._reply()
        return result

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
            if self._watch_broken(epoch):
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
class EtcdHarness(HarnessBase):
    """Harness for `EtcdBackend` against a running etcd; faults come from FaultyBackend.

    ``transport`` picks the backend's transport: ``"gateway"`` (JSON gateway) or ``"grpc"`` (etcd's gRPC API).
    """

    def __init__(self, endpoint: str, *, compact: Compactor, transport: Literal["gateway", "grpc"] = "gateway") -> None:
        super().__init__(tag="etcd" if transport == "gateway" else f"etcd-{transport}")
        self.endpoint = endpoint
        self.transport: Literal["gateway", "grpc"] = transport
        self._compact = compact

    def connect(self) -> AbstractAsyncContextManager[Backend]:
        from .._backends.etcd import EtcdBackend

        return EtcdBackend(self.endpoint, transport=self.transport)

    async def compact(self, revision: int) -> None:
        await anyio.to_thread.run_sync(self._compact, revision)


class Compactor(Protocol):
    def __call__(self, revision: int) -> object: ...


@final
class PostgresHarness(HarnessBase):
    """Harness for `PostgresBackend` against a running PostgreSQL; faults come from FaultyBackend.

    Every client is a `PostgresBackend` of its own (its own connections), entered, so its sweeper runs too.
    """

    def __init__(self, dsn: str, *, schema: str = "coordkit") -> None:
        super().__init__(tag="pg")
        self.dsn = dsn
        self.schema = schema

    def connect(self) -> AbstractAsyncContextManager[Backend]:
        from .._backends.postgres import PostgresBackend

        return PostgresBackend(self.dsn, schema=self.schema)

    async def compact(self, revision: int) -> None:
        from .._backends.postgres import PostgresBackend

        async with PostgresBackend(self.dsn, schema=self.schema) as backend:
            await backend.compact(revision)
