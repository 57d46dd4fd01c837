"""Security on a real etcd: TLS, mutual TLS, user/password auth, RBAC, token expiry, and secrets that never leak.

etcd only (TLS, auth and permissions are etcd's; MemoryBackend has none), on asyncio, over both transports of
EtcdBackend (the JSON gateway and gRPC: every test runs on each, through `transport`). Every recipe is exercised in
every mode through one helper (`exercise_recipes`). Every test of this module also runs under a capture of all
log records at DEBUG (coordkit, aiohttp, etcd3, asyncio) and of coordkit's spans, and the teardown of each test
fails it if a password, a private key or an auth token shows up there.
"""

from __future__ import annotations

import json
import logging
import traceback
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordkit import (
    AuthenticationError,
    BackendError,
    ConfigView,
    Election,
    EtcdBackend,
    Group,
    JobSpec,
    Lock,
    Put,
    QueueDepth,
    Range,
    RunContext,
    Scheduler,
    Semaphore,
    Session,
    UnavailableError,
    WorkQueue,
    __version__,
    _telemetry,
    once,
    publish,
)
from coordkit._backends.etcd.gateway import GatewayClient
from coordkit._backends.etcd.grpc_transport import GrpcClient
from coordkit.testing import EtcdServer

from .helpers import closed_endpoint

pytestmark = pytest.mark.anyio

ROOT_PASSWORD = "root-secret-Qx7vLw2"
USER, USER_PASSWORD = "alice", "alice-secret-Hn4rTz9"
READER, READER_PASSWORD = "bob", "bob-secret-Vc8mPq3"
ALLOWED, FORBIDDEN = "app-a/", "app-b/"  # the user may read and write keys under ALLOWED only
TOKEN_TTL = 2  # seconds an idle auth token lives on the auth server (etcd's --auth-token-ttl)

#: every secret the tests create: passwords, private keys (PEM body lines), auth tokens coordkit obtained
_secrets: set[str] = {ROOT_PASSWORD, USER_PASSWORD, READER_PASSWORD}
_log_records: list[logging.LogRecord] = []
_spans = InMemorySpanExporter()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp and grpc.aio are asyncio-only


_TRANSPORT: list[Literal["gateway", "grpc"]] = ["gateway"]


@pytest.fixture(scope="module", params=["gateway", "grpc"], autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """The transport every `EtcdBackend` of this module uses (`_etcd`)."""
    _TRANSPORT[0] = request.param
    yield request.param
    _TRANSPORT[0] = "gateway"


def _etcd(endpoints: str, **options: Any) -> EtcdBackend:
    """An EtcdBackend on the transport under test."""
    return EtcdBackend(endpoints, transport=_TRANSPORT[0], **options)


def _token(backend: EtcdBackend) -> str | None:
    """The auth token the backend holds now."""
    return backend._grpc._token if backend._grpc is not None else backend._client._auth_token


# -- servers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server() -> Iterator[EtcdServer]:
    with EtcdServer(tls=True) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server() -> Iterator[EtcdServer]:
    with EtcdServer(client_cert_auth=True) as server:
        assert server.client_key_file is not None
        # the client's private key is a secret: every line of its PEM body
        pem = Path(server.client_key_file).read_text().splitlines()
        _secrets.update(line for line in pem if line and not line.startswith("-----"))
        yield server


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    """Auth enabled, short-lived tokens; USER may read and write ALLOWED, READER may only read it."""
    with EtcdServer(auth=True, password=ROOT_PASSWORD, auth_token_ttl=TOKEN_TTL) as server:
        # etcdctl's commands are the gateway's /v3/auth/role/add, role/grant, user/add and user/grant calls.
        for user, password, permission in ((USER, USER_PASSWORD, "readwrite"), (READER, READER_PASSWORD, "read")):
            role = f"app-a-{permission}"
            server.run_etcdctl("role", "add", role)
            server.run_etcdctl("role", "grant-permission", role, "--prefix=true", permission, ALLOWED)
            server.run_etcdctl("user", "add", user, f"--new-user-password={password}", "--interactive=false")
            server.run_etcdctl("user", "grant-role", user, role)
        yield server


def _root(server: EtcdServer) -> EtcdBackend:
    return _etcd(server.endpoint, username="root", password=ROOT_PASSWORD)


def _user(server: EtcdServer) -> EtcdBackend:
    return _etcd(server.endpoint, username=USER, password=USER_PASSWORD)


# -- capture of logs, spans and tokens ----------------------------------------------------------------------


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _log_records.append(record)


@pytest.fixture(scope="module", autouse=True)
def _capture_logs() -> Iterator[None]:
    handler = _Capture(logging.DEBUG)
    names = ("", "coordkit", "aiohttp", "aiohttp.client", "aiohttp.internal", "etcd3", "asyncio", "opentelemetry")
    previous = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module", autouse=True)
def _capture_spans() -> Iterator[None]:
    # A provider of our own behind coordkit's tracer (the global provider can be set only once per process,
    # and the telemetry tests own it).
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_spans))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_telemetry, "tracer", provider.get_tracer("coordkit", __version__))
        yield
    provider.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _capture_tokens() -> Iterator[None]:
    """Remember every auth token coordkit obtains (observing the transports, not replacing them)."""
    with pytest.MonkeyPatch.context() as patch:
        for client in (GatewayClient, GrpcClient):
            authenticate = client._authenticate

            async def remembering(self: Any, *, stale: str | None, authenticate: Any = authenticate) -> str:
                token: str = await authenticate(self, stale=stale)
                _secrets.add(token)
                return token

            patch.setattr(client, "_authenticate", remembering)
        yield


def _span_texts() -> Iterator[str]:
    for span in _spans.get_finished_spans():
        yield span.name
        yield repr(dict(span.attributes or {}))
        for event in span.events:
            yield event.name
            yield repr(dict(event.attributes or {}))
        yield repr(span.status.description)


def _log_texts() -> Iterator[str]:
    for record in _log_records:
        yield record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            yield from _exception_texts(record.exc_info[1])
        if record.stack_info:
            yield record.stack_info


def _exception_texts(exc: BaseException) -> Iterator[str]:
    """Everything an exception shows: the formatted chain, and for each link its str, repr, args and fields."""
    yield "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield str(link)
        yield repr(link)
        yield from (repr(arg) for arg in link.args)
        yield from (repr(value) for value in vars(link).values())
        todo += [link.__cause__, link.__context__]
        if isinstance(link, BaseExceptionGroup):
            todo += link.exceptions


def _assert_no_secret(texts: Iterator[str] | list[str], where: str) -> None:
    secrets = [secret for secret in _secrets if secret]
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}: {text[:300]!r}"


@pytest.fixture(autouse=True)
def _no_secret_in_logs_or_spans() -> Iterator[None]:
    _log_records.clear()
    _spans.clear()
    yield
    _assert_no_secret(_log_texts(), "a log record")
    _assert_no_secret(_span_texts(), "a span")


# -- every recipe, one round trip each ----------------------------------------------------------------------


async def _lock(session: Session, prefix: str) -> None:
    async with Lock(session, f"{prefix}lock") as held:
        fenced = await session.backend.txn([held.guard()], [Put(f"{prefix}fenced".encode(), b"1")])
        assert fenced.succeeded


async def _semaphore(session: Session, prefix: str) -> None:
    async with Semaphore(session, f"{prefix}semaphore", limit=2) as permit:
        assert permit.token > 0


async def _election(session: Session, prefix: str) -> None:
    election = Election(session, f"{prefix}election")
    async with aclosing(election.observe()) as leaders:
        assert await anext(leaders) is None
        async with election.campaign(b"candidate") as leadership:
            observed = await anext(leaders)
            assert observed is not None and observed.term == leadership.term
            assert await election.leader() == observed


async def _group(session: Session, prefix: str) -> None:
    group = Group(session, f"{prefix}group")
    async with aclosing(group.watch()) as views:
        assert not (await anext(views)).members
        async with group.join("member-1", metadata=b"10.0.0.1"):
            assert (await anext(views)).joined == {"member-1"}
            assert dict((await group.members()).members) == {"member-1": b"10.0.0.1"}


async def _config(session: Session, prefix: str) -> None:
    async with ConfigView(session.backend, f"{prefix}config/") as view:
        assert await publish(session.backend, f"{prefix}config/db", {"url": "db-1"}, expected_revision=0)
        await view.wait_for(lambda values: values.get("db") == {"url": "db-1"})


async def _once(session: Session, prefix: str) -> None:
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        return b"42"

    assert await once(session, f"{prefix}once", compute) == b"42"
    assert await once(session, f"{prefix}once", compute) == b"42"
    assert calls == 1


async def _work_queue(session: Session, prefix: str) -> None:
    queue = WorkQueue(session, f"{prefix}queue")
    await queue.put(b"job")
    async with queue.lease(visibility_timeout=10) as task:
        assert task.payload == b"job"
    assert await queue.depth() == QueueDepth(0, 0, 0)


async def _scheduler(session: Session, prefix: str) -> None:
    ran = anyio.Event()

    async def job(context: RunContext) -> None:
        ran.set()

    scheduler = Scheduler(session, f"{prefix}cron")
    scheduler.register("job", job)
    async with scheduler:
        await scheduler.put_job(JobSpec("tick", "job", interval=0.1))
        await ran.wait()
    assert "ok" in {record.outcome for record in await scheduler.history("tick")}


RECIPES: dict[str, Callable[[Session, str], Awaitable[None]]] = {
    "lock": _lock,
    "semaphore": _semaphore,
    "election": _election,
    "group": _group,
    "config": _config,
    "once": _once,
    "work_queue": _work_queue,
    "scheduler": _scheduler,
}


async def exercise_recipes(backend: EtcdBackend, prefix: str) -> None:
    """Run every recipe once on keys under ``prefix``, in one session; a hang fails instead of blocking.

    The keys are under ``prefix`` + the transport: both transports run on the same servers.
    """
    prefix = f"{prefix}{_TRANSPORT[0]}/"
    with anyio.fail_after(30):
        async with Session(backend, ttl=5) as session:
            for recipe in RECIPES.values():
                await recipe(session, prefix)
        assert not session.lost


# -- TLS and mutual TLS -------------------------------------------------------------------------------------


async def test_tls_with_ca_file(tls_server: EtcdServer) -> None:
    assert tls_server.endpoint.startswith("https://") and tls_server.ca_file
    async with _etcd(tls_server.endpoint, ca_file=tls_server.ca_file) as backend:
        await exercise_recipes(backend, "ca-file/")


async def test_tls_with_ssl_context(tls_server: EtcdServer, transport: str) -> None:
    if transport == "grpc":  # grpc cannot take an SSLContext: said at construction, not at the first call
        with pytest.raises(ValueError, match="ssl_context"):
            _etcd(tls_server.endpoint, ssl_context=tls_server.client_ssl_context())
        return
    async with _etcd(tls_server.endpoint, ssl_context=tls_server.client_ssl_context()) as backend:
        await exercise_recipes(backend, "ssl-context/")


async def test_tls_refuses_an_unknown_ca(tls_server: EtcdServer) -> None:
    async with _etcd(tls_server.endpoint) as untrusting:  # system CAs: they do not know the test CA
        with anyio.fail_after(10), pytest.raises(BackendError, match="TLS") as info:
            await untrusting.range(Range(b"k"))
    assert not isinstance(info.value, UnavailableError)  # configuration, not an outage: not retried


async def test_mutual_tls(mtls_server: EtcdServer, transport: str) -> None:
    assert mtls_server.client_cert_file and mtls_server.client_key_file
    async with _etcd(
        mtls_server.endpoint,
        ca_file=mtls_server.ca_file,
        cert_file=mtls_server.client_cert_file,
        key_file=mtls_server.client_key_file,
    ) as backend:
        await exercise_recipes(backend, "mtls-files/")
    if transport == "gateway":  # the gRPC transport takes no SSLContext (test_tls_with_ssl_context)
        async with _etcd(mtls_server.endpoint, ssl_context=mtls_server.client_ssl_context()) as backend:
            await exercise_recipes(backend, "mtls-context/")


async def test_mutual_tls_refuses_a_client_without_certificate(mtls_server: EtcdServer) -> None:
    async with _etcd(mtls_server.endpoint, ca_file=mtls_server.ca_file) as no_cert:
        with anyio.fail_after(10):
            with pytest.raises(BackendError, match="TLS handshake") as info:
                await no_cert.range(Range(b"k"))
            assert not isinstance(info.value, UnavailableError)
            with pytest.raises(BackendError, match="TLS handshake") as info:
                async with Session(no_cert, ttl=5):
                    pass
            assert not isinstance(info.value, UnavailableError)
            with pytest.raises(BackendError, match="TLS handshake"):
                async with no_cert.watch(b"k", start_revision=0):
                    pass
    _assert_no_secret(_exception_texts(info.value), "the error of a client without certificate")


# -- user/password authentication and RBAC ------------------------------------------------------------------


async def test_root_user_runs_every_recipe(auth_server: EtcdServer) -> None:
    async with _root(auth_server) as backend:
        await exercise_recipes(backend, "root/")


async def test_wrong_password_is_refused_at_once(auth_server: EtcdServer) -> None:
    async with _etcd(auth_server.endpoint, username=USER, password="not-" + USER_PASSWORD) as backend:
        with anyio.fail_after(10):
            with pytest.raises(AuthenticationError) as info:
                await backend.range(Range(ALLOWED.encode(), prefix=True))
            with pytest.raises(AuthenticationError):
                async with Session(backend, ttl=5):
                    pass
    _assert_no_secret(_exception_texts(info.value), "a wrong-password error")


async def test_user_runs_every_recipe_on_its_prefix(auth_server: EtcdServer) -> None:
    async with _user(auth_server) as backend:
        await exercise_recipes(backend, f"{ALLOWED}rbac/")


Call = Callable[[], Awaitable[object]]


def _entry_points(session: Session, prefix: str) -> tuple[dict[str, Call], dict[str, Call]]:
    """Every entry point of every recipe on keys under ``prefix``: (those that only read, those that write)."""
    backend = session.backend

    async def enter(manager: Any) -> None:
        async with manager:
            pass

    async def first(items: Any) -> None:
        async with aclosing(items):
            await anext(items)

    async def compute() -> bytes:
        return b"42"

    election, group = Election(session, f"{prefix}election"), Group(session, f"{prefix}group")
    queue, scheduler = WorkQueue(session, f"{prefix}queue"), Scheduler(session, f"{prefix}cron")
    reads: dict[str, Call] = {
        "Election.leader": election.leader,
        "Election.observe": lambda: first(election.observe()),
        "Group.members": group.members,
        "Group.watch": lambda: first(group.watch()),
        "ConfigView": lambda: enter(ConfigView(backend, f"{prefix}config/")),
        "WorkQueue.depth": queue.depth,
        "Scheduler.history": lambda: scheduler.history("tick"),
        "watch": lambda: enter(backend.watch(prefix.encode(), prefix=True, start_revision=0)),
    }
    writes: dict[str, Call] = {
        "Lock": lambda: enter(Lock(session, f"{prefix}lock")),
        "Lock.try_acquire": Lock(session, f"{prefix}lock").try_acquire,  # again, after the refusal above
        "Semaphore": lambda: enter(Semaphore(session, f"{prefix}semaphore", limit=2)),
        "Election.campaign": lambda: enter(election.campaign(b"x")),
        "Group.join": lambda: enter(group.join("member-1")),
        "publish": lambda: publish(backend, f"{prefix}config/db", {"url": "x"}, expected_revision=None),
        "once": lambda: once(session, f"{prefix}once", compute),
        "WorkQueue.put": lambda: queue.put(b"job"),
        "WorkQueue.lease": lambda: enter(queue.lease(visibility_timeout=10)),  # writes once an item is there
        "Scheduler.put_job": lambda: scheduler.put_job(JobSpec("tick", "job", interval=1)),
        "Scheduler": lambda: enter(scheduler),  # a worker announces itself in the workers' group
    }
    return reads, writes


async def _refusals(calls: dict[str, Call]) -> None:
    """Call each; each must fail at once (not be retried, not hang) with AuthenticationError."""
    errors: dict[str, Exception] = {}
    for name, call in calls.items():
        with anyio.fail_after(10):
            try:
                await call()
            except Exception as exc:
                errors[name] = exc
            else:
                raise AssertionError(f"{name} was allowed")
    wrong = {name: repr(error) for name, error in errors.items() if not isinstance(error, AuthenticationError)}
    assert not wrong, f"not an AuthenticationError: {wrong}"
    for name, error in errors.items():
        assert "permission denied" in str(error), name
        _assert_no_secret(_exception_texts(error), f"the error of {name}")


async def _keys(server: EtcdServer, prefix: str) -> list[tuple[bytes, int]]:
    async with _root(server) as root:
        return [(kv.key, kv.mod_revision) for kv in (await root.range(Range(prefix.encode(), prefix=True))).kvs]


async def test_user_is_refused_every_recipe_outside_its_prefix(auth_server: EtcdServer) -> None:
    async with _user(auth_server) as backend, Session(backend, ttl=5) as session:  # leases need no permission
        reads, writes = _entry_points(session, FORBIDDEN)
        await _refusals({**reads, **writes})
        assert not session.lost
    assert await _keys(auth_server, FORBIDDEN) == [], "a refused recipe left keys behind"


async def test_read_only_user_observes_but_cannot_write(auth_server: EtcdServer) -> None:
    prefix = f"{ALLOWED}read-only/"
    async with _user(auth_server) as writer, Session(writer, ttl=5) as session:
        await WorkQueue(session, f"{prefix}queue").put(b"job")  # so that the reader's lease tries to claim it
    before = await _keys(auth_server, prefix)
    async with _etcd(auth_server.endpoint, username=READER, password=READER_PASSWORD) as backend:
        async with Session(backend, ttl=5) as session:
            reads, writes = _entry_points(session, prefix)
            for name, call in reads.items():
                with anyio.fail_after(10):
                    try:
                        await call()
                    except Exception as exc:
                        raise AssertionError(f"{name} was refused to a reader") from exc
            await _refusals(writes)
    assert await _keys(auth_server, prefix) == before, "a refused recipe wrote"


# -- token expiry -------------------------------------------------------------------------------------------


def _token_is_valid(server: EtcdServer, token: str) -> bool:
    request = urllib.request.Request(
        f"{server.endpoint}/v3/kv/range",
        data=json.dumps({"key": "eA=="}).encode(),
        headers={"Content-Type": "application/json", "Authorization": token},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError as exc:
        assert b"invalid auth token" in exc.read()
        return False


def _has(key: str, value: object) -> Callable[[Mapping[str, Any]], bool]:
    return lambda values: values.get(key) == value


async def test_expired_token_is_renewed_transparently(auth_server: EtcdServer) -> None:
    rounds = 3
    prefix = f"{ALLOWED}refresh/"
    tokens: list[str | None] = []
    async with _user(auth_server) as backend, Session(backend, ttl=5) as session:
        async with Lock(session, f"{prefix}lock") as held, ConfigView(backend, f"{prefix}config/") as view:
            for round_ in range(rounds):
                token = _token(backend)
                assert token is not None
                tokens.append(token)
                # Idle for longer than the token's TTL (etcd checks expiry once a second). Keepalives do not use
                # the token, so only this idleness decides: the token expires on the server.
                await anyio.sleep(TOKEN_TTL + 2)
                assert not await anyio.to_thread.run_sync(_token_is_valid, auth_server, token)
                assert not session.lost
                with anyio.fail_after(10):
                    # a write (re-authenticates, then sends the refused request again) ...
                    assert await publish(backend, f"{prefix}config/round", round_, expected_revision=None)
                    # ... seen by the watch opened tokens ago, and a write fenced by the lock held all along
                    await view.wait_for(_has("round", round_))
                    fenced = await backend.txn([held.guard()], [Put(f"{prefix}fenced".encode(), b"%d" % round_)])
                    assert fenced.succeeded
            statistics = session.statistics()
        assert not session.lost
    tokens.append(_token(backend))
    assert len(set(tokens)) == rounds + 1, "each round re-authenticated once"
    assert not statistics.lost and statistics.keepalives >= rounds


# -- secrets --------------------------------------------------------------------------------------------------


async def test_secrets_never_leak(auth_server: EtcdServer, mtls_server: EtcdServer) -> None:
    failures: list[BaseException] = []

    async def fails(call: Callable[[], Awaitable[object]]) -> None:
        with anyio.fail_after(20):
            try:
                await call()
            except Exception as exc:
                failures.append(exc)
            else:
                raise AssertionError("expected a failure")

    # credentials in an endpoint URL are refused without echoing them
    with pytest.raises(ValueError, match="user info") as bad_url:
        _etcd(f"http://{USER}:{USER_PASSWORD}@127.0.0.1:2379")
    with pytest.raises(ValueError, match="user info") as bad_url_and_port:
        _etcd(f"http://{USER}:{USER_PASSWORD}/x@127.0.0.1:2379")
    failures += [bad_url.value, bad_url_and_port.value]

    objects: list[object] = []
    async with _user(auth_server) as user, _root(auth_server) as root:
        async with Session(user, ttl=5) as session:
            lock, election = Lock(session, f"{ALLOWED}leak/lock"), Election(session, f"{ALLOWED}leak/election")
            async with lock as held, election.campaign(b"x") as leadership:
                group = Group(session, f"{ALLOWED}leak/group")
                async with group.join("m") as member, ConfigView(user, f"{ALLOWED}leak/config/") as view:
                    transport_client = user._grpc or user._client
                    objects += [user, root, transport_client, session, lock, held, election, leadership, group, member]
                    objects += [view, WorkQueue(session, f"{ALLOWED}leak/q"), Scheduler(session, f"{ALLOWED}cron")]
                    objects += [Semaphore(session, f"{ALLOWED}leak/s", limit=1), session.statistics()]
            await fails(lambda: Lock(session, f"{FORBIDDEN}lock").try_acquire())  # permission denied
            await fails(lambda: exercise_recipes(user, FORBIDDEN))
        await fails(lambda: root.txn([], [Put(b"k", b"x" * 1_600_000)]))  # too large
    async with _etcd(auth_server.endpoint, username=USER, password=USER_PASSWORD + "x") as wrong:
        await fails(lambda: wrong.range(Range(b"k")))  # wrong password
    async with _etcd(closed_endpoint(), username=USER, password=USER_PASSWORD, request_timeout=1) as unreachable:
        await fails(lambda: unreachable.range(Range(b"k")))
        await fails(lambda: exercise_recipes(unreachable, ALLOWED))
    mtls = mtls_server
    async with _etcd(
        mtls.endpoint, ca_file=mtls.ca_file, cert_file=mtls.client_cert_file, key_file=mtls.client_key_file
    ) as with_key:
        objects.append(with_key)
        await fails(lambda: with_key.txn([], [Put(b"k", b"x" * 1_600_000)]))
    with pytest.raises(ValueError, match="TLS files") as bad_key:  # a certificate where the key should be
        _etcd(mtls.endpoint, cert_file=mtls.client_cert_file, key_file=mtls.ca_file)
    failures.append(bad_key.value)

    assert {type(exc).__name__ for exc in failures} >= {"AuthenticationError", "UnavailableError", "ValueError"}
    for exc in failures:
        _assert_no_secret(_exception_texts(exc), f"the error {exc!r}")
    _assert_no_secret([text for obj in objects for text in (repr(obj), str(obj))], "a repr()")
    # the captures are live (so the checks of every test's teardown are not vacuous)
    assert any(record.levelno == logging.DEBUG and record.name.startswith("asyncio") for record in _log_records)
    recorded = [event for span in _spans.get_finished_spans() for event in span.events if event.name == "exception"]
    assert any("AuthenticationError" in str(event.attributes) for event in recorded)
    assert _token(user) in _secrets  # tokens are captured
