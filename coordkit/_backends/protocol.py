"""The backend protocol: the only thing recipes know about the store.

The semantics are etcd v3's, and the conformance suite in `testing` is the precise contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from .types import Compare, Lease, Op, Range, RangeResult, TxnResult, WatchBatch


@runtime_checkable
class Backend(Protocol):
    """A linearizable, revisioned key-value store with leases and watches.

    Every method is a cancellation point and leaves no half-applied state: a cancelled call either happened
    entirely or not at all (for a write, the caller cannot always know which; writes that may be retried after
    an ambiguous failure are built to be idempotent). Transport failures raise
    `UnavailableError`.
    """

    #: ``"memory"``, ``"etcd"``, ...: reported in telemetry.
    name: str

    async def range(self, request: Range) -> RangeResult:
        """Read one key or a prefix at the current revision."""
        ...

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """If every compare holds, apply ``success``, else ``failure``, atomically at one revision.

        This is the only write. A branch must not write the same key twice (as in etcd).
        """
        ...

    async def grant(self, ttl: int) -> Lease:
        """Grant a lease of ``ttl`` seconds (the server may grant more, never less)."""
        ...

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; return its TTL in seconds. Raises LeaseExpiredError when it is gone."""
        ...

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys at one revision. Idempotent: an unknown lease is not an error."""
        ...

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        """Watch a key or prefix from ``start_revision`` on.

        ``async with backend.watch(k, start_revision=r) as batches: async for batch in batches: ...`` yields
        every event with revision ≥ r, in order, one batch per revision, never ending by itself. Raises
        CompactedError when ``r`` was compacted, UnavailableError when the stream breaks; ValueError at once for the
        empty key without ``prefix`` (as for `Range`: the empty key is only a prefix).

        ``start_revision=0`` watches from now: the first batch is an empty *notice* whose revision is the store
        revision when the watch was registered, and every change after it follows. A watch from now is the
        cheap one on etcd (a watch from a past revision is caught up by a loop that runs every 100 ms), and with
        a read made after the notice it observes a key without any race.
        """
        ...

    async def aclose(self) -> None:
        """Release connections. The backend cannot be used afterwards."""
        ...

    async def __aenter__(self) -> Self:
        """``async with backend:`` closes it on exit."""
        ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
