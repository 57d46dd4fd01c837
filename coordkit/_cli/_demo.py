"""``coordkit demo``: a monolith run as three replicas whose main job must run once, not three times.

Each replica joins the group of replicas (a member key on its session's lease) and campaigns for the main job;
the leader runs it every half second. Then the leader freezes (its heartbeats stop, as in a long GC pause or a
partition): its job is cancelled as soon as its session's local deadline passes, before the server expires its
lease; then the lease expires, another replica is elected and carries on with a larger term, and the group
sees the frozen replica leave. Memory backend by default (one process plays the three replicas); with --etcd,
on a real cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType

import anyio

from .. import (
    Backend,
    Compare,
    Election,
    Group,
    Leadership,
    Lease,
    Op,
    OwnershipLostError,
    Range,
    RangeResult,
    Session,
    TxnResult,
    WatchBatch,
)
from ._output import Output

TTL = 2
TICKS = 8
ELECTION = "coordkit-demo/main-job"
GROUP = "coordkit-demo/replicas"


async def demo(connect: Callable[[], Backend], output: Output) -> None:
    """Play the story; ``connect()`` makes one client per replica (and one for the observer)."""
    story = _Story(output, anyio.current_time())
    replicas = {f"replica-{n}": _Replica(connect()) for n in (1, 2, 3)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(story.watch_replicas, connect())
        for name, client in replicas.items():
            tg.start_soon(story.replica, name, client)
        await story.frozen.wait()
        leader = story.ticks[-1][0]
        story.say(f"{leader} freezes: its heartbeats stop", fg="red")
        replicas[leader].freeze()
        await story.finished.wait()
        tg.cancel_scope.cancel()
    terms = [term for _, term in story.ticks]
    assert terms == sorted(terms), "terms only grow"
    runners = " -> ".join(dict.fromkeys(name for name, _ in story.ticks))
    story.say(f"{len(story.ticks)} ticks, each run once, by {runners}")


@dataclass
class _Story:
    """What the replicas do and what the demo says of it."""

    output: Output
    started: float
    ticks: list[tuple[str, int]] = field(default_factory=list)
    frozen: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)

    def say(self, message: str, fg: str | None = None) -> None:
        self.output.line(f"[{anyio.current_time() - self.started:5.2f}s] {message}", fg=fg)

    async def main_job(self, name: str, leadership: Leadership) -> None:
        self.say(f"{name} leads (term {leadership.term}) and runs the main job", fg="green")
        try:
            while len(self.ticks) < TICKS:
                self.ticks.append((name, leadership.term))
                self.say(f"  main job tick {len(self.ticks)} on {name}")
                if len(self.ticks) == 3:
                    self.frozen.set()
                await anyio.sleep(0.5)
            self.finished.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            if not self.finished.is_set():  # not the end of the demo: the leader's session was lost
                self.say(f"{name}: main job cancelled (its session's deadline passed)", fg="red")
            raise

    async def replica(self, name: str, client: _Replica) -> None:
        try:
            async with client, Session(client, ttl=TTL) as session, Group(session, GROUP).join(name):
                async with Election(session, ELECTION).campaign(name.encode()) as leadership:
                    await self.main_job(name, leadership)
        except OwnershipLostError as exc:
            self.say(f"{name}: {type(exc).__name__}, it stops leading and stays out", fg="red")

    async def watch_replicas(self, client: Backend) -> None:
        async with client:
            async for view in Group(Session(client), GROUP).watch():
                for name in sorted(view.left):
                    self.say(f"group: {name} left (its lease expired)", fg="yellow")


class _Replica:
    """A replica's client, which `freeze` stops for good, as a process paused for ever (a GC pause, a VM stopped)
    would: every call it makes from then on hangs. Its lease is then no longer renewed, and expires."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.name = inner.name
        self._frozen = False

    def freeze(self) -> None:
        self._frozen = True

    async def _pass(self) -> None:
        if self._frozen:
            await anyio.sleep_forever()

    async def range(self, request: Range) -> RangeResult:
        await self._pass()
        return await self._inner.range(request)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        await self._pass()
        return await self._inner.txn(compare, success, failure)

    async def grant(self, ttl: int) -> Lease:
        await self._pass()
        return await self._inner.grant(ttl)

    async def refresh(self, lease_id: int) -> int:
        await self._pass()
        return await self._inner.refresh(lease_id)

    async def revoke(self, lease_id: int) -> None:
        await self._pass()
        await self._inner.revoke(lease_id)

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        return self._inner.watch(key, prefix=prefix, start_revision=start_revision)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _Replica:
        return self  # the client it wraps is open already (a Backend is, once made)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
