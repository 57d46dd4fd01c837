"""Key helpers shared by every backend."""

from __future__ import annotations


def prefix_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that starts with ``prefix``.

    ``b""`` means "to the end of the keyspace" (a prefix that is empty or all ``0xff`` has no upper bound).
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b""


def in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    """Whether ``key`` is in ``[start, end)``; ``end`` None means the single key ``start``, b"" no bound."""
    if end is None:
        return key == start
    return key >= start and (end == b"" or key < end)
