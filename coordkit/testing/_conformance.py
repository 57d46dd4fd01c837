"""The backend conformance suite: the executable form of the backend protocol's contract.

Each check is an ``async def check_x(harness)`` that raises AssertionError on a violation. Run them all from
pytest with `conformance_tests` (one test per check), in one call with `run_conformance`, or parametrize your own
tests over `CONFORMANCE_CHECKS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio

from .._backends.protocol import Backend
from .._backends.types import (
    Compare,
    Delete,
    DeleteResult,
    EventType,
    Op,
    Put,
    Range,
    RangeResult,
    WatchBatch,
)
from .._errors import CompactedError, LeaseExpiredError, RequestTooLargeError
from ._harness import Harness

if TYPE_CHECKING:
    import pytest

Check = Callable[[Harness], Awaitable[None]]
CONFORMANCE_CHECKS: dict[str, Check] = {}
"""Every conformance check by name (filled in below, in definition order)."""


def _check(fn: Check) -> Check:
    CONFORMANCE_CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


async def run_conformance(harness_factory: Callable[[], Harness]) -> None:
    """Run every check, each on a fresh harness from ``harness_factory``; the first failure raises."""
    for check in CONFORMANCE_CHECKS.values():
        await check(harness_factory())


def conformance_tests(harness: Callable[[], Harness] | str = "harness") -> Callable[..., Awaitable[None]]:
    """A pytest test function that runs every conformance check, one test per check, with anyio's plugin.

    Assign it to a ``test_`` name in a test module::

        test_conformance = conformance_tests(lambda: MyHarness("http://127.0.0.1:9000"))

    pytest then collects ``test_conformance[revisions]``, ``test_conformance[compares]``, ... Each check gets a
    fresh harness. The tests run on the event loop that anyio's ``anyio_backend`` fixture names (asyncio unless
    the module or a conftest overrides it: trio with a ``MockClock`` for an in-process store with virtual time).

    Args:
        harness: makes the `Harness` of a check, or names a pytest fixture that gives one (function-scoped, so
            each check gets its own; the fixture may take other fixtures, such as a server's).

    Raises:
        ImportError: pytest is not installed (it is needed only here).
    """
    import pytest  # the library needs pytest only here: imported when called

    @pytest.mark.anyio
    @pytest.mark.parametrize("check", list(CONFORMANCE_CHECKS), ids=list(CONFORMANCE_CHECKS))
    async def test_conformance(check: str, request: pytest.FixtureRequest) -> None:
        made = harness() if callable(harness) else request.getfixturevalue(harness)
        await CONFORMANCE_CHECKS[check](made)

    return test_conformance


async def _get(backend: Backend, key: bytes) -> RangeResult:
    return await backend.range(Range(key))


async def _put(backend: Backend, key: bytes, value: bytes = b"v", lease: int = 0) -> int:
    return (await backend.txn([], [Put(key, value, lease)])).revision


async def _next_batches(batches: AsyncIterator[WatchBatch], count: int) -> list[WatchBatch]:
    out: list[WatchBatch] = []
    with anyio.fail_after(10):
        while len(out) < count:
            out.append(await anext(batches))
    return out


@_check
async def check_revisions(h: Harness) -> None:
    """Each write advances the one global revision by 1; create/mod revisions and version follow etcd."""
    k = h.namespace + b"rev"
    async with h.client() as b:
        start = (await b.range(Range(k))).revision
        r1 = await _put(b, k, b"1")
        assert r1 == start + 1, (start, r1)
        r2 = await _put(b, k, b"2")
        assert r2 == r1 + 1
        got = await _get(b, k)
        assert got.revision == r2 and got.count == 1 and not got.more
        (kv,) = got.kvs
        assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (k, b"2", r1, r2, 2, 0)
        # A transaction that writes nothing leaves the revision as it was.
        noop = await b.txn([Compare.version(k, "==", 99)], [Put(k, b"x")], [Range(k)])
        assert not noop.succeeded and noop.revision == r2
        gone = await b.txn([], [Delete(h.namespace + b"absent")])
        assert gone.revision == r2 and gone.responses == (DeleteResult(0, r2),)
        r3 = (await b.txn([], [Delete(k)])).revision
        assert r3 == r2 + 1 and (await _get(b, k)).kvs == ()
        r4 = await _put(b, k, b"again")
        (kv,) = (await _get(b, k)).kvs
        assert (kv.create_revision, kv.version) == (r4, 1), "a re-created key starts a new life"


@_check
async def check_compares(h: Harness) -> None:
    """Compares on create/mod revision, version, value and lease, with every operator; absent-key rules."""
    k, absent = h.namespace + b"cmp", h.namespace + b"nothing"
    async with h.client() as b:
        lease = await b.grant(30)
        r1 = await _put(b, k, b"m", lease.id)
        r2 = await _put(b, k, b"m", lease.id)
        cases = [
            (Compare.create(k, "==", r1), True),
            (Compare.create(k, "!=", r1), False),
            (Compare.create(k, "<", r1 + 1), True),
            (Compare.create(k, ">", r1), False),
            (Compare.mod(k, "==", r2), True),
            (Compare.mod(k, ">", r1), True),
            (Compare.mod(k, "<", r2), False),
            (Compare.version(k, "==", 2), True),
            (Compare.version(k, ">", 2), False),
            (Compare.version(k, "!=", 1), True),
            (Compare.value(k, "==", b"m"), True),
            (Compare.value(k, "<", b"n"), True),
            (Compare.value(k, ">", b"m"), False),
            (Compare.value(k, "!=", b"m"), False),
            (Compare.lease(k, "==", lease.id), True),
            (Compare.lease(k, "!=", 0), True),
            (Compare.create(absent, "==", 0), True),
            (Compare.mod(absent, "==", 0), True),
            (Compare.version(absent, "==", 0), True),
            (Compare.lease(absent, "==", 0), True),
            (Compare.value(absent, "==", b""), False),
            (Compare.value(absent, "!=", b"x"), False),
        ]
        for compare, expected in cases:
            result = await b.txn([compare], [Range(k)], [])
            assert result.succeeded is expected, (compare, expected)
        both = await b.txn([Compare.version(k, "==", 2), Compare.value(k, "==", b"no")], [], [])
        assert not both.succeeded, "all compares must hold"
        await b.revoke(lease.id)


@_check
async def check_txn_branches(h: Harness) -> None:
    """A txn applies one branch atomically at one revision; ranges inside see the txn's own writes."""
    ns = h.namespace + b"txn/"
    async with h.client() as b:
        await _put(b, ns + b"a", b"1")
        await _put(b, ns + b"b", b"2")
        result = await b.txn(
            [Compare.create(ns + b"lock", "==", 0)],
            [Put(ns + b"lock", b""), Delete(ns + b"a"), Range(ns, prefix=True)],
            [Range(ns + b"lock")],
        )
        assert result.succeeded
        _, deleted, listing = result.responses
        assert deleted == DeleteResult(1, result.revision)
        assert isinstance(listing, RangeResult)
        assert [kv.key for kv in listing.kvs] == [ns + b"b", ns + b"lock"]
        assert all(kv.mod_revision <= result.revision for kv in listing.kvs)
        again = await b.txn([Compare.create(ns + b"lock", "==", 0)], [Put(ns + b"lock", b"x")], [Range(ns + b"lock")])
        assert not again.succeeded and again.revision == result.revision
        (failure_range,) = again.responses
        assert isinstance(failure_range, RangeResult) and failure_range.kvs[0].create_revision == result.revision
        wiped = await b.txn([], [Delete(ns, prefix=True)])
        assert wiped.responses == (DeleteResult(2, wiped.revision),)
        duplicates: list[list[Op]] = [
            [Put(ns + b"x", b"1"), Put(ns + b"x", b"2")],
            [Delete(ns, prefix=True), Put(ns + b"y", b"")],
        ]
        for bad in duplicates:
            try:
                await b.txn([], bad)
            except ValueError:
                pass
            else:
                raise AssertionError(f"duplicate key in one branch must be refused: {bad}")
        assert (await b.range(Range(ns, prefix=True))).kvs == (), "a refused txn writes nothing"


@_check
async def check_range_options(h: Harness) -> None:
    """limit/more/count, sorting, create-revision bounds, keys_only and count_only."""
    ns = h.namespace + b"rng/"
    async with h.client() as b:
        revs = [await _put(b, ns + k, v) for k, v in ((b"c", b"1"), (b"a", b"2"), (b"b", b"3"))]
        everything = await b.range(Range(ns, prefix=True))
        assert [kv.key for kv in everything.kvs] == [ns + b"a", ns + b"b", ns + b"c"] and everything.count == 3
        limited = await b.range(Range(ns, prefix=True, limit=2))
        assert len(limited.kvs) == 2 and limited.more and limited.count == 3
        first_created = await b.range(Range(ns, prefix=True, sort_by="create", limit=1))
        assert first_created.kvs[0].key == ns + b"c"
        last_created = await b.range(Range(ns, prefix=True, sort_by="create", descending=True, limit=1))
        assert last_created.kvs[0].key == ns + b"b"
        by_key_desc = await b.range(Range(ns, prefix=True, descending=True))
        assert [kv.key for kv in by_key_desc.kvs] == [ns + b"c", ns + b"b", ns + b"a"]
        # etcd's waitDeletes query: the newest key created before a revision.
        before = await b.range(
            Range(ns, prefix=True, sort_by="create", descending=True, limit=1, max_create_revision=revs[2] - 1)
        )
        assert before.kvs[0].key == ns + b"a"
        newer = await b.range(Range(ns, prefix=True, min_create_revision=revs[1]))
        assert sorted(kv.key for kv in newer.kvs) == [ns + b"a", ns + b"b"]
        keys = await b.range(Range(ns, prefix=True, keys_only=True))
        assert [kv.value for kv in keys.kvs] == [b"", b"", b""] and keys.kvs[0].version == 1
        counted = await b.range(Range(ns, prefix=True, count_only=True))
        assert counted.kvs == () and counted.count == 3


@_check
async def check_prefix_edges(h: Harness) -> None:
    """0xff bytes in a prefix, and the empty prefix (the whole keyspace), for ranges and watches."""
    ns = h.namespace
    keys = [ns + b"\xff", ns + b"\xff\x00", ns + b"\xff\xff", ns + b"a\xff", ns + b"a\xff\x01"]
    async with h.client() as b:
        start = (await b.range(Range(ns + b"\xff", prefix=True))).revision
        for k in [*keys, ns + b"b"]:
            await _put(b, k)
        got = await b.range(Range(ns + b"\xff", prefix=True))
        assert [kv.key for kv in got.kvs] == [ns + b"\xff", ns + b"\xff\x00", ns + b"\xff\xff"]
        got = await b.range(Range(ns + b"a\xff", prefix=True))
        assert [kv.key for kv in got.kvs] == [ns + b"a\xff", ns + b"a\xff\x01"]
        everything = await b.range(Range(b"", prefix=True, keys_only=True))
        assert set(keys) <= {kv.key for kv in everything.kvs}
        async with b.watch(ns + b"\xff", prefix=True, start_revision=start + 1) as batches:
            seen = [e.kv.key for batch in await _next_batches(batches, 3) for e in batch.events]
        assert seen == [ns + b"\xff", ns + b"\xff\x00", ns + b"\xff\xff"]
        async with b.watch(b"", prefix=True, start_revision=start + 1) as batches:
            seen = [e.kv.key for batch in await _next_batches(batches, 6) for e in batch.events]
        assert seen == [*keys, ns + b"b"]


@_check
async def check_leases(h: Harness) -> None:
    """grant/refresh/revoke; revoke deletes all the lease's keys at one revision; revoke is idempotent."""
    ns = h.namespace + b"lease/"
    async with h.client() as b:
        lease = await b.grant(5)
        assert lease.ttl >= 5 and lease.id > 0
        assert await b.refresh(lease.id) >= 5
        for name in (b"a", b"b", b"c"):
            await _put(b, ns + name, b"", lease.id)
        await _put(b, ns + b"free")
        start = (await b.range(Range(ns, prefix=True))).revision
        await b.revoke(lease.id)
        async with b.watch(ns, prefix=True, start_revision=start + 1) as batches:
            (batch,) = await _next_batches(batches, 1)
        assert batch.revision == start + 1
        assert [(e.type, e.kv.key) for e in batch.events] == [(EventType.DELETE, ns + n) for n in (b"a", b"b", b"c")]
        assert [kv.key for kv in (await b.range(Range(ns, prefix=True))).kvs] == [ns + b"free"]
        await b.revoke(lease.id)  # idempotent
        try:
            await b.refresh(lease.id)
        except LeaseExpiredError as exc:
            assert exc.lease_id == lease.id
        else:
            raise AssertionError("refresh of a revoked lease must raise LeaseExpiredError")
        try:
            await _put(b, ns + b"orphan", b"", lease.id)
        except LeaseExpiredError:
            pass
        else:
            raise AssertionError("a put bound to a missing lease must raise LeaseExpiredError")
        assert (await _get(b, ns + b"orphan")).kvs == ()


@_check
async def check_lease_expiry(h: Harness) -> None:
    """A lease not refreshed expires after its TTL and takes its keys with it at one revision."""
    ns = h.namespace + b"expiry/"
    async with h.client() as b:
        lease = await b.grant(2)
        kept = await b.grant(30)
        await b.txn([], [Put(ns + b"x", b"", lease.id), Put(ns + b"y", b"", lease.id), Put(ns + b"z", b"", kept.id)])
        start = (await b.range(Range(ns, prefix=True))).revision
        async with b.watch(ns, prefix=True, start_revision=start + 1) as batches:
            began = anyio.current_time()
            with anyio.fail_after(lease.ttl + 5):
                batch = await anext(batches)
            waited = anyio.current_time() - began
        assert [e.kv.key for e in batch.events] == [ns + b"x", ns + b"y"], "one revision for all keys"
        assert all(e.type is EventType.DELETE for e in batch.events)
        assert lease.ttl - 0.5 <= waited <= lease.ttl + 2, waited
        assert [kv.key for kv in (await b.range(Range(ns, prefix=True))).kvs] == [ns + b"z"]
        await b.revoke(kept.id)


@_check
async def check_forced_expiry(h: Harness) -> None:
    """The harness's forced expiry (a fault hook) behaves as a real expiry."""
    ns = h.namespace + b"forced/"
    async with h.client() as b:
        lease = await b.grant(60)
        await b.txn([], [Put(ns + b"x", b"", lease.id), Put(ns + b"y", b"", lease.id)])
        await h.expire_lease(lease.id)
        assert (await b.range(Range(ns, prefix=True))).kvs == ()
        try:
            await b.refresh(lease.id)
        except LeaseExpiredError:
            pass
        else:
            raise AssertionError("the lease must be gone")


@_check
async def check_watch_ordering(h: Harness) -> None:
    """Events come in revision order, one batch per revision, events of a txn in the order applied."""
    ns = h.namespace + b"order/"
    async with h.client() as writer, h.client() as reader:
        start = (await writer.range(Range(ns, prefix=True))).revision
        async with reader.watch(ns, prefix=True, start_revision=start + 1) as batches:
            await _put(writer, ns + b"1", b"a")
            await writer.txn([], [Put(ns + b"3", b"c"), Put(ns + b"2", b"b"), Put(h.namespace + b"other", b"")])
            await writer.txn([], [Delete(ns + b"1")])
            got = await _next_batches(batches, 3)
        assert [batch.revision for batch in got] == [start + 1, start + 2, start + 3]
        assert [e.kv.key for e in got[1].events] == [ns + b"3", ns + b"2"], "txn order, other keys filtered out"
        (deleted,) = got[2].events
        assert deleted.type is EventType.DELETE and deleted.kv.key == ns + b"1"
        assert deleted.kv.mod_revision == start + 3
        put = got[0].events[0]
        assert (put.type, put.kv.value, put.kv.create_revision, put.kv.version) == (EventType.PUT, b"a", start + 1, 1)


@_check
async def check_watch_history(h: Harness) -> None:
    """A watch from a past revision replays history; a single-key watch sees only that key."""
    ns = h.namespace + b"hist/"
    async with h.client() as b:
        first = await _put(b, ns + b"k", b"1")
        await _put(b, ns + b"other", b"x")
        await _put(b, ns + b"k", b"2")
        async with b.watch(ns + b"k", start_revision=first) as batches:
            got = await _next_batches(batches, 2)
        assert [(batch.revision, batch.events[0].kv.value) for batch in got] == [(first, b"1"), (first + 2, b"2")]


@_check
async def check_watch_from_now(h: Harness) -> None:
    """start_revision=0: an empty notice carrying the registration revision, then only later changes."""
    ns = h.namespace + b"now/"
    async with h.client() as b:
        before = await _put(b, ns + b"k", b"old")
        async with b.watch(ns, prefix=True, start_revision=0) as batches:
            with anyio.fail_after(10):
                notice = await anext(batches)
            assert notice.events == () and notice.revision >= before
            after = await _put(b, ns + b"k", b"new")
            (batch,) = await _next_batches(batches, 1)
        assert batch.revision == after and batch.events[0].kv.value == b"new"
        try:
            b.watch(ns, prefix=True, start_revision=-1)
        except ValueError:
            pass
        else:
            raise AssertionError("a negative start_revision must raise ValueError")


@_check
async def check_compaction(h: Harness) -> None:
    """A watch starting before the compact revision fails with CompactedError carrying that revision."""
    ns = h.namespace + b"compact/"
    async with h.client() as b:
        first = await _put(b, ns + b"k", b"1")
        await _put(b, ns + b"k", b"2")
        current = await _put(b, ns + b"k", b"3")
        await h.compact(current)
        try:
            async with b.watch(ns + b"k", start_revision=first) as batches:
                await _next_batches(batches, 1)
        except CompactedError as exc:
            assert exc.compact_revision == current, (exc.compact_revision, current)
        else:
            raise AssertionError("watching compacted history must raise CompactedError")
        async with b.watch(ns + b"k", start_revision=current + 1) as batches:
            await _put(b, ns + b"k", b"4")
            (batch,) = await _next_batches(batches, 1)
        assert batch.events[0].kv.value == b"4"


@_check
async def check_large_values(h: Harness) -> None:
    """A 1 MiB value round-trips through range and watch; a request over 1.5 MiB is refused, nothing written."""
    k = h.namespace + b"big"
    value = bytes(range(256)) * 4096
    async with h.client() as b:
        rev = await _put(b, k, value)
        assert (await _get(b, k)).kvs[0].value == value
        async with b.watch(k, start_revision=rev) as batches:
            (batch,) = await _next_batches(batches, 1)
        assert batch.events[0].kv.value == value
        try:
            await _put(b, k, b"x" * (2 * 1024 * 1024))
        except RequestTooLargeError:
            pass
        else:
            raise AssertionError("a 2 MiB put must raise RequestTooLargeError")
        assert (await _get(b, k)).kvs[0].mod_revision == rev


@_check
async def check_cancellation(h: Harness) -> None:
    """A call cancelled before it starts does nothing; a cancelled txn is never half-applied."""
    ns = h.namespace + b"cancel/"
    async with h.client() as b:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await b.txn([], [Put(ns + b"never", b"")])
        assert scope.cancelled_caught
        assert (await _get(b, ns + b"never")).kvs == ()
        for attempt in range(20):
            keys = [ns + f"{attempt}/{i}".encode() for i in range(3)]
            with anyio.move_on_after(attempt * 0.0005):
                await b.txn([], [Put(k, b"") for k in keys])
            present = (await b.range(Range(ns + f"{attempt}/".encode(), prefix=True))).count
            assert present in (0, 3), f"txn half-applied: {present} of 3 keys"
        with anyio.move_on_after(0.01):
            async with b.watch(ns, prefix=True, start_revision=(await _get(b, ns)).revision) as batches:
                async for _ in batches:
                    pass
        # the backend still works after a cancelled watch
        await _put(b, ns + b"after", b"")


@_check
async def check_concurrent_cas(h: Harness) -> None:
    """Concurrent compare-and-swap increments from several clients: no update lost (linearizable)."""
    k = h.namespace + b"counter"
    clients, increments = 4, 10

    async def worker() -> None:
        async with h.client() as b:
            for _ in range(increments):
                while True:
                    current = await _get(b, k)
                    value = int(current.kvs[0].value) if current.kvs else 0
                    mod = current.kvs[0].mod_revision if current.kvs else 0
                    swapped = await b.txn([Compare.mod(k, "==", mod)], [Put(k, str(value + 1).encode())])
                    if swapped.succeeded:
                        break

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(worker)
    async with h.client() as b:
        (kv,) = (await _get(b, k)).kvs
    assert int(kv.value) == clients * increments and kv.version == clients * increments


@_check
async def check_bad_input(h: Harness) -> None:
    """Malformed requests raise TypeError/ValueError before anything is sent.

    The malformed requests are made as a foreign caller could make them, without the constructors' own
    validation (``Put(b"", b"x")`` raises by itself): the backend must refuse them too.
    """
    ns = h.namespace + b"bad/"
    async with h.client() as b:
        cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("grant(0)", lambda: b.grant(0)),
            ("grant(-5)", lambda: b.grant(-5)),
            ("a Put of the empty key", lambda: b.txn([], [_forged(Put(ns, b"x"), key=b"")])),
            ("a Range of the empty key (not a prefix)", lambda: b.range(_forged(Range(ns), key=b""))),
            ("a Put of a str key", lambda: b.txn([], [_forged(Put(ns, b"x"), key="text")])),
            ("a compare that is not a Compare", lambda: b.txn(["not a compare"], [])),  # type: ignore[list-item]
        ]
        for what, call in cases:
            try:
                await call()
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError(f"bad input must raise TypeError or ValueError: {what} did not")
        assert (await b.range(Range(ns, prefix=True))).kvs == (), "a refused request writes nothing"


_D = TypeVar("_D")


def _forged(valid: _D, **changes: object) -> _D:
    """A copy of the dataclass ``valid`` with ``changes``, made without running its validation (``__post_init__``)."""
    forged = object.__new__(type(valid))
    for f in dataclasses.fields(valid):  # type: ignore[arg-type]
        object.__setattr__(forged, f.name, changes.get(f.name, getattr(valid, f.name)))
    return forged
