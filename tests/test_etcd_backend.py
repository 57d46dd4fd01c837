"""etcd-specific tests of EtcdBackend against a real etcd (the protocol itself is the shared conformance suite).

Most tests guard a workaround of a known etcd3-py / aiohttp defect (see coordkit/_backends/etcd/gateway.py), so that an
upgrade that breaks one fails here, loudly.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import aiohttp
import anyio
import etcd3.errors
import pytest

from coordkit._backends.etcd import EtcdBackend
from coordkit._backends.types import Compare, Delete, EventType, Put, Range, WatchBatch
from coordkit._errors import (
    AuthenticationError,
    BackendError,
    CompactedError,
    LeaseExpiredError,
    RequestTooLargeError,
    UnavailableError,
)
from coordkit._watch import Snapshot, Watch
from coordkit.testing._etcd_server import EtcdServer

from .helpers import closed_endpoint
from .proxy import TcpProxy

pytestmark = pytest.mark.anyio

_names = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-only


@pytest.fixture(scope="module")
def server() -> Iterator[EtcdServer]:
    with EtcdServer() as srv:
        yield srv


@pytest.fixture
def ns() -> bytes:
    """A key prefix of this test's own."""
    return f"t{next(_names)}/".encode()


@pytest.fixture
async def backend(server: EtcdServer) -> AsyncIterator[EtcdBackend]:
    async with EtcdBackend(server.endpoint) as b:
        yield b


async def _collect(batches: AsyncIterator[WatchBatch], events: int) -> list[WatchBatch]:
    out: list[WatchBatch] = []
    seen = 0
    async for batch in batches:
        out.append(batch)
        seen += len(batch.events)
        if seen >= events:
            return out
    raise AssertionError("watch ended by itself")


# -- packaging -----------------------------------------------------------------------------------------------


def test_import_does_not_load_the_etcd_extra() -> None:
    code = "import sys, coordkit._backends.etcd; assert not {'aiohttp', 'etcd3'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_names_it() -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from coordkit._backends.etcd import EtcdBackend\n"
        "try:\n    EtcdBackend('http://127.0.0.1:1')\n"
        "except ImportError as exc:\n    assert \"pip install 'coordkit[etcd]'\" in str(exc), exc\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "endpoint",
    ["127.0.0.1:2379", "ftp://127.0.0.1:2379", "http://", "http://h:2379/v3", "http://h:port", "http://u:p@h:1"],
)
def test_bad_endpoints_are_refused_at_construction(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        EtcdBackend(endpoint)


def test_inconsistent_options_are_refused() -> None:
    with pytest.raises(ValueError, match="https"):
        EtcdBackend("http://127.0.0.1:2379", ca_file="/nonexistent")
    with pytest.raises(ValueError, match="username"):
        EtcdBackend("http://127.0.0.1:2379", username="root")
    with pytest.raises(ValueError, match="at least one"):
        EtcdBackend([])


def test_runs_on_asyncio_only() -> None:
    async def main() -> None:
        async with EtcdBackend(closed_endpoint()) as b:
            await b.range(Range(b"k"))

    with pytest.raises(RuntimeError, match="asyncio"):
        anyio.run(main, backend="trio")


# -- etcd3-py defects and their workarounds --------------------------------------------------------------------


async def test_watch_burst_of_500_events_none_lost(backend: EtcdBackend, ns: bytes) -> None:
    # etcd3-py's stream reader drops events when several responses arrive in one read (16 of 201 measured).
    start = (await backend.range(Range(ns))).revision + 1
    keys = [ns + b"%03d" % i for i in range(500)]
    async with backend.watch(ns, prefix=True, start_revision=start) as live:
        async with anyio.create_task_group() as tg:  # concurrent writes: events reach the stream in bursts
            for key in keys:
                tg.start_soon(backend.txn, (), (Put(key, b"v"),))
        with anyio.fail_after(20):
            batches = await _collect(live, 500)
    revisions = [b.revision for b in batches]
    assert revisions == sorted(set(revisions))  # in order, one batch per revision
    assert sorted(e.kv.key for b in batches for e in b.events) == keys
    # Replaying history: etcd packs many revisions into one message, which must be split per revision.
    async with backend.watch(ns, prefix=True, start_revision=start) as replay:
        with anyio.fail_after(20):
            assert await _collect(replay, 500) == batches


async def test_watch_message_larger_than_one_read(backend: EtcdBackend, ns: bytes) -> None:
    # A 1 MiB value is one 1.4 MB JSON line that arrives in many reads; its request body is also over aiohttp's
    # 1 MiB raw-bytes warning threshold (a ResourceWarning is an error in this suite).
    value = bytes(range(256)) * 4096
    result = await backend.txn((), (Put(ns + b"big", value),))
    async with backend.watch(ns, prefix=True, start_revision=result.revision) as batches:
        with anyio.fail_after(10):
            [batch] = await _collect(batches, 1)
    assert batch.events[0].kv.value == value


async def test_construct_while_etcd_is_down_then_start_it() -> None:
    # etcd3-py's constructor probes the version with a blocking request and crashes when etcd is down.
    srv = EtcdServer()
    try:
        before = anyio.current_time()
        backend = EtcdBackend(srv.endpoint)
        assert anyio.current_time() - before < 0.5  # no blocking probe
        async with backend:
            with pytest.raises(UnavailableError) as info:
                await backend.range(Range(b"k"))
            assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)  # chained to the native error
            await anyio.to_thread.run_sync(srv.start)
            assert (await backend.txn((), (Put(b"k", b"v"),))).succeeded
            assert (await backend.range(Range(b"k"))).kvs[0].value == b"v"
    finally:
        srv.close()


async def test_empty_and_0xff_prefixes(backend: EtcdBackend) -> None:
    # etcd3-py crashes computing the range end of an empty prefix or one ending in 0xff.
    keys = [b"\xff", b"\xff\x00", b"\xff\xff\xfe", b"a\xff", b"a\xff\xff", b"b"]
    result = await backend.txn((), tuple(Put(k, k) for k in keys))
    everything = await backend.range(Range(b"", prefix=True))
    assert set(keys) <= {kv.key for kv in everything.kvs}
    assert everything.count == len(everything.kvs)
    assert [kv.key for kv in (await backend.range(Range(b"\xff", prefix=True))).kvs] == keys[:3]
    assert [kv.key for kv in (await backend.range(Range(b"a\xff", prefix=True))).kvs] == keys[3:5]
    for prefix, expected in [(b"", keys), (b"\xff", keys[:3]), (b"a\xff", keys[3:5])]:
        async with backend.watch(prefix, prefix=True, start_revision=result.revision) as batches:
            with anyio.fail_after(10):
                [batch] = await _collect(batches, 1)
        assert sorted(e.kv.key for e in batch.events) == sorted(expected)
    deleted = await backend.txn((), (Delete(b"\xff", prefix=True), Delete(b"a\xff", prefix=True)))
    assert deleted.responses[0].deleted == 3  # type: ignore[union-attr]
    assert deleted.responses[1].deleted == 2  # type: ignore[union-attr]


async def test_refresh_and_revoke(backend: EtcdBackend) -> None:
    # etcd3-py's lease_keep_alive_once is broken and its keepalive stream fails with TypeError on aiohttp >= 3.10.6.
    lease = await backend.grant(30)
    assert await backend.refresh(lease.id) == lease.ttl
    await backend.revoke(lease.id)
    await backend.revoke(lease.id)  # idempotent
    with pytest.raises(LeaseExpiredError) as info:
        await backend.refresh(lease.id)
    assert info.value.lease_id == lease.id


async def test_errors_are_mapped_and_chained(backend: EtcdBackend, server: EtcdServer, ns: bytes) -> None:
    with pytest.raises(LeaseExpiredError) as lease_info:
        await backend.txn((), (Put(ns + b"k", b"v", lease=12345),))
    assert lease_info.value.lease_id == 12345
    assert isinstance(lease_info.value.__cause__, etcd3.errors.ErrLeaseNotFound)

    with pytest.raises(RequestTooLargeError) as large_info:
        await backend.txn((), (Put(ns + b"k", b"x" * 1_600_000),))
    assert isinstance(large_info.value.__cause__, etcd3.errors.ErrRequestTooLarge)

    revision = (await backend.txn((), (Put(ns + b"k", b"1"),))).revision
    await backend.txn((), (Put(ns + b"k", b"2"),))
    await anyio.to_thread.run_sync(server.compact, revision + 1)
    with pytest.raises(CompactedError) as compacted_info:
        async with backend.watch(ns, prefix=True, start_revision=revision) as batches:
            with anyio.fail_after(10):
                await _collect(batches, 1)
    assert compacted_info.value.compact_revision == revision + 1
    assert isinstance(compacted_info.value.__cause__, etcd3.errors.ErrCompacted)


# -- TLS ------------------------------------------------------------------------------------------------------


async def test_ca_only_tls() -> None:
    # etcd3-py ignores a CA file given without a client certificate.
    with EtcdServer(tls=True) as srv:
        assert srv.endpoint.startswith("https://")
        assert srv.ca_file is not None
        async with EtcdBackend(srv.endpoint, ca_file=srv.ca_file) as backend:
            result = await backend.txn((), (Put(b"k", b"v"),))
            assert (await backend.range(Range(b"k"))).kvs[0].value == b"v"
            async with backend.watch(b"k", start_revision=result.revision) as batches:
                with anyio.fail_after(10):
                    await _collect(batches, 1)
        async with EtcdBackend(srv.endpoint) as untrusting:  # system CAs do not know our test CA
            with pytest.raises(BackendError, match="TLS") as info:
                await untrusting.range(Range(b"k"))
            assert not isinstance(info.value, UnavailableError)
            assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)


async def test_mutual_tls() -> None:
    with EtcdServer(client_cert_auth=True) as srv:
        assert srv.ca_file and srv.client_cert_file and srv.client_key_file
        async with EtcdBackend(
            srv.endpoint, ca_file=srv.ca_file, cert_file=srv.client_cert_file, key_file=srv.client_key_file
        ) as backend:
            assert (await backend.txn((), (Put(b"k", b"v"),))).succeeded
        async with EtcdBackend(srv.endpoint, ssl_context=srv.client_ssl_context()) as backend:
            assert (await backend.range(Range(b"k"))).count == 1
        async with EtcdBackend(srv.endpoint, ca_file=srv.ca_file) as no_cert:
            with pytest.raises(BackendError):
                await no_cert.range(Range(b"k"))


# -- auth -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    with EtcdServer(auth=True) as srv:
        yield srv


async def test_wrong_password(auth_server: EtcdServer) -> None:
    async with EtcdBackend(auth_server.endpoint, username="root", password="wrong") as backend:
        with pytest.raises(AuthenticationError) as info:
            await backend.range(Range(b"k"))
        assert isinstance(info.value.__cause__, etcd3.errors.ErrAuthFailed)
    async with EtcdBackend(auth_server.endpoint) as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.range(Range(b"k"))


async def test_lost_token_is_renewed_transparently(auth_server: EtcdServer) -> None:
    # Simple tokens live in the member's memory: a restart invalidates them just as --auth-token-ttl expiry does.
    async with EtcdBackend(auth_server.endpoint, username="root", password=auth_server.password) as backend:
        result = await backend.txn((), (Put(b"k", b"v"),))
        first_token = backend._client._auth_token
        assert first_token
        await anyio.to_thread.run_sync(auth_server.stop)
        await anyio.to_thread.run_sync(auth_server.start)
        assert (await backend.range(Range(b"k"))).kvs[0].value == b"v"  # invalid token -> re-auth -> retried
        second_token = backend._client._auth_token
        assert second_token not in (None, first_token)
        assert (await backend.txn((Compare.value(b"k", "==", b"v"),), (Put(b"k", b"w"),))).succeeded

        # A watch sees a stale token only as a "permission denied" cancel: it re-authenticates too.
        await anyio.to_thread.run_sync(auth_server.stop)
        await anyio.to_thread.run_sync(auth_server.start)
        async with backend.watch(b"k", start_revision=result.revision) as batches:
            with anyio.fail_after(10):
                await _collect(batches, 1)
        assert backend._client._auth_token not in (None, second_token)


# -- failover, broken streams, retries --------------------------------------------------------------------------


async def test_failover_skips_a_dead_endpoint(server: EtcdServer, ns: bytes) -> None:
    dead = closed_endpoint()
    async with EtcdBackend([dead, server.endpoint]) as backend:
        # a refused connection surely sent nothing: even a transaction moves on to the next endpoint
        result = await backend.txn((), (Put(ns + b"k", b"v"),))
        assert result.succeeded
        assert backend._client.baseurl == server.endpoint
        assert (await backend.range(Range(ns + b"k"))).count == 1
    async with (
        EtcdBackend([dead, server.endpoint]) as backend,
        backend.watch(ns, prefix=True, start_revision=result.revision) as batches,
    ):
        with anyio.fail_after(10):
            await _collect(batches, 1)
    async with EtcdBackend([dead, closed_endpoint()]) as nowhere:
        with pytest.raises(UnavailableError):
            await nowhere.range(Range(b"k"))


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_server_restart_breaks_an_open_watch(how: str) -> None:
    with EtcdServer() as srv:
        async with EtcdBackend(srv.endpoint) as backend:
            result = await backend.txn((), (Put(b"k", b"1"),))
            async with backend.watch(b"k", start_revision=result.revision) as batches:
                with anyio.fail_after(10):
                    await _collect(batches, 1)
                    await anyio.to_thread.run_sync(getattr(srv, how))
                    with pytest.raises(UnavailableError):  # neither a hang nor a silent end
                        await anext(batches)
            await anyio.to_thread.run_sync(srv.start)
            later = await backend.txn((), (Put(b"k", b"2"),))
            async with backend.watch(b"k", start_revision=result.revision) as batches:
                with anyio.fail_after(10):
                    replayed = await _collect(batches, 2)
            assert [b.revision for b in replayed] == [result.revision, later.revision]
            assert all(e.type is EventType.PUT for b in replayed for e in b.events)


class _FakeGateway:
    """A TCP server that reads a request and then hangs up (``mode="drop"``) or never answers (``"hang"``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if self.mode == "hang":
            await reader.read()  # until the client gives up and closes
        writer.close()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_ambiguous_failure_retries_reads_but_not_transactions() -> None:
    gateway = _FakeGateway("drop")
    async with gateway as endpoint, EtcdBackend(endpoint) as backend:
        with pytest.raises(UnavailableError):
            await backend.range(Range(b"k"))
        assert gateway.connections == 2  # one endpoint: the attempt and one retry
        gateway.connections = 0
        with pytest.raises(UnavailableError):
            await backend.txn((), (Put(b"k", b"v"),))
        assert gateway.connections == 1  # the server may have applied it: not sent again


async def test_request_timeout_and_cancellation() -> None:
    gateway = _FakeGateway("hang")
    async with gateway as endpoint, EtcdBackend(endpoint, request_timeout=0.2) as backend:
        with pytest.raises(UnavailableError) as info:
            await backend.txn((), (Put(b"k", b"v"),))
        assert isinstance(info.value.__cause__, TimeoutError)
    async with gateway as endpoint, EtcdBackend(endpoint, request_timeout=60) as backend:
        with anyio.move_on_after(0.2) as scope:
            await backend.range(Range(b"k"))
        assert scope.cancelled_caught
        with anyio.move_on_after(0.2) as scope:
            async with backend.watch(b"k", start_revision=1):
                pass
        assert scope.cancelled_caught


async def test_closed_backend_refuses_calls(server: EtcdServer) -> None:
    backend = EtcdBackend(server.endpoint)
    now = (await backend.range(Range(b"k"))).revision
    async with backend.watch(b"k", start_revision=now + 1) as batches:
        await backend.aclose()
        with pytest.raises(UnavailableError), anyio.fail_after(10):
            await anext(batches)
    with pytest.raises(UnavailableError, match="closed"):
        await backend.range(Range(b"k"))
    await backend.aclose()  # idempotent


# -- silent watch streams -------------------------------------------------------------------------------------


async def test_a_silent_watch_stream_is_reopened_on_a_live_endpoint() -> None:
    """A stream whose connection is blackholed (open, but nothing gets through) is detected and reopened.

    Progress notifications keep an idle but healthy stream from counting as silent; a blackholed one is
    reopened after ``watch_idle_timeout``, on the next endpoint once its own does not answer, from where it was.
    """
    with EtcdServer(watch_progress_interval=0.2) as srv:
        async with (
            TcpProxy("127.0.0.1", srv.client_port) as proxy,
            EtcdBackend([proxy.endpoint, srv.endpoint], request_timeout=1, watch_idle_timeout=1) as client,
            EtcdBackend(srv.endpoint) as direct,
            Watch(client, b"silent/", prefix=True) as watch,
        ):
            send, received = anyio.create_memory_object_stream[Snapshot | WatchBatch](10)

            async def follow() -> None:
                async for item in watch:
                    await send.send(item)

            async with send, received, anyio.create_task_group() as tg:
                tg.start_soon(follow)  # reading the stream all along: an idle stream is waited on, not paused
                assert isinstance(await received.receive(), Snapshot)
                await anyio.sleep(3)  # three idle timeouts without a change: progress notifications keep it open
                assert watch.statistics().reconnects == 0
                proxy.blackhole()
                written = (await direct.txn([], [Put(b"silent/a", b"1")])).revision
                with anyio.fail_after(30):
                    batch = await received.receive()
                assert isinstance(batch, WatchBatch) and batch.revision == written
                assert watch.statistics().reconnects >= 1
                tg.cancel_scope.cancel()


def test_watch_idle_timeout_is_checked() -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="watch_idle_timeout"):
            EtcdBackend("http://127.0.0.1:2379", watch_idle_timeout=bad)
    with pytest.raises(TypeError, match="watch_idle_timeout"):
        EtcdBackend("http://127.0.0.1:2379", watch_idle_timeout="5")  # type: ignore[arg-type]
