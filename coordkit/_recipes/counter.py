"""Counter: an integer in one key, changed only by compare-and-swap, so no update is ever lost.

The key is ``<name>`` itself; its value is the integer in decimal ASCII (``etcdctl get <name>`` shows it, any
language can read and write it). Every change is a transaction that compares the key's mod revision with the one
the change was computed from: under contention one writer wins and the others compute again from the value the
failed transaction read back (no extra round trip). An uncontended `Counter.add` is one transaction once the
counter object has seen the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import final

from .._backends.protocol import Backend
from .._backends.types import MAX_INT64, Compare, KeyValue, Put, Range, RangeResult
from .._errors import CoordkitError
from .._keys import name_key

#: what a counter's key holds: a decimal int64, optionally signed, surrounded by whitespace at most (int() accepts it)
_DECIMAL = re.compile(rb"\s*[-+]?[0-9]{1,19}\s*")


class CounterValueError(CoordkitError):
    """The counter's key holds something that is not a decimal integer (written by something else).

    Attributes:
        key: the counter's key.
        value: the bytes found there.
    """

    def __init__(self, key: bytes, value: bytes) -> None:
        self.key, self.value = key, value
        shown = value[:40] + (b"..." if len(value) > 40 else b"")
        super().__init__(f"counter {key.decode(errors='replace')!r} holds {shown!r}, not a decimal integer")


@dataclass(frozen=True, slots=True)
class CounterValue:
    """A counter's value and the revision it was read at.

    Attributes:
        value: the integer (0 for a counter never written).
        revision: the key's mod revision (0 for a counter never written): the ``expected_revision`` of
            `Counter.compare_and_set`.
    """

    value: int
    revision: int


@final
class Counter:
    """A distributed integer with atomic add, get and compare-and-set.

    ``await counter.add(5)`` returns the new value; concurrent adds from any number of processes are all counted
    (none is lost). ``await counter.get()`` reads the value and its revision; ``compare_and_set(value,
    expected_revision=...)`` writes only if nobody changed the counter since that read. Values stay within int64,
    so that any client can read them.

    Args:
        backend: the store.
        name: the counter's name: the key itself.
    """

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self._key = name_key(name)
        self._seen = CounterValue(0, 0)  # where the next add starts: the last value this object saw

    async def get(self) -> CounterValue:
        """The value now.

        Raises:
            CounterValueError: the key holds something that is not a decimal integer.
        """
        result = await self.backend.range(Range(self._key))
        self._seen = self._decode(result)
        return self._seen

    async def add(self, delta: int = 1) -> int:
        """Add ``delta`` (negative to subtract) atomically; return the new value.

        Not retried after an ambiguous failure: an `UnavailableError` means the add may or may not have been
        applied (read the value to find out).

        Raises:
            TypeError: ``delta`` is not an int.
            OverflowError: the result would leave int64; nothing is written.
            CounterValueError: the key holds something that is not a decimal integer.
        """
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise TypeError(f"delta is an int, not {type(delta).__name__}")
        seen = self._seen
        while True:
            new = _check_int64(seen.value + delta)
            # Write only over the value we computed from; if it changed, read it back in the same round trip.
            result = await self.backend.txn(
                [Compare.mod(self._key, "==", seen.revision)],
                [Put(self._key, str(new).encode())],
                [Range(self._key)],
            )
            if result.succeeded:
                self._seen = CounterValue(new, result.revision)
                return new
            current = result.responses[0]
            assert isinstance(current, RangeResult)
            seen = self._seen = self._decode(current)

    async def compare_and_set(self, value: int, *, expected_revision: int) -> int | None:
        """Set the value if the counter is still at ``expected_revision`` (0: never written).

        Returns:
            The revision of the write, or None when someone changed the counter since (nothing written).

        Raises:
            TypeError, OverflowError: ``value`` is not an int64.
        """
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"value is an int, not {type(value).__name__}")
        if not isinstance(expected_revision, int) or isinstance(expected_revision, bool):
            raise TypeError(f"expected_revision is an int, not {type(expected_revision).__name__}")
        _check_int64(value)
        # Compare-and-swap: only over the revision the caller based its value on, so no update is lost unseen.
        result = await self.backend.txn(
            [Compare.mod(self._key, "==", expected_revision)], [Put(self._key, str(value).encode())]
        )
        if not result.succeeded:
            return None
        self._seen = CounterValue(value, result.revision)
        return result.revision

    def _decode(self, result: RangeResult) -> CounterValue:
        if not result.kvs:
            return CounterValue(0, 0)
        kv: KeyValue = result.kvs[0]
        if _DECIMAL.fullmatch(kv.value) is None:
            raise CounterValueError(self._key, kv.value)
        value = int(kv.value)
        if not -MAX_INT64 - 1 <= value <= MAX_INT64:
            raise CounterValueError(self._key, kv.value)
        return CounterValue(value, kv.mod_revision)


def _check_int64(value: int) -> int:
    if not -MAX_INT64 - 1 <= value <= MAX_INT64:
        raise OverflowError(f"counter value {value} does not fit int64")
    return value
