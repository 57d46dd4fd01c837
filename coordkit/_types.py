"""Data types of the backend protocol (etcd v3 semantics)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Union

CompareOp = Literal["==", "!=", "<", ">"]
SortBy = Literal["key", "create", "mod", "version", "value"]


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored: its value, revisions, version and the lease it is bound to (0 for none)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class CompareTarget(enum.Enum):
    """What a :class:`Compare` looks at."""

    CREATE = "CREATE"
    MOD = "MOD"
    VERSION = "VERSION"
    VALUE = "VALUE"
    LEASE = "LEASE"


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition of a transaction on one key. A missing key has revisions, version and lease 0.

    As in etcd, a value comparison on a missing key is false whatever the operator. Build them with the
    class methods: ``Compare.create(key, "==", 0)`` (key absent), ``Compare.mod(key, "==", rev)`` (unchanged).
    """

    key: bytes
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes):
            raise TypeError(f"compare key must be bytes, not {type(self.key).__name__}")
        if self.op not in ("==", "!=", "<", ">"):
            raise ValueError(f"compare operator must be one of == != < >, not {self.op!r}")
        want = bytes if self.target is CompareTarget.VALUE else int
        if not isinstance(self.operand, want) or isinstance(self.operand, bool):
            raise TypeError(f"{self.target.value} compare needs a {want.__name__} operand")

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


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key``, or every key starting with it when ``prefix`` is true."""

    key: bytes
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Range:
    """Read ``key``, or every key starting with it when ``prefix`` is true (``b""`` with prefix: all keys).

    Attributes:
        limit: at most this many keys (0: no limit); ``RangeResult.more`` tells whether some were left out.
        sort_by / descending: order of the result (default: by key, ascending).
        max_create_revision: only keys created at or before this revision (0: no bound).
        min_create_revision: only keys created at or after this revision (0: no bound).
        keys_only: leave values empty. count_only: return no keys, only the count.
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


Op = Union[Put, Delete, Range]


@dataclass(frozen=True, slots=True)
class RangeResult:
    """Keys read, the number that matched (before ``limit``), and the store revision of the read."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int


@dataclass(frozen=True, slots=True)
class PutResult:
    """A put inside a transaction; ``revision`` is the transaction's revision."""

    revision: int


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """How many keys a delete removed."""

    deleted: int
    revision: int


OpResult = Union[RangeResult, PutResult, DeleteResult]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Which branch ran, the results of its operations in order, and the store revision after the transaction.

    A transaction that wrote nothing leaves the revision unchanged.
    """

    succeeded: bool
    responses: tuple[OpResult, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: its id and the TTL the server granted, in seconds."""

    id: int
    ttl: int


class EventType(enum.Enum):
    """Kind of a watch event."""

    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For a DELETE, ``kv`` carries the key and the deletion revision as ``mod_revision``."""

    type: EventType
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Every event of one store revision that matched a watch, in the order they were applied."""

    revision: int
    events: tuple[Event, ...] = field(default_factory=tuple)
