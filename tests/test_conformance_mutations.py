"""Every conformance check can fail: each catches a backend that breaks the rule it guards.

For each check, one or more mutants: a `MemoryBackend` client wrapped so that it breaks exactly one rule (or, for
``forced_expiry``, a harness whose forced expiry is not one). The check must raise AssertionError against the
mutant and pass against the unchanged wrapper, so the failure comes from the rule broken, not from the wrapping.
Memory only, on virtual time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio.lowlevel
import pytest
from trio.testing import MockClock

from coordkit import (
    Backend,
    Compare,
    Delete,
    Lease,
    MemoryBackend,
    MemoryStore,
    Op,
    Put,
    PutResult,
    Range,
    RangeResult,
    RequestTooLargeError,
    TxnResult,
    WatchBatch,
)
from coordkit.testing import CONFORMANCE_CHECKS, in_range
from coordkit.testing._harness import new_namespace

from .helpers import PassThrough

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Wrapper(PassThrough):
    """A MemoryBackend client passing every call through unchanged; each mutant overrides one method."""

    inner: MemoryBackend


class MutantHarness:
    """Clients of one fresh store, each wrapped in ``wrapper``; faults from the store's own hooks."""

    def __init__(self, wrapper: type[Wrapper]) -> None:
        self.wrapper = wrapper
        self.store = MemoryStore(seed=0)
        self.namespace = new_namespace("mutant")

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Backend]:
        async with MemoryBackend(store=self.store) as backend:
            yield self.wrapper(backend)

    async def compact(self, revision: int) -> None:
        self.store.compact(revision)

    async def expire_lease(self, lease_id: int) -> None:
        self.store.revoke(lease_id)

    def suspend_keepalives(self, client: Backend) -> None:
        _inner(client).faults.suspend_keepalives()

    def partition(self, client: Backend) -> None:
        _inner(client).faults.partition()

    def break_watches(self, client: Backend) -> None:
        _inner(client).faults.break_watches()

    def heal(self, client: Backend) -> None:
        _inner(client).faults.heal()


def _inner(client: Backend) -> MemoryBackend:
    assert isinstance(client, Wrapper)
    return client.inner


# -- the mutants, by the check that must catch them --------------------------------------------------------------


class VersionNotCounted(Wrapper):
    """revisions: a key's version stays 1 however often it is written."""

    async def range(self, request: Range) -> RangeResult:
        got = await self.inner.range(request)
        return dataclasses.replace(got, kvs=tuple(kv._replace(version=1) for kv in got.kvs))


class LessIsGreater(Wrapper):
    """compares: ``<`` and ``>`` swapped."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        swap = {"<": ">", ">": "<"}
        swapped = [dataclasses.replace(c, op=swap.get(c.op, c.op)) for c in compare]  # type: ignore[arg-type]
        return await self.inner.txn(swapped, success, failure)


class DuplicatePutsAccepted(Wrapper):
    """txn_branches: a branch writing one key twice is applied (the last put wins) instead of refused."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        return await self.inner.txn(compare, _last_put_per_key(success), _last_put_per_key(failure))


def _last_put_per_key(ops: Sequence[Op]) -> list[Op]:
    last = {op.key: i for i, op in enumerate(ops) if isinstance(op, Put)}
    return [op for i, op in enumerate(ops) if not isinstance(op, Put) or last[op.key] == i]


class LimitIgnored(Wrapper):
    """range_options: ``limit`` is ignored."""

    async def range(self, request: Range) -> RangeResult:
        return await self.inner.range(dataclasses.replace(request, limit=0))


class PrefixEndWraps(Wrapper):
    """prefix_edges: the end of a prefix ending in 0xff is computed by adding 1 to the last byte, modulo 256."""

    async def range(self, request: Range) -> RangeResult:
        got = await self.inner.range(request)
        if not (request.prefix and request.key.endswith(b"\xff")):
            return got
        end = request.key[:-1] + b"\x00"
        kvs = tuple(kv for kv in got.kvs if in_range(kv.key, request.key, end))
        return dataclasses.replace(got, kvs=kvs, count=len(kvs))


class RevokeOneKeyAtATime(Wrapper):
    """leases: revoke deletes the lease's keys one revision each."""

    async def revoke(self, lease_id: int) -> None:
        state = self.inner.store._leases.get(lease_id)
        for key in sorted(state.keys if state is not None else ()):
            await self.inner.txn([], [Delete(key)])
        await self.inner.revoke(lease_id)


class LeaseOutlivesTtl(Wrapper):
    """lease_expiry: a lease lives 3 s longer than the TTL it reports."""

    async def grant(self, ttl: int) -> Lease:
        lease = await self.inner.grant(ttl + 3)
        return Lease(lease.id, lease.ttl - 3)


class ForcedExpiryKeepsLease(MutantHarness):
    """forced_expiry: the harness's forced expiry deletes the lease's keys but leaves the lease alive."""

    def __init__(self, wrapper: type[Wrapper] = Wrapper) -> None:
        super().__init__(wrapper)

    async def expire_lease(self, lease_id: int) -> None:
        keys = sorted(self.store._leases[lease_id].keys)
        self.store.txn([], [Delete(key) for key in keys], [])


class EventsReversed(Wrapper):
    """watch_ordering: the events of a batch come in reverse order."""

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        return _mapped(self.inner.watch(key, prefix=prefix, start_revision=start_revision), _reversed)


def _reversed(batch: WatchBatch) -> WatchBatch:
    return batch._replace(events=batch.events[::-1])


class KeyWatchLosesLastByte(Wrapper):
    """watch_history: a single-key watch watches the prefix of the key without its last byte."""

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        if not prefix:
            key, prefix = key[:-1], True
        return self.inner.watch(key, prefix=prefix, start_revision=start_revision)


class NoticeWithoutRevision(Wrapper):
    """watch_from_now: the notice of a watch from now carries revision 0."""

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        return _mapped(self.inner.watch(key, prefix=prefix, start_revision=start_revision), _zero_notice)


def _zero_notice(batch: WatchBatch) -> WatchBatch:
    return batch if batch.events else batch._replace(revision=0)


class CompactedStartMovedUp(Wrapper):
    """compaction: a watch from compacted history silently starts at the compact revision instead of failing."""

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        start = max(start_revision, self.inner.store.compact_revision) if start_revision else 0
        return self.inner.watch(key, prefix=prefix, start_revision=start)


class OversizeReportedWritten(Wrapper):
    """large_values: a request over the size limit is reported as applied (nothing was written)."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        try:
            return await self.inner.txn(compare, success, failure)
        except RequestTooLargeError:
            revision = self.inner.store.revision
            return TxnResult(True, (PutResult(revision),), revision)


class FirstWriteBeforeCancellation(Wrapper):
    """cancellation: a transaction's first operation is applied before its first cancellation point."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        if compare or len(success) < 2 or not isinstance(success[0], Put):
            return await self.inner.txn(compare, success, failure)
        self.inner.store.txn([], success[:1], [])
        await anyio.lowlevel.checkpoint()
        return await self.inner.txn(compare, success[1:], failure)


class ComparesIgnored(Wrapper):
    """concurrent_cas: compares are not checked, so concurrent compare-and-swaps overwrite each other."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        return await self.inner.txn([], success, failure)


class ZeroTtlAccepted(Wrapper):
    """bad_input: grant(0) is granted (the minimum TTL) instead of refused."""

    async def grant(self, ttl: int) -> Lease:
        return await self.inner.grant(ttl or 1)


class NegativeTtlAccepted(Wrapper):
    """bad_input: a negative TTL is granted as its absolute value."""

    async def grant(self, ttl: int) -> Lease:
        return await self.inner.grant(abs(ttl) if ttl < 0 else ttl)


class EmptyPutKeyDropped(Wrapper):
    """bad_input: a Put of the empty key is left out of the transaction instead of refused."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        keep = [op for op in success if not (isinstance(op, Put) and op.key == b"")]
        return await self.inner.txn(compare, keep, failure)


class EmptyRangeKeyAnswered(Wrapper):
    """bad_input: a Range of the empty key (not a prefix) is answered with nothing instead of refused."""

    async def range(self, request: Range) -> RangeResult:
        if request.key == b"" and not request.prefix:
            return RangeResult((), 0, False, self.inner.store.revision)
        return await self.inner.range(request)


class TextKeyEncoded(Wrapper):
    """bad_input: a Put whose key is a str is written with the key encoded instead of refused."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        fixed = [
            Put(op.key.encode(), op.value, op.lease) if isinstance(op, Put) and isinstance(op.key, str) else op
            for op in success
        ]
        return await self.inner.txn(compare, fixed, failure)


class NonCompareIgnored(Wrapper):
    """bad_input: a compare that is not a Compare is left out instead of refused."""

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        return await self.inner.txn([c for c in compare if isinstance(c, Compare)], success, failure)


@asynccontextmanager
async def _mapped(
    inner: AbstractAsyncContextManager[AsyncIterator[WatchBatch]], change: Any
) -> AsyncIterator[AsyncIterator[WatchBatch]]:
    async def changed(batches: AsyncIterator[WatchBatch]) -> AsyncGenerator[WatchBatch, None]:
        async for batch in batches:
            yield change(batch)

    async with inner as batches:
        stream = changed(batches)
        try:
            yield stream
        finally:
            await stream.aclose()


def _mutants() -> dict[str, list[tuple[str, type[Wrapper], type[MutantHarness]]]]:
    """check name -> (id, wrapper, harness class) of each mutant it must catch."""
    by_check: dict[str, list[type[Wrapper]]] = {
        "revisions": [VersionNotCounted],
        "compares": [LessIsGreater],
        "txn_branches": [DuplicatePutsAccepted],
        "range_options": [LimitIgnored],
        "prefix_edges": [PrefixEndWraps],
        "leases": [RevokeOneKeyAtATime],
        "lease_expiry": [LeaseOutlivesTtl],
        "watch_ordering": [EventsReversed],
        "watch_history": [KeyWatchLosesLastByte],
        "watch_from_now": [NoticeWithoutRevision],
        "compaction": [CompactedStartMovedUp],
        "large_values": [OversizeReportedWritten],
        "cancellation": [FirstWriteBeforeCancellation],
        "concurrent_cas": [ComparesIgnored],
        "bad_input": [
            ZeroTtlAccepted,
            NegativeTtlAccepted,
            EmptyPutKeyDropped,
            EmptyRangeKeyAnswered,
            TextKeyEncoded,
            NonCompareIgnored,
        ],
    }
    out: dict[str, list[tuple[str, type[Wrapper], type[MutantHarness]]]] = {
        name: [(w.__name__, w, MutantHarness) for w in wrappers] for name, wrappers in by_check.items()
    }
    out["forced_expiry"] = [(ForcedExpiryKeepsLease.__name__, Wrapper, ForcedExpiryKeepsLease)]
    return out


CASES = [
    (check, mutant_id, wrapper, harness)
    for check, mutants in _mutants().items()
    for mutant_id, wrapper, harness in mutants
]


def test_every_check_has_a_mutant() -> None:
    assert set(_mutants()) == set(CONFORMANCE_CHECKS)


@pytest.mark.parametrize(
    ("check", "wrapper", "harness"),
    [(check, wrapper, harness) for check, _, wrapper, harness in CASES],
    ids=[f"{check}-{mutant_id}" for check, mutant_id, _, _ in CASES],
)
async def test_check_catches_mutant(check: str, wrapper: type[Wrapper], harness: type[MutantHarness]) -> None:
    with pytest.raises(AssertionError):
        await CONFORMANCE_CHECKS[check](harness(wrapper))


@pytest.mark.parametrize("check", list(CONFORMANCE_CHECKS))
async def test_check_passes_unmutated(check: str) -> None:
    """The same wrapping with no rule broken passes: a mutant's failure is its broken rule's."""
    await CONFORMANCE_CHECKS[check](MutantHarness(Wrapper))
