"""One suite, two backends: every test taking ``harness`` runs on MemoryBackend and on a real etcd.

Memory runs on trio under ``MockClock(autojump_threshold=0)``: time is virtual, a 10 s TTL passes at once.
etcd runs on asyncio (aiohttp) against a real etcd 3.5.1 server the session fixture starts on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from trio.testing import MockClock

from coordkit.testing import EtcdHarness, EtcdServer, Harness, MemoryHarness


@pytest.fixture(params=["memory", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(kind: str) -> Any:
    if kind == "memory":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return "asyncio"


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def harness(kind: str, request: pytest.FixtureRequest) -> Harness:
    if kind == "memory":
        return MemoryHarness()
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return EtcdHarness(server.endpoint, compact=server.compact)
