"""The leader-elector sidecar's HTTP face: who leads, and whether this instance is healthy.

``GET /`` answers ``{"name": "<leader id>"}``, as the Kubernetes leader-elector sidecar does, so an unmodified
monolith can ask "am I the leader?" by comparing the name with its own id: ``""`` while nobody leads or while
this instance's session is not valid (a sidecar cut off from etcd cannot tell who leads). ``GET /healthz`` is
200 while this instance's session is valid, else 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import click

from .. import Session


@dataclass
class SidecarState:
    """What the sidecar serves; the election loop keeps it current.

    It only ever names itself leader while its own campaign holds the leadership and its session is valid,
    and names nobody while its session is not valid: a sidecar cut off from etcd cannot know who leads, and
    must not let its program go on believing it is the leader.

    Attributes:
        me: this instance's id.
        observed: the leader's id as last seen in the store, "" when nobody leads.
        session: this instance's current session (None between sessions).
        term: the term of this instance's leadership, 0 while it does not lead.
    """

    me: str
    observed: str = ""
    session: Session | None = None
    term: int = 0

    @property
    def healthy(self) -> bool:
        """This instance's session is entered and valid."""
        session = self.session  # its deadline too: a sidecar resumed from a freeze answers before it notices
        return session is not None and not session.lost and anyio.current_time() < session.deadline

    @property
    def leader(self) -> str:
        """Who leads, as this instance can vouch for it ("" when it cannot tell, or nobody leads)."""
        if not self.healthy:
            return ""
        if self.term:
            return self.me
        return "" if self.observed == self.me else self.observed  # a stale sight of our own past leadership

    def health(self) -> tuple[int, dict[str, object]]:
        """The /healthz status code and body: 200 while the session is valid."""
        leader = self.leader
        body = {
            "healthy": self.healthy,
            "id": self.me,
            "leader": leader,
            "is_leader": bool(self.term) and leader == self.me,
        }
        if body["is_leader"]:
            body["term"] = self.term
        return (200 if self.healthy else 503), body


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port).

    Raises:
        click.BadParameter: not HOST:PORT with a port in 0..65535.
    """
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {address!r}", param_hint="--http")
    return host, int(port)


@asynccontextmanager
async def serve(state: SidecarState, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``state`` over HTTP on ``host:port`` for the block; yields the bound port (0 picks a free one)."""
    from aiohttp import web

    async def leader(request: web.Request) -> web.Response:
        return web.json_response({"name": state.leader})

    async def healthz(request: web.Request) -> web.Response:
        status, body = state.health()
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/", leader)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
