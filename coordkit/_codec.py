"""Codecs: how recipes that store values (once, config) turn them into bytes and back."""

from __future__ import annotations

import json
from typing import Any, Protocol, TypeVar, final

T = TypeVar("T")


class Codec(Protocol[T]):
    """Turns values into bytes and back. ``decode`` raises ValueError (or a subclass) on bad input."""

    def encode(self, value: T) -> bytes:
        """The bytes to store for ``value``."""
        ...

    def decode(self, data: bytes) -> T:
        """The value stored as ``data``. Raises ValueError (or a subclass) when ``data`` is not one."""
        ...


@final
class JsonCodec:
    """JSON in UTF-8, compact. Decoding bad input raises ValueError (``json.JSONDecodeError``)."""

    def encode(self, value: Any) -> bytes:
        """``value`` as compact JSON in UTF-8. Raises TypeError for what JSON cannot represent."""
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes) -> Any:
        """The JSON value in ``data``. Raises ValueError (``json.JSONDecodeError``) when it is not JSON."""
        return json.loads(data)


#: The JSON codec.
JSON = JsonCodec()
