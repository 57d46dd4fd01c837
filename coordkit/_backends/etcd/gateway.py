"""The gateway transport: every etcd3-py and aiohttp workaround of the etcd backend lives in this module.

etcd3-py 0.1.6 (the named dependency) is unmaintained and partly broken with current aiohttp. We subclass its
``AioClient`` (never patching library globals) and keep what works: its authentication call and its error
classes. What we replace, and why:

- construction: ``AioClient.__init__`` probes the server version with a blocking ``requests.get`` (and crashes
  when etcd is down) and builds an aiohttp session outside any event loop. `GatewayClient` skips both:
  no network at construction, a fixed server version (``/v3`` API prefix), sessions created lazily in the loop;
- TLS: etcd3-py ignores a CA without a client certificate; we use an ``ssl.SSLContext`` built by
  `build_ssl_context` (CA-only TLS and mTLS);
- streams: etcd3-py's reader drops events when several responses arrive in one read and fails with TypeError on
  aiohttp >= 3.10.6. `WatchStream` reads etcd's newline-delimited JSON itself, on a second connection
  pool, so long-lived watches never starve unary calls;
- prefixes: etcd3-py crashes on empty and 0xff prefixes (the backend computes range ends itself);
- large bodies: aiohttp warns (ResourceWarning) about raw bodies over 1 MiB; those are sent from a BytesIO;
- speed: etcd3-py's swagger (de)serialisation costs ~7x the request itself (range p50 5.1 ms vs 0.75 ms on a
  local etcd 3.5.1), so range, txn, lease grant/keepalive/revoke and watch send the same gateway JSON on the
  client's aiohttp session and decode it themselves (`call`). Only ``authenticate`` takes
  etcd3-py's own request path (rare, and not latency-critical).

Native errors (aiohttp, timeouts, etcd3-py classes, gateway error bodies) become coordkit errors in one function,
`translate`, always chained with ``raise ... from native``.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, final

import aiohttp
import anyio
import etcd3
import etcd3.errors as etcd_errors
from etcd3.baseclient import BaseClient, sem
from etcd3.errors.go_grpc_codes import codeText

from ..._errors import (
    AuthenticationError,
    BackendError,
    CompactedError,
    LeaseExpiredError,
    RequestTooLargeError,
    UnavailableError,
)
from ..._retry import retry_call

JSON = dict[str, Any]

#: The gateway API we speak (etcd >= 3.4 serves it under /v3); pinned so construction never asks the server.
SERVER_VERSION = "3.5.0"

_GRPC_CODES = {name: code for code, name in codeText.items()}
_CANCEL_REASON = re.compile(r"code = (\w+) desc = (.*)", re.DOTALL)
_HEADERS = {"Content-Type": "application/json"}
#: aiohttp warns (ResourceWarning) when a raw bytes body exceeds 1 MiB; larger bodies go out from a BytesIO.
_LARGE_BODY = 2**20

_AUTH_ERRORS = (
    etcd_errors.ErrAuthFailed,
    etcd_errors.ErrAuthNotEnabled,
    etcd_errors.ErrInvalidAuthToken,
    etcd_errors.ErrPermissionDenied,
    etcd_errors.ErrUserEmpty,
    etcd_errors.ErrUserNotFound,
    etcd_errors.ErrRoleNotGranted,
    etcd_errors.ErrPermissionNotGranted,
)


class MalformedReplyError(ValueError):
    """The gateway answered something that is not an etcd reply (wrong server, proxy page, ...)."""


#: Everything a request can raise that is not coordkit's own (nor cancellation, which always propagates).
_NATIVE_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    etcd_errors.Etcd3Exception,
    OSError,  # includes ssl.SSLError and connection errors
    TimeoutError,  # our anyio.fail_after, aiohttp's timeouts
    EOFError,  # a stream the server ended
    json.JSONDecodeError,
    UnicodeDecodeError,
    MalformedReplyError,
)


def translate(exc: BaseException, *, endpoint: str = "", lease_id: int = 0) -> BackendError:
    """Map a native error to coordkit's tree. The only place where that mapping is decided.

    Callers raise the result ``from exc``. ``lease_id`` names the lease a "lease not found" is about.
    """
    where = f" ({endpoint})" if endpoint else ""
    if isinstance(exc, etcd_errors.Etcd3Exception):
        code = getattr(exc, "code", None)
        message = str(getattr(exc, "error", None) or exc)
        if isinstance(exc, etcd_errors.ErrCompacted):
            return CompactedError(0, message)
        if isinstance(exc, etcd_errors.ErrLeaseNotFound):
            return LeaseExpiredError(lease_id)
        if isinstance(exc, etcd_errors.ErrRequestTooLarge) or (code == 8 and "larger than max" in message):
            return RequestTooLargeError(message)
        if isinstance(exc, _AUTH_ERRORS) or code in (7, 16):  # PermissionDenied, Unauthenticated
            return AuthenticationError(message)
        if code in (4, 14) or isinstance(exc, etcd_errors.ErrTooManyRequests):  # DeadlineExceeded, Unavailable
            return UnavailableError(f"{message}{where}")
        return BackendError(f"{message} (gRPC code {code}){where}")
    if isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError):
        # a certificate problem is configuration, not an outage: do not retry it away
        return BackendError(f"TLS handshake with etcd failed{where}: {exc}")
    if isinstance(exc, TimeoutError):
        return UnavailableError(f"etcd did not answer in time{where}")
    if isinstance(exc, aiohttp.ClientError | OSError | EOFError):
        return UnavailableError(f"etcd unreachable{where}: {str(exc) or repr(exc)}")
    return BackendError(f"malformed reply from etcd{where}: {exc}")


def _body(payload: bytes) -> bytes | io.BytesIO:
    return io.BytesIO(payload) if len(payload) > _LARGE_BODY else payload  # a fresh BytesIO for every attempt


def _etcd_error(message: object, code: object, status: object) -> Exception:
    """An etcd3-py error instance for a gateway error (its classes are keyed by etcd's message)."""
    grpc_code = code if isinstance(code, int) and code in codeText else 2
    http_status = status if isinstance(status, int) else None
    error: Exception = etcd_errors.get_client_error(str(message or "unknown error"), grpc_code, http_status)
    return error


def _decode_reply(status: int, body: bytes) -> JSON:
    """Decode a gateway reply, raising the etcd3-py error of an error reply.

    Unary errors look like ``{"error": "...", "code": 5, "message": "..."}``; streamed replies (keepalive) wrap
    the result as ``{"result": {...}}`` and errors as ``{"error": {"grpc_code": 14, "message": "..."}}``.
    """
    try:
        data = json.loads(body)
    except ValueError:
        if status == 200:
            raise
        raise _etcd_error(body.decode(errors="replace").strip() or f"HTTP {status}", 2, status) from None
    if not isinstance(data, dict):
        raise MalformedReplyError(f"expected a JSON object, got {body[:200]!r}")
    error = data.get("error")
    if isinstance(error, dict):
        raise _etcd_error(error.get("message"), error.get("grpc_code"), error.get("http_code", status))
    if status != 200:
        raise _etcd_error(data.get("message") or error, data.get("code"), status)
    result = data.get("result")
    return result if isinstance(result, dict) else data


def build_ssl_context(*, ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client SSLContext verifying the server against ``ca_file`` (system CAs when None), with an optional
    client certificate (mTLS).

    Raises:
        ValueError: a file cannot be read or is not a certificate/key.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file is not None:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS files: {exc}") from exc
    return ctx


class _JsonLines:
    """Reads etcd's gateway stream: one JSON object per line, any number of them per network read."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._partial = bytearray()
        self._lines: deque[bytes] = deque()

    async def next(self) -> JSON:
        while not self._lines:
            try:
                chunk = await self._resp.content.readany()
            except RuntimeError as exc:  # aiohttp's answer to reading once the connection is closed
                raise EOFError("the stream's connection is closed") from exc
            if not chunk:
                raise EOFError("etcd ended the stream")
            if b"\n" not in chunk:
                self._partial += chunk  # a large message arrives in pieces: only split complete lines
                continue
            self._partial += chunk
            *lines, rest = self._partial.split(b"\n")
            self._partial = bytearray(rest)
            self._lines.extend(bytes(line) for line in lines if line.strip())
        data = json.loads(self._lines.popleft())
        if not isinstance(data, dict):
            raise MalformedReplyError(f"expected a JSON object in the stream, got {data!r}")
        return data


def _cancel_error(result: JSON) -> Exception:
    """The etcd3-py error for a watch cancelled by the server."""
    if int(result.get("compact_revision", 0)):
        return _etcd_error("etcdserver: mvcc: required revision has been compacted", 11, 200)
    reason = str(result.get("cancel_reason") or "watch canceled by etcd")
    # e.g. "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    match = _CANCEL_REASON.search(reason)
    if match is None:
        return _etcd_error(reason, 1, 200)
    return _etcd_error(match.group(2), _GRPC_CODES.get(match.group(1), 2), 200)


@final
class WatchStream:
    """One open watch: the gateway's response stream, read line by line."""

    def __init__(self, resp: aiohttp.ClientResponse, endpoint: str, idle_timeout: float | None) -> None:
        self._resp = resp
        self._lines = _JsonLines(resp)
        self._idle_timeout = math.inf if idle_timeout is None else idle_timeout
        self._pending: deque[JSON] = deque()
        self.endpoint = endpoint
        #: the store revision when etcd registered the watch (from its "created" message)
        self.created_revision = 0

    async def _next_result(self) -> JSON:
        with anyio.move_on_after(self._idle_timeout) as idle:  # a read cancelled while waiting loses nothing
            data = await self._lines.next()
        if idle.cancelled_caught:
            raise TimeoutError(f"the watch stream was silent for {self._idle_timeout:g} s")
        error = data.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            code = error.get("grpc_code") if isinstance(error, dict) else data.get("code")
            raise _etcd_error(message, code, 200)
        result = data.get("result")
        if not isinstance(result, dict):
            raise MalformedReplyError(f"watch message without result: {data!r}")
        return result

    async def receive(self) -> JSON:
        """The next watch response that carries events (``created`` and progress messages are skipped).

        Raises:
            CompactedError: the start revision was compacted (``compact_revision`` is set).
            UnavailableError: the stream ended or broke.
            AuthenticationError, BackendError: etcd cancelled the watch for another reason.
        """
        try:
            while True:
                result = self._pending.popleft() if self._pending else await self._next_result()
                if result.get("canceled"):
                    native = _cancel_error(result)
                    compact_revision = int(result.get("compact_revision", 0))
                    if compact_revision:
                        raise CompactedError(compact_revision) from native
                    raise translate(native, endpoint=self.endpoint) from native
                if result.get("events"):
                    return result
        except _NATIVE_ERRORS as exc:
            raise translate(exc, endpoint=self.endpoint) from exc

    def close(self) -> None:
        """Close the HTTP response (and its connection: a half-read stream cannot be reused)."""
        self._resp.close()


class GatewayClient(etcd3.AioClient):  # type: ignore[misc]  # etcd3-py has no type hints
    """etcd's gRPC-JSON gateway over aiohttp, with failover between endpoints and token refresh.

    Construction does no I/O. Sessions are created in the running asyncio loop on first use: one pool for unary
    calls (shared with etcd3-py's own calls, e.g. ``authenticate``), one for long-lived watch streams.

    Args:
        endpoints: base URLs (``scheme://host:port``), already validated.
        ssl_context: used for https endpoints (None: aiohttp's default verification).
        username, password: credentials for etcd's auth (both or neither).
        request_timeout: bound of one unary attempt, and of establishing one watch, in seconds.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None,
        username: str | None,
        password: str | None,
        request_timeout: float,
        watch_idle_timeout: float | None,
    ) -> None:
        self._endpoints = tuple(endpoints)
        self._current = 0
        # AioClient.__init__ is skipped on purpose: it would create an aiohttp session outside any event loop and
        # an SSLContext that ignores CA-only TLS. BaseClient.__init__ only sets fields and loads the swagger spec
        # (it calls our _retrieve_version, which stays off the network).
        BaseClient.__init__(self, server_version=SERVER_VERSION, cluster_version=SERVER_VERSION)
        self._ssl_context = ssl_context
        self._username = username
        self._password = password
        self._auth_token: str | None = None  # etcd3-py's own ``token`` stays None: we send ours per request
        self._auth_lock = anyio.Lock()
        self._timeout = request_timeout
        self._watch_idle_timeout = watch_idle_timeout
        # one pass over every endpoint, plus one more try of the first (a restarting single server)
        self._attempts = len(self._endpoints) + 1
        self._unary: aiohttp.ClientSession | None = None
        self._streams: aiohttp.ClientSession | None = None
        self._closed = False

    # -- etcd3-py hooks ----------------------------------------------------------------------------------

    def _retrieve_version(self) -> None:
        # etcd3-py probes GET /version with a blocking requests call here; we pin the version instead.
        self.server_version = self.cluster_version = SERVER_VERSION
        self.server_version_sem = self.cluster_version_sem = sem.Version(SERVER_VERSION)

    @property
    def baseurl(self) -> str:
        """The endpoint in use (etcd3-py builds its URLs from this)."""
        return self._endpoints[self._current]

    @property
    def session(self) -> aiohttp.ClientSession:
        """The unary-call pool, created on first use inside the running loop (etcd3-py's calls use it too)."""
        if self._unary is None:
            self._unary = self._new_session(limit=100)
        return self._unary

    @property
    def stream_session(self) -> aiohttp.ClientSession:
        """A separate pool for watch streams: each holds its connection for as long as it is open."""
        if self._streams is None:
            self._streams = self._new_session(limit=0)
        return self._streams

    def _new_session(self, *, limit: int) -> aiohttp.ClientSession:
        if self._closed:
            raise UnavailableError("backend is closed")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("EtcdBackend runs on asyncio only (aiohttp is asyncio-only)") from None
        connector = aiohttp.TCPConnector(limit=limit, ssl=self._ssl_context if self._ssl_context is not None else True)
        # No session-wide timeout: aiohttp's default (5 min total) would cut long watches. Unary attempts are
        # bounded with anyio.fail_after instead.
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        """Close both pools (open watch streams end with UnavailableError). Idempotent.

        Completes even when cancelled: a client closed on the way out of a cancelled scope must not leak.
        """
        self._closed = True
        with anyio.CancelScope(shield=True):
            for session in (self._unary, self._streams):
                if session is not None:
                    await session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- auth ----------------------------------------------------------------------------------------------

    async def _token(self) -> str | None:
        if self._username is None:
            return None
        if self._auth_token is None:
            return await self._authenticate(stale=None)
        return self._auth_token

    async def _authenticate(self, *, stale: str | None) -> str:
        """Get a fresh token, unless another task already replaced ``stale`` (one re-authentication per expiry)."""
        async with self._auth_lock:
            if self._auth_token is not None and self._auth_token != stale:
                return self._auth_token
            reply = await self.authenticate(self._username, self._password)  # etcd3-py's request path
            self._auth_token = str(reply.token)
            return self._auth_token

    # -- failover and retries -----------------------------------------------------------------------------

    def _failed(self, index: int, exc: BaseException, *, lease_id: int = 0) -> BackendError:
        error = translate(exc, endpoint=self._endpoints[index], lease_id=lease_id)
        if isinstance(error, UnavailableError) and self._current == index:
            self._current = (index + 1) % len(self._endpoints)  # round robin to the next endpoint
        return error

    def _retryable(self, exc: UnavailableError) -> bool:
        """Whether a write that failed with ``exc`` may be sent again: only when it surely never left."""
        if self._closed:
            return False
        cause = exc.__cause__
        return isinstance(cause, aiohttp.ClientConnectorError) and not isinstance(cause, aiohttp.ClientSSLError)

    def _retryable_read(self, exc: UnavailableError) -> bool:
        return not self._closed

    # -- unary calls ---------------------------------------------------------------------------------------

    async def call(self, path: str, body: JSON, *, idempotent: bool, lease_id: int = 0) -> JSON:
        """POST one gateway request (``path`` under ``/v3``) and return the decoded reply.

        Args:
            idempotent: the request may be repeated after an ambiguous failure (reads, keepalives, revokes).
                Otherwise it is retried only when it surely was not sent (connection refused).
            lease_id: reported by LeaseExpiredError when etcd says the lease is gone.

        Raises:
            UnavailableError: every attempt failed to get an answer (or a write failed ambiguously).
            AuthenticationError, LeaseExpiredError, RequestTooLargeError, BackendError: etcd refused.
        """
        payload = json.dumps(body, separators=(",", ":")).encode()
        return await retry_call(
            lambda: self._call_once(path, payload, lease_id),
            attempts=self._attempts,
            retryable=self._retryable_read if idempotent else self._retryable,
        )

    async def _call_once(self, path: str, payload: bytes, lease_id: int) -> JSON:
        if self._closed:
            raise UnavailableError("backend is closed")
        index = self._current
        url = f"{self._endpoints[index]}{self.api_prefix}{path}"
        try:
            with anyio.fail_after(self._timeout):
                token = await self._token()
                try:
                    return await self._send(url, payload, token)
                except etcd_errors.ErrInvalidAuthToken:
                    if self._username is None:
                        raise
                    # Tokens expire (--auth-token-ttl) and vanish when a member restarts: authenticate once more.
                    # The request was refused, so sending it again is safe even for a write.
                    token = await self._authenticate(stale=token)
                    return await self._send(url, payload, token)
        except _NATIVE_ERRORS as exc:
            raise self._failed(index, exc, lease_id=lease_id) from exc

    async def _send(self, url: str, payload: bytes, token: str | None) -> JSON:
        headers = _HEADERS if token is None else {**_HEADERS, "Authorization": token}
        async with self.session.post(url, data=_body(payload), headers=headers) as resp:
            body = await resp.read()
            return _decode_reply(resp.status, body)

    # -- watch streams -------------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_watch(self, request: JSON) -> AsyncIterator[WatchStream]:
        """Open a watch stream (POST /v3/watch with ``request``), failing over between endpoints.

        Opening is retried like an idempotent call until the server's first message arrives; after that a
        broken stream raises UnavailableError from `receive`. Leaving closes the response.
        """
        payload = json.dumps(request, separators=(",", ":")).encode()
        stream: WatchStream | None = None
        try:
            stream = await retry_call(
                lambda: self._open_watch_once(payload), attempts=self._attempts, retryable=self._retryable_read
            )
            yield stream
        finally:
            if stream is not None:
                stream.close()

    async def _open_watch_once(self, payload: bytes) -> WatchStream:
        if self._closed:
            raise UnavailableError("backend is closed")
        index = self._current
        endpoint = self._endpoints[index]
        url = f"{endpoint}{self.api_prefix}/watch"
        resp: aiohttp.ClientResponse | None = None
        try:
            with anyio.fail_after(self._timeout):
                reauthenticated = False
                while True:
                    token = await self._token()
                    headers = _HEADERS if token is None else {**_HEADERS, "Authorization": token}
                    resp = await self.stream_session.post(url, data=_body(payload), headers=headers)
                    if resp.status != 200:
                        _decode_reply(resp.status, await resp.read())
                        raise MalformedReplyError(f"watch answered HTTP {resp.status}")
                    stream = WatchStream(resp, endpoint, self._watch_idle_timeout)
                    first = await stream._next_result()
                    if (
                        first.get("canceled")
                        and "PermissionDenied" in str(first.get("cancel_reason"))
                        and self._username is not None
                        and not reauthenticated
                    ):
                        # A watch shows an expired or forgotten token only as a "permission denied" cancel:
                        # authenticate once more and open it again.
                        resp.close()
                        resp = None
                        await self._authenticate(stale=token)
                        reauthenticated = True
                        continue
                    if first.get("canceled") and not int(first.get("compact_revision", 0)):
                        # Refused at creation (etcd says created *and* canceled, e.g. permission denied): an error
                        # now, not a stream that looks open until its first read.
                        raise _cancel_error(first)
                    if first.get("created"):
                        stream.created_revision = int(first.get("header", {}).get("revision", 0))
                    stream._pending.append(first)
                    return stream
        except BaseException as exc:
            if resp is not None:
                resp.close()
            if isinstance(exc, _NATIVE_ERRORS):
                raise self._failed(index, exc) from exc
            raise
