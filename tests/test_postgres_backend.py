"""PostgresBackend against the failures of a real PostgreSQL: a server restart, killed connections
(``pg_terminate_backend``), a blackholed network. Sessions, locks and views recover with no help from the caller.

The shared suite (every test taking ``harness``) runs on PostgreSQL too; these are the faults only it has.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

from coordkit import (
    AuthenticationError,
    ConfigView,
    EventType,
    Lock,
    PostgresBackend,
    Put,
    Range,
    Session,
    UnavailableError,
    publish,
)
from coordkit._retry import retry_call
from coordkit.testing import KvRecorder, PostgresServer, check_linearizable

from .proxy import TcpProxy
from .test_config import Changes
from .test_linearizability import MODEL, Workload, report, run_workload

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("kind", ["postgres"])]


@asynccontextmanager
async def admin(server: PostgresServer) -> AsyncIterator[asyncpg.Connection[Any]]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server.dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def terminate_coordkit_connections(server: PostgresServer) -> int:
    """Kill every coordkit connection on the server, as an operator's ``pg_terminate_backend`` would."""
    async with admin(server) as conn:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'coordkit' AND pid <> pg_backend_pid()"
        )
    return len(killed)


async def test_session_lock_and_view_survive_a_server_restart(postgres_server: PostgresServer) -> None:
    """The server stops and starts (every connection breaks) while a session holds a lock and a view follows a
    prefix: the session is not lost, the lock is still held, and the view shows every change exactly once."""
    prefix = "pg-restart/"
    async with (
        PostgresBackend(postgres_server.dsn) as writer,
        PostgresBackend(postgres_server.dsn) as service,
        Session(service, ttl=10) as session,
        Lock(session, "pg-restart-lock") as held,
    ):
        await publish(writer, prefix + "seq", 0, expected_revision=None)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            for i in range(1, 4):
                await publish(writer, prefix + "seq", i, expected_revision=None)
            await anyio.to_thread.run_sync(postgres_server.restart)
            for i in range(4, 7):  # connections that died with the server are noticed and replaced
                await publish(writer, prefix + "seq", i, expected_revision=None)
            assert [(await changes.next()).value for _ in range(6)] == [1, 2, 3, 4, 5, 6]
            tg.cancel_scope.cancel()
        assert not session.lost
        (kv,) = (await service.range(Range(b"pg-restart-lock/", prefix=True))).kvs
        assert kv.create_revision == held.token, "the lock key outlived the restart"


async def test_killed_connections_are_replaced(postgres_server: PostgresServer) -> None:
    """``pg_terminate_backend`` on every coordkit connection: keepalives, watches and the notification listener
    reconnect by themselves; a change after the kill reaches the view, and lease expiry still happens."""
    prefix = "pg-kill/"
    async with (
        PostgresBackend(postgres_server.dsn) as writer,
        PostgresBackend(postgres_server.dsn) as service,
        Session(service, ttl=5) as session,
    ):
        await publish(writer, prefix + "a", 0, expected_revision=None)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            assert await terminate_coordkit_connections(postgres_server) >= 3
            await publish(writer, prefix + "a", 1, expected_revision=None)
            assert (await changes.next()).value == 1
            tg.cancel_scope.cancel()
        # the sweepers reconnected too: a lease left to expire takes its key with it
        lease = await writer.grant(2)
        key = prefix.encode() + b"leased"
        put = await writer.txn([], [Put(key, b"", lease.id)])
        async with writer.watch(key, start_revision=put.revision + 1) as batches:
            with anyio.fail_after(10):
                batch = await anext(batches)
        assert [(event.type, event.kv.key) for event in batch.events] == [(EventType.DELETE, key)]
        assert not session.lost


async def test_blackholed_connections_time_out_and_recover(postgres_server: PostgresServer) -> None:
    """The network swallows everything for 2 s (no reset, no error): calls end with UnavailableError after the
    request timeout instead of hanging, the session (TTL 10 s) is not lost, and everything works after it ends."""
    prefix = b"pg-blackhole/"
    async with TcpProxy("127.0.0.1", postgres_server.port) as proxy:
        dsn = postgres_server.dsn.replace(f":{postgres_server.port}/", f":{proxy.port}/")
        async with (
            PostgresBackend(postgres_server.dsn) as writer,
            PostgresBackend(dsn, request_timeout=1.0) as service,
            Session(service, ttl=10) as session,
        ):
            await writer.txn([], [Put(prefix + b"k", b"0")])
            proxy.blackhole()
            with pytest.raises(UnavailableError), anyio.fail_after(5):
                await service.range(Range(prefix + b"k"))
            await writer.txn([], [Put(prefix + b"k", b"1")])
            with anyio.fail_after(10):  # the session's keepalives meet the blackhole too
                while not session.statistics().keepalive_failures:  # noqa: ASYNC110 - a counter, no event
                    await anyio.sleep(0.1)
            proxy.pass_through()
            with anyio.fail_after(10):
                got = await retry_call(lambda: service.range(Range(prefix + b"k")))
            assert got.kvs[0].value == b"1"
            assert not session.lost


async def test_password_from_the_dsn_and_a_wrong_one() -> None:
    """A server that requires a password: the DSN's password works, a wrong one raises AuthenticationError (a
    permanent failure: a session is lost at once rather than retried), and the schema option keeps apart."""
    with PostgresServer(password="right-password") as server:
        wrong = server.dsn.replace(":right-password@", ":wrong-password@")
        async with PostgresBackend(wrong) as backend:
            with pytest.raises(AuthenticationError):
                await backend.range(Range(b"k"))
        async with PostgresBackend(server.dsn) as one, PostgresBackend(server.dsn, schema="other_app") as other:
            await one.txn([], [Put(b"k", b"one")])
            assert (await other.range(Range(b"k"))).kvs == (), "each schema is a store of its own"
            assert (await one.range(Range(b"k"))).kvs[0].value == b"one"


async def test_history_through_a_blackholing_proxy_is_linearizable(postgres_server: PostgresServer) -> None:
    """Four clients reach PostgreSQL through TCP proxies that now and then swallow everything (a transaction may
    be cut off while it holds the revision lock): the recorded history is linearizable, revisions included."""
    recorder = KvRecorder()
    namespace = f"ck-lin-pg-{random.randrange(1 << 30)}/".encode()
    rng = random.Random(7)
    blackholes = 0
    async with AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(TcpProxy("127.0.0.1", postgres_server.port)) for _ in range(2)]
        clients = [
            await stack.enter_async_context(
                PostgresBackend(
                    postgres_server.dsn.replace(f":{postgres_server.port}/", f":{proxies[i % 2].port}/"),
                    request_timeout=0.3,
                )
            )
            for i in range(4)
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_workload, recorder, clients, namespace, Workload(clients=4, operations=40, pause=0.03))
            with anyio.move_on_after(20):
                while len(recorder.history) < 4 * 40:
                    await anyio.sleep(rng.uniform(0.1, 0.3))
                    proxy = rng.choice(proxies)
                    proxy.blackhole()
                    blackholes += 1
                    await anyio.sleep(rng.uniform(0.05, 0.5))
                    proxy.pass_through()
    result = check_linearizable(MODEL, recorder.history, timeout=60)
    report("PostgreSQL through a blackholing proxy", recorder, result, blackholes=blackholes)
    assert result.outcome == "ok", result
    assert MODEL.check_revisions(recorder.history) == []
    assert recorder.ambiguous > 0, "the blackholes must produce ambiguous operations"
