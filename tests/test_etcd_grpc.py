"""What only the gRPC transport of EtcdBackend does, against a real etcd (``transport="grpc"``).

The protocol itself is the shared conformance suite, and every recipe test runs on this transport too (the
``etcd-grpc`` param of the ``harness`` fixture): this module covers the transport's own shape. One connection per
endpoint whatever the number of sessions and watches, fragment reassembly, stubs that cannot clash with another
etcd client's, error mapping, failover, and a blackholed member left behind without losing a session.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import grpc
import pytest

from coordkit import Session
from coordkit._backends.etcd import EtcdBackend, grpc_transport
from coordkit._backends.etcd._proto import rpc_pb2
from coordkit._backends.types import Delete, Put, Range, WatchBatch
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
    return "asyncio"  # grpc.aio is asyncio-only


@pytest.fixture(scope="module")
def server() -> Iterator[EtcdServer]:
    with EtcdServer() as srv:
        yield srv


@pytest.fixture
def ns() -> bytes:
    """A key prefix of this test's own."""
    return f"g{next(_names)}/".encode()


@pytest.fixture
async def backend(server: EtcdServer) -> AsyncIterator[EtcdBackend]:
    async with EtcdBackend(server.endpoint, transport="grpc") as b:
        yield b


async def _collect(batches: AsyncIterator[WatchBatch], count: int) -> list[WatchBatch]:
    return [await anext(batches) for _ in range(count)]


def test_the_grpc_extra_is_imported_only_when_used_and_named_when_missing() -> None:
    code = (
        "import sys, coordkit, coordkit._backends.etcd\n"
        "assert not {'grpc', 'google.protobuf'} & set(sys.modules)\n"
        "sys.modules['grpc'] = None\n"
        "from coordkit._backends.etcd import EtcdBackend\n"
        "EtcdBackend('http://127.0.0.1:1')  # the gateway transport needs no grpc\n"
        "try:\n    EtcdBackend('http://127.0.0.1:1', transport='grpc')\n"
        "except ImportError as exc:\n    assert \"pip install 'coordkit[grpc]'\" in str(exc), exc\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="transport"):
        EtcdBackend("http://127.0.0.1:2379", transport="http3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ssl_context"):
        import ssl

        EtcdBackend("https://127.0.0.1:2379", transport="grpc", ssl_context=ssl.create_default_context())
    with pytest.raises(ValueError, match="TLS files"):
        EtcdBackend("https://127.0.0.1:2379", transport="grpc", ca_file="/nonexistent/ca.pem")
    assert "grpc" in repr(EtcdBackend("http://127.0.0.1:2379", transport="grpc"))


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ("Internal error from Core", UnavailableError),  # a stream write after its member died (seen in CI)
        ("Received RST_STREAM with error code 2", UnavailableError),
        ("etcdserver: something the server refused", BackendError),
    ],
)
def test_a_dead_connection_is_an_outage_and_a_refusal_is_not(details: str, expected: type[Exception]) -> None:
    from grpc.aio import AioRpcError, Metadata

    from coordkit._backends.etcd.grpc_transport import translate

    error = translate(AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), details=details))
    assert type(error) is expected, error


def test_stubs_cannot_clash_with_another_etcd_clients() -> None:
    """Another client's etcd stubs (package ``etcdserverpb``, file ``rpc.proto``, as python-etcd3 and aetcd
    register them) and ours live in one process: ours are ``coordkit.etcdserverpb`` in coordkit's own files."""
    assert rpc_pb2.RangeRequest.DESCRIPTOR.full_name == "coordkit.etcdserverpb.RangeRequest"
    assert rpc_pb2.DESCRIPTOR.name == "coordkit/_backends/etcd/_proto/rpc.proto"
    program = """
from google.protobuf import descriptor_pb2, descriptor_pool
foreign = descriptor_pb2.FileDescriptorProto(name="rpc.proto", package="etcdserverpb", syntax="proto3")
message = foreign.message_type.add(name="RangeRequest")
message.field.add(name="key", number=1, type=12, label=1)  # bytes key = 1, as in etcd's rpc.proto
descriptor_pool.Default().Add(foreign)  # another etcd client, imported first
from coordkit._backends.etcd._proto import rpc_pb2  # ours: no "duplicate symbol" error
print(rpc_pb2.RangeRequest(key=b"k").SerializeToString().hex())
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", program], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0a016b"  # field 1, length 1, "k": etcd's wire format


async def test_one_connection_whatever_the_number_of_sessions_and_watches(server: EtcdServer, ns: bytes) -> None:
    async with (
        TcpProxy("127.0.0.1", server.client_port) as proxy,
        EtcdBackend(proxy.endpoint, transport="grpc") as backend,
        AsyncExitStack() as stack,
    ):
        sessions = [await stack.enter_async_context(Session(backend, ttl=10)) for _ in range(5)]
        watches = [
            await stack.enter_async_context(backend.watch(ns + f"{i}".encode(), start_revision=0)) for i in range(5)
        ]
        notices = [await anext(batches) for batches in watches]
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(backend.refresh, session.lease_id)
        written = await backend.txn([], [Put(ns + f"{i}".encode(), b"v") for i in range(5)])
        with anyio.fail_after(10):
            for batches, notice in zip(watches, notices, strict=True):
                assert notice.revision < written.revision == (await anext(batches)).revision
        assert proxy.connections == 1


async def test_fragmented_watch_responses_are_reassembled(backend: EtcdBackend, ns: bytes) -> None:
    """One revision's events larger than etcd's watch message limit (request limit 1.5 MiB + 512 KiB) arrive in
    fragments: one batch still."""
    keys = [ns + f"{i:04d}/".encode() + b"k" * 1000 for i in range(3000)]  # ~3 MB of DELETE events
    for start in range(0, len(keys), 100):
        await backend.txn([], [Put(key, b"") for key in keys[start : start + 100]])
    now = (await backend.range(Range(ns, prefix=True, count_only=True))).revision
    async with backend.watch(ns, prefix=True, start_revision=now + 1) as batches:
        deleted = await backend.txn([], [Delete(ns, prefix=True)])
        with anyio.fail_after(20):
            batch = await anext(batches)
    assert batch.revision == deleted.revision
    assert [event.kv.key for event in batch.events] == keys


async def test_errors_are_mapped_and_chained(backend: EtcdBackend, server: EtcdServer, ns: bytes) -> None:
    with pytest.raises(LeaseExpiredError) as lease_info:
        await backend.txn((), (Put(ns + b"k", b"v", lease=12345),))
    assert lease_info.value.lease_id == 12345
    assert isinstance(lease_info.value.__cause__, grpc.aio.AioRpcError)

    with pytest.raises(RequestTooLargeError) as large_info:
        await backend.txn((), (Put(ns + b"k", b"x" * 1_600_000),))
    assert isinstance(large_info.value.__cause__, grpc.aio.AioRpcError)

    lease = await backend.grant(30)
    assert await backend.refresh(lease.id) == lease.ttl
    await backend.revoke(lease.id)
    await backend.revoke(lease.id)  # idempotent
    with pytest.raises(LeaseExpiredError):
        await backend.refresh(lease.id)

    revision = (await backend.txn((), (Put(ns + b"k", b"1"),))).revision
    await backend.txn((), (Put(ns + b"k", b"2"),))
    await anyio.to_thread.run_sync(server.compact, revision + 1)
    with pytest.raises(CompactedError) as compacted_info:
        async with backend.watch(ns, prefix=True, start_revision=revision) as batches:
            with anyio.fail_after(10):
                await _collect(batches, 1)
    assert compacted_info.value.compact_revision == revision + 1


async def test_failover_skips_a_dead_endpoint(server: EtcdServer, ns: bytes) -> None:
    dead = closed_endpoint()
    async with EtcdBackend([dead, server.endpoint], transport="grpc") as backend:
        # a refused connection surely sent nothing: even a transaction moves on to the next endpoint
        result = await backend.txn((), (Put(ns + b"k", b"v"),))
        assert result.succeeded
        assert (await backend.range(Range(ns + b"k"))).count == 1
        async with Session(backend, ttl=10) as session:
            assert await backend.refresh(session.lease_id) == 10
    async with (
        EtcdBackend([dead, server.endpoint], transport="grpc") as backend,
        backend.watch(ns, prefix=True, start_revision=result.revision) as batches,
    ):
        with anyio.fail_after(10):
            await _collect(batches, 1)
    async with EtcdBackend([dead, closed_endpoint()], transport="grpc", request_timeout=1) as nowhere:
        with pytest.raises(UnavailableError):
            await nowhere.range(Range(b"k"))
        with pytest.raises(UnavailableError):
            await nowhere.txn((), (Put(b"k", b"v"),))


async def test_server_restart_breaks_an_open_watch_and_the_stream_reopens() -> None:
    with EtcdServer() as srv:
        async with EtcdBackend(srv.endpoint, transport="grpc") as backend:
            result = await backend.txn((), (Put(b"k", b"1"),))
            async with backend.watch(b"k", start_revision=result.revision) as batches:
                with anyio.fail_after(10):
                    await _collect(batches, 1)
                    await anyio.to_thread.run_sync(srv.kill)
                    with pytest.raises(UnavailableError):  # neither a hang nor a silent end
                        await anext(batches)
            await anyio.to_thread.run_sync(srv.start)
            with anyio.fail_after(20):
                later = await backend.txn((), (Put(b"k", b"2"),))
                async with backend.watch(b"k", start_revision=result.revision) as batches:
                    replayed = await _collect(batches, 2)
                lease = await backend.grant(10)
                assert await backend.refresh(lease.id) == 10
            assert [b.revision for b in replayed] == [result.revision, later.revision]


async def test_every_watch_of_a_broken_stream_fails_when_none_can_be_moved() -> None:
    """The stream breaks and no endpoint takes its watches back (the only server is down): every watch of that
    stream raises UnavailableError, not only the first one the client tried to move. (The others kept a stale
    "registered" from the broken stream, were not failed, and hung for ever: two of three watches of one client
    stalled in the cluster test when the quorum was lost.)"""
    with EtcdServer() as srv:
        async with EtcdBackend(srv.endpoint, transport="grpc") as backend:
            result = await backend.txn((), (Put(b"a", b"1"), Put(b"b", b"1"), Put(b"c", b"1")))
            async with (
                backend.watch(b"a", start_revision=result.revision) as a,
                backend.watch(b"b", start_revision=result.revision) as b,
                backend.watch(b"c", start_revision=result.revision) as c,
            ):
                with anyio.fail_after(10):
                    for batches in (a, b, c):
                        await anext(batches)
                await anyio.to_thread.run_sync(srv.kill)
                with anyio.fail_after(30):
                    for batches in (a, b, c):
                        with pytest.raises(UnavailableError):
                            await anext(batches)


async def test_watches_move_to_another_endpoint_with_no_gap(server: EtcdServer, ns: bytes) -> None:
    """When the shared watch stream breaks, every watch moves to a new stream on the next endpoint, each from the
    revision after its last event (etcd's Go client does the same): the reader sees neither an error nor a gap."""
    async with (
        TcpProxy("127.0.0.1", server.client_port) as proxy,
        EtcdBackend([proxy.endpoint, server.endpoint], transport="grpc") as client,
        EtcdBackend(server.endpoint, transport="grpc") as direct,
    ):
        first = await direct.txn([], [Put(ns + b"a", b"1"), Put(ns + b"b", b"1")])
        async with (
            client.watch(ns + b"a", start_revision=first.revision) as a,
            client.watch(ns + b"b", start_revision=0) as b,
        ):
            with anyio.fail_after(10):
                assert (await anext(a)).revision == first.revision
                notice = await anext(b)
            proxy.blackhole()
            second = await direct.txn([], [Put(ns + b"a", b"2"), Put(ns + b"b", b"2")])
            third = await direct.txn([], [Put(ns + b"b", b"3")])
            proxy.pass_through()  # the connection that lost bytes in the blackhole is closed: the stream breaks
            with anyio.fail_after(20):
                assert [(await anext(a)).revision] == [second.revision]
                assert [(await anext(b)).revision for _ in range(2)] == [second.revision, third.revision]
            assert notice.revision >= first.revision


async def test_a_stream_that_breaks_as_a_watch_is_accepted_moves_that_watch_too(
    server: EtcdServer, ns: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream breaks after etcd's "created" answer was read, before the watch was filed among the stream's
    registered watches: the watch is registered again on a new stream, and gets its events (it stalled for ever,
    filed on the broken stream after that stream's watches had been moved: seen on the cluster test)."""
    deliver = grpc_transport.Watcher.deliver
    broken: list[grpc_transport.WatchStream] = []

    def deliver_then_break(watcher: grpc_transport.Watcher, response: rpc_pb2.WatchResponse) -> None:
        deliver(watcher, response)
        if response.created and not broken and watcher.stream is not None:
            broken.append(watcher.stream)
            watcher.stream._break(UnavailableError("broken by the test as the watch is accepted"))

    monkeypatch.setattr(grpc_transport.Watcher, "deliver", deliver_then_break)
    async with EtcdBackend(server.endpoint, transport="grpc") as backend:
        first = await backend.txn([], [Put(ns + b"k", b"1")])
        async with backend.watch(ns + b"k", start_revision=first.revision) as batches:
            second = await backend.txn([], [Put(ns + b"k", b"2")])
            with anyio.fail_after(10):
                assert [(await anext(batches)).revision for _ in range(2)] == [first.revision, second.revision]
    assert broken, "the break was not injected"


async def test_closed_backend_refuses_calls(server: EtcdServer) -> None:
    backend = EtcdBackend(server.endpoint, transport="grpc")
    now = (await backend.range(Range(b"k"))).revision
    async with backend.watch(b"k", start_revision=now + 1) as batches:
        await backend.aclose()
        with pytest.raises(UnavailableError), anyio.fail_after(10):
            await anext(batches)
    with pytest.raises(UnavailableError, match="closed"):
        await backend.range(Range(b"k"))
    await backend.aclose()  # idempotent


# -- TLS and auth -----------------------------------------------------------------------------------------------


async def test_ca_only_and_mutual_tls() -> None:
    with EtcdServer(client_cert_auth=True) as srv:
        assert srv.ca_file and srv.client_cert_file and srv.client_key_file
        async with EtcdBackend(
            srv.endpoint,
            transport="grpc",
            ca_file=srv.ca_file,
            cert_file=srv.client_cert_file,
            key_file=srv.client_key_file,
        ) as backend:
            result = await backend.txn((), (Put(b"k", b"v"),))
            async with backend.watch(b"k", start_revision=result.revision) as batches:
                with anyio.fail_after(10):
                    await _collect(batches, 1)
        async with EtcdBackend(srv.endpoint, transport="grpc", ca_file=srv.ca_file, request_timeout=2) as no_cert:
            with pytest.raises(BackendError) as no_cert_info:
                await no_cert.range(Range(b"k"))
            assert not isinstance(no_cert_info.value, AuthenticationError)
        async with EtcdBackend(srv.endpoint, transport="grpc", request_timeout=2) as untrusting:
            with pytest.raises(BackendError, match="TLS") as info:  # grpc's roots do not know the test CA
                await untrusting.range(Range(b"k"))
            assert not isinstance(info.value, UnavailableError)


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    with EtcdServer(auth=True) as srv:
        yield srv


async def test_wrong_password_and_no_credentials(auth_server: EtcdServer) -> None:
    async with EtcdBackend(auth_server.endpoint, transport="grpc", username="root", password="wrong") as backend:
        with pytest.raises(AuthenticationError) as info:
            await backend.range(Range(b"k"))
        assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)
    async with EtcdBackend(auth_server.endpoint, transport="grpc") as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.range(Range(b"k"))


async def test_lost_token_is_renewed_transparently(auth_server: EtcdServer) -> None:
    # Simple tokens live in the member's memory: a restart invalidates them just as --auth-token-ttl expiry does.
    async with EtcdBackend(
        auth_server.endpoint, transport="grpc", username="root", password=auth_server.password
    ) as backend:
        client = backend._grpc
        assert client is not None
        result = await backend.txn((), (Put(b"k", b"v"),))
        first_token = client._token
        assert first_token
        async with Session(backend, ttl=30) as session:
            for _ in range(2):
                await anyio.to_thread.run_sync(auth_server.stop)
                await anyio.to_thread.run_sync(auth_server.start)
                with anyio.fail_after(20):
                    # a watch sees a stale token only as a "permission denied" cancel: it re-authenticates too
                    async with backend.watch(b"k", start_revision=result.revision) as batches:
                        await _collect(batches, 1)
                    assert await backend.refresh(session.lease_id) > 0  # the keepalive stream reopens
                await anyio.to_thread.run_sync(auth_server.stop)
                await anyio.to_thread.run_sync(auth_server.start)
                with anyio.fail_after(20):
                    assert (await backend.range(Range(b"k"))).kvs[0].value == b"v"  # invalid token -> re-auth
        assert client._token not in (None, first_token)


# -- a blackholed member ----------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_blackholed_member_is_left_and_no_session_is_lost(server: EtcdServer, ns: bytes) -> None:
    """A member whose connection is blackholed (open, nothing gets through) is detected by HTTP/2 pings and left
    for the next endpoint: a session of TTL 20 s lives on, a watch resumes there and sees every change."""
    async with (
        TcpProxy("127.0.0.1", server.client_port) as proxy,
        EtcdBackend([proxy.endpoint, server.endpoint], transport="grpc") as client,  # default watch_idle_timeout
        EtcdBackend(server.endpoint, transport="grpc") as direct,
        Session(client, ttl=20) as session,
        Watch(client, ns, prefix=True) as watch,
    ):
        send, received = anyio.create_memory_object_stream[Snapshot | WatchBatch](10)

        async def follow() -> None:
            async for item in watch:
                await send.send(item)

        async with send, received, anyio.create_task_group() as tg:
            tg.start_soon(follow)
            assert isinstance(await received.receive(), Snapshot)
            proxy.blackhole()
            blackholed = anyio.current_time()
            written = (await direct.txn([], [Put(ns + b"a", b"1")])).revision
            with anyio.fail_after(60):  # a hang guard: only pings can notice a silent watch stream here
                batch = await received.receive()
            detected = anyio.current_time() - blackholed
            assert isinstance(batch, WatchBatch) and batch.revision == written  # the transport moved the watch
            await anyio.sleep(max(0.0, 25 - detected))  # past the session's TTL: keepalives went elsewhere
            assert not session.lost
            assert session.deadline > anyio.current_time()
            print(f"blackholed member left after {detected:.1f} s")
            tg.cancel_scope.cancel()
