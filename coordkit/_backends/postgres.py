"""PostgresBackend: etcd v3 semantics built on PostgreSQL (driver: asyncpg).

How each property etcd gives for free is built here:

- **One revision, commit order = revision order.** Every write transaction first locks the one row of the
  ``meta`` table (``SELECT ... FOR UPDATE``), evaluates its compares, applies its operations, appends its events to
  the ``log`` table and sets ``meta.revision`` to the next number, then commits. The row lock is held until the
  commit, so writers run one at a time and revision N+1 cannot commit before revision N: no sequence (whose values
  commit out of order and lose watch events). Read-only transactions read one snapshot, without the lock.
- **Leases** are rows of ``lease`` whose expiry is computed from the *server's* clock (``now() + ttl``). An
  expired lease is gone for `refresh` and for puts at once; a sweeper deletes it and its keys at one revision. Every
  open backend runs a sweeper loop, and the one holding a session advisory lock sweeps (any client may; when it
  dies its lock goes with its connection and another takes over within a second). It sleeps until the next expiry
  (at most 0.5 s), so the keys of an expired lease are deleted within milliseconds of the deadline.
- **Watch** reads the ``log`` table from any revision, a page at a time, in one snapshot with ``meta`` (so it sees
  every revision up to ``meta.revision`` and knows the compact revision). ``LISTEN/NOTIFY`` only wakes readers
  (and a reader polls every second anyway): a lost notification delays an event, never loses it. The log is
  durable, so a reader resumes after a dropped connection with no gap and no duplicate.
- **Compaction** (`PostgresBackend.compact`) moves the compact revision and trims the log; a watch from before it
  raises `CompactedError`.
- **Limits** are etcd's defaults, so code that runs on one backend runs on the others: 1.5 MiB per write request,
  2 MiB per read request, 128 operations per transaction branch (`BackendError` / `RequestTooLargeError`).

The schema (default ``coordkit``) is created on first use and versioned in its ``migrations`` table; several
applications can share one database with different schemas. TLS, passwords and every other connection option come
from the DSN (libpq URL or key/value string, as asyncpg reads it).

asyncpg rather than psycopg 3: its binary protocol and statement cache make a round trip cheaper (the per-call
latency target is against the same SQL sent by hand), it has LISTEN/NOTIFY callbacks on a connection, and the
library uses asyncio only where the backend needs it (PostgreSQL is not usable from trio with either driver).
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio
import anyio.lowlevel

from .._errors import (
    AuthenticationError,
    BackendError,
    CompactedError,
    CoordkitError,
    LeaseExpiredError,
    UnavailableError,
)
from .._keys import prefix_end
from .limits import MIN_LEASE_TTL, check_range_size, check_txn_limits, check_watch_size
from .types import (
    Compare,
    CompareTarget,
    Delete,
    DeleteResult,
    Event,
    EventType,
    KeyValue,
    Lease,
    Op,
    OpResult,
    Put,
    PutResult,
    Range,
    RangeResult,
    TxnResult,
    WatchBatch,
    check_lease_id,
    check_range,
    check_start_revision,
    check_ttl,
    check_txn,
    check_watch_key,
)

if TYPE_CHECKING:
    import asyncpg

    Connection = asyncpg.Connection[asyncpg.Record]
else:
    Connection = Any

#: The schema version this code writes (the ``migrations`` table records what a database has).
SCHEMA_VERSION = 1
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PUT, _DELETE = 0, 1
#: the leading bytes of a key that the ordered key index holds (the ``kv_key_order`` index's expression)
_KEY_ORDER_BYTES = 1000
#: events read per watch query (a revision is never split: a bigger one is read whole)
_WATCH_PAGE = 1000
#: a watch reads the log at least this often even when no notification came (a lost NOTIFY only delays)
_WATCH_POLL = 1.0
#: the sweeper's longest sleep: the longest a new lease's expiry can wait for it (the shortest TTL is 2 s)
_SWEEP_INTERVAL = 0.5
#: the server ends a transaction left idle this long (a client that died or was cut off while holding the
#: revision lock would otherwise stop every writer)
_IDLE_IN_TRANSACTION_MS = 5000
_CONTROL_IDLE_MS = 10000

# Each migration is a list of statements; {s} is the quoted schema. Never edit one that has shipped: add another.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE {s}.meta (
            id int PRIMARY KEY CHECK (id = 1),
            revision bigint NOT NULL,
            compact_revision bigint NOT NULL
        )""",
        "INSERT INTO {s}.meta (id, revision, compact_revision) VALUES (1, 1, 0)",
        # keys may be as long as a request (1.5 MiB) but a btree entry holds at most 2704 bytes: keys are unique
        # by their SHA-256 and ranges scan an index of their first bytes (cut keys keep their order)
        """CREATE TABLE {s}.kv (
            key bytea NOT NULL,
            value bytea NOT NULL,
            create_revision bigint NOT NULL,
            mod_revision bigint NOT NULL,
            version bigint NOT NULL,
            lease bigint NOT NULL
        )""",
        "CREATE UNIQUE INDEX kv_key ON {s}.kv (sha256(key))",
        "CREATE INDEX kv_key_order ON {s}.kv (substr(key, 1, 1000))",
        "CREATE INDEX kv_lease ON {s}.kv (lease) WHERE lease <> 0",
        """CREATE TABLE {s}.log (
            revision bigint NOT NULL,
            seq int NOT NULL,
            type smallint NOT NULL,
            key bytea NOT NULL,
            value bytea NOT NULL,
            create_revision bigint NOT NULL,
            version bigint NOT NULL,
            lease bigint NOT NULL,
            PRIMARY KEY (revision, seq)
        )""",
        """CREATE TABLE {s}.lease (
            id bigint PRIMARY KEY,
            ttl bigint NOT NULL,
            expires_at timestamptz NOT NULL
        )""",
        "CREATE INDEX lease_expiry ON {s}.lease (expires_at)",
    ),
)

_SORT_COLUMNS = {
    "key": "key",
    "create": "create_revision",
    "mod": "mod_revision",
    "version": "version",
    "value": "value",
}
_KV_COLUMNS = "key, value, create_revision, mod_revision, version, lease"


def _load_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("PostgresBackend needs asyncpg: pip install 'coordkit[postgres]'") from exc
    return asyncpg


def _bounds(key: bytes, prefix: bool, first: int, *, indexed: bool = True) -> tuple[str, list[bytes]]:
    """SQL condition on ``key`` for one key or a prefix; its parameters are numbered from ``first``.

    With ``indexed`` (the ``kv`` table) the condition also names the indexed expressions: the key's hash for one
    key, its first bytes for a range (a key in [a, b) has its first N bytes in [a[:N], b[:N]]).
    """
    n = _KEY_ORDER_BYTES
    if not prefix:
        if indexed:
            return _bounds_sql("key", first, indexed), [hashlib.sha256(key).digest(), key]
        return _bounds_sql("key", first, indexed), [key]
    end = prefix_end(key)
    if not key and not end:
        return "true", []
    if not end:
        return _bounds_sql("from", first, indexed), [key[:n], key] if indexed else [key]
    return _bounds_sql("between", first, indexed), [key[:n], end[:n], key, end] if indexed else [key, end]


@functools.cache
def _bounds_sql(shape: str, first: int, indexed: bool) -> str:
    n = _KEY_ORDER_BYTES
    if shape == "key":
        return f"sha256(key) = ${first} AND key = ${first + 1}" if indexed else f"key = ${first}"
    if shape == "from":
        return f"substr(key, 1, {n}) >= ${first} AND key >= ${first + 1}" if indexed else f"key >= ${first}"
    if indexed:
        return (
            f"substr(key, 1, {n}) >= ${first} AND substr(key, 1, {n}) <= ${first + 1} "
            f"AND key >= ${first + 2} AND key < ${first + 3}"
        )
    return f"key >= ${first} AND key < ${first + 1}"


#: one logged event: type, key, value, create revision, version, lease
_Event = tuple[int, bytes, bytes, int, int, int]


def _at(result: OpResult, revision: int) -> OpResult:
    """An op's result with the transaction's revision (known only once every op is applied)."""
    if isinstance(result, DeleteResult):
        return DeleteResult(result.deleted, revision)
    if isinstance(result, RangeResult):
        return RangeResult(result.kvs, result.count, result.more, revision)
    return result


def _range_sql(s: str, r: Range) -> tuple[str, list[Any]]:
    """One statement reading the revision, the count of keys in the range and the keys asked for, in one snapshot.

    Returns one row per key (the revision and count repeated), or one row of NULL keys when none matched.
    """
    where, bounds = _bounds(r.key, r.prefix, 1)
    args: list[Any] = list(bounds)
    if r.max_create_revision and not r.count_only:
        args.append(r.max_create_revision)
    if r.min_create_revision and not r.count_only:
        args.append(r.min_create_revision)
    if r.limit and not r.count_only:
        args.append(r.limit + 1)  # one more tells whether there are more
    shape = (
        s,
        where,
        len(bounds),
        r.count_only,
        bool(r.max_create_revision),
        bool(r.min_create_revision),
        r.sort_by,
        r.descending,
        bool(r.limit),
        r.keys_only,
    )
    return _range_sql_text(*shape), args


@functools.cache
def _range_sql_text(
    s: str,
    where: str,
    bound_args: int,
    count_only: bool,
    max_create: bool,
    min_create: bool,
    sort_by: str,
    descending: bool,
    limit: bool,
    keys_only: bool,
) -> str:
    if count_only:
        return f"SELECT m.revision, (SELECT count(*) FROM {s}.kv WHERE {where}) AS total FROM {s}.meta m"
    n = bound_args
    filters = []
    if max_create:
        n += 1
        filters.append(f"create_revision <= ${n}")
    if min_create:
        n += 1
        filters.append(f"create_revision >= ${n}")
    direction = "DESC" if descending else "ASC"
    column = _SORT_COLUMNS[sort_by]
    order = f"{column} {direction}" + (", key" if column != "key" else "")
    outer_order = f"f.{column} {direction}" + (", f.key" if column != "key" else "")
    limit_sql = f"LIMIT ${n + 1}" if limit else ""
    value = "''::bytea" if keys_only else "value"
    return (
        f"WITH r AS MATERIALIZED (SELECT {_KV_COLUMNS} FROM {s}.kv WHERE {where}) "
        f"SELECT m.revision, (SELECT count(*) FROM r) AS total, "
        f"f.key, f.value, f.create_revision, f.mod_revision, f.version, f.lease FROM {s}.meta m "
        f"LEFT JOIN LATERAL (SELECT key, {value} AS value, create_revision, mod_revision, version, lease FROM r "
        f"WHERE {' AND '.join(filters) or 'true'} ORDER BY {order} {limit_sql}) f ON true ORDER BY {outer_order}"
    )


def _range_result(r: Range, rows: Sequence[Any], revision: int | None = None) -> RangeResult:
    first = rows[0]
    total = int(first["total"])
    rev = int(first["revision"]) if revision is None else revision
    if r.count_only:
        return RangeResult((), total, False, rev)
    kvs = [
        KeyValue(row["key"], row["value"], row["create_revision"], row["mod_revision"], row["version"], row["lease"])
        for row in rows
        if row["key"] is not None
    ]
    more = bool(r.limit) and len(kvs) > r.limit
    if more:
        kvs = kvs[: r.limit]
    return RangeResult(tuple(kvs), total, more, rev)


def _holds(c: Compare, kv: KeyValue | None) -> bool:
    """etcd's compare: a missing key has revisions, version and lease 0, and fails every value compare."""
    actual: int | bytes
    if c.target is CompareTarget.VALUE:
        if kv is None:
            return False
        actual = kv.value
    elif kv is None:
        actual = 0
    elif c.target is CompareTarget.MOD:
        actual = kv.mod_revision
    elif c.target is CompareTarget.CREATE:
        actual = kv.create_revision
    elif c.target is CompareTarget.VERSION:
        actual = kv.version
    else:
        actual = kv.lease
    operand = c.operand
    if c.op == "==":
        return actual == operand
    if c.op == "!=":
        return actual != operand
    if c.op == "<":
        return actual < operand  # type: ignore[operator]  # same type: checked by Compare
    return actual > operand  # type: ignore[operator]


def _translate(exc: BaseException) -> CoordkitError | None:
    """The one mapping of asyncpg's and the network's errors to coordkit's (None: not a store error)."""
    asyncpg = _load_asyncpg()
    if isinstance(
        exc,
        (
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InsufficientPrivilegeError,
        ),
    ):
        return AuthenticationError(f"PostgreSQL refused: {exc}")
    if isinstance(exc, TimeoutError):  # a statement or a connection attempt over the request timeout
        return UnavailableError("PostgreSQL did not answer in time")
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError  # class 08
        | asyncpg.exceptions.OperatorInterventionError  # 57: shutdown, terminated, cancelled
        | asyncpg.exceptions.InsufficientResourcesError  # 53: too many connections, disk full
        | asyncpg.exceptions.InvalidTransactionStateError  # 25: e.g. ended for idling in a transaction
        | asyncpg.exceptions.TransactionRollbackError  # 40: serialization failure, deadlock
        | asyncpg.InterfaceError  # the connection is closed or in a bad state
        | asyncpg.exceptions.InternalClientError  # a connection whose server ended it while idle (asyncpg's state)
        | OSError,
    ):
        return UnavailableError(f"PostgreSQL unavailable: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return BackendError(f"PostgreSQL error: {exc}")
    return None


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Raise the coordkit error of a store error (the native one as its cause)."""
    try:
        yield
    except Exception as exc:
        mapped = _translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


_T = TypeVar("_T")


class _Progress:
    """How far a call got: ``began`` once its transaction's BEGIN was acknowledged."""

    __slots__ = ("began",)

    def __init__(self) -> None:
        self.began = False


@final
class _Pool:
    """A few connections, each used by one call at a time. A connection that saw any error or cancellation is
    closed, not reused (its state is unknown: a transaction may be open); the next call opens a new one."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]], size: int) -> None:
        self._connect = connect
        self._idle: list[Connection] = []
        self._slots = anyio.Semaphore(size)
        self.closed = False

    async def take(self) -> tuple[Connection, bool]:
        """A connection for one call (waiting, cancellably, while all are in use), and whether it was used before
        (then it may have died while idle: killed, or its server restarted). Give it back with `give`."""
        try:
            self._slots.acquire_nowait()  # no event-loop round trip when a connection is free
        except anyio.WouldBlock:
            await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn, True
            return await self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    def give(self, conn: Connection, exc: BaseException | None = None) -> None:
        """Give back a connection after its call ended, with the exception it raised, if any.

        A connection that saw cancellation or a store error is closed (its state is unknown: a transaction may be
        open); one whose call was refused by coordkit itself (a lease gone, a future compaction) is kept.
        """
        self._slots.release()
        if exc is None or isinstance(exc, CoordkitError | ValueError):
            self._put_back(conn)
        else:
            conn.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """`take` and `give` around a block."""
        conn, _ = await self.take()
        try:
            yield conn
        except BaseException as exc:
            self.give(conn, exc)
            raise
        self.give(conn)

    def _put_back(self, conn: Connection) -> None:
        if self.closed or conn.is_closed() or conn.is_in_transaction():
            conn.terminate()
        else:
            self._idle.append(conn)

    def drop_idle(self) -> None:
        """Close every idle connection (they may all have died with the one that failed)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.terminate()

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.terminate()


@final
class PostgresBackend:
    """A backend on PostgreSQL (≥ 12) with etcd v3's semantics: linearizable transactions at one global revision,
    leases expired by the server's clock, watches from any revision. Needs ``pip install 'coordkit[postgres]'``.

    ``async with PostgresBackend("postgresql://user:pw@db/app") as backend:`` opens it: while it is open it keeps one
    connection that receives change notifications (so watches wake at once) and may sweep expired leases. Calls
    also work on a backend that is not entered (watches then poll every second, and other clients sweep).

    Every call runs on asyncio (asyncpg) and holds one pooled connection; connecting and each statement are bounded
    by ``request_timeout``: a server that does not answer raises `UnavailableError` and the connection is dropped.
    A cancelled write either committed whole or not at all.

    Args:
        dsn: where and how to connect (libpq URL or ``key=value`` string: host, port, user, password, database,
            ``sslmode``, ``sslrootcert``, ...).
        schema: the schema holding coordkit's tables (lowercase letters, digits and ``_``); created on first use.
        pool_size: most connections used at once for calls (watches take one only while reading); lease
            keepalives have one more of their own, so they never wait behind other calls.
        request_timeout: seconds connecting or one statement may take before the call raises `UnavailableError` (a
            transaction sends up to about five statements; waiting for a free pooled connection is not bounded).

    Raises:
        ValueError: a schema name that is not a plain lowercase identifier, or a bad size or timeout.
    """

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "coordkit",
        pool_size: int = 8,
        request_timeout: float = 5.0,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"dsn is a string, not {type(dsn).__name__}")
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must be a lowercase SQL identifier ([a-z_][a-z0-9_]*), not {schema!r}")
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, not {pool_size!r}")
        if not isinstance(request_timeout, int | float) or not 0 < request_timeout < float("inf"):
            raise ValueError(f"request_timeout must be a positive number of seconds, not {request_timeout!r}")
        _load_asyncpg()
        self.dsn = dsn
        self.schema = schema
        self._s = f'"{schema}"'
        self._channel = f"coordkit_{schema}"
        self._request_timeout = float(request_timeout)
        self._pool = _Pool(self._connect, pool_size)
        # keepalives never queue behind other calls: a session's validity depends on their latency
        self._keepalive_pool = _Pool(self._connect, 1)
        self._migrated = False
        self._migrate_lock = anyio.Lock()
        self._changed = anyio.Event()
        self._stack: AsyncExitStack | None = None
        self._closed = False
        #: whether this client's sweeper holds the sweep lock now (for tests and statistics)
        self.sweeping = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> PostgresBackend:
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # runs first on exit: the control loop ends with the backend
            tg.start_soon(self._control_loop)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the control loop (sweeper, notification listener) and close every connection."""
        self._closed = True
        self._wake()
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self._pool.close()
        self._keepalive_pool.close()
        await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<PostgresBackend schema={self.schema!r}>"

    # -- connections -----------------------------------------------------------------------------------

    async def _open(self, *, idle_session_ms: int = 0) -> Connection:
        asyncpg = _load_asyncpg()
        settings = {
            "application_name": "coordkit",
            "idle_in_transaction_session_timeout": str(_IDLE_IN_TRANSACTION_MS),
        }
        if idle_session_ms:
            settings["idle_session_timeout"] = str(idle_session_ms)
        # every statement is bounded by command_timeout (asyncpg's own timer: cheaper than a cancel scope per call)
        conn: Connection = await asyncpg.connect(
            self.dsn,
            timeout=self._request_timeout,
            command_timeout=self._request_timeout,
            server_settings=settings,
        )
        return conn

    async def _connect(self) -> Connection:
        conn = await self._open()
        if not self._migrated:
            try:
                async with self._migrate_lock:
                    if not self._migrated:
                        await self._migrate(conn)
                        self._migrated = True
            except BaseException:
                conn.terminate()
                raise
        return conn

    async def _migrate(self, conn: Connection) -> None:
        """Create or upgrade the schema, once per database: concurrent clients wait on an advisory lock."""
        s = self._s
        try:
            done = await conn.fetchval(f"SELECT max(version) FROM {s}.migrations")
        except _load_asyncpg().UndefinedTableError:
            done = None
        if done is not None and done >= SCHEMA_VERSION:
            if done > SCHEMA_VERSION:
                raise BackendError(f"schema {self.schema} is at version {done}, newer than this coordkit's")
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"coordkit.migrate.{self.schema}")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.migrations "
                "(version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {s}.migrations")
            for version in range(done + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    await conn.execute(statement.format(s=s))
                await conn.execute(f"INSERT INTO {s}.migrations (version) VALUES ($1)", version)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection for one call, with errors mapped. Connecting and each statement are bounded by the
        request timeout; waiting for a free connection is local queueing, not the server's slowness: not bounded."""
        if self._closed:
            raise UnavailableError("backend is closed")
        with _mapped_errors():
            async with self._pool.connection() as conn:
                yield conn

    async def _run(
        self, body: Callable[[Connection, _Progress], Awaitable[_T]], *, idempotent: bool, pool: _Pool | None = None
    ) -> _T:
        """Run ``body`` on a pooled connection, with errors mapped (the hot path: no context managers).

        A connection that died while idle in the pool (killed, or its server restarted) fails the first statement
        sent on it: such a call is run once more on a new connection when that cannot apply it twice (an
        idempotent call, or a transaction that failed before its BEGIN was acknowledged). Timeouts are not retried.
        """
        if self._closed:
            raise UnavailableError("backend is closed")
        pool = self._pool if pool is None else pool
        for attempt in range(2):
            try:
                conn, reused = await pool.take()
            except Exception as exc:
                mapped = _translate(exc)
                if mapped is None:
                    raise
                raise mapped from exc
            progress = _Progress()
            try:
                result = await body(conn, progress)
            except Exception as exc:
                pool.give(conn, exc)
                mapped = _translate(exc)
                if mapped is None:
                    raise
                stale = reused and isinstance(mapped, UnavailableError) and not isinstance(exc, TimeoutError)
                if attempt == 0 and stale and (idempotent or not progress.began):
                    pool.drop_idle()  # its idle neighbours most likely died with it: retry on a new connection
                    continue
                raise mapped from exc
            except BaseException as exc:
                pool.give(conn, exc)
                raise
            pool.give(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch(self, sql: str, args: Sequence[Any], pool: _Pool | None = None) -> list[Any]:
        """One idempotent statement on a pooled connection."""

        async def fetch(conn: Connection, _: _Progress) -> list[Any]:
            rows: list[Any] = await conn.fetch(sql, *args)
            return rows

        return await self._run(fetch, idempotent=True, pool=pool)

    # -- reads -----------------------------------------------------------------------------------------

    async def range(self, request: Range) -> RangeResult:
        """Read one key or a prefix, as `Backend.range`: one statement reads the revision, count and keys."""
        check_range(request)
        check_range_size(request)
        sql, args = _range_sql(self._s, request)
        return _range_result(request, await self._fetch(sql, args))

    # -- the only write --------------------------------------------------------------------------------

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """As `Backend.txn`: compares and writes under the revision row's lock, so commit order is revision order."""
        check_txn(compare, success, failure)
        check_txn_limits(compare, success, failure)
        writes = any(not isinstance(op, Range) for op in (*success, *failure))

        async def run(conn: Connection, progress: _Progress) -> TxnResult:
            return await self._txn(conn, progress, writes, compare, success, failure)

        return await self._run(run, idempotent=not writes)

    async def _txn(
        self,
        conn: Connection,
        progress: _Progress,
        writes: bool,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op],
    ) -> TxnResult:
        if not writes:
            return await self._read_txn(conn, progress, compare, success, failure)
        async with conn.transaction():
            progress.began = True  # from here a failure may have applied the transaction: never retried
            # the serialization point: held until commit, so revisions commit in order
            current = await self._lock_revision(conn)
            succeeded = await self._compares(conn, compare)
            ops = success if succeeded else failure
            await self._check_leases(conn, ops)
            revision = current + 1
            events: list[_Event] = []
            results = [await self._apply(conn, op, revision, events) for op in ops]
            final = revision if events else current
            if events:
                await self._commit_events(conn, revision, events)
        return TxnResult(succeeded, tuple(_at(result, final) for result in results), final)

    async def _read_txn(
        self,
        conn: Connection,
        progress: _Progress,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op],
    ) -> TxnResult:
        """A transaction that only reads: one snapshot is linearizable, no lock needed."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            progress.began = True
            revision = await conn.fetchval(f"SELECT revision FROM {self._s}.meta")
            succeeded = await self._compares(conn, compare)
            responses: list[OpResult] = []
            for op in success if succeeded else failure:
                assert isinstance(op, Range)
                sql, args = _range_sql(self._s, op)
                responses.append(_range_result(op, await conn.fetch(sql, *args), revision))
        return TxnResult(succeeded, tuple(responses), revision)

    async def _apply(self, conn: Connection, op: Op, revision: int, events: list[_Event]) -> OpResult:
        """Apply one op of a writing transaction at ``revision``, appending its events (revisions filled later)."""
        if isinstance(op, Put):
            row = await conn.fetchrow(
                f"INSERT INTO {self._s}.kv AS k ({_KV_COLUMNS}) VALUES ($1, $2, $3, $3, 1, $4) "
                "ON CONFLICT ((sha256(key))) DO UPDATE SET value = EXCLUDED.value, "
                "mod_revision = EXCLUDED.mod_revision, version = k.version + 1, lease = EXCLUDED.lease "
                "RETURNING create_revision, version",
                op.key,
                op.value,
                revision,
                op.lease,
            )
            assert row is not None
            events.append((_PUT, op.key, op.value, row["create_revision"], row["version"], op.lease))
            return PutResult(revision)
        if isinstance(op, Delete):
            where, args = _bounds(op.key, op.prefix, 1)
            rows = await conn.fetch(f"DELETE FROM {self._s}.kv WHERE {where} RETURNING key", *args)
            deleted = sorted(row["key"] for row in rows)
            events.extend((_DELETE, key, b"", 0, 0, 0) for key in deleted)
            return DeleteResult(len(deleted), 0)
        sql, args = _range_sql(self._s, op)
        return _range_result(op, await conn.fetch(sql, *args), 0)

    async def _lock_revision(self, conn: Connection) -> int:
        revision: int = await conn.fetchval(f"SELECT revision FROM {self._s}.meta WHERE id = 1 FOR UPDATE")
        return revision

    async def _compares(self, conn: Connection, compare: Sequence[Compare]) -> bool:
        if not compare:
            return True
        keys = list({c.key for c in compare})
        rows = await conn.fetch(
            f"SELECT {_KV_COLUMNS} FROM {self._s}.kv WHERE sha256(key) = ANY($1::bytea[]) AND key = ANY($2::bytea[])",
            [hashlib.sha256(key).digest() for key in keys],
            keys,
        )
        kvs = {row["key"]: KeyValue(*row) for row in rows}
        return all(_holds(c, kvs.get(c.key)) for c in compare)

    async def _check_leases(self, conn: Connection, ops: Sequence[Op]) -> None:
        """Refuse the transaction if a put names a lease that is gone (the first such put's lease, as etcd)."""
        wanted = [op.lease for op in ops if isinstance(op, Put) and op.lease]
        if not wanted:
            return
        rows = await conn.fetch(
            f"SELECT id FROM {self._s}.lease WHERE id = ANY($1::bigint[]) AND expires_at > now()", list(set(wanted))
        )
        alive = {row["id"] for row in rows}
        for lease_id in wanted:
            if lease_id not in alive:
                raise LeaseExpiredError(lease_id)

    async def _commit_events(self, conn: Connection, revision: int, events: Sequence[_Event]) -> None:
        """Append one revision's events to the log and move the revision (notifying watchers at commit)."""
        types, keys, values, creates, versions, leases = (list(column) for column in zip(*events, strict=True))
        await conn.execute(
            f"WITH logged AS (INSERT INTO {self._s}.log "
            "(revision, seq, type, key, value, create_revision, version, lease) "
            "SELECT $1, u.ord - 1, u.type, u.key, u.value, u.create_revision, u.version, u.lease FROM "
            "unnest($3::smallint[], $4::bytea[], $5::bytea[], $6::bigint[], $7::bigint[], $8::bigint[]) "
            "WITH ORDINALITY AS u(type, key, value, create_revision, version, lease, ord)) "
            f"UPDATE {self._s}.meta SET revision = $1 WHERE id = 1 RETURNING pg_notify($2, $1::text)",
            revision,
            self._channel,
            types,
            keys,
            values,
            creates,
            versions,
            leases,
        )

    # -- leases ----------------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        """Grant a lease whose expiry the server's clock keeps (``now() + ttl``), as `Backend.grant`."""
        check_ttl(ttl)
        ttl = max(ttl, MIN_LEASE_TTL)
        async with self._connection() as conn:
            while True:
                lease_id = secrets.randbits(62) + 1
                granted = await conn.fetchval(
                    f"INSERT INTO {self._s}.lease (id, ttl, expires_at) "
                    "VALUES ($1, $2::bigint, now() + make_interval(secs => $2::float8)) "
                    "ON CONFLICT (id) DO NOTHING RETURNING id",
                    lease_id,
                    ttl,
                )
                if granted is not None:
                    return Lease(lease_id, ttl)

    async def refresh(self, lease_id: int) -> int:
        """Move the lease's expiry to the server's ``now() + ttl``; LeaseExpiredError if it is gone."""
        check_lease_id(lease_id)
        rows = await self._fetch(
            f"UPDATE {self._s}.lease SET expires_at = now() + make_interval(secs => ttl) "
            "WHERE id = $1 AND expires_at > now() RETURNING ttl",
            [lease_id],
            self._keepalive_pool,
        )
        if not rows:
            raise LeaseExpiredError(lease_id)
        return int(rows[0]["ttl"])

    async def revoke(self, lease_id: int) -> None:
        """Delete the lease and its keys at one revision (idempotent), as `Backend.revoke`."""
        check_lease_id(lease_id)
        async with self._connection() as conn, conn.transaction():
            current = await self._lock_revision(conn)
            await self._delete_lease(conn, lease_id, current)

    async def _delete_lease(self, conn: Connection, lease_id: int, current: int) -> int:
        """Delete a lease and its keys at one revision (under the revision lock); return the revision after."""
        gone = await conn.fetchval(f"DELETE FROM {self._s}.lease WHERE id = $1 RETURNING id", lease_id)
        if gone is None:
            return current
        rows = await conn.fetch(f"DELETE FROM {self._s}.kv WHERE lease = $1 RETURNING key", lease_id)
        if not rows:
            return current
        revision = current + 1
        keys = sorted(row["key"] for row in rows)  # etcd deletes a lease's keys in key order
        await self._commit_events(conn, revision, [(_DELETE, key, b"", 0, 0, 0) for key in keys])
        return revision

    # -- history ---------------------------------------------------------------------------------------

    async def compact(self, revision: int | None = None) -> int:
        """Forget history before ``revision`` (default: the current revision), as etcd's compaction does; return it.

        A watch that starts before it, or lags behind it, then raises `CompactedError`. As on the etcd builds the
        project tests against, the deletions at the compact revision itself go too.

        Raises:
            ValueError: ``revision`` is in the future.
            CompactedError: ``revision`` is at or before the current compact revision.
        """
        async with self._connection() as conn:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT revision, compact_revision FROM {self._s}.meta WHERE id = 1 FOR UPDATE"
                )
                assert row is not None
                current, compacted = row["revision"], row["compact_revision"]
                target = current if revision is None else revision
                if target > current:
                    raise ValueError(f"cannot compact to a future revision {target} (current {current})")
                if target <= compacted:
                    raise CompactedError(compacted)
                await conn.execute(f"UPDATE {self._s}.meta SET compact_revision = $1 WHERE id = 1", target)
            # readers check the compact revision first: the rows can go after the lock is released
            await conn.execute(
                f"DELETE FROM {self._s}.log WHERE revision < $1 OR (revision = $1 AND type = {_DELETE})", target
            )
        return target

    # -- watch -----------------------------------------------------------------------------------------

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        """Read the log from ``start_revision`` on, as `Backend.watch`; NOTIFY only wakes the reader."""
        check_watch_key(key, prefix)
        check_start_revision(start_revision)
        return self._watch(key, prefix, start_revision)

    @asynccontextmanager
    async def _watch(self, key: bytes, prefix: bool, start_revision: int) -> AsyncIterator[AsyncIterator[WatchBatch]]:
        check_watch_size(key, prefix, start_revision)
        async with self._connection() as conn:
            row = await conn.fetchrow(f"SELECT revision, compact_revision FROM {self._s}.meta")
        assert row is not None
        notice = not start_revision
        if notice:
            start_revision = row["revision"] + 1
        elif start_revision < row["compact_revision"]:
            raise CompactedError(row["compact_revision"])
        stream = self._stream(key, prefix, start_revision, notice)
        try:
            yield stream
        finally:
            await stream.aclose()

    async def _stream(
        self, key: bytes, prefix: bool, next_revision: int, notice: bool
    ) -> AsyncGenerator[WatchBatch, None]:
        if notice:
            yield WatchBatch(next_revision - 1, ())
        where, args = _bounds(key, prefix, 3, indexed=False)
        sql = (
            f"SELECT m.revision AS head, m.compact_revision, l.revision, l.seq, l.type, l.key, l.value, "
            f"l.create_revision, l.version, l.lease FROM {self._s}.meta m LEFT JOIN LATERAL ("
            f"SELECT * FROM {self._s}.log WHERE revision >= $1 AND {where} ORDER BY revision, seq LIMIT $2"
            ") l ON true ORDER BY l.revision, l.seq"
        )
        rest = (
            f"SELECT revision, seq, type, key, value, create_revision, version, lease FROM {self._s}.log "
            f"WHERE revision = $1 AND seq > $2 AND {where} ORDER BY seq"
        )
        while True:
            changed = self._changed  # taken before the read: a notification after it is not missed
            async with self._connection() as conn:
                rows = await conn.fetch(sql, next_revision, _WATCH_PAGE, *args)
                head, compacted = rows[0]["head"], rows[0]["compact_revision"]
                if next_revision < compacted:
                    raise CompactedError(compacted)
                rows = [row for row in rows if row["revision"] is not None]
                full = len(rows) == _WATCH_PAGE
                if full and rows[0]["revision"] == rows[-1]["revision"]:
                    # one revision larger than a page: read the rest of it (a revision is never split)
                    rows += await conn.fetch(rest, rows[-1]["revision"], rows[-1]["seq"], *args)
                elif full:
                    last = rows[-1]["revision"]
                    rows = [row for row in rows if row["revision"] != last]
            batches = _batches(rows)
            if batches:
                next_revision = batches[-1].revision + 1
            if not full:
                next_revision = max(next_revision, head + 1)  # the read saw every revision up to head
            for batch in batches:
                yield batch
            if not batches:
                with anyio.move_on_after(_WATCH_POLL):
                    await changed.wait()

    def _wake(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # -- the control connection: notifications and the lease sweeper -----------------------------------

    async def _control_loop(self) -> None:
        """Listen for changes and, while holding the sweep lock, expire leases; reconnect on any failure."""
        while True:
            conn = None
            try:
                with _mapped_errors():
                    with anyio.fail_after(self._request_timeout):
                        conn = await self._open(idle_session_ms=_CONTROL_IDLE_MS)
                        await conn.add_listener(self._channel, self._on_notify)
                    self._wake()  # notifications may have been missed while no connection listened
                    while True:
                        with anyio.fail_after(self._request_timeout):
                            delay = await self._sweep_round(conn)
                        await anyio.sleep(delay)
            except (BackendError, TimeoutError):
                pass
            finally:
                self.sweeping = False
                if conn is not None:
                    conn.terminate()
            await anyio.sleep(_SWEEP_INTERVAL)

    def _on_notify(self, *_: object) -> None:
        self._wake()

    async def _sweep_round(self, conn: Connection) -> float:
        """One round of the sweeper: take the lock if free, expire what is due; return seconds to sleep."""
        if not self._migrated:
            async with self._pool.connection():  # runs the migration
                pass
        if not self.sweeping:
            self.sweeping = bool(
                await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", f"coordkit.sweep.{self.schema}")
            )
            if not self.sweeping:
                return _SWEEP_INTERVAL
        due = await conn.fetchval(
            f"SELECT extract(epoch FROM min(expires_at) - clock_timestamp())::float8 FROM {self._s}.lease"
        )
        if due is not None and due <= 0:
            async with conn.transaction():
                current = await self._lock_revision(conn)
                expired = await conn.fetch(
                    f"SELECT id FROM {self._s}.lease WHERE expires_at <= now() ORDER BY expires_at LIMIT 100"
                )
                for row in expired:
                    current = await self._delete_lease(conn, row["id"], current)
            return 0.0 if len(expired) == 100 else 0.01
        return _SWEEP_INTERVAL if due is None else min(float(due), _SWEEP_INTERVAL)


def _batches(rows: Sequence[Any]) -> list[WatchBatch]:
    """Group log rows (in revision, seq order) into one batch per revision."""
    out: list[WatchBatch] = []
    events: list[Event] = []
    revision = None
    for row in rows:
        if row["revision"] != revision:
            if events:
                assert revision is not None
                out.append(WatchBatch(revision, tuple(events)))
            revision, events = row["revision"], []
        if row["type"] == _PUT:
            kv = KeyValue(
                row["key"], row["value"], row["create_revision"], row["revision"], row["version"], row["lease"]
            )
            events.append(Event(EventType.PUT, kv))
        else:
            events.append(Event(EventType.DELETE, KeyValue(row["key"], b"", 0, row["revision"], 0, 0)))
    if events:
        assert revision is not None
        out.append(WatchBatch(revision, tuple(events)))
    return out
