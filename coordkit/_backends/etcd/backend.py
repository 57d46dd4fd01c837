"""EtcdBackend: the backend protocol on a real etcd v3 cluster, over one of two transports.

The default transport is etcd's gRPC-JSON gateway: this module encodes coordkit's requests as the gateway's JSON
and decodes the replies; the transport (aiohttp, etcd3-py, failover, auth, TLS, error mapping) is in `gateway`.
``transport="grpc"`` speaks etcd's gRPC API through `grpc_transport` (grpc.aio, coordkit's own stubs), which
encodes, decodes and maps its errors itself. Both are imported only when a backend is built, so that
``import coordkit`` needs neither the ``etcd`` nor the ``grpc`` extra. Validation and the backend's guarantees
are written once, here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, final
from urllib.parse import urlsplit

from ..._errors import BackendError, LeaseExpiredError, UnavailableError
from ..._keys import prefix_end
from ..types import (
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
    from .gateway import GatewayClient, WatchStream
    from .grpc_transport import GrpcClient

JSON = dict[str, Any]

_COMPARE_RESULT = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_COMPARE_FIELD = {
    CompareTarget.CREATE: "create_revision",
    CompareTarget.MOD: "mod_revision",
    CompareTarget.VERSION: "version",
    CompareTarget.VALUE: "value",
    CompareTarget.LEASE: "lease",
}
_SORT_TARGET = {"key": "KEY", "create": "CREATE", "mod": "MOD", "version": "VERSION", "value": "VALUE"}
_DEFAULT_PORT = {"http": 2379, "https": 2379}


def _load_gateway() -> ModuleType:
    try:
        from . import gateway
    except ImportError as exc:
        raise ImportError(
            f"EtcdBackend needs etcd3-py and aiohttp ({exc}): pip install 'coordkit[etcd]'", name=exc.name
        ) from exc
    return gateway


def _load_grpc() -> ModuleType:
    try:
        from . import grpc_transport
    except ImportError as exc:
        raise ImportError(
            f"EtcdBackend(transport='grpc') needs grpcio and protobuf ({exc}): pip install 'coordkit[grpc]'",
            name=exc.name,
        ) from exc
    return grpc_transport


def _check_options(
    endpoints: tuple[str, ...],
    username: str | None,
    password: str | None,
    ssl_context: ssl.SSLContext | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    request_timeout: float,
) -> bool:
    """Refuse options that do not fit together; return whether the endpoints use TLS."""
    if (username is None) != (password is None):
        raise ValueError("give both username and password, or neither")
    if not isinstance(request_timeout, int | float) or isinstance(request_timeout, bool):
        raise TypeError(f"request_timeout is a number of seconds, not {type(request_timeout).__name__}")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be positive, not {request_timeout!r}")
    tls_files = ca_file is not None or cert_file is not None or key_file is not None
    if ssl_context is not None and tls_files:
        raise ValueError("give ssl_context or ca_file/cert_file/key_file, not both")
    if key_file is not None and cert_file is None:
        raise ValueError("key_file needs cert_file")
    uses_tls = any(url.startswith("https:") for url in endpoints)
    if (ssl_context is not None or tls_files) and not uses_tls:
        raise ValueError("TLS options were given but no endpoint is https://")
    return uses_tls


def _check_watch_idle_timeout(watch_idle_timeout: float | None) -> None:
    if watch_idle_timeout is not None:
        if not isinstance(watch_idle_timeout, int | float) or isinstance(watch_idle_timeout, bool):
            raise TypeError(f"watch_idle_timeout is a number of seconds, not {type(watch_idle_timeout).__name__}")
        if not 0 < watch_idle_timeout < math.inf:
            raise ValueError(f"watch_idle_timeout must be positive and finite, not {watch_idle_timeout!r}")


def _parse_endpoint(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"an etcd endpoint is a URL string, not {type(url).__name__}")
    if "@" in url:  # user info may hold a password: refuse it without echoing any of it
        raise ValueError(
            f"etcd endpoint '...@{url.rpartition('@')[2]}' must not contain user info: pass username= and password="
        )
    if not url.strip().isprintable() or any(ch.isspace() for ch in url.strip()):  # urlsplit drops tabs silently
        raise ValueError(f"etcd endpoint {url!r} has spaces or unprintable characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad etcd endpoint {url!r}: {exc}") from None
    if parts.scheme not in _DEFAULT_PORT:
        raise ValueError(f"etcd endpoint {url!r} must start with http:// or https://")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError(f"etcd endpoint {url!r} needs a host (and no user info)")
    if port == 0:
        raise ValueError(f"etcd endpoint {url!r}: port 0 cannot be connected to")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {url!r} must not have a path, query or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or _DEFAULT_PORT[parts.scheme]}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return binascii.a2b_base64(text) if text else b""


def _bounds(key: bytes, prefix: bool) -> JSON:
    """The gateway's ``key`` / ``range_end`` for one key or a prefix.

    The empty prefix starts at ``\\x00`` (etcd refuses an empty key; no key is empty), and a prefix with no
    upper bound (empty or all 0xff) ends at ``\\x00``, etcd's "to the end of the keyspace".
    """
    if not prefix:
        return {"key": _b64(key)}
    end = prefix_end(key)
    return {"key": _b64(key or b"\x00"), "range_end": _b64(end or b"\x00")}


def _range_request(r: Range) -> JSON:
    body = _bounds(r.key, r.prefix)
    if r.limit:
        body["limit"] = str(r.limit)
    # etcd sorts only when sort_order is not NONE; its unsorted order is by key, ascending
    if r.sort_by != "key" or r.descending:
        body["sort_target"] = _SORT_TARGET[r.sort_by]
        body["sort_order"] = "DESCEND" if r.descending else "ASCEND"
    if r.max_create_revision:
        body["max_create_revision"] = str(r.max_create_revision)
    if r.min_create_revision:
        body["min_create_revision"] = str(r.min_create_revision)
    if r.keys_only:
        body["keys_only"] = True
    if r.count_only:
        body["count_only"] = True
    return body


def _compare(c: Compare) -> JSON:
    operand = _b64(c.operand) if isinstance(c.operand, bytes) else str(c.operand)
    return {
        "key": _b64(c.key),
        "target": c.target.value,
        "result": _COMPARE_RESULT[c.op],
        _COMPARE_FIELD[c.target]: operand,
    }


def _request_op(op: Op) -> JSON:
    if isinstance(op, Put):
        put: JSON = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": _bounds(op.key, op.prefix)}
    return {"request_range": _range_request(op)}


# The gateway omits fields with default values: a missing number is 0, a missing bool false, a missing list empty.


def _revision(reply: JSON) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _key_value(kv: JSON) -> KeyValue:
    return KeyValue(
        key=_unb64(kv.get("key", "")),
        value=_unb64(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
        version=int(kv.get("version", 0)),
        lease=int(kv.get("lease", 0)),
    )


def _range_result(reply: JSON, revision: int) -> RangeResult:
    return RangeResult(
        kvs=tuple(_key_value(kv) for kv in reply.get("kvs", ())),
        count=int(reply.get("count", 0)),
        more=bool(reply.get("more", False)),
        revision=revision,
    )


def _op_result(op: Op, response: JSON, revision: int) -> OpResult:
    # each response is {"response_range" | "response_put" | "response_delete_range": {...}}, in request order
    inner: JSON = next(iter(response.values()), {}) if response else {}
    if isinstance(op, Range):
        return _range_result(inner, revision)
    if isinstance(op, Put):
        return PutResult(revision)
    return DeleteResult(int(inner.get("deleted", 0)), revision)


def _batches(events: Sequence[JSON]) -> Iterator[WatchBatch]:
    """Split one watch message into one batch per revision (a message can carry several), in order."""
    batch: list[Event] = []
    revision = 0
    for raw in events:
        kv = _key_value(raw.get("kv", {}))
        if batch and kv.mod_revision != revision:
            yield WatchBatch(revision, tuple(batch))
            batch = []
        revision = kv.mod_revision
        batch.append(Event(EventType.DELETE if raw.get("type") == "DELETE" else EventType.PUT, kv))
    if batch:
        yield WatchBatch(revision, tuple(batch))


@final
class EtcdBackend:
    """The backend protocol on etcd v3 (>= 3.4), through its gRPC-JSON gateway or its gRPC API. asyncio only.

    ``async with EtcdBackend("http://127.0.0.1:2379") as backend: ...``. Building one does no I/O, so it works
    while etcd is down; the first call connects.

    Guarantees: reads, lease refreshes and revokes are retried on the next endpoint (round robin, jittered
    backoff through `_retry`, at most one pass over the endpoints plus one attempt) when an
    endpoint does not answer; grants too (a lease granted by a lost reply expires unused). A transaction is
    retried only when it surely was not sent (the connection was refused): after an ambiguous failure it raises
    UnavailableError and the caller decides. Expired auth tokens are renewed transparently, once per expiry.
    Every call is a cancellation point (anyio cancel scopes work; asyncio only).

    With ``transport="grpc"`` (extra ``coordkit[grpc]``) the same guarantees hold over etcd's gRPC API, shaped
    like etcd's Go client: one HTTP/2 connection per endpoint in use, one keepalive stream for every lease, one
    watch stream for every watch, HTTP/2 pings that detect a dead or blackholed member within ~11 s (then its
    streams move to the next endpoint), and streams that a member without a leader fails.

    Args:
        endpoints: one URL or several (``http://host:port`` / ``https://host:port``), tried in order.
        username: etcd user name (give the password too, or neither).
        password: that user's password; the token is renewed by logging in again when etcd rejects it.
        ssl_context: a client SSLContext for https endpoints, instead of the three files below.
        ca_file: the CA that signed the server certificate (CA-only TLS).
        cert_file: a client certificate, for mutual TLS (with key_file).
        key_file: the client certificate's private key.
        request_timeout: transport bound of one request attempt, in seconds (callers bound whole operations
            with ``anyio.fail_after``).
        watch_idle_timeout: seconds a watch stream may stay silent before it counts as broken and is opened
            again (on the next endpoint if its own does not answer), resuming where it was: what detects a
            stream whose connection died without closing (a partition, a blackhole, a NAT that dropped it).
            Watches ask etcd for progress notifications, which etcd sends on idle streams every
            ``--experimental-watch-progress-notify-interval`` (10 minutes by default): keep this above that
            interval (the default, 15 minutes, suits etcd's default; lower both to detect sooner). None: never.
            On the gRPC transport HTTP/2 pings detect a dead connection anyway; a silent watch stream is asked
            for progress after this long, and broken when it does not answer within ``request_timeout``.
        transport: ``"gateway"`` (the JSON gateway, extra ``coordkit[etcd]``) or ``"grpc"`` (etcd's gRPC API,
            extra ``coordkit[grpc]``; TLS from ``ca_file``/``cert_file``/``key_file``, not ``ssl_context``).

    Raises:
        ValueError: a bad endpoint URL or scheme (a URL without a port means etcd's 2379), inconsistent
            credentials or TLS options, unreadable TLS files, an unknown transport, an ``ssl_context`` with
            ``transport="grpc"``.
        TypeError: endpoints that are not URL strings, a request_timeout or watch_idle_timeout that is not a
            number.
        ImportError: the transport's extra is not installed (``pip install 'coordkit[etcd]'`` or
            ``'coordkit[grpc]'``).
    """

    name = "etcd"

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        request_timeout: float = 5.0,
        watch_idle_timeout: float | None = 900.0,
        transport: Literal["gateway", "grpc"] = "gateway",
    ) -> None:
        if transport not in ("gateway", "grpc"):
            raise ValueError(f"transport is 'gateway' or 'grpc', not {transport!r}")
        if isinstance(endpoints, bytes | bytearray) or not isinstance(endpoints, str | Sequence):
            raise TypeError(f"endpoints are a URL string or a sequence of them, not {type(endpoints).__name__}")
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not urls:
            raise ValueError("EtcdBackend needs at least one endpoint")
        self.endpoints = tuple(_parse_endpoint(url) for url in urls)
        uses_tls = _check_options(
            self.endpoints, username, password, ssl_context, ca_file, cert_file, key_file, request_timeout
        )
        _check_watch_idle_timeout(watch_idle_timeout)
        self.transport = transport
        self._grpc: GrpcClient | None = None
        timeouts = {
            "request_timeout": float(request_timeout),
            "watch_idle_timeout": None if watch_idle_timeout is None else float(watch_idle_timeout),
        }
        if transport == "grpc":
            if ssl_context is not None:
                raise ValueError("transport='grpc' takes TLS from ca_file/cert_file/key_file, not an ssl_context")
            grpc_transport = _load_grpc()
            credentials = (
                grpc_transport.channel_credentials(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
                if uses_tls
                else None
            )
            self._grpc = grpc_transport.GrpcClient(
                self.endpoints, credentials=credentials, username=username, password=password, **timeouts
            )
            return
        adapter = _load_gateway()
        if uses_tls and ssl_context is None:
            ssl_context = adapter.build_ssl_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._client: GatewayClient = adapter.GatewayClient(
            self.endpoints, ssl_context=ssl_context, username=username, password=password, **timeouts
        )

    def __repr__(self) -> str:
        via = " (grpc)" if self._grpc is not None else ""
        return f"<EtcdBackend {', '.join(self.endpoints)}{via}>"

    async def __aenter__(self) -> EtcdBackend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; open watches end with UnavailableError. Idempotent."""
        await (self._grpc or self._client).close()

    def _check_open(self) -> None:
        if (self._grpc or self._client).closed:
            raise UnavailableError("backend is closed")

    # -- KV ------------------------------------------------------------------------------------------------

    async def range(self, request: Range) -> RangeResult:
        """Read one key or a prefix (linearizable). Retried on the next endpoint when one does not answer.

        Raises:
            UnavailableError: no endpoint answered. AuthenticationError: credentials or permissions refused.
        """
        check_range(request)
        self._check_open()
        if self._grpc is not None:
            return await self._grpc.range(request)
        reply = await self._client.call("/kv/range", _range_request(request), idempotent=True)
        return _range_result(reply, _revision(reply))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically at one revision.

        Never repeated after an ambiguous failure (it may have been applied): then UnavailableError.

        Raises:
            UnavailableError: no answer (the transaction may or may not have been applied).
            LeaseExpiredError: a Put names a lease that does not exist (any more).
            RequestTooLargeError: the request exceeds the server's limit.
            AuthenticationError: the credentials or permissions were refused.
            BackendError: etcd refused it for another reason.
        """
        check_txn(compare, success, failure)
        self._check_open()
        leases = [op.lease for op in (*success, *failure) if isinstance(op, Put) and op.lease]
        try:
            if self._grpc is not None:
                return await self._grpc.txn(compare, success, failure, lease_id=leases[0] if leases else 0)
            body: JSON = {"compare": [_compare(c) for c in compare]}
            if success:
                body["success"] = [_request_op(op) for op in success]
            if failure:
                body["failure"] = [_request_op(op) for op in failure]
            reply = await self._client.call("/kv/txn", body, idempotent=False, lease_id=leases[0] if leases else 0)
        except LeaseExpiredError as exc:
            if len(set(leases)) < 2:
                raise
            # etcd does not say which lease is missing: find it, so that lease_id names the right one
            raise LeaseExpiredError(await self._missing_lease(compare, success, failure, exc.lease_id)) from exc
        succeeded = bool(reply.get("succeeded", False))
        revision = _revision(reply)
        ops = success if succeeded else failure
        responses = reply.get("responses", ())
        if len(responses) != len(ops):
            raise BackendError(f"etcd answered {len(responses)} results for {len(ops)} operations")
        return TxnResult(
            succeeded, tuple(_op_result(op, resp, revision) for op, resp in zip(ops, responses, strict=True)), revision
        )

    async def _missing_lease(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op], guess: int
    ) -> int:
        """The lease etcd refused a transaction for: the first one of the branch that ran that does not exist.

        Only called on that error, with several leases named: a compare-only transaction tells the branch (when
        both name leases) and TimeToLive which lease is gone. ``guess`` when those calls fail or find none.
        """

        def named(ops: Sequence[Op]) -> list[int]:
            return list(dict.fromkeys(op.lease for op in ops if isinstance(op, Put) and op.lease))

        try:
            branch = named(success) or named(failure)
            if named(success) and named(failure):
                branch = named(success) if (await self.txn(compare, [])).succeeded else named(failure)
            for lease_id in branch:
                if await self._time_to_live(lease_id) < 0:  # etcd's answer for a lease it does not know
                    return lease_id
        except BackendError:
            pass
        return guess

    async def _time_to_live(self, lease_id: int) -> int:
        if self._grpc is not None:
            return await self._grpc.time_to_live(lease_id)
        reply = await self._client.call("/lease/timetolive", {"ID": str(lease_id)}, idempotent=True)
        return int(reply.get("TTL", -1))

    # -- leases --------------------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        """Grant a lease of at least ``ttl`` seconds (etcd raises short TTLs to its minimum).

        Raises:
            UnavailableError: no endpoint answered.
        """
        check_ttl(ttl)
        self._check_open()
        if self._grpc is not None:
            return await self._grpc.grant(ttl)
        # Safe to repeat: a lease granted by a lost reply has no keys and expires unused after its TTL.
        reply = await self._client.call("/lease/grant", {"TTL": str(ttl)}, idempotent=True)
        if reply.get("error"):
            raise BackendError(f"etcd refused the lease: {reply['error']}")
        return Lease(int(reply.get("ID", 0)), int(reply.get("TTL", 0)))

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive once; return its TTL in seconds.

        Raises:
            LeaseExpiredError: the lease is gone (expired or revoked).
            UnavailableError: no endpoint answered.
            TypeError, ValueError: (before anything is sent) not an int64 lease id.
        """
        check_lease_id(lease_id)
        self._check_open()
        if self._grpc is not None:
            ttl = await self._grpc.refresh(lease_id)
            if ttl <= 0:  # etcd answers a keepalive of an unknown lease with TTL 0, not an error
                raise LeaseExpiredError(lease_id)
            return ttl
        reply = await self._client.call("/lease/keepalive", {"ID": str(lease_id)}, idempotent=True, lease_id=lease_id)
        ttl = int(reply.get("TTL", 0))
        if ttl <= 0:  # etcd answers a keepalive of an unknown lease with TTL 0 (omitted), not an error
            raise LeaseExpiredError(lease_id)
        return ttl

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys at one revision. An unknown lease is not an error.

        Raises:
            UnavailableError: no endpoint answered.
            TypeError, ValueError: (before anything is sent) not an int64 lease id.
        """
        check_lease_id(lease_id)
        self._check_open()
        with contextlib.suppress(LeaseExpiredError):  # already gone: revoking is idempotent
            if self._grpc is not None:
                await self._grpc.revoke(lease_id)
                return
            await self._client.call("/lease/revoke", {"ID": str(lease_id)}, idempotent=True, lease_id=lease_id)

    # -- watch ---------------------------------------------------------------------------------------------

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        """Watch a key or prefix from ``start_revision`` on: one `WatchBatch` per revision, in order.

        Entering opens the stream (failing over between endpoints) and waits for etcd to accept it; leaving
        closes the HTTP response. The iterator never ends by itself.

        Raises:
            CompactedError: ``start_revision`` was compacted (raised while iterating).
            UnavailableError: the stream could not be opened, or broke (the server restarted, the network failed).
        """
        check_watch_key(key, prefix)
        check_start_revision(start_revision)
        return self._watch(key, prefix, start_revision)

    @asynccontextmanager
    async def _watch(self, key: bytes, prefix: bool, start_revision: int) -> AsyncIterator[AsyncIterator[WatchBatch]]:
        self._check_open()
        if self._grpc is not None:
            grpc_transport = _load_grpc()
            async with self._grpc.open_watch(grpc_transport.watch_create_request(key, prefix, start_revision)) as w:
                batches = grpc_transport.watch_batches_of(w, notice=not start_revision)
                try:
                    yield batches
                finally:
                    await batches.aclose()
            return
        create: dict[str, object] = {**_bounds(key, prefix), "progress_notify": True}  # liveness on idle streams
        if start_revision:
            create["start_revision"] = str(start_revision)
        async with self._client.open_watch({"create_request": create}) as stream:
            batches = self._batches(stream, notice=not start_revision)
            try:
                yield batches
            finally:
                await batches.aclose()

    @staticmethod
    async def _batches(stream: WatchStream, *, notice: bool) -> AsyncGenerator[WatchBatch, None]:
        if notice:  # a watch "from now": say from which revision on it sees changes
            yield WatchBatch(stream.created_revision, ())
        while True:
            result = await stream.receive()
            for batch in _batches(result["events"]):
                yield batch
