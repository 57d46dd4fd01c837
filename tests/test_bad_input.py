"""Bad input, on both backends: every public constructor and call refuses it with a typed error, at once.

Property tests (hypothesis) generate the input. Checks that never reach a store (argument validation, which must
happen before any I/O) run many examples once; checks that reach the store run a few examples on each backend
and then assert that the store under the test's namespace is exactly as before and that no lease was left behind.
Every call that reaches a store is bounded by ``anyio.fail_after`` (virtual time on memory, real time on etcd):
a refusal is never a hang.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, currently_in_test_context, example, given, note, settings, strategies as st

from coordkit import (
    JSON,
    Backend,
    BackendError,
    Compare,
    ConfigView,
    Delete,
    Election,
    EtcdBackend,
    Group,
    JobSpec,
    Lock,
    MemoryBackend,
    Put,
    Range,
    RequestTooLargeError,
    Scheduler,
    Semaphore,
    Session,
    UnavailableError,
    Watch,
    WorkQueue,
    invalidate_once,
    once,
    publish,
    publish_many,
    run_while_leader,
    wait_deleted,
)
from coordkit._backends.types import MAX_INT64, MAX_LEASE_TTL, MAX_REQUEST_BYTES
from coordkit.testing import Harness, MemoryHarness, PostgresHarness

from .helpers import closed_endpoint

pytestmark = pytest.mark.anyio

MiB = 2**20
#: argument checks that never reach a store: cheap, so many examples
PURE = settings(max_examples=100, deadline=None)
#: checks that reach a store: a few examples each, on both backends (each example opens clients on a real etcd)
IO = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: a bound for any single call that reaches a store: generous on a loaded machine, yet never a hang
CALL_BOUND = 15


# -- strategies ----------------------------------------------------------------------------------------------

not_text = st.one_of(
    st.binary(max_size=6),
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.lists(st.text(max_size=2), max_size=2),
)
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)  # text that has no UTF-8 encoding
bad_text = st.one_of(
    st.just(""),
    st.tuples(st.text(max_size=4), st.text(max_size=4)).map(lambda p: f"{p[0]}\x00{p[1]}"),
    st.tuples(st.text(max_size=4), lone_surrogate, st.text(max_size=4)).map("".join),
)
#: names every recipe refuses: TypeError for a non-str, ValueError for empty / NUL / not UTF-8
bad_names = st.one_of(not_text, bad_text)
#: valid names made of "/" edge cases (leading, trailing, doubled, only "/") and non-ASCII text
slashy_names = st.lists(st.sampled_from(["/", "//", "a", "é", "名", " ", "x.y"]), min_size=1, max_size=4).map("".join)
bad_ttls = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_LEASE_TTL + 1),
    st.floats(),  # nan, inf, 2.5, and 10.0 too: a TTL is whole seconds
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
not_bytes = st.one_of(
    st.text(max_size=4),
    st.integers(),
    st.none(),
    st.binary(max_size=4).map(bytearray),
    st.binary(max_size=4).map(lambda data: memoryview(data)),
    st.lists(st.integers(0, 255), max_size=3),
)
bad_counts = st.one_of(  # a positive int is wanted: a limit, max_attempts, history
    st.integers(max_value=0),
    st.booleans(),
    st.floats(),
    st.text(max_size=2),
    st.none(),
)
bad_int64 = st.one_of(st.integers(min_value=MAX_INT64 + 1), st.integers(max_value=-1))
bad_lease_ids = st.one_of(bad_int64, st.booleans(), st.floats(), st.text(max_size=3), st.none())
bad_intervals = st.one_of(
    st.floats(max_value=0),
    st.just(math.nan),
    st.just(math.inf),
    st.floats(min_value=1e-12, max_value=4e-7),  # under timedelta's 1 µs resolution: a zero step
    st.floats(min_value=3.2e9, allow_infinity=False),  # over 100 years
    st.integers(min_value=2**70),
    st.booleans(),
    st.text(max_size=3),
)
bad_durations = st.one_of(  # a finite number of seconds >= 0 is wanted
    st.floats(max_value=-1e-9),
    st.just(math.nan),
    st.just(math.inf),
    st.booleans(),
    st.text(max_size=3),
)


def expected_error(value: object) -> type[Exception]:
    """The error a text argument gets: TypeError when it is no str, ValueError when it is bad text."""
    return ValueError if isinstance(value, str) else TypeError


# -- helpers -------------------------------------------------------------------------------------------------


def refused(label: str, call: Callable[[], object], error: type[Exception] | None = None) -> Exception:
    """Call something that must refuse its arguments at once, before any I/O; return the error.

    A coroutine is stepped once: it must raise before its first suspension (where it would reach the store).
    """
    if currently_in_test_context():
        note(label)
    try:
        result = call()
        if inspect.iscoroutine(result):
            try:
                result.send(None)
            except StopIteration:
                pass
            else:
                result.close()
                pytest.fail(f"{label}: started I/O instead of refusing its input")
    except (TypeError, ValueError) as exc:
        if error is not None:
            assert isinstance(exc, error), f"{label}: {type(exc).__name__}: {exc} (expected {error.__name__})"
        return exc
    pytest.fail(f"{label}: accepted its input")


async def job(*args: object) -> None:
    pass


async def returns_bytes() -> bytes:
    return b"result"


LeaseLister = Callable[[], Awaitable[set[int]]]


@pytest.fixture
def live_leases(kind: str, harness: Harness, request: pytest.FixtureRequest) -> LeaseLister:
    """Lists the leases alive in the store (a memory store's own list; ``etcdctl lease list`` on etcd; the lease
    table on PostgreSQL)."""
    if kind == "memory":
        assert isinstance(harness, MemoryHarness)
        store = harness.store

        async def memory_leases() -> set[int]:
            return set(store.lease_ids())

        return memory_leases
    if kind == "postgres":
        assert isinstance(harness, PostgresHarness)
        dsn, schema = harness.dsn, harness.schema

        async def postgres_leases() -> set[int]:
            import asyncpg

            conn = await asyncpg.connect(dsn)
            try:
                return {row["id"] for row in await conn.fetch(f'SELECT id FROM "{schema}".lease')}
            finally:
                await conn.close()

        return postgres_leases
    server = request.getfixturevalue("etcd_server")

    async def etcd_leases() -> set[int]:
        listing = await anyio.to_thread.run_sync(server.run_etcdctl, "lease", "list")
        return {int(line, 16) for line in listing.splitlines()[1:] if line.strip()}

    return etcd_leases


@asynccontextmanager
async def untouched(client: Backend, namespace: bytes, live_leases: LeaseLister) -> AsyncIterator[None]:
    """Assert that the block leaves the keys under ``namespace`` exactly as they were, and grants no lease."""

    async def state() -> tuple[list[tuple[bytes, int, int]], set[int]]:
        result = await client.range(Range(namespace, prefix=True, keys_only=True))
        return [(kv.key, kv.mod_revision, kv.lease) for kv in result.kvs], await live_leases()

    keys_before, leases_before = await state()
    yield
    keys_after, leases_after = await state()
    assert keys_after == keys_before, "a refused call changed the store"
    assert leases_after <= leases_before, f"a refused call left leases behind: {leases_after - leases_before}"


async def raises(error: type[Exception] | tuple[type[Exception], ...], call: Awaitable[object]) -> Exception:
    """Await ``call`` (bounded); it must raise ``error``."""
    with pytest.raises(error) as info, anyio.fail_after(CALL_BOUND):
        await call
    return info.value


async def enter(make: Callable[[], Any]) -> None:
    """Make an async context manager (a campaign, a join, a lease...), enter it and leave it."""
    async with make():
        pass


# -- arguments refused before any I/O ---------------------------------------------------------------------


def name_entry_points(name: Any) -> Iterator[tuple[str, Callable[[], object]]]:
    """Every public call that takes a recipe name, with ``name``."""
    backend = MemoryBackend()
    session = Session(backend, ttl=5)
    yield "Lock", lambda: Lock(session, name)
    yield "Semaphore", lambda: Semaphore(session, name, limit=2)
    yield "Election", lambda: Election(session, name)
    yield "Group", lambda: Group(session, name)
    yield "WorkQueue", lambda: WorkQueue(session, name)
    yield "Scheduler", lambda: Scheduler(session, name)
    yield "once", lambda: once(session, name, returns_bytes)
    yield "invalidate_once", lambda: invalidate_once(backend, name)
    yield "run_while_leader", lambda: run_while_leader(backend, name, job)


def member_entry_points(member_id: Any) -> Iterator[tuple[str, Callable[[], object]]]:
    """Calls taking an id that lives under a recipe's prefix: a member id, a job name."""
    session = Session(MemoryBackend(), ttl=5)
    scheduler = Scheduler(session, "cron")
    yield "Group.join", lambda: Group(session, "group").join(member_id)
    yield "JobSpec", lambda: JobSpec(member_id, "target", interval=60)
    yield "Scheduler.kill", lambda: scheduler.kill(member_id)
    yield "Scheduler.history", lambda: scheduler.history(member_id)
    yield "Scheduler.remove_job", lambda: scheduler.remove_job(member_id)


@PURE
@given(name=bad_names)
def test_bad_names_are_refused_before_any_io(name: object) -> None:
    for label, call in name_entry_points(name):
        error = refused(label, call, expected_error(name))
        assert "name" in str(error), f"{label}: the message does not say what is wrong: {error}"


@PURE
@given(member_id=st.one_of(bad_names, slashy_names.filter(lambda text: "/" in text)))
def test_bad_member_ids_and_job_names_are_refused_before_any_io(member_id: object) -> None:
    for label, call in member_entry_points(member_id):
        refused(label, call, expected_error(member_id))


#: lone surrogates that no key can stand for: surrogateescape gives only U+DC80..U+DCFF (one per non-UTF-8 byte)
unescapable_surrogate = lone_surrogate.filter(lambda c: not 0xDC80 <= ord(c) <= 0xDCFF)


@PURE
@given(key=st.one_of(not_text, st.tuples(st.text(max_size=3), unescapable_surrogate).map("".join)))
def test_config_keys_and_prefixes_are_text(key: object) -> None:
    """A ConfigView prefix may be "" (every key) and a key may hold NUL; anything that is no key's text is refused.

    (A key a view shows for non-UTF-8 bytes, with surrogates U+DC80..U+DCFF, is accepted: see test_config.)
    """
    backend = MemoryBackend()
    error = expected_error(key)
    refused("ConfigView", lambda: ConfigView(backend, key), error)  # type: ignore[call-overload]
    refused("publish", lambda: publish(backend, key, 1, expected_revision=None), error)  # type: ignore[arg-type]
    refused("publish_many", lambda: publish_many(backend, {key: 1}, expected=None), error)  # type: ignore[dict-item]
    refused("publish_many expected", lambda: publish_many(backend, {}, expected={key: 0}), error)  # type: ignore[dict-item]


def test_publish_refuses_what_is_no_mapping_or_key() -> None:
    backend = MemoryBackend()
    refused("publish_many list", lambda: publish_many(backend, [("k", 1)], expected=None), TypeError)  # type: ignore[arg-type]
    refused("publish empty key", lambda: publish(backend, "", 1, expected_revision=None), ValueError)
    refused("publish str revision", lambda: publish(backend, "k", 1, expected_revision="3"), TypeError)  # type: ignore[arg-type]
    refused("publish unserialisable", lambda: publish(backend, "k", object(), expected_revision=None), TypeError)


@PURE
@given(ttl=bad_ttls)
def test_bad_ttls_are_refused_before_any_io(ttl: object) -> None:
    memory = MemoryBackend()
    etcd = EtcdBackend("http://127.0.0.1:9")  # builds no connection: nothing is sent before the check
    session = Session(memory, ttl=5)
    error = TypeError if not isinstance(ttl, int) or isinstance(ttl, bool) else ValueError
    refused("Session", lambda: Session(memory, ttl=ttl), error)  # type: ignore[arg-type]
    refused("MemoryBackend.grant", lambda: memory.grant(ttl), error)  # type: ignore[arg-type]
    refused("EtcdBackend.grant", lambda: etcd.grant(ttl), error)  # type: ignore[arg-type]
    if ttl is not None:  # result_ttl=None: the result lives until invalidated
        refused("once result_ttl", lambda: once(session, "o", returns_bytes, result_ttl=ttl), error)  # type: ignore[call-overload]
    refused("WorkQueue.lease", lambda: WorkQueue(session, "q").lease(visibility_timeout=ttl), error)  # type: ignore[arg-type]
    refused("run_while_leader", lambda: run_while_leader(memory, "e", job, ttl=ttl), error)  # type: ignore[arg-type]


@PURE
@given(margin=bad_durations)
def test_bad_durations_are_refused(margin: object) -> None:
    backend = MemoryBackend()
    session = Session(backend, ttl=5)
    error = TypeError if isinstance(margin, bool | str) else ValueError
    exc = refused("Session safety_margin", lambda: Session(backend, ttl=10, safety_margin=margin), None)  # type: ignore[arg-type]
    assert "safety_margin" in str(exc) or isinstance(exc, TypeError)
    refused("Scheduler misfire_grace", lambda: Scheduler(session, "cron", misfire_grace=margin), error)  # type: ignore[arg-type]


@PURE
@given(value=not_bytes)
def test_byte_apis_refuse_other_types(value: object) -> None:
    backend = MemoryBackend()
    session = Session(backend, ttl=5)
    refused("Put value", lambda: Put(b"k", value), TypeError)  # type: ignore[arg-type]
    refused("Put key", lambda: Put(value, b"v"), TypeError)  # type: ignore[arg-type]
    refused("Delete key", lambda: Delete(value), TypeError)  # type: ignore[arg-type]
    refused("Range key", lambda: Range(value), TypeError)  # type: ignore[arg-type]
    refused("Compare key", lambda: Compare.create(value, "==", 0), TypeError)  # type: ignore[arg-type]
    refused("Compare value", lambda: Compare.value(b"k", "==", value), TypeError)  # type: ignore[arg-type]
    refused("Watch key", lambda: Watch(backend, value), TypeError)  # type: ignore[arg-type]
    refused("backend.watch key", lambda: backend.watch(value, start_revision=0), TypeError)  # type: ignore[arg-type]
    refused("wait_deleted", lambda: wait_deleted(backend, value, revision=1), TypeError)  # type: ignore[arg-type]
    refused("campaign value", lambda: Election(session, "e").campaign(value), TypeError)  # type: ignore[arg-type]
    refused("run_while_leader value", lambda: run_while_leader(backend, "e", job, value=value), TypeError)  # type: ignore[arg-type]
    refused("join metadata", lambda: Group(session, "g").join("m", metadata=value), TypeError)  # type: ignore[arg-type]
    refused("WorkQueue.put", lambda: WorkQueue(session, "q").put(value), TypeError)  # type: ignore[arg-type]


@PURE
@given(count=bad_counts)
def test_bad_limits_and_counts_are_refused(count: object) -> None:
    session = Session(MemoryBackend(), ttl=5)
    error = ValueError if isinstance(count, int) and not isinstance(count, bool) else TypeError
    exc = refused("Semaphore limit", lambda: Semaphore(session, "s", limit=count), error)  # type: ignore[arg-type]
    assert "limit" in str(exc)
    refused("WorkQueue max_attempts", lambda: WorkQueue(session, "q", max_attempts=count), error)  # type: ignore[arg-type]
    refused("Scheduler history", lambda: Scheduler(session, "cron", history=count), error)  # type: ignore[arg-type]


@PURE
@given(interval=bad_intervals)
def test_bad_job_intervals_are_refused(interval: object) -> None:
    """An interval must be a finite number of seconds from 1 µs to 100 years: the ticks are timedelta multiples."""
    error = TypeError if isinstance(interval, bool | str) else ValueError
    exc = refused("JobSpec interval", lambda: JobSpec("job", "target", interval=interval), error)  # type: ignore[arg-type]
    assert "'job'" in str(exc), "the message names the job"


def test_bad_job_specs_are_refused() -> None:
    session = Session(MemoryBackend(), ttl=5)
    refused("target", lambda: JobSpec("j", 5, interval=1), TypeError)  # type: ignore[arg-type]
    refused("cron type", lambda: JobSpec("j", "t", cron=5), TypeError)  # type: ignore[arg-type]
    refused("cron text", lambda: JobSpec("j", "t", cron="every minute"), ValueError)
    refused("both", lambda: JobSpec("j", "t", cron="* * * * *", interval=60), ValueError)
    refused("neither", lambda: JobSpec("j", "t"), ValueError)
    refused("args", lambda: JobSpec("j", "t", interval=1, args="ab"), TypeError)  # type: ignore[arg-type]
    refused("misfire", lambda: JobSpec("j", "t", interval=1, misfire="never"), ValueError)  # type: ignore[arg-type]
    scheduler = Scheduler(session, "cron")
    refused("register target", lambda: scheduler.register(b"t", job), TypeError)  # type: ignore[arg-type]
    refused("register fn", lambda: scheduler.register("t", "not callable"), TypeError)  # type: ignore[arg-type]
    refused("worker", lambda: Scheduler(session, "cron", worker=5), TypeError)  # type: ignore[arg-type]
    refused("now", lambda: Scheduler(session, "cron", now=5), TypeError)  # type: ignore[arg-type]
    # JSON arguments: an unserialisable one is refused when the spec is published, before anything is written
    spec = JobSpec("j", "t", interval=1, args=[object()])
    refused("put_job args", lambda: scheduler.put_job(spec), TypeError)


@PURE
@given(number=bad_lease_ids)
def test_lease_ids_revisions_and_int64_fields_are_checked(number: object) -> None:
    """etcd's numbers are int64: anything else is refused before it is sent, on both backends alike."""
    error = TypeError if not isinstance(number, int) or isinstance(number, bool) else ValueError
    for backend in (MemoryBackend(), EtcdBackend("http://127.0.0.1:9")):
        refused(f"{backend.name} refresh", lambda b=backend: b.refresh(number), error)  # type: ignore[misc]
        refused(f"{backend.name} revoke", lambda b=backend: b.revoke(number), error)  # type: ignore[misc]
        refused(f"{backend.name} watch", lambda b=backend: b.watch(b"k", start_revision=number), error)  # type: ignore[misc]
    if number is not None:  # Watch(start_revision=None): a snapshot first
        refused("Watch start_revision", lambda: Watch(MemoryBackend(), b"k", start_revision=number), error)  # type: ignore[arg-type]
    if isinstance(number, int) and not isinstance(number, bool):
        refused("Put lease", lambda: Put(b"k", b"", number), ValueError)
        refused("Range limit", lambda: Range(b"k", limit=number), ValueError)
        refused("Range max_create_revision", lambda: Range(b"k", max_create_revision=number), ValueError)
        if number > 0:  # int64 compares may be negative
            refused("Compare mod", lambda: Compare.mod(b"k", "==", number), ValueError)
            refused("Semaphore limit", lambda: Semaphore(Session(MemoryBackend()), "s", limit=number), ValueError)


def test_transaction_parts_must_be_sequences() -> None:
    """A generator would be used up by the checks and the transaction applied without its compares."""
    for backend in (MemoryBackend(), EtcdBackend("http://127.0.0.1:9")):
        compares = (c for c in [Compare.create(b"k", "==", 5)])
        refused("txn generator", lambda b=backend, c=compares: b.txn(c, [Put(b"k", b"v")]), TypeError)  # type: ignore[misc]
        refused("txn compare", lambda b=backend: b.txn(Compare.create(b"k", "==", 5), []), TypeError)  # type: ignore[misc]
        refused("txn op type", lambda b=backend: b.txn([], [b"put"]), TypeError)  # type: ignore[misc]
        refused("txn bytes", lambda b=backend: b.txn([], b"ops"), TypeError)  # type: ignore[misc]


def test_recipes_refuse_what_is_no_session_backend_or_function() -> None:
    backend = MemoryBackend()
    session = Session(backend, ttl=5)
    refused("Session", lambda: Session("etcd://here"), TypeError)  # type: ignore[arg-type]
    for label, call in [
        ("Lock", lambda: Lock(backend, "n")),  # type: ignore[arg-type]
        ("Semaphore", lambda: Semaphore(backend, "n", limit=1)),  # type: ignore[arg-type]
        ("Election", lambda: Election(backend, "n")),  # type: ignore[arg-type]
        ("Group", lambda: Group(backend, "n")),  # type: ignore[arg-type]
        ("WorkQueue", lambda: WorkQueue(backend, "n")),  # type: ignore[arg-type]
        ("Scheduler", lambda: Scheduler(backend, "n")),  # type: ignore[arg-type]
        ("once", lambda: once(backend, "n", returns_bytes)),  # type: ignore[call-overload]
    ]:
        assert "Session" in str(refused(label, call, TypeError))
    refused("once fn", lambda: once(session, "n", b"not a function"), TypeError)  # type: ignore[call-overload]
    refused("run_while_leader job", lambda: run_while_leader(backend, "n", None), TypeError)  # type: ignore[arg-type]
    refused("requeue id", lambda: WorkQueue(session, "q").requeue(b"id"), TypeError)  # type: ignore[arg-type]
    refused("put priority", lambda: WorkQueue(session, "q").put(b"x", priority=True), TypeError)


# -- EtcdBackend endpoints ------------------------------------------------------------------------------------

hosts = st.sampled_from(["127.0.0.1", "localhost", "etcd-0.example", "[::1]"])
bad_endpoints = st.one_of(
    # wrong or missing scheme
    st.builds(
        "{}{}:2379".format, st.sampled_from(["", "ftp://", "grpc://", "unix://", "etcd://", "//", "tcp:"]), hosts
    ),
    # no host, user info, a path, a query or a fragment
    st.sampled_from(["http://", "http://:2379", "https://:1", "http://u:p@h:1", "http://h:1/v3", "http://h:1?a=b"]),
    st.builds("http://{}:2379/{}".format, hosts, st.text("ab/%.", min_size=1, max_size=4).filter(lambda t: t != "/")),
    # bad ports: out of range, zero, not a number
    st.builds("http://{}:{}".format, hosts, st.one_of(st.integers(65536, 10**9), st.just(0))),
    st.builds("http://{}:{}".format, hosts, st.text("abc:-x", min_size=1, max_size=4)),
    # hosts with spaces or control characters
    st.builds("http://a{}b:1".format, st.sampled_from([" ", "\x00", "\t", "\x7f", "\udcff"])),
)


@PURE
@given(url=bad_endpoints)
def test_malformed_endpoints_are_refused_without_io(url: str) -> None:
    exc = refused("EtcdBackend", lambda: EtcdBackend(url), ValueError)
    if "@" not in url:  # user info may hold a password: the message leaves it out
        assert "endpoint" in str(exc)
    refused("EtcdBackend in a list", lambda: EtcdBackend(["http://127.0.0.1:2379", url]), ValueError)


@settings(PURE, max_examples=20)  # each builds a client (no I/O, but etcd3-py's set-up is not free)
@given(port=st.one_of(st.none(), st.integers(1, 65535)), scheme=st.sampled_from(["http", "https", "HTTP"]))
def test_endpoints_are_normalised_with_etcds_default_port(port: int | None, scheme: str) -> None:
    """A URL without a port means etcd's 2379 (as etcdctl reads it); the scheme is case-insensitive."""
    url = f"{scheme}://Etcd.Example" + ("" if port is None else f":{port}") + "/"
    (endpoint,) = EtcdBackend(url).endpoints
    assert endpoint == f"{scheme.lower()}://etcd.example:{2379 if port is None else port}"
    assert EtcdBackend(endpoint).endpoints == (endpoint,), "normalising is idempotent"


def test_endpoint_and_option_types_are_checked() -> None:
    for endpoints in (b"http://127.0.0.1:2379", None, 2379, [b"http://127.0.0.1:2379"]):
        refused(f"endpoints {endpoints!r}", lambda e=endpoints: EtcdBackend(e), TypeError)  # type: ignore[misc]
    refused("no endpoint", lambda: EtcdBackend([]), ValueError)
    for timeout, error in (
        ("5", TypeError),
        (True, TypeError),
        (None, TypeError),
        (0, ValueError),
        (math.nan, ValueError),
    ):
        refused(f"request_timeout {timeout!r}", lambda t=timeout: EtcdBackend("http://h:1", request_timeout=t), error)  # type: ignore[misc]


@pytest.mark.parametrize("kind", ["etcd"])
async def test_unreachable_endpoint_fails_fast_with_a_typed_error() -> None:
    """Nothing listens: every call raises UnavailableError at once (connection refused), never hangs."""
    url = closed_endpoint()
    async with EtcdBackend(url) as backend:
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("range", lambda: backend.range(Range(b"k"))),
            ("txn", lambda: backend.txn([], [Put(b"k", b"v")])),
            ("grant", lambda: backend.grant(5)),
            ("refresh", lambda: backend.refresh(1)),
            ("revoke", lambda: backend.revoke(1)),
            ("watch", lambda: enter(lambda: backend.watch(b"k", start_revision=0))),
        ]
        for label, call in calls:
            started = anyio.current_time()
            error = await raises(UnavailableError, call())
            assert url in str(error), f"{label}: the message names the endpoint: {error}"
            assert anyio.current_time() - started < 5, f"{label} took too long to fail"
        await raises(UnavailableError, enter(lambda: Session(backend, ttl=5)))


@pytest.mark.parametrize("kind", ["etcd"])
async def test_endpoints_that_are_not_etcd_fail_with_typed_errors(etcd_server: Any) -> None:
    """https to a plain-HTTP etcd, to an HTTP server; http to a server that is not etcd, or never answers: each
    call raises a typed error (a BackendError), within its bound, naming the endpoint."""

    async def not_etcd(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found")

    async def silent(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        try:
            ports = {}
            for handler in (not_etcd, silent):
                listener = await stack.enter_async_context(await anyio.create_tcp_listener(local_host="127.0.0.1"))
                tg.start_soon(listener.serve, handler)
                ports[handler] = listener.extra(anyio.abc.SocketAttribute.local_port)
            cases: list[tuple[str, type[BackendError], str]] = [
                # etcd resets a TLS handshake on its plain port: to the client, the connection is reset
                (etcd_server.endpoint.replace("http://", "https://"), BackendError, ""),
                (f"https://127.0.0.1:{ports[not_etcd]}", BackendError, "TLS"),
                (f"http://127.0.0.1:{ports[not_etcd]}", BackendError, "not found"),
                (f"http://127.0.0.1:{ports[silent]}", UnavailableError, "in time"),
            ]
            for url, error_type, says in cases:
                async with EtcdBackend(url, request_timeout=0.5) as backend:
                    calls: list[Callable[[], Awaitable[object]]] = [
                        lambda: backend.range(Range(b"k")),
                        lambda: backend.txn([], [Put(b"k", b"v")]),
                        lambda: enter(lambda: backend.watch(b"k", start_revision=0)),
                    ]
                    for call in calls:
                        started = anyio.current_time()
                        error = await raises(error_type, call())
                        assert says in str(error) and url in str(error), (url, error)
                        assert anyio.current_time() - started < 5, (url, error)
        finally:
            tg.cancel_scope.cancel()  # stop serving (then the stack closes the listeners)


# -- on a store: refused calls leave it as it was ------------------------------------------------------------


@IO
@given(name=bad_names, ttl=bad_ttls)
async def test_refused_calls_on_an_open_session_change_nothing(
    harness: Harness, live_leases: LeaseLister, name: Any, ttl: Any
) -> None:
    async with harness.client() as client, Session(client, ttl=5) as session:
        ns = harness.namespace.decode()
        async with untouched(client, harness.namespace, live_leases):
            await raises((TypeError, ValueError), once(session, name, returns_bytes))
            if ttl is not None:  # result_ttl=None: the result lives until invalidated
                await raises((TypeError, ValueError), once(session, ns + "once", returns_bytes, result_ttl=ttl))
            await raises((TypeError, ValueError), invalidate_once(client, name))
            await raises((TypeError, ValueError), run_while_leader(client, name, job))
            await raises((TypeError, ValueError), run_while_leader(client, ns + "leader", job, ttl=ttl))
            await raises((TypeError, ValueError), enter(lambda: Group(session, ns + "group").join(name)))
            with pytest.raises((TypeError, ValueError)):
                WorkQueue(session, ns + "queue").lease(visibility_timeout=ttl)
            with pytest.raises((TypeError, ValueError)):
                Session(client, ttl=ttl)
            await raises((TypeError, ValueError), client.grant(ttl))


@IO
@given(name=slashy_names)
async def test_names_with_slashes_work_and_clean_up(harness: Harness, live_leases: LeaseLister, name: str) -> None:
    """Names made of "/" edge cases are valid (names nest, as in etcd): each recipe works and leaves no key."""
    full = harness.namespace.decode() + name
    async with harness.client() as client, Session(client, ttl=5) as session:
        with anyio.fail_after(CALL_BOUND):
            async with untouched(client, harness.namespace, live_leases):
                async with Lock(session, full) as held:
                    assert held.key.startswith(f"{full}/".encode())
                async with Semaphore(session, full, limit=2):
                    pass
                election = Election(session, full)
                async with election.campaign(b"me") as leadership:
                    leader = await election.leader()
                    assert leader is not None and leader.term == leadership.term
                group = Group(session, full)
                async with group.join("member"):
                    assert set((await group.members()).members) == {"member"}
            assert await once(session, full, returns_bytes) == b"result"
            assert await invalidate_once(client, full)
        assert (await client.range(Range(harness.namespace, prefix=True))).count == 0


async def test_nested_groups_do_not_show_each_others_members(harness: Harness) -> None:
    """Group "g/sub" (and "g/") live under group "g"'s prefix: their members are not g's, nor are foreign keys."""
    ns = harness.namespace.decode()
    async with harness.client() as client, Session(client, ttl=5) as session:
        outer, inner, trailing = Group(session, ns + "g"), Group(session, ns + "g/sub"), Group(session, ns + "g/")
        await client.txn([], [Put(harness.namespace + b"g/\xff\xfe", b"")])  # no member's key: not UTF-8
        with anyio.fail_after(CALL_BOUND):
            async with aclosing(outer.watch()) as views:
                assert dict((await anext(views)).members) == {}
                async with inner.join("m1"), trailing.join("m2"), outer.join("m0"):
                    view = await anext(views)  # the nested joins are no change of g's
                    assert dict(view.members) == {"m0": b""} and view.joined == {"m0"}
                    assert set((await outer.members()).members) == {"m0"}
                    assert set((await inner.members()).members) == {"m1"}
                    assert set((await trailing.members()).members) == {"m2"}


huge = st.integers(MAX_REQUEST_BYTES + 1, MAX_REQUEST_BYTES + 512 * 1024)


@settings(PURE, max_examples=5)
@given(size=huge)
def test_names_longer_than_a_request_are_refused_before_any_io(size: int) -> None:
    """No request carrying such a name could be sent: refused at once, with a message that does not echo it."""
    for label, call in [*name_entry_points("n" * size), *member_entry_points("n" * size)]:
        assert len(str(refused(label, call, ValueError))) < 200


@settings(IO, max_examples=2)
@given(size=huge)
async def test_oversized_values_are_refused_and_write_nothing(
    harness: Harness, live_leases: LeaseLister, size: int
) -> None:
    """Over etcd's request limit: RequestTooLargeError from every recipe, on both backends, and nothing written."""
    ns = harness.namespace.decode()
    big = b"v" * size
    too_large = RequestTooLargeError

    async def big_result() -> bytes:
        return big

    async with harness.client() as client, Session(client, ttl=5) as session:
        election, group = Election(session, ns + "election"), Group(session, ns + "group")
        async with election.campaign(b"small") as leadership, group.join("member") as member:
            async with untouched(client, harness.namespace, live_leases):
                await raises(too_large, enter(lambda: Election(session, ns + "other").campaign(big)))
                await raises(too_large, leadership.proclaim(big))
                await raises(too_large, enter(lambda: group.join("big", metadata=big)))
                await raises(too_large, member.update(big))
                await raises(too_large, once(session, ns + "once", big_result))
                await raises(too_large, once(session, ns + "once", big_result, result_ttl=60))  # no lease left
                await raises(too_large, WorkQueue(session, ns + "queue").put(big))
                await raises(too_large, publish(client, ns + "config", big.decode(), expected_revision=None))
                await raises(too_large, publish(client, ns + "v" * size, 1, expected_revision=None))  # a key
                await raises(too_large, client.txn([], [Put(harness.namespace + b"k", big)]))
            assert leadership.value == b"small" and member.metadata == b""
            leader = await election.leader()
            assert leader is not None and leader.value == b"small"
        assert (await client.range(Range(harness.namespace, prefix=True))).count == 0
        assert (await once(session, ns + "once", returns_bytes)) == b"result", "a refused result does not block once"
        assert await invalidate_once(client, ns + "once")


async def test_long_names_either_work_or_are_refused_whole(harness: Harness, live_leases: LeaseLister) -> None:
    """A 400 KiB name is valid, but a Lock's acquire carries it 7 times (over the limit), a join 3 times (under):
    each recipe either works and cleans up, or raises RequestTooLargeError having written nothing."""
    ns = harness.namespace.decode()
    name = ns + "n" * (400 * 1024)
    too_large = RequestTooLargeError
    async with harness.client() as client, Session(client, ttl=5) as session:
        async with untouched(client, harness.namespace, live_leases):
            for _ in range(2):  # a refused acquire leaves nothing behind that would break the next one
                await raises(too_large, Lock(session, name).acquire())
            await raises(too_large, Semaphore(session, name, limit=2).try_acquire())
            await raises(too_large, enter(lambda: Election(session, name).campaign()))
            await raises(too_large, once(session, name, returns_bytes))
            with anyio.fail_after(CALL_BOUND):
                group = Group(session, name)
                async with group.join("m"):
                    assert set((await group.members()).members) == {"m"}
                queue = WorkQueue(session, name)
                await queue.put(b"job")
                await raises(too_large, queue.depth())  # a read of 3 prefixes: over gRPC's 2 MiB
                written = await client.range(Range(f"{name}/".encode(), prefix=True, count_only=True))
                assert written.count == 2, "the item and the queue's tail"
                await client.txn([], [Delete(f"{name}/".encode(), prefix=True)])


@settings(IO, max_examples=2)
@given(size=st.integers(MiB, MiB + 64 * 1024))
@example(size=0)
async def test_empty_values_and_values_of_a_mebibyte_are_stored_whole(harness: Harness, size: int) -> None:
    """Documented behaviour: values up to the request limit are fine (a WorkQueue payload is stored base64), and
    an empty value is a value (an empty once() result is a result, not "no result")."""
    ns = harness.namespace.decode()
    value = bytes(range(256)) * (size // 256)

    async def compute() -> bytes:
        return value

    async with harness.client() as client, Session(client, ttl=5) as session:
        with anyio.fail_after(CALL_BOUND):
            election = Election(session, ns + "e")
            async with election.campaign(value), Group(session, ns + "g").join("m", metadata=value):
                assert (await election.leader()).value == value  # type: ignore[union-attr]
                assert (await Group(session, ns + "g").members()).members["m"] == value
            assert await once(session, ns + "o", compute) == value
            assert await once(session, ns + "o", returns_bytes) == value, "the stored result"
            text = value.hex()[: size // 2]
            assert await publish(client, ns + "cfg", text, expected_revision=None)
            async with ConfigView(client, ns + "cfg") as view:
                assert view.get("") == text
            queue = WorkQueue(session, ns + "q")
            await queue.put(value[:MiB])
            async with queue.lease() as task:
                assert task.payload == value[:MiB]
            await invalidate_once(client, ns + "o")
            await client.txn([], [Delete(harness.namespace, prefix=True)])


class FailingCodec:
    """A codec that fails on the way in, on the way out, or returns what is not bytes."""

    def __init__(self, *, encode: Exception | None = None, decode: Exception | None = None, text: bool = False):
        self._encode, self._decode, self._text = encode, decode, text

    def encode(self, value: Any) -> bytes:
        if self._encode is not None:
            raise self._encode
        return str(value) if self._text else JSON.encode(value)  # type: ignore[return-value]

    def decode(self, data: bytes) -> Any:
        if self._decode is not None:
            raise self._decode
        return JSON.decode(data)


async def test_codecs_that_fail(harness: Harness, live_leases: LeaseLister) -> None:
    """A codec's error reaches the caller (noted with what it was doing), writes nothing, and poisons nothing."""
    ns = harness.namespace.decode()
    name = ns + "report"

    async def compute() -> Any:
        return {"rows": 3}

    async with harness.client() as client, Session(client, ttl=5) as session:
        async with untouched(client, harness.namespace, live_leases):
            for codec, error, result in (
                (FailingCodec(encode=ValueError("cannot encode")), ValueError, {"rows": 3}),
                (FailingCodec(text=True), TypeError, {"rows": 3}),  # encode returned str
                (JSON, TypeError, object()),  # not serialisable
            ):

                async def unserialisable(result: Any = result) -> Any:
                    return result

                exc = await raises(error, once(session, name, unserialisable, codec=codec))
                assert repr(name) in str(exc) + " ".join(getattr(exc, "__notes__", [])), exc
            await raises(
                ValueError,
                publish(client, ns + "cfg", 1, expected_revision=None, codec=FailingCodec(encode=ValueError())),
            )
        # the claim was released each time: the next caller computes
        assert await once(session, name, compute, codec=JSON) == {"rows": 3}
        exc = await raises(ValueError, once(session, name, compute, codec=FailingCodec(decode=ValueError("bad bytes"))))
        assert any(repr(name) in note for note in exc.__notes__), "the note names the once() call"
        assert await once(session, name, compute, codec=JSON) == {"rows": 3}, "the stored result is intact"
        # a view keeps the last good value of a key whose new value does not decode, and says why
        await publish(client, ns + "cfg/a", 1, expected_revision=None)
        async with ConfigView(client, ns + "cfg/") as view:
            await client.txn([], [Put(f"{ns}cfg/a".encode(), b"\xff not json")])
            with anyio.fail_after(CALL_BOUND):
                await view.wait_for(lambda _: "a" in view.errors)
            assert view.get("a") == 1 and isinstance(view.errors["a"], ValueError)


async def test_backend_limits_are_the_same_on_both_backends(harness: Harness) -> None:
    """MemoryBackend refuses exactly what etcd refuses (with default settings): sizes, operation counts, int64."""
    ns = harness.namespace
    half = b"v" * (MAX_REQUEST_BYTES // 2 + 1)
    async with harness.client() as client:
        # too many operations (etcd's --max-txn-ops): refused whole
        await raises(BackendError, client.txn([], [Put(ns + b"%d" % i, b"") for i in range(129)]))
        await raises(BackendError, client.txn([Compare.version(ns + b"%d" % i, "==", 0) for i in range(129)], []))
        assert (await client.txn([], [Put(ns + b"%d" % i, b"") for i in range(128)])).succeeded
        # size: a write counts its compares too; a read may be larger (up to gRPC's limit)
        await raises(
            RequestTooLargeError, client.txn([Compare.value(ns + b"a", "==", half)] * 2, [Put(ns + b"w", b"")])
        )
        assert not (await client.txn([Compare.value(ns + b"a", "==", half)] * 2, [Range(ns + b"w")])).succeeded
        await raises(RequestTooLargeError, client.range(Range(ns + b"k" * (MAX_REQUEST_BYTES + 600 * 1024))))
        await raises(
            RequestTooLargeError,
            enter(lambda: client.watch(ns + b"k" * (MAX_REQUEST_BYTES + 600 * 1024), start_revision=0)),
        )
        # a watch from a revision beyond int64 is refused, not awaited forever
        with pytest.raises(ValueError, match="start_revision"):
            client.watch(ns, start_revision=MAX_INT64 + 1)
        await raises(ValueError, client.refresh(2**64))
        await raises(ValueError, client.revoke(-1))
        assert (await client.range(Range(ns, prefix=True, count_only=True))).count == 128
        await client.txn([], [Delete(ns, prefix=True)])
