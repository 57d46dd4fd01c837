"""etcd's limits on a request, counted as etcd counts them, for the backends that are not etcd (memory,
PostgreSQL): they refuse exactly what etcd refuses, at the same byte."""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import BackendError, RequestTooLargeError
from .._keys import prefix_end
from .types import MAX_REQUEST_BYTES, Compare, CompareTarget, Delete, Op, Put, Range

#: etcd's smallest lease TTL with its default heartbeat (100 ms) and election timeout (1 s): shorter asks get it.
MIN_LEASE_TTL = 2
#: etcd's default ``--max-txn-ops``: more compares, or more operations in a branch, are refused.
MAX_TXN_OPS = 128
#: gRPC refuses any message over etcd's ``--max-request-bytes`` + 512 KiB, reads and watches included.
MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES + 512 * 1024


# -- request sizes, counted as etcd counts them -----------------------------------------------------------------
#
# etcd refuses a request by the size of its protobuf encoding: gRPC any message over MAX_MESSAGE_BYTES, raft a
# write whose proposal (the transaction plus a header with the request id) is over MAX_REQUEST_BYTES. So sizes
# are counted as protobuf encodes what EtcdBackend sends, field by field: refused at the same byte as etcd.

_COMPARE_RESULT = {"==": 0, ">": 1, "<": 2, "!=": 3}  # etcd's Compare.CompareResult numbers
_COMPARE_TARGET = {
    CompareTarget.VERSION: 0,
    CompareTarget.CREATE: 1,
    CompareTarget.MOD: 2,
    CompareTarget.VALUE: 3,
    CompareTarget.LEASE: 4,
}
_SORT_TARGET = {"key": 0, "version": 1, "create": 2, "mod": 3, "value": 4}
#: a raft proposal's header: field 100 (a 2-byte tag), its length, and the request id (a uint64 varint of up to
#: 10 bytes: the member id is in its top bits). Counted at its largest: never accept what some server refuses.
_RAFT_HEADER = 2 + 1 + 1 + 10


def _varint(n: int) -> int:
    """Bytes of a protobuf varint (a negative int64 takes 10)."""
    if n < 0:
        return 10
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _nested(size: int, tag: int = 1) -> int:
    """A length-delimited field of ``size`` bytes (a tag of ``tag`` bytes)."""
    return tag + _varint(size) + size


def _bytes_field(data: bytes) -> int:
    return _nested(len(data)) if data else 0  # proto3 leaves out empty bytes


def _int_field(n: int) -> int:
    return 1 + _varint(n) if n else 0


def _bounds_size(key: bytes, prefix: bool) -> int:
    """``key`` and ``range_end`` as sent: the empty prefix starts at ``\\x00``, an unbounded one ends at ``\\x00``."""
    if not prefix:
        return _bytes_field(key)
    return _bytes_field(key or b"\x00") + _bytes_field(prefix_end(key) or b"\x00")


def _range_size(r: Range) -> int:
    size = _bounds_size(r.key, r.prefix) + _int_field(r.limit)
    if r.sort_by != "key" or r.descending:
        size += _int_field(2 if r.descending else 1) + _int_field(_SORT_TARGET[r.sort_by])
    size += _int_field(r.min_create_revision) + _int_field(r.max_create_revision)
    return size + 2 * r.keys_only + 2 * r.count_only


def _op_size(op: Op) -> int:
    if isinstance(op, Put):
        inner = _bytes_field(op.key) + _bytes_field(op.value) + _int_field(op.lease)
    elif isinstance(op, Delete):
        inner = _bounds_size(op.key, op.prefix)
    else:
        inner = _range_size(op)
    return _nested(inner)  # a RequestOp: one field, present even when empty


def _compare_size(c: Compare) -> int:
    operand = _nested(len(c.operand)) if isinstance(c.operand, bytes) else 1 + _varint(c.operand)  # a oneof: always
    return _int_field(_COMPARE_RESULT[c.op]) + _int_field(_COMPARE_TARGET[c.target]) + _bytes_field(c.key) + operand


def _too_large(size: int, limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"request is too large ({size} bytes > {limit})")


def check_range_size(request: Range) -> None:
    """Refuse a range whose request gRPC would refuse (RequestTooLargeError)."""
    size = _range_size(request)
    if size > MAX_MESSAGE_BYTES:
        raise _too_large(size, MAX_MESSAGE_BYTES)


def check_watch_size(key: bytes, prefix: bool, start_revision: int) -> None:
    """Refuse a watch whose create request gRPC would refuse (RequestTooLargeError)."""
    # a WatchRequest holding a create request: the range, the start revision and progress_notify (as sent)
    size = _nested(_bounds_size(key, prefix) + _int_field(start_revision) + 2)
    if size > MAX_MESSAGE_BYTES:
        raise _too_large(size, MAX_MESSAGE_BYTES)


def check_txn_limits(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> None:
    """Refuse a transaction as etcd does, in etcd's order: gRPC's size limit, then the operation count
    (``BackendError``, as etcd's "too many operations"), then the raft proposal's size limit (for a write)."""
    size = sum(_nested(_compare_size(c)) for c in compare) + sum(_nested(_op_size(op)) for op in (*success, *failure))
    if size > MAX_MESSAGE_BYTES:
        raise _too_large(size, MAX_MESSAGE_BYTES)
    if max(len(compare), len(success), len(failure)) > MAX_TXN_OPS:
        raise BackendError("etcdserver: too many operations in txn request")
    if any(not isinstance(op, Range) for op in (*success, *failure)):
        proposal = _RAFT_HEADER + _nested(size)
        if proposal > MAX_REQUEST_BYTES:
            raise _too_large(proposal, MAX_REQUEST_BYTES)
