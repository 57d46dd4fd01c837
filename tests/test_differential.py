"""Differential test (issue 12): MemoryBackend and a real etcd run the same seeded random operation streams.

DESIGN.md: "MemoryBackend is exactly as strict as etcd (a recipe that passes on memory and fails on etcd is a
memory-backend bug)". This shows it instead of assuming it. A *sequence* is a seed: ``random.Random(seed)`` makes a
list of operations (data only, made before anything runs, so any prefix or subset replays exactly). Each operation
runs on a fresh `MemoryBackend` and then on a real etcd (a dedicated `EtcdServer` for this module, wiped before
each sequence), and every observable is compared: each response field (kvs, count, more, succeeded, deleted, TTLs),
every revision, each watch's event batches, and the class (and ``compact_revision`` / ``lease_id``) of every error.

The stream covers puts with and without leases (live, revoked and never-granted ones); transactions with every
compare target (create/mod revision, version, value, lease) and operator, on present and missing keys, with mixed
Put/Delete/Range branches and prefix deletes (the empty and all-0xff prefixes included); ranges with every option of
`Range`; lease grant/refresh/revoke and forced expiry (MemoryFaults.expire_lease, a revoke on etcd: what the
harnesses do); compaction (and watches below the compact revision); watches from past revisions, from now, from the
future; and requests both must refuse: too many operations, too large (at the byte), duplicate keys, empty keys.

How the two stay comparable:

- revisions: both stores run the same preamble (a put and a delete, then a compaction), after which etcd's revision
  is the memory store's plus a constant ``offset``; revisions are compared after removing it (0 stays 0).
- lease ids: named by grant order (``L0``, ``L1``, ...); an id never granted is the same number on both sides.
- lease TTLs: leases kept past their grant live for at least 300 s, so none expires by itself on the real clock
  during a sequence; short TTLs are granted and revoked at once (what is compared is the TTL granted). Expiry is
  forced at the same point of the stream on both sides, as the conformance harnesses do.
- a watch is read up to a *fence*: each watch operation opens its watches, then writes one key (compared too),
  and a watch over the whole keyspace read up to the fence's revision says which revisions each watch must show.
- sort ties: etcd sorts non-key orders with Go's unstable sort (and MemoryBackend shuffles ties), so keys with equal
  sort values are compared as a set (per tie group; the truncated last group of a limited read by its size).
- request size: etcd counts the raft request's ID (a varint of 7 to 10 bytes, depending on the member id) in its
  limit; MemoryBackend counts the largest, and the module's etcd is one whose ids take 10 bytes: equal to the byte.
- client-side refusals (ValueError/TypeError before anything is sent) are also sent to etcd raw, bypassing the
  checks: etcd must refuse them too. The one known exception (a put inside an unbounded delete) is not sent.

Not compared (on purpose): when a lease expires by itself (etcd looks every 500 ms), and a watch left unread while
its history is compacted (memory fails it with CompactedError, as etcd does with a watcher that fell behind; etcd
usually has the events buffered already).

A divergence fails with the seed, the shortest prefix of the sequence that diverges, a smaller subsequence found
by removing operations while the divergence remains, and the environment variables that replay each exactly:
``COORDKIT_DIFF_SEED=S`` (with ``COORDKIT_DIFF_OPS=N``: only the first N operations; ``COORDKIT_DIFF_KEEP=i,j,..``:
only those operations). ``COORDKIT_DIFF_ETCD=/usr/bin/etcd`` compares with another etcd binary. The chaos run
scales with ``COORDKIT_DIFF_SEQUENCES`` (default 10,000 sequences of ``COORDKIT_DIFF_LENGTH`` = 200 operations);
the default run does 8.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import pytest

from coordkit import (
    BackendError,
    CompactedError,
    Compare,
    Delete,
    DeleteResult,
    EtcdBackend,
    KeyValue,
    LeaseExpiredError,
    MemoryBackend,
    Put,
    PutResult,
    Range,
    RangeResult,
    RequestTooLargeError,
    WatchBatch,
)
from coordkit._backends.etcd.backend import _compare, _request_op
from coordkit._backends.protocol import Backend
from coordkit._backends.types import MAX_LEASE_TTL, MAX_REQUEST_BYTES, CompareTarget, check_txn
from coordkit._keys import prefix_end
from coordkit.testing import EtcdServer, Harness

SEQUENCES = int(os.environ.get("COORDKIT_DIFF_SEQUENCES", "10000"))
OPS = int(os.environ.get("COORDKIT_DIFF_LENGTH", "200"))
SHORT_SEQUENCES = 8

MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES + 512 * 1024
KEYS = (b"\x00", b"a", b"a/1", b"a/2", b"a/2/x", b"b", b"b\xff", b"\xff", b"\xff\xff", b"c")
PREFIXES = (b"", b"a", b"a/", b"a/2", b"b", b"\xff", b"\xff\xff", b"z")
VALUES = (b"", b"v1", b"v2", b"\x00", b"v10")
OPERATORS = ("==", "!=", "<", ">")
SORTS = ("key", "create", "mod", "version", "value")
TARGETS = tuple(CompareTarget)


# -- operations: plain data, made from the seed alone -----------------------------------------------------------


@dataclass(frozen=True)
class LeaseRef:
    """The ``index``-th lease granted in the sequence (a never-granted id when there are fewer)."""

    index: int

    def __repr__(self) -> str:
        return f"L{self.index}"


@dataclass(frozen=True)
class Rev:
    """A revision resolved when the operation runs, in memory numbering (etcd's adds the offset).

    ``kind``: ``abs`` (the number ``arg``), ``cur`` (current revision minus ``arg``), ``compact`` (the compact
    revision plus ``arg``), ``mod`` / ``create`` (that revision of key ``arg``, 0 when absent).
    """

    kind: str
    arg: Any

    def __repr__(self) -> str:
        return f"{self.kind}({self.arg!r})"


@dataclass(frozen=True)
class Big:
    """``size`` bytes of value (kept short in reprs)."""

    size: int

    def __repr__(self) -> str:
        return f"Big({self.size})"


Bytes = bytes | Big


@dataclass(frozen=True)
class RangeSpec:
    key: Bytes
    prefix: bool = False
    limit: int = 0
    sort_by: str = "key"
    descending: bool = False
    max_create: Rev | int = 0
    min_create: Rev | int = 0
    keys_only: bool = False
    count_only: bool = False


@dataclass(frozen=True)
class PutSpec:
    key: Bytes
    value: Bytes
    lease: LeaseRef | int = 0


@dataclass(frozen=True)
class DeleteSpec:
    key: Bytes
    prefix: bool = False


@dataclass(frozen=True)
class CompareSpec:
    key: Bytes
    target: CompareTarget
    op: str
    operand: Bytes | Rev | LeaseRef | int


OpSpec = PutSpec | DeleteSpec | RangeSpec


@dataclass(frozen=True)
class WatchSpec:
    key: bytes
    prefix: bool
    start: Rev | str  # "now", or a revision


@dataclass(frozen=True)
class Step:
    """One operation of a sequence: ``kind`` and its arguments."""

    kind: str
    args: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return f"{self.kind}{self.args!r}"


def _rev(rng: random.Random) -> Rev:
    roll = rng.random()
    if roll < 0.35:
        return Rev("cur", rng.choice((0, 0, 1, 2, 3, 5, 8, -1, -2)))
    if roll < 0.75:
        return Rev(rng.choice(("mod", "create")), rng.choice(KEYS))
    return Rev("abs", rng.choice((0, 0, 1, 2, 3, 4, -1, 2**62)))


def _lease(rng: random.Random, grants: int) -> LeaseRef | int:
    roll = rng.random()
    if roll < 0.05:
        return rng.getrandbits(62) + 1  # never granted
    return LeaseRef(rng.randrange(grants + 1))  # == grants: not granted yet at this point


def _range_spec(rng: random.Random) -> RangeSpec:
    prefix = rng.random() < 0.6
    limit = rng.choice((0, 0, 0, 1, 2, 3, 5))
    sort_by = rng.choice(SORTS) if rng.random() < 0.35 else "key"
    return RangeSpec(
        key=rng.choice(PREFIXES if prefix else KEYS),
        prefix=prefix,
        limit=limit,
        sort_by=sort_by,
        descending=rng.random() < 0.25,
        max_create=_rev(rng) if rng.random() < 0.15 else 0,
        min_create=_rev(rng) if rng.random() < 0.15 else 0,
        keys_only=rng.random() < 0.15,
        count_only=rng.random() < 0.15,
    )


def _compare_spec(rng: random.Random, grants: int) -> CompareSpec:
    target = rng.choice(TARGETS)
    op = rng.choice(OPERATORS)
    key = b"" if rng.random() < 0.01 else rng.choice(KEYS)
    operand: Bytes | Rev | LeaseRef | int
    if target is CompareTarget.VALUE:
        operand = rng.choice(VALUES)
    elif target is CompareTarget.VERSION:
        operand = rng.choice((0, 0, 1, 1, 2, 3, 4, -1))
    elif target is CompareTarget.LEASE:
        # ids differ between the backends: only their identity (and 0) can be compared in the same way
        operand = 0 if rng.random() < 0.4 else _lease(rng, grants)
        if operand != 0:
            op = rng.choice(("==", "!="))
    else:
        operand = _rev(rng)
    return CompareSpec(key, target, op, operand)


def _op_spec(rng: random.Random, grants: int) -> OpSpec:
    roll = rng.random()
    if roll < 0.5:
        lease = _lease(rng, grants) if rng.random() < 0.3 else 0
        return PutSpec(rng.choice(KEYS), rng.choice(VALUES), lease)
    if roll < 0.75:
        prefix = rng.random() < 0.4
        return DeleteSpec(rng.choice(PREFIXES if prefix else KEYS), prefix)
    return _range_spec(rng)


def _branch(rng: random.Random, grants: int, most: int) -> tuple[OpSpec, ...]:
    return tuple(_op_spec(rng, grants) for _ in range(rng.randint(0, most)))


def make_sequence(seed: int, length: int) -> list[Step]:
    """The operations of sequence ``seed``: the same list on every run (they depend on nothing else)."""
    rng = random.Random(seed)
    steps: list[Step] = []
    grants = 0
    weights = {
        "txn": 32,
        "put": 14,
        "range": 14,
        "grant": 4,
        "grant_short": 2,
        "refresh": 3,
        "revoke": 3,
        "expire": 2,
        "compact": 3,
        "watch": 1.6,
        "too_many": 0.8,
        "big": 0.6,
    }
    kinds, cum = list(weights), list(weights.values())
    while len(steps) < length:
        kind = rng.choices(kinds, cum)[0]
        if kind == "txn":
            compares = tuple(_compare_spec(rng, grants) for _ in range(rng.choice((0, 1, 1, 1, 2, 3))))
            steps.append(Step("txn", (compares, _branch(rng, grants, 4), _branch(rng, grants, 3))))
        elif kind == "put":
            lease = _lease(rng, grants) if rng.random() < 0.4 else 0
            steps.append(Step("txn", ((), (PutSpec(rng.choice(KEYS), rng.choice(VALUES), lease),), ())))
        elif kind == "range":
            steps.append(Step("range", (_range_spec(rng),)))
        elif kind == "grant":
            steps.append(Step("grant", (rng.choice((300, 600, 3600, 86_400, MAX_LEASE_TTL)),)))
            grants += 1
        elif kind == "grant_short":
            steps.append(Step("grant_short", (rng.choice((1, 2, 3, 5)),)))
            grants += 1
        elif kind in ("refresh", "revoke", "expire"):
            steps.append(Step(kind, (_lease(rng, grants),)))
        elif kind == "compact":
            roll = rng.random()
            if roll < 0.7:
                target = Rev("cur", rng.choice((0, 0, 1, 2, 4)))
            elif roll < 0.85:
                target = Rev("compact", rng.choice((-1, 0, 1)))
            else:
                target = _rev(rng)
            steps.append(Step("compact", (target,)))
        elif kind == "watch":
            steps.append(_watch_step(rng))
        elif kind == "too_many":
            count = rng.choice((127, 128, 129, 140))
            where = rng.choice(("compare", "success", "failure"))
            item: Any
            if where == "compare":
                item = CompareSpec(rng.choice(KEYS), CompareTarget.VERSION, rng.choice(OPERATORS), 0)
                steps.append(Step("txn", ((item,) * count, (), ())))
            else:
                item = rng.choice((RangeSpec(rng.choice(KEYS)), DeleteSpec(rng.choice(KEYS))))
                branch = (item,) * count
                steps.append(Step("txn", ((), branch, ()) if where == "success" else ((), (), branch)))
        elif kind == "big":
            steps.append(_big_step(rng, grants))
    return steps


def _watch_step(rng: random.Random) -> Step:
    watches = []
    for _ in range(rng.randint(1, 3)):
        prefix = rng.random() < 0.6
        roll = rng.random()
        start: Rev | str
        if roll < 0.15:
            start = "now"
        elif roll < 0.25:
            start = Rev("cur", rng.choice((-1, -3)))  # the future
        elif roll < 0.35:
            start = Rev("abs", rng.choice((1, 2, 3, 4)))
        elif roll < 0.5:  # around the compact revision: below it is compacted, at it its deletions are gone
            start = Rev("compact", rng.choice((-1, 0, 0, 1)))
        else:
            start = Rev("cur", rng.randint(0, 12))
        key = rng.choice(PREFIXES) if prefix else b"" if rng.random() < 0.05 else rng.choice(KEYS)
        watches.append(WatchSpec(key, prefix, start))
    return Step("watch", (tuple(watches), PutSpec(rng.choice(KEYS), rng.choice(VALUES))))


def _big_step(rng: random.Random, grants: int) -> Step:
    """A request near a size limit: refused or not to the byte, the same on both sides."""
    shape = rng.choice(("put", "put", "put_cmp", "delete_prefix", "compare_only", "range_key", "txn_range_key"))
    key = rng.choice(KEYS)
    if shape in ("put", "put_cmp"):
        # a never-granted lease, the same id on both sides: the length of an id's varint counts in the size, and
        # the ids granted by the two differ (the size is checked first: then the lease is refused)
        lease = rng.getrandbits(62) + 1 if rng.random() < 0.3 else 0
        compares = (CompareSpec(key, CompareTarget.VALUE, "!=", rng.choice(VALUES)),) if shape == "put_cmp" else ()
        put = PutSpec(key, Big(MAX_REQUEST_BYTES - rng.randint(10, 60)), lease)
        # the second step deletes the value again, so that later reads stay small
        return Step("big", (("txn", (compares, (put,), ())), ("txn", ((), (DeleteSpec(key),), ()))))
    if shape == "delete_prefix":
        return Step("big", (("txn", ((), (DeleteSpec(Big(MAX_REQUEST_BYTES // 2 - rng.randint(0, 40)), True),), ())),))
    if shape == "compare_only":
        cmp = CompareSpec(key, CompareTarget.VALUE, "==", Big(MAX_MESSAGE_BYTES - rng.randint(5, 40)))
        return Step("big", (("txn", ((cmp,), (), ())),))
    if shape == "range_key":
        return Step("big", (("range", (RangeSpec(Big(MAX_MESSAGE_BYTES - rng.randint(0, 20))),)),))
    return Step("big", (("txn", ((), (RangeSpec(Big(MAX_MESSAGE_BYTES - rng.randint(5, 30))),), ())),))


# -- one side: a backend, and how its numbers map to the shared ones ---------------------------------------------


@dataclass
class Side:
    name: str
    backend: Backend
    compact: Callable[[int], Awaitable[str]]  # "ok", "compacted" or "future"
    expire: Callable[[int], Awaitable[None]]
    offset: int = 0
    leases: list[int] = field(default_factory=list)

    def rev_out(self, revision: int) -> int:
        """A revision of this side as the shared number."""
        return revision - self.offset if revision else 0

    def rev_in(self, revision: int) -> int:
        """A shared revision as this side's (0 and negative numbers mean the same on both)."""
        return revision + self.offset if revision >= 1 else revision

    def lease_in(self, lease: LeaseRef | int) -> int:
        if isinstance(lease, LeaseRef):
            return self.leases[lease.index] if lease.index < len(self.leases) else 0x3FFF_0000_0000_0000 + lease.index
        return lease

    def lease_out(self, lease_id: int) -> int | str:
        return f"L{self.leases.index(lease_id)}" if lease_id in self.leases else lease_id


@dataclass(frozen=True)
class Context:
    """The memory store's state before a step: what resolves the step's symbolic parts, the same for both sides."""

    revision: int
    compact_revision: int
    kvs: dict[bytes, KeyValue]

    @classmethod
    def of(cls, memory: MemoryBackend) -> Context:
        store = memory.store
        return cls(store.revision, store.compact_revision, dict(store._kvs))

    def resolve(self, rev: Rev | int) -> int:
        if isinstance(rev, int):
            return rev
        if rev.kind == "abs":
            return int(rev.arg)
        if rev.kind == "cur":
            return self.revision - int(rev.arg)
        if rev.kind == "compact":
            return self.compact_revision + int(rev.arg)
        kv = self.kvs.get(rev.arg)
        if kv is None:
            return 0
        return kv.mod_revision if rev.kind == "mod" else kv.create_revision


def _bytes(value: Bytes) -> bytes:
    return b"x" * value.size if isinstance(value, Big) else value


def _build_range(spec: RangeSpec, side: Side, ctx: Context) -> Range:
    return Range(
        _bytes(spec.key),
        prefix=spec.prefix,
        limit=spec.limit,
        sort_by=spec.sort_by,  # type: ignore[arg-type]
        descending=spec.descending,
        max_create_revision=max(0, side.rev_in(ctx.resolve(spec.max_create))),
        min_create_revision=max(0, side.rev_in(ctx.resolve(spec.min_create))),
        keys_only=spec.keys_only,
        count_only=spec.count_only,
    )


def _build_op(spec: OpSpec, side: Side, ctx: Context) -> Put | Delete | Range:
    if isinstance(spec, PutSpec):
        return Put(_bytes(spec.key), _bytes(spec.value), side.lease_in(spec.lease))
    if isinstance(spec, DeleteSpec):
        return Delete(_bytes(spec.key), prefix=spec.prefix)
    return _build_range(spec, side, ctx)


def _build_compare(spec: CompareSpec, side: Side, ctx: Context) -> Compare:
    operand: int | bytes
    if isinstance(spec.operand, LeaseRef):
        operand = side.lease_in(spec.operand)
    elif isinstance(spec.operand, Rev):
        operand = side.rev_in(ctx.resolve(spec.operand))
    elif isinstance(spec.operand, Big):
        operand = _bytes(spec.operand)
    else:
        operand = spec.operand
    return Compare(_bytes(spec.key), spec.target, spec.op, operand)  # type: ignore[arg-type]


# -- normalising what a side answered -----------------------------------------------------------------------------


def _short(value: bytes) -> bytes | tuple[str, int]:
    return value if len(value) <= 64 else ("bytes", len(value))


def _kv(side: Side, kv: KeyValue) -> tuple[Any, ...]:
    return (
        _short(kv.key),
        _short(kv.value),
        side.rev_out(kv.create_revision),
        side.rev_out(kv.mod_revision),
        kv.version,
        side.lease_out(kv.lease) if kv.lease else 0,
    )


def _sort_value(kv: tuple[Any, ...], sort_by: str) -> Any:
    return {"create": kv[2], "mod": kv[3], "version": kv[4], "value": kv[1]}[sort_by]


def _range_out(side: Side, result: RangeResult, request: Range) -> tuple[Any, ...]:
    kvs: Any = [_kv(side, kv) for kv in result.kvs]
    if request.sort_by != "key" and kvs:
        # Go's sort.Sort is not stable: within a group of equal sort values, compare the set of keys only
        groups: list[tuple[Any, Any]] = []
        for kv in kvs:
            value = _sort_value(kv, request.sort_by)
            if groups and groups[-1][0] == value:
                groups[-1][1].append(kv)
            else:
                groups.append((value, [kv]))
        shown: list[Any] = [(value, sorted(members)) for value, members in groups]
        if result.more:  # which of the last group's keys made it under the limit is unspecified too
            shown[-1] = (shown[-1][0], len(groups[-1][1]))
        kvs = shown
    return ("range", tuple(map(repr, kvs)), result.count, result.more, side.rev_out(result.revision))


def _error(side: Side, exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, CompactedError):
        return ("error", "CompactedError", side.rev_out(exc.compact_revision))
    if isinstance(exc, LeaseExpiredError):
        return ("error", "LeaseExpiredError", side.lease_out(exc.lease_id))
    return ("error", type(exc).__name__)


def _batches_out(side: Side, batches: Sequence[WatchBatch]) -> tuple[Any, ...]:
    return tuple((side.rev_out(b.revision), tuple((e.type.value, _kv(side, e.kv)) for e in b.events)) for b in batches)


# -- running one operation on one side ----------------------------------------------------------------------------


async def _txn(side: Side, ctx: Context, args: tuple[Any, ...]) -> Any:
    try:
        compares = [_build_compare(c, side, ctx) for c in args[0]]
    except ValueError as exc:  # e.g. an empty key: etcd refuses it ("key is not provided")
        return await _raw_compare_refused(side, exc, args[0])
    success = [_build_op(op, side, ctx) for op in args[1]]
    failure = [_build_op(op, side, ctx) for op in args[2]]
    try:
        result = await side.backend.txn(compares, success, failure)
    except (ValueError, TypeError) as exc:
        if side.name == "etcd":
            # refused before sending: etcd itself must refuse it too (else coordkit is stricter than etcd)
            return await _raw_txn_refused(side, exc, compares, success, failure)
        return _error(side, exc)
    except Exception as exc:
        return _error(side, exc)
    ops = success if result.succeeded else failure
    responses: list[Any] = []
    for op, response in zip(ops, result.responses, strict=True):
        if isinstance(op, Range):
            assert isinstance(response, RangeResult)
            responses.append(_range_out(side, response, op))
        elif isinstance(response, PutResult):
            responses.append(("put", side.rev_out(response.revision)))
        else:
            assert isinstance(response, DeleteResult)
            responses.append(("delete", response.deleted, side.rev_out(response.revision)))
    return ("txn", result.succeeded, tuple(responses), side.rev_out(result.revision))


async def _raw_txn_refused(
    side: Side, exc: BaseException, compares: list[Compare], success: list[Any], failure: list[Any]
) -> Any:
    assert isinstance(side.backend, EtcdBackend)
    if isinstance(exc, ValueError) and _only_unbounded_overlap(success, failure):
        # Known and kept: etcd's overlap check reads a range end of "\x00" (to the end of the keyspace) literally,
        # so it accepts a put inside a delete of the empty or an all-0xff prefix; coordkit refuses it on every
        # backend. Not sent: etcd would apply it, and the two stores would part.
        return _error(side, exc)
    body = {
        "compare": [_compare(c) for c in compares],
        "success": [_request_op(op) for op in success],
        "failure": [_request_op(op) for op in failure],
    }
    try:
        await side.backend._client.call("/kv/txn", body, idempotent=False)
    except BackendError:
        return _error(side, exc)  # both refuse it: the client-side check matches etcd
    return ("etcd accepted a txn coordkit refuses", type(exc).__name__, str(exc))


async def _raw_compare_refused(side: Side, exc: ValueError, specs: Sequence[CompareSpec]) -> Any:
    """A compare coordkit cannot build: etcd must refuse the transaction too (sent raw, without the compare check)."""
    if side.name != "etcd":
        return _error(side, exc)
    assert isinstance(side.backend, EtcdBackend)
    body = {
        "compare": [
            {"key": base64.b64encode(_bytes(c.key)).decode(), "target": "VERSION", "version": "0"} for c in specs
        ]
    }
    try:
        await side.backend._client.call("/kv/txn", body, idempotent=False)
    except BackendError:
        return _error(side, exc)
    return ("etcd accepted a compare coordkit refuses", str(exc))


def _only_unbounded_overlap(success: list[Any], failure: list[Any]) -> bool:
    """Whether check_txn accepts the branches once deletes with no upper bound are left out."""
    unbounded = [op for op in (*success, *failure) if isinstance(op, Delete) and op.prefix and not prefix_end(op.key)]
    if not unbounded:
        return False
    try:
        check_txn([], [op for op in success if op not in unbounded], [op for op in failure if op not in unbounded])
    except ValueError:
        return False
    return True


async def _range(side: Side, ctx: Context, args: tuple[Any, ...]) -> Any:
    request = _build_range(args[0], side, ctx)
    try:
        return _range_out(side, await side.backend.range(request), request)
    except Exception as exc:
        return _error(side, exc)


async def _grant(side: Side, ttl: int, *, short: bool) -> Any:
    try:
        lease = await side.backend.grant(ttl)
        side.leases.append(lease.id)
        if not short:
            return ("lease", lease.ttl)
        # a short lease could expire on the real clock mid-sequence (on either side, at different moments):
        # compare what was granted, then revoke it at once (idempotent, even if it did expire)
        await side.backend.revoke(lease.id)
        return ("lease", lease.ttl)
    except Exception as exc:
        return _error(side, exc)


async def _lease_op(side: Side, kind: str, ref: LeaseRef | int) -> Any:
    lease_id = side.lease_in(ref)
    try:
        if kind == "refresh":
            return ("ttl", await side.backend.refresh(lease_id))
        if kind == "revoke":
            await side.backend.revoke(lease_id)
        else:
            await side.expire(lease_id)
        return ("ok",)
    except Exception as exc:
        return _error(side, exc)


def _matches(key: bytes, spec: WatchSpec) -> bool:
    return key.startswith(spec.key) if spec.prefix else key == spec.key


async def _read_until(batches: AsyncIterator[WatchBatch], last: int) -> list[WatchBatch]:
    out: list[WatchBatch] = []
    while not out or out[-1].revision < last:
        out.append(await anext(batches))
    return out


async def _watch(side: Side, ctx: Context, args: tuple[Any, ...]) -> Any:
    specs: tuple[WatchSpec, ...] = args[0]
    fence: PutSpec = args[1]
    starts = [ctx.resolve(s.start) if isinstance(s.start, Rev) else 0 for s in specs]  # 0: "now"
    outcomes: list[Any] = [None] * len(specs)
    notices: list[int] = [0] * len(specs)
    try:
        return await _watch_all(side, ctx, specs, fence, starts, outcomes, notices)
    except TimeoutError:  # a watch that does not deliver what the other side's does (or hangs on both)
        return ("watch timed out", tuple(outcomes))


async def _watch_all(
    side: Side,
    ctx: Context,
    specs: tuple[WatchSpec, ...],
    fence: PutSpec,
    starts: list[int],
    outcomes: list[Any],
    notices: list[int],
) -> Any:
    compacted_below = ctx.compact_revision  # memory's view decides what to expect, the same on both sides
    fence_revision = ctx.revision + 1
    with anyio.fail_after(20):
        async with AsyncExitStack() as stack:
            streams: list[AsyncIterator[WatchBatch] | None] = []
            for i, (spec, start) in enumerate(zip(specs, starts, strict=True)):
                try:
                    streams.append(
                        await stack.enter_async_context(
                            side.backend.watch(spec.key, prefix=spec.prefix, start_revision=side.rev_in(start))
                        )
                    )
                    if start == 0:
                        stream = streams[-1]
                        assert stream is not None
                        notices[i] = side.rev_out((await anext(stream)).revision)
                except Exception as exc:
                    streams.append(None)
                    outcomes[i] = _error(side, exc)
            live = [s for s, stream in zip(starts, streams, strict=True) if stream is not None and s >= 1]
            full_start = min([s for s in live if s >= compacted_below and s <= fence_revision] + [fence_revision])
            whole = side.backend.watch(b"", prefix=True, start_revision=side.rev_in(full_start))
            full = await stack.enter_async_context(whole)
            fenced = await _txn(side, ctx, ((), (fence,), ()))
            everything = await _read_until(full, side.rev_in(fence_revision))
            for i, (spec, start, stream) in enumerate(zip(specs, starts, streams, strict=True)):
                if stream is None:
                    continue
                if start > fence_revision:
                    outcomes[i] = ("future",)
                    continue
                if start and start < compacted_below:
                    try:
                        outcomes[i] = ("unexpected", _batches_out(side, [await anext(stream)]))
                    except Exception as exc:
                        outcomes[i] = _error(side, exc)
                    continue
                since = start if start else notices[i] + 1
                due = [
                    b.revision
                    for b in everything
                    if side.rev_out(b.revision) >= since and any(_matches(e.kv.key, spec) for e in b.events)
                ]
                try:
                    got = await _read_until(stream, due[-1]) if due else []
                    outcomes[i] = ("batches", notices[i], _batches_out(side, got))
                except Exception as exc:
                    outcomes[i] = _error(side, exc)
    return ("watch", fenced, full_start, _batches_out(side, everything), tuple(outcomes))


async def _compact(side: Side, ctx: Context, rev: Rev) -> Any:
    return ("compact", await side.compact(side.rev_in(ctx.resolve(rev))))


async def run_step(side: Side, ctx: Context, step: Step) -> Any:
    kind, args = step.kind, step.args
    if kind == "txn":
        return await _txn(side, ctx, args)
    if kind == "range":
        return await _range(side, ctx, args)
    if kind in ("grant", "grant_short"):
        return await _grant(side, args[0], short=kind == "grant_short")
    if kind in ("refresh", "revoke", "expire"):
        return await _lease_op(side, kind, args[0])
    if kind == "compact":
        return await _compact(side, ctx, args[0])
    if kind == "watch":
        return await _watch(side, ctx, args)
    if kind == "big":
        return tuple([await run_step(side, ctx, Step(k, a)) for k, a in args])
    raise AssertionError(kind)


# -- a sequence on both sides -------------------------------------------------------------------------------------


@dataclass
class Divergence:
    index: int
    step: Step
    memory: Any
    etcd: Any


def _memory_side(memory: MemoryBackend) -> Side:
    async def compact(revision: int) -> str:
        try:
            memory.faults.compact(revision)
        except CompactedError:
            return "compacted"
        except ValueError:
            return "future"
        return "ok"

    async def expire(lease_id: int) -> None:
        memory.faults.expire_lease(lease_id)

    return Side("memory", memory, compact, expire)


def _etcd_side(server: EtcdServer, backend: EtcdBackend) -> Side:
    async def compact(revision: int) -> str:
        try:
            await anyio.to_thread.run_sync(server.compact, revision)
        except RuntimeError as exc:
            text = str(exc)
            return "compacted" if "compacted" in text else "future" if "future" in text else text
        return "ok"

    async def expire(lease_id: int) -> None:
        await backend.revoke(lease_id)  # what EtcdHarness.expire_lease does: etcd cannot expire a lease on demand

    return Side("etcd", backend, compact, expire)


PREAMBLE = (
    Step("txn", ((), (PutSpec(b"\x00", b""),), ())),
    Step("txn", ((), (DeleteSpec(b"\x00"),), ())),
    Step("compact", (Rev("cur", 0),)),
)


async def run_sequence(server: EtcdServer, steps: Sequence[Step], *, seed: int) -> Divergence | None:
    """Run ``steps`` on a fresh MemoryBackend and on the (wiped) etcd; the first divergence, or None."""
    async with MemoryBackend(seed=seed) as memory, EtcdBackend(server.endpoint) as etcd:
        await etcd.txn([], [Delete(b"", prefix=True)])  # what earlier sequences left
        mem, real = _memory_side(memory), _etcd_side(server, etcd)
        for index, step in enumerate(PREAMBLE):
            if step.kind == "compact":  # the writes are done: from here on, etcd's revisions are memory's + offset
                real.offset = (await etcd.range(Range(b"\x00"))).revision - memory.store.revision
            ctx = Context.of(memory)
            got_memory, got_etcd = await run_step(mem, ctx, step), await run_step(real, ctx, step)
            if step.kind == "compact" and got_memory != got_etcd:
                return Divergence(-len(PREAMBLE) + index, step, got_memory, got_etcd)
        try:
            for index, step in enumerate(steps):
                ctx = Context.of(memory)  # symbolic parts resolve against the state before the step
                got_memory = await run_step(mem, ctx, step)
                got_etcd = await run_step(real, ctx, step)
                if got_memory != got_etcd:
                    return Divergence(index, step, got_memory, got_etcd)
        finally:
            for side in (mem, real):
                for lease_id in side.leases:
                    await side.backend.revoke(lease_id)
    return None


# -- failing well: shortest diverging prefix, a smaller subsequence, and how to replay both --------------------


async def _diverges_last(server: EtcdServer, steps: Sequence[Step], seed: int) -> Divergence | None:
    """The divergence of ``steps`` if it is at their last step (what a shrunk candidate must keep)."""
    found = await run_sequence(server, steps, seed=seed)
    return found if found is not None and found.index == len(steps) - 1 else None


async def shrink(
    server: EtcdServer, seed: int, steps: Sequence[Step], found: Divergence, *, budget: float = 60.0
) -> tuple[list[int], Divergence]:
    """Remove steps before the diverging one while the last step still diverges (chunks, then single steps)."""
    kept = list(range(found.index + 1))
    deadline = time.monotonic() + budget
    chunk = max(1, len(kept) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i = 0
        while i < len(kept) - 1 and time.monotonic() < deadline:
            candidate = kept[:i] + kept[min(i + chunk, len(kept) - 1) :]
            result = await _diverges_last(server, [steps[j] for j in candidate], seed)
            if result is not None:
                kept, found = candidate, result
            else:
                i += chunk
        chunk //= 2
    return kept, found


def _report(seed: int, steps: Sequence[Step], prefix: Divergence, kept: list[int], small: Divergence) -> str:
    lines = [
        f"MemoryBackend and etcd diverge: sequence seed {seed}, at step {prefix.index} (the shortest diverging "
        f"prefix is the first {prefix.index + 1} steps).",
        f"  replay: COORDKIT_DIFF_SEED={seed} COORDKIT_DIFF_OPS={prefix.index + 1} "
        "pytest tests/test_differential.py::test_memory_backend_matches_etcd",
        f"  step:   {prefix.step!r}",
        f"  memory: {prefix.memory!r}",
        f"  etcd:   {prefix.etcd!r}",
        f"A subsequence of {len(kept)} steps still diverges at its last step:",
        f"  replay: COORDKIT_DIFF_SEED={seed} COORDKIT_DIFF_KEEP={','.join(map(str, kept))} "
        "pytest tests/test_differential.py::test_memory_backend_matches_etcd",
    ]
    lines += [f"  [{j}] {steps[j]!r}" for j in kept]
    lines += [f"  memory: {small.memory!r}", f"  etcd:   {small.etcd!r}"]
    return "\n".join(lines)


async def check_sequences(server: EtcdServer, seeds: Sequence[int], length: int, *, progress: bool = False) -> int:
    """Run every sequence; fail with a replayable report at the first divergence. Returns how many ran."""
    keep = os.environ.get("COORDKIT_DIFF_KEEP")
    ran = 0
    started = time.monotonic()
    for seed in seeds:
        if progress and ran and ran % 100 == 0:
            print(f"differential: {ran} sequences agree ({time.monotonic() - started:.0f} s)", flush=True)
        steps = make_sequence(seed, length)
        if keep:
            steps = [steps[int(i)] for i in keep.split(",")]
        found = await run_sequence(server, steps, seed=seed)
        ran += 1
        if found is not None:
            kept, small = await shrink(server, seed, steps, found)
            pytest.fail(_report(seed, steps, found, kept, small), pytrace=False)
    return ran


def _seeds(default: Iterator[int] | range) -> Sequence[int]:
    seed = os.environ.get("COORDKIT_DIFF_SEED")
    return [int(seed)] if seed is not None else list(default)


def _request_id_bytes(server: EtcdServer) -> int:
    """Bytes of the varint of this server's raft request ids: their top 16 bits are the member id's low 16 bits."""
    with urllib.request.urlopen(f"{server.endpoint}/v3/maintenance/status", data=b"{}", timeout=10) as reply:
        member_id = int(json.loads(reply.read())["header"]["member_id"])
    top = member_id & 0xFFFF
    return 10 if top >= 0x8000 else 9 if top >= 0x100 else 8


@pytest.fixture(scope="module")
def diff_server() -> Iterator[EtcdServer]:
    """A dedicated etcd: each sequence wipes its keys and compacts it, which no other test may see.

    Its raft request ids take 10 bytes (MemoryBackend counts the largest id; a server with shorter ones accepts a
    write up to 3 bytes longer): new servers are started until one does, as about half of them do.
    """
    binary = os.environ.get("COORDKIT_DIFF_ETCD")  # another etcd to compare with (e.g. Debian's 3.4)
    for _ in range(20):
        with EtcdServer(etcd_binary=binary, unsafe_no_fsync=binary is None) as server:  # 3.4 lacks the flag
            if _request_id_bytes(server) == 10:
                yield server
                return
    pytest.fail("20 etcd servers in a row had request ids shorter than 10 bytes")


def test_memory_backend_matches_etcd(diff_server: EtcdServer) -> None:
    """8 sequences of 200 operations: every response, revision, event batch and error class is the same."""
    length = int(os.environ.get("COORDKIT_DIFF_OPS", OPS))
    anyio.run(check_sequences, diff_server, _seeds(range(SHORT_SEQUENCES)), length, backend="asyncio")


@pytest.mark.chaos
@pytest.mark.slow
def test_memory_backend_matches_etcd_long(diff_server: EtcdServer) -> None:
    """COORDKIT_DIFF_SEQUENCES sequences (default 10,000) of COORDKIT_DIFF_LENGTH operations (default 200)."""
    seeds = _seeds(range(1_000_000, 1_000_000 + SEQUENCES))
    ran = anyio.run(partial(check_sequences, progress=True), diff_server, seeds, OPS, backend="asyncio")
    print(f"{ran} sequences of {OPS} operations: MemoryBackend and etcd agree")


def test_the_differential_catches_a_broken_memory_backend(
    diff_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proof that the comparison can fail: an off-by-one mod_revision on a key's third write is found and shrunk."""
    from coordkit._backends.memory import MemoryStore

    put = MemoryStore._put

    def broken(self: MemoryStore, op: Put, revision: int, events: list[Any]) -> None:
        put(self, op, revision, events)
        kv = self._kvs[op.key]
        if kv.version == 3:
            self._kvs[op.key] = kv._replace(mod_revision=kv.mod_revision + 1)

    monkeypatch.setattr(MemoryStore, "_put", broken)

    async def main() -> None:
        steps = make_sequence(0, OPS)
        found = await run_sequence(diff_server, steps, seed=0)
        assert found is not None, "an off-by-one mod_revision went unnoticed"
        kept, small = await shrink(diff_server, 0, steps, found, budget=10)
        assert len(kept) < found.index + 1
        assert small.memory != small.etcd

    anyio.run(main, backend="asyncio")


# -- regressions: one per divergence the differential found (each runs on memory and on etcd) --------------------


@pytest.mark.anyio
async def test_a_count_only_read_is_never_more(harness: Harness) -> None:
    """etcd returns no keys for count_only, so ``more`` stays false whatever the limit (memory said true)."""
    ns = harness.namespace
    async with harness.client() as client:
        await client.txn([], [Put(ns + b"%d" % i, b"v") for i in range(3)])
        result = await client.range(Range(ns, prefix=True, limit=1, count_only=True))
        assert (result.kvs, result.count, result.more) == ((), 3, False)
        result = await client.range(Range(ns, prefix=True, limit=1, count_only=True, max_create_revision=1))
        assert (result.kvs, result.count, result.more) == ((), 3, False), "counted before the create filters"
        result = await client.range(Range(ns, prefix=True, limit=1))
        assert (len(result.kvs), result.count, result.more) == (1, 3, True)


@pytest.mark.anyio
async def test_a_watch_from_the_compact_revision_sees_its_puts_but_not_its_deletions(harness: Harness) -> None:
    """etcd's compaction removes a tombstone made at the compact revision itself (memory kept the DELETE event).

    An etcd bug (etcd-io/etcd#18089) fixed in patch releases from August 2024 on; this etcd (3.5.1) has it, and
    MemoryBackend keeps the stricter behaviour. On a fixed etcd the etcd half of this test fails: update it then.
    """
    ns = harness.namespace
    async with harness.client() as client:
        await client.txn([], [Put(ns + b"gone", b""), Put(ns + b"also-gone", b"")])
        mixed = (await client.txn([], [Delete(ns + b"gone"), Put(ns + b"new", b"1")])).revision
        deletes_only = (await client.txn([], [Delete(ns + b"also-gone")])).revision
        after = (await client.txn([], [Put(ns + b"after", b"")])).revision
        await harness.compact(mixed)
        with anyio.fail_after(10):
            async with client.watch(ns, prefix=True, start_revision=mixed) as batches:
                batch = await anext(batches)
                assert batch.revision == mixed
                assert [(e.type.value, e.kv.key) for e in batch.events] == [("PUT", ns + b"new")]
                assert (await anext(batches)).revision == deletes_only  # later deletions are history as usual
        await harness.compact(deletes_only)
        with anyio.fail_after(10):
            async with client.watch(ns, prefix=True, start_revision=deletes_only) as batches:
                assert (await anext(batches)).revision == after, "a revision of deletions only is gone entirely"


@pytest.mark.anyio
async def test_the_missing_lease_of_a_transaction_is_the_one_named(harness: Harness) -> None:
    """etcd does not say which lease a refused txn lacked: EtcdBackend named the first lease of either branch."""
    ns = harness.namespace
    async with harness.client() as client:
        live, gone = (await client.grant(60)).id, (await client.grant(60)).id
        await client.revoke(gone)
        try:
            with pytest.raises(LeaseExpiredError) as caught:
                await client.txn([], [Put(ns + b"a", b"", live), Put(ns + b"b", b"", gone)])
            assert caught.value.lease_id == gone
            absent = Compare.version(ns + b"a", "==", 0)
            with pytest.raises(LeaseExpiredError) as caught:  # the failure branch ran: its lease is the one
                await client.txn(
                    [Compare.version(ns + b"a", "!=", 0)], [Put(ns + b"a", b"", live)], [Put(ns + b"b", b"", gone)]
                )
            assert caught.value.lease_id == gone
            # the branch that does not run is not checked, on both
            assert (await client.txn([absent], [Put(ns + b"a", b"", live)], [Put(ns + b"b", b"", gone)])).succeeded
        finally:
            await client.revoke(live)


def test_compare_keys_cannot_be_empty(diff_server: EtcdServer) -> None:
    """etcd refuses a transaction with an empty compare key ("key is not provided"); memory evaluated it."""
    with pytest.raises(ValueError, match="empty key"):
        Compare.value(b"", "==", b"")
    with pytest.raises(ValueError, match="empty key"):
        Compare.version(b"", "==", 0)

    async def etcd_refuses() -> None:
        async with EtcdBackend(diff_server.endpoint) as etcd:
            body = {"compare": [{"key": "", "target": "VERSION", "version": "0"}]}
            with pytest.raises(BackendError, match="key is not provided"):
                await etcd._client.call("/kv/txn", body, idempotent=False)

    anyio.run(etcd_refuses, backend="asyncio")


def test_a_put_inside_an_unbounded_delete_is_refused_though_etcd_would_take_it(diff_server: EtcdServer) -> None:
    """The one place coordkit is stricter than etcd, on every backend alike (so not a MemoryBackend divergence).

    etcd's overlap check reads the range end ``\\x00`` ("to the end of the keyspace") literally, as an empty
    interval: it accepts a put inside a delete of the empty or an all-0xff prefix. coordkit refuses it as the
    duplicate key it is, as etcd does for every bounded range.
    """
    for backend in (MemoryBackend(), EtcdBackend(diff_server.endpoint)):
        for prefix in (b"", b"\xff"):
            ops: list[Put | Delete] = [Put(b"\xff\xff", b""), Delete(prefix, prefix=True)]
            with pytest.raises(ValueError, match="duplicate key"):
                anyio.run(backend.txn, [], ops, backend="asyncio")

    async def etcd_accepts() -> None:
        async with EtcdBackend(diff_server.endpoint) as etcd:
            ops = [_request_op(Put(b"\xff\xff", b"")), _request_op(Delete(b"", prefix=True))]
            reply = await etcd._client.call("/kv/txn", {"success": ops}, idempotent=False)
            assert reply.get("succeeded")
            bounded = [_request_op(Put(b"a/1", b"")), _request_op(Delete(b"a/", prefix=True))]
            with pytest.raises(BackendError, match="duplicate key"):
                await etcd._client.call("/kv/txn", {"success": bounded}, idempotent=False)

    anyio.run(etcd_accepts, backend="asyncio")


#: shapes of requests near a size limit, and that limit: raft's for a write, gRPC's for a read-only transaction
SIZE_SHAPES: dict[str, tuple[int, Callable[[int], tuple[list[Compare], list[Any], list[Any]]]]] = {
    "put": (MAX_REQUEST_BYTES, lambda n: ([], [Put(b"k", b"x" * n)], [])),
    "put with a lease and a compare": (
        MAX_REQUEST_BYTES,
        # a lease id that is never granted, the same on both sides: its varint's length counts too
        lambda n: ([Compare.value(b"k", "!=", b"y" * 10)], [Put(b"k", b"x" * n, 2**62 + 12345)], []),
    ),
    "a negative int64 operand": (
        MAX_REQUEST_BYTES,
        lambda n: ([Compare.version(b"k", "<", -5)], [Put(b"k", b"x" * n)], []),
    ),
    "a prefix delete": (MAX_REQUEST_BYTES, lambda n: ([], [Delete(b"k" * (n // 2), prefix=True)], [])),
    "the failure branch": (MAX_REQUEST_BYTES, lambda n: ([Compare.version(b"k", "==", 0)], [], [Put(b"k", b"x" * n)])),
    "read-only: a compare": (MAX_MESSAGE_BYTES, lambda n: ([Compare.value(b"k", "==", b"x" * n)], [], [])),
    "read-only: a range": (
        MAX_MESSAGE_BYTES,
        lambda n: ([], [Range(b"k" * n, limit=3, sort_by="mod", keys_only=True)], []),
    ),
}


def test_request_sizes_are_refused_at_the_same_byte_as_etcd(diff_server: EtcdServer) -> None:
    """MemoryBackend counted keys and values only: etcd refused writes 30-40 bytes smaller (protobuf framing and the
    raft header). Now the largest request memory accepts is the largest this etcd accepts, for every shape."""

    async def accepted(backend: Backend, shape: Callable[[int], Any], n: int) -> bool:
        try:
            await backend.txn(*shape(n))
        except RequestTooLargeError:
            return False
        except LeaseExpiredError:
            pass  # the size is checked first: refused for its lease only
        finally:
            await backend.txn([], [Delete(b"k"), Delete(b"j")])  # keep the stores (and memory's history) small
        return True

    async def main() -> None:
        async with EtcdBackend(diff_server.endpoint) as etcd:
            for name, (limit, shape) in SIZE_SHAPES.items():
                lo, hi = limit - 256, limit  # memory accepts lo and refuses hi (checked below)
                memory = MemoryBackend()
                assert await accepted(memory, shape, lo) and not await accepted(memory, shape, hi)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if await accepted(memory, shape, mid) else (lo, mid)
                assert await accepted(etcd, shape, lo), f"{name}: etcd refuses {lo} bytes, which memory accepts"
                assert not await accepted(etcd, shape, hi), f"{name}: etcd accepts {hi} bytes, memory does not"
            for n, fits in ((MAX_MESSAGE_BYTES - 4, True), (MAX_MESSAGE_BYTES - 3, False)):  # key: 1 + 3 bytes
                for backend in (MemoryBackend(), etcd):
                    outcome = await _range_fits(backend, Range(b"k" * n))
                    assert outcome is fits, f"{backend.name}: a range of a {n}-byte key"

    anyio.run(main, backend="asyncio")


async def _range_fits(backend: Backend, request: Range) -> bool:
    try:
        await backend.range(request)
    except RequestTooLargeError:
        return False
    return True


def test_keys_with_equal_sort_values_come_in_no_promised_order() -> None:
    """etcd sorts with Go's unstable sort (ties move once 7 keys or more are sorted, and differently between etcd
    builds): memory kept ties in key order, so code relying on that passed on memory only. Now memory shuffles
    ties, reproducibly for a seed. (Differential sequences compare ties as sets.)"""

    async def order(seed: int) -> tuple[bytes, ...]:
        backend = MemoryBackend(seed=seed)
        await backend.txn([], [Put(b"k%d" % i, b"same") for i in range(5)] + [Put(b"z", b"a")])
        result = await backend.range(Range(b"", prefix=True, sort_by="value"))
        assert result.kvs[0].key == b"z", "sorted by value first"
        return tuple(kv.key for kv in result.kvs[1:])

    async def main() -> None:
        orders = {await order(seed) for seed in range(20)}
        assert all(sorted(keys) == [b"k%d" % i for i in range(5)] for keys in orders)
        assert len(orders) > 1, "ties always came in the same order"
        assert await order(7) == await order(7), "the same seed, the same order"

    anyio.run(main, backend="asyncio")


@pytest.mark.anyio
async def test_a_watch_of_the_empty_key_is_refused(harness: Harness) -> None:
    """etcd watched the key ``\\x00`` for ``watch(b"")`` and memory a key no store can hold; now both refuse it,
    as ``Range(b"")`` is (the empty key is only a prefix, and the empty prefix is every key)."""
    async with harness.client() as client:
        with pytest.raises(ValueError, match="empty key"):
            client.watch(b"", start_revision=0)
        with pytest.raises(TypeError):
            client.watch("k", start_revision=0)  # type: ignore[arg-type]
        with anyio.fail_after(10):
            async with client.watch(b"", prefix=True, start_revision=0) as batches:
                await anext(batches)  # the notice: the empty prefix is fine
