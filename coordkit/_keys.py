"""Key helpers: key ranges (shared by every backend) and the validated key prefix of a recipe's name."""

from __future__ import annotations

MAX_REQUEST_BYTES = 1536 * 1024
"""etcd's default ``--max-request-bytes`` (1.5 MiB): a larger request is refused (`RequestTooLargeError`).

MemoryBackend refuses what etcd with this default refuses; a value, with its key and the request's other
operations, must fit in it.
"""


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


def name_prefix(name: str) -> bytes:
    """Validate a recipe name and return its key prefix ``<name>/``.

    Raises:
        TypeError: not a str.
        ValueError: empty, not valid UTF-8 (lone surrogates), containing NUL, or longer than a whole request may
            be (1.5 MiB: every request of a recipe carries its name).
    """
    if not isinstance(name, str):
        raise TypeError(f"names are str, not {type(name).__name__}")
    if not name:
        raise ValueError("the name must not be empty")
    shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}..."
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the name must be valid UTF-8 text: {shown}") from exc
    if len(encoded) > MAX_REQUEST_BYTES:
        raise ValueError(f"the name is {len(encoded)} bytes long; etcd refuses requests over {MAX_REQUEST_BYTES}")
    if "\x00" in name:
        raise ValueError(f"the name must not contain NUL characters: {shown}")
    return encoded + b"/"


def check_name(name: str) -> None:
    """Check that ``name`` can name a recipe (a lock, an election, a group, a queue, ...), before using it.

    Every recipe checks its name itself; this is for programs that take names from their users (a command
    line, a config file) and want to refuse a bad one early.

    Raises:
        TypeError: not a str.
        ValueError: empty, not valid UTF-8 (lone surrogates), containing NUL, or longer than a whole request may
            be (`MAX_REQUEST_BYTES`: every request of a recipe carries its name).
    """
    name_prefix(name)


def name_key(name: str) -> bytes:
    """Validate a recipe name and return it as a key of its own (a counter, a barrier), checked as `name_prefix`."""
    return name_prefix(name)[:-1]
