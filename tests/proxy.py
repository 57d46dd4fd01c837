"""TcpProxy: a TCP proxy on 127.0.0.1 between a client and one server, that passes, blackholes or delays traffic.

The blackhole is the nasty network failure: connections are accepted and stay open, writes succeed, and nothing
ever arrives on either side (no reset, no error), so only the client's own deadlines can notice it. Mode changes
apply at once to open connections too (a client's pooled keep-alive connections included). When the blackhole
ends, the connections that lost bytes in it are closed: their byte streams have a hole that TCP would never
have let through (it would have reset them after its retransmissions failed).
"""

from __future__ import annotations

import math
from typing import Literal, final

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ("TcpProxy",)

Mode = Literal["pass", "blackhole", "delay"]
_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ")


@final
class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` (``async with`` it to serve).

    ``proxy.endpoint`` is the URL to give a client. `blackhole`, `delay` and `pass_through` switch the mode.
    Client-to-server chunks that start an HTTP request are logged in `requests` with the time they were
    forwarded (``anyio.current_time()``), so a test can tell what the server can have received.

    Attributes:
        connections: connections accepted so far.
        requests: ``(forwarded at, request line)`` for every request forwarded to the server.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.latency = 0.0
        self.connections = 0
        self.requests: list[tuple[float, bytes]] = []
        self.port = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._open: set[_Connection] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pass_through(self) -> None:
        """Forward everything at once (the default)."""
        self.mode = "pass"
        self._close_holed()

    def blackhole(self) -> None:
        """Accept and read, forward nothing, in both directions; connections stay open."""
        self.mode = "blackhole"

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` after it arrived (each direction, order kept)."""
        self.mode = "delay"
        self.latency = seconds
        self._close_holed()

    def _close_holed(self) -> None:
        for connection in self._open:
            if connection.dropped:
                connection.scope.cancel()

    def last_request(self, marker: bytes) -> float | None:
        """When the last request whose request line contains ``marker`` was forwarded, or None."""
        times = [at for at, line in self.requests if marker in line]
        return max(times, default=None)

    async def __aenter__(self) -> TcpProxy:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = int(listener.extra(SocketAttribute.local_port))
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._serve, listener)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)

    async def _serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self.upstream)
            except OSError:
                return  # the server is down: the client sees its connection closed
            async with upstream, anyio.create_task_group() as tg:
                connection = _Connection(tg.cancel_scope)
                self._open.add(connection)

                async def direction(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, upward: bool) -> None:
                    # A delay line: the reader stamps each chunk, the writer forwards it when its time has come.
                    send, receive = anyio.create_memory_object_stream[tuple[float, bytes]](math.inf)
                    try:
                        async with anyio.create_task_group() as line:
                            line.start_soon(self._read, connection, src, send)
                            line.start_soon(self._write, connection, receive, dst, upward)
                    finally:
                        tg.cancel_scope.cancel()  # one side closed: close the other too
                        self._open.discard(connection)

                tg.start_soon(direction, client, upstream, True)
                tg.start_soon(direction, upstream, client, False)

    async def _read(
        self, connection: _Connection, src: anyio.abc.SocketStream, line: MemoryObjectSendStream[tuple[float, bytes]]
    ) -> None:
        async with line:
            while True:
                try:
                    chunk = await src.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return  # the peer closed or reset its connection
                if self.mode == "blackhole":
                    connection.dropped = True
                    continue  # read and dropped: the sender's writes succeed, nothing arrives
                due = anyio.current_time() + (self.latency if self.mode == "delay" else 0.0)
                line.send_nowait((due, chunk))

    async def _write(
        self,
        connection: _Connection,
        line: MemoryObjectReceiveStream[tuple[float, bytes]],
        dst: anyio.abc.SocketStream,
        upward: bool,
    ) -> None:
        async with line:
            async for due, chunk in line:
                await anyio.sleep_until(due)
                if self.mode == "blackhole":  # switched while the chunk was in flight
                    connection.dropped = True
                    continue
                if upward and chunk.startswith(_METHODS):
                    self.requests.append((anyio.current_time(), chunk.split(b"\r\n", 1)[0]))
                try:
                    await dst.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return


class _Connection:
    """One proxied connection: the scope that closes it, and whether it lost bytes to a blackhole."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.dropped = False
