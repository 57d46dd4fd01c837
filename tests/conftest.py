"""One suite, every backend: each test taking ``harness`` runs on MemoryBackend, a real etcd through each of
EtcdBackend's transports (the JSON gateway, gRPC) and a real PostgreSQL.

Memory runs on trio under ``MockClock(autojump_threshold=0)``: time is virtual, a 10 s TTL passes at once.
etcd runs on asyncio against a real etcd 3.5.1 server the session fixture starts on loopback; PostgreSQL
on asyncio (asyncpg) against a real server started by ``initdb`` and ``postgres`` in a temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from trio.testing import MockClock

from coordkit.testing import EtcdHarness, EtcdServer, Harness, MemoryHarness, PostgresHarness, PostgresServer

from .cluster import EtcdCluster


@pytest.fixture(params=["memory", "etcd", "etcd-grpc", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(kind: str) -> Any:
    if kind == "memory":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return "asyncio"


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """The etcd every etcd test shares; ``COORDKIT_TEST_ETCD`` names another etcd build to run the suite against (e.g.
    Debian's 3.4 at /usr/bin/etcd, which has no --unsafe-no-fsync)."""
    binary = os.environ.get("COORDKIT_TEST_ETCD")  # (not COORDKIT_ETCD: the CLI's endpoints)
    with EtcdServer(etcd_binary=binary, unsafe_no_fsync=binary is None) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def harness(kind: str, request: pytest.FixtureRequest) -> Harness:
    if kind == "memory":
        return MemoryHarness()
    if kind == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        return PostgresHarness(postgres.dsn)
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return EtcdHarness(server.endpoint, compact=server.compact, transport="grpc" if kind == "etcd-grpc" else "gateway")


@pytest.fixture(scope="module")
def cluster_once() -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster per test module that asks for one (tests/cluster.py); ``COORDKIT_CLUSTER_ETCD``
    names another etcd build to run against (e.g. Debian's 3.4, which has no --unsafe-no-fsync)."""
    binary = os.environ.get("COORDKIT_CLUSTER_ETCD")
    with EtcdCluster(etcd_binary=binary, unsafe_no_fsync=binary is None) as cluster:
        yield cluster


@pytest.fixture
def cluster(cluster_once: EtcdCluster) -> Iterator[EtcdCluster]:
    """The module's cluster, every member running, resumed and healthy (a failed test may have left some not)."""
    cluster_once.restore()
    yield cluster_once
    cluster_once.restore()
