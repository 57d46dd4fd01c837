"""Data types of the backend protocol (etcd v3 semantics)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias

from .._keys import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES, in_range, prefix_end

CompareOp = Literal["==", "!=", "<", ">"]
_COMPARE_OPS = frozenset(("==", "!=", "<", ">"))
SortBy = Literal["key", "create", "mod", "version", "value"]


class KeyValue(NamedTuple):
    """One key as stored: its value, revisions, version and the lease it is bound to (0 for none).

    Attributes:
        key: the key.
        value: its value.
        create_revision: the revision that created the key (this incarnation of it).
        mod_revision: the revision of its last change.
        version: puts since it was created (1 after the first).
        lease: the lease it is bound to (0: none); the key goes when the lease ends.
    """

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class CompareTarget(enum.Enum):
    """What a `Compare` looks at."""

    CREATE = "CREATE"
    MOD = "MOD"
    VERSION = "VERSION"
    VALUE = "VALUE"
    LEASE = "LEASE"


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition of a transaction on one key. A missing key has revisions, version and lease 0.

    As in etcd, a value comparison on a missing key is false whatever the operator, and the key cannot be empty
    (etcd refuses the whole transaction: "key is not provided"). Build them with the
    class methods: ``Compare.create(key, "==", 0)`` (key absent), ``Compare.mod(key, "==", rev)`` (unchanged).

    Attributes:
        key: the key compared.
        target: what of it is compared.
        op: the operator: the key's ``target`` is on its left, ``operand`` on its right.
        operand: a revision, version or lease id (int), or a value (bytes).
    """

    key: bytes
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    def __post_init__(self) -> None:
        _check_compare(self)

    @classmethod
    def create(cls, key: bytes, op: CompareOp, revision: int) -> Compare:
        """Compare the key's create revision (0 when absent)."""
        return cls(key, CompareTarget.CREATE, op, revision)

    @classmethod
    def mod(cls, key: bytes, op: CompareOp, revision: int) -> Compare:
        """Compare the key's last modification revision (0 when absent)."""
        return cls(key, CompareTarget.MOD, op, revision)

    @classmethod
    def version(cls, key: bytes, op: CompareOp, version: int) -> Compare:
        """Compare the key's version: number of puts since creation (0 when absent)."""
        return cls(key, CompareTarget.VERSION, op, version)

    @classmethod
    def value(cls, key: bytes, op: CompareOp, value: bytes) -> Compare:
        """Compare the key's value bytewise (false for any operator when the key is absent)."""
        return cls(key, CompareTarget.VALUE, op, value)

    @classmethod
    def lease(cls, key: bytes, op: CompareOp, lease_id: int) -> Compare:
        """Compare the lease the key is bound to (0 when none or absent)."""
        return cls(key, CompareTarget.LEASE, op, lease_id)


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``value`` at ``key``, bound to ``lease`` (0: no lease)."""

    key: bytes
    value: bytes
    lease: int = 0

    def __post_init__(self) -> None:
        _check_put(self)


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key``, or every key starting with it when ``prefix`` is true."""

    key: bytes
    prefix: bool = False

    def __post_init__(self) -> None:
        _check_key(self.key, allow_empty=self.prefix)


@dataclass(frozen=True, slots=True)
class Range:
    """Read ``key``, or every key starting with it when ``prefix`` is true (``b""`` with prefix: all keys).

    Attributes:
        limit: at most this many keys (0: no limit); ``RangeResult.more`` tells whether some were left out.
        sort_by: what the result is ordered by (default: the key). Keys with equal values of another sort target
            come in no particular order (etcd's sort is not stable; MemoryBackend shuffles them).
        descending: reverse the order.
        max_create_revision: only keys created at or before this revision (0: no bound).
        min_create_revision: only keys created at or after this revision (0: no bound).
        keys_only: leave values empty.
        count_only: return no keys, only the count (``more`` is then false, as on etcd).
    """

    key: bytes
    prefix: bool = False
    limit: int = 0
    sort_by: SortBy = "key"
    descending: bool = False
    max_create_revision: int = 0
    min_create_revision: int = 0
    keys_only: bool = False
    count_only: bool = False

    def __post_init__(self) -> None:
        _check_range(self)


# The constructors above validate with these, and so do `check_txn` and `check_range`: a request made some other
# way (``object.__new__``, ``copy.replace`` of a foreign class, a pickle) is refused by the backend all the same.


def _check_compare(c: Compare) -> None:
    if type(c.key) is not bytes or not c.key:
        _check_key(c.key, allow_empty=False)
    if not isinstance(c.target, CompareTarget):
        raise TypeError(f"compare target must be a CompareTarget, not {type(c.target).__name__}")
    if c.op not in _COMPARE_OPS:
        raise ValueError(f"compare operator must be one of == != < >, not {c.op!r}")
    want = bytes if c.target is CompareTarget.VALUE else int
    if type(c.operand) is not want:
        raise TypeError(f"{c.target.value} compare needs a {want.__name__} operand")
    if isinstance(c.operand, int) and not -MAX_INT64 - 1 <= c.operand <= MAX_INT64:
        raise ValueError(f"{c.target.value} compare operand {c.operand} does not fit etcd's int64")


def _check_put(op: Put) -> None:
    if type(op.key) is not bytes or not op.key:
        _check_key(op.key, allow_empty=False)
    if type(op.value) is not bytes:
        raise TypeError(f"value must be bytes, not {type(op.value).__name__}")
    if type(op.lease) is not int or not 0 <= op.lease <= MAX_INT64:
        raise ValueError(f"lease must be an int from 0 to 2**63 - 1, not {op.lease!r}")


def _check_range(request: Range) -> None:
    _check_key(request.key, allow_empty=request.prefix)
    for name in ("limit", "max_create_revision", "min_create_revision"):
        value = getattr(request, name)
        if not isinstance(value, int) or not 0 <= value <= MAX_INT64:
            raise ValueError(f"{name} must be an int from 0 to 2**63 - 1, not {value!r}")
    if request.sort_by not in ("key", "create", "mod", "version", "value"):
        raise ValueError(f"sort_by must be key, create, mod, version or value, not {request.sort_by!r}")


def _check_key(key: object, *, allow_empty: bool) -> None:
    if not isinstance(key, bytes):
        raise TypeError(f"keys are bytes, not {type(key).__name__}")
    if not key and not allow_empty:
        raise ValueError("the empty key is only allowed as a prefix")


Op: TypeAlias = Put | Delete | Range


@dataclass(frozen=True, slots=True)
class RangeResult:
    """Keys read, the number that matched (before ``limit``), and the store revision of the read.

    Attributes:
        kvs: the keys read, in the requested order (none with ``count_only``).
        count: how many keys matched, before ``limit``.
        more: whether ``limit`` left some out.
        revision: the store revision of the read.
    """

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int


class PutResult(NamedTuple):
    """A put inside a transaction; ``revision`` is the transaction's revision."""

    revision: int


class DeleteResult(NamedTuple):
    """How many keys a delete removed.

    Attributes:
        deleted: the number of keys removed.
        revision: the transaction's revision.
    """

    deleted: int
    revision: int


OpResult: TypeAlias = RangeResult | PutResult | DeleteResult


class TxnResult(NamedTuple):
    """Which branch ran, the results of its operations in order, and the store revision after the transaction.

    A transaction that wrote nothing leaves the revision unchanged.

    Attributes:
        succeeded: whether every compare held (the success branch ran), or not (the failure branch).
        responses: one result per operation of the branch that ran, in order.
        revision: the store revision after the transaction.
    """

    succeeded: bool
    responses: tuple[OpResult, ...]
    revision: int


class Lease(NamedTuple):
    """A granted lease: its id and the TTL the server granted, in seconds.

    Attributes:
        id: the lease id.
        ttl: the TTL granted, in seconds (the server may grant more than asked).
    """

    id: int
    ttl: int


class EventType(enum.Enum):
    """Kind of a watch event."""

    PUT = "PUT"
    DELETE = "DELETE"


class Event(NamedTuple):
    """One change. For a DELETE, ``kv`` carries the key and the deletion revision as ``mod_revision``.

    Attributes:
        type: a put or a delete.
        kv: the key after the change.
    """

    type: EventType
    kv: KeyValue


class WatchBatch(NamedTuple):
    """Every event of one store revision that matched a watch, in the order they were applied.

    Attributes:
        revision: the store revision.
        events: its events (none in the notice a watch from now starts with).
    """

    revision: int
    events: tuple[Event, ...] = ()


#: etcd's largest lease TTL in seconds.
MAX_LEASE_TTL = 9_000_000_000
#: etcd's revisions, lease ids and compare operands are int64: larger numbers are refused.
MAX_INT64 = 2**63 - 1


def check_lease_id(lease_id: int) -> None:
    """Reject something that cannot be an etcd lease id (TypeError/ValueError), before anything is sent."""
    if not isinstance(lease_id, int) or isinstance(lease_id, bool):
        raise TypeError(f"lease ids are int, not {type(lease_id).__name__}")
    if not 0 <= lease_id <= MAX_INT64:
        raise ValueError(f"a lease id is an int from 0 to 2**63 - 1, not {lease_id}")


def check_start_revision(revision: int) -> None:
    """Reject a watch start revision etcd cannot take (TypeError/ValueError); 0 means "from now"."""
    if not isinstance(revision, int) or isinstance(revision, bool):
        raise TypeError(f"start_revision must be an int, not {type(revision).__name__}")
    if not 0 <= revision <= MAX_INT64:
        raise ValueError(f"start_revision must be an int from 0 to 2**63 - 1, not {revision}")


def check_watch_key(key: bytes, prefix: bool) -> None:
    """Reject a watch key as `Range` rejects a read's (TypeError/ValueError): the empty key only as a prefix.

    etcd would watch the key ``\\x00`` instead of the empty one, which no store can hold.
    """
    _check_key(key, allow_empty=prefix)


def check_range(request: Range) -> None:
    """Reject a read that is not a well-formed `Range` (TypeError/ValueError), before anything is sent.

    Checked as the constructor checks it, so a `Range` made without it (the empty key outside a prefix, a
    negative limit) is refused too.
    """
    if not isinstance(request, Range):
        raise TypeError(f"range takes a Range, not {type(request).__name__}")
    _check_range(request)


def check_ttl(ttl: int) -> None:
    """Reject a lease TTL no etcd server would grant (ValueError/TypeError), before anything is sent."""
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise TypeError(f"lease ttl must be an int number of seconds, not {type(ttl).__name__}")
    if not 1 <= ttl <= MAX_LEASE_TTL:
        raise ValueError(f"lease ttl must be between 1 and {MAX_LEASE_TTL} seconds, not {ttl}")


def check_txn(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> None:
    """Reject a malformed transaction the way etcd does, before anything is sent.

    Every compare and operation is checked as its constructor checks it, so one made without the constructor
    (``object.__new__``, a foreign caller) is refused too.

    Raises:
        TypeError: a part is not a sequence (a generator would be used up by this check, and the transaction
            then applied without its compares), or an element is not a Compare / Put / Delete / Range, or one
            of its fields has the wrong type (a key that is not bytes).
        ValueError: a branch writes one key twice (two puts, or a put inside a delete's range), as etcd's
            "duplicate key given in txn request". Slightly stricter than etcd, on every backend alike: etcd's check
            reads the range end of a delete with no upper bound (the empty or an all-0xff prefix) as an empty
            interval and lets a put inside it through; coordkit refuses that too.
    """
    for part, items in (("compare", compare), ("success", success), ("failure", failure)):
        if not isinstance(items, Sequence) or isinstance(items, str | bytes):
            raise TypeError(f"txn {part} must be a list or tuple, not {type(items).__name__}")
    for c in compare:
        if not isinstance(c, Compare):
            raise TypeError(f"txn compares must be Compare, not {type(c).__name__}")
        _check_compare(c)
    for branch in (success, failure):
        puts: set[bytes] = set()
        deletes: list[Delete] = []
        for op in branch:
            if isinstance(op, Put):
                _check_put(op)
                if op.key in puts:
                    raise ValueError(f"duplicate key given in txn request: {op.key!r}")
                puts.add(op.key)
            elif isinstance(op, Delete):
                _check_key(op.key, allow_empty=op.prefix)
                deletes.append(op)
            elif isinstance(op, Range):
                _check_range(op)
            else:
                raise TypeError(f"txn operations must be Put, Delete or Range, not {type(op).__name__}")
        for d in deletes:
            end = prefix_end(d.key) if d.prefix else None
            for key in puts:
                if in_range(key, d.key, end):
                    raise ValueError(f"duplicate key given in txn request: {key!r}")
