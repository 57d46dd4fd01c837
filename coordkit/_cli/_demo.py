"""``coordkit demo``: a monolith run as three replicas whose main job must run once, not three times.

Each replica joins the group of replicas (a member key on its session's lease) and campaigns for the main job;
the leader runs it every half second. Then the leader freezes (its heartbeats stop, as in a long GC pause or a
partition): its job is cancelled as soon as its session's local deadline passes, before the server expires its
lease; then the lease expires, another replica is elected and carries on with a larger term, and the group
sees the frozen replica leave. Memory backend by default (one process plays the three replicas); with --etcd,
on a real cluster.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from .._backends.protocol import Backend
from .._errors import OwnershipLostError
from .._recipes.election import Election, Leadership
from .._recipes.group import Group
from .._session import Session
from ..testing import FaultyBackend
from ._output import Output

TTL = 2
TICKS = 8
ELECTION = "coordkit-demo/main-job"
GROUP = "coordkit-demo/replicas"


async def demo(connect: Callable[[], Backend], output: Output) -> None:
    """Play the story; ``connect()`` makes one client per replica (and one for the observer)."""
    started = anyio.current_time()
    ticks: list[tuple[str, int]] = []
    frozen = anyio.Event()
    finished = anyio.Event()
    replicas = {f"replica-{n}": FaultyBackend(connect()) for n in (1, 2, 3)}

    def say(message: str, fg: str | None = None) -> None:
        output.line(f"[{anyio.current_time() - started:5.2f}s] {message}", fg=fg)

    async def main_job(name: str, leadership: Leadership) -> None:
        say(f"{name} leads (term {leadership.term}) and runs the main job", fg="green")
        try:
            while len(ticks) < TICKS:
                ticks.append((name, leadership.term))
                say(f"  main job tick {len(ticks)} on {name}")
                if len(ticks) == 3:
                    frozen.set()
                await anyio.sleep(0.5)
            finished.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            if not finished.is_set():  # not the end of the demo: the leader's session was lost
                say(f"{name}: main job cancelled (its session's deadline passed)", fg="red")
            raise

    async def replica(name: str, client: FaultyBackend) -> None:
        try:
            async with client, Session(client, ttl=TTL) as session, Group(session, GROUP).join(name):
                async with Election(session, ELECTION).campaign(name.encode()) as leadership:
                    await main_job(name, leadership)
        except OwnershipLostError as exc:
            say(f"{name}: {type(exc).__name__}, it stops leading and stays out", fg="red")

    async def watch_replicas(client: Backend) -> None:
        async with client:
            async for view in Group(Session(client), GROUP).watch():
                for name in sorted(view.left):
                    say(f"group: {name} left (its lease expired)", fg="yellow")

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_replicas, connect())
        for name, client in replicas.items():
            tg.start_soon(replica, name, client)
        await frozen.wait()
        leader = ticks[-1][0]
        say(f"{leader} freezes: its heartbeats stop", fg="red")
        replicas[leader].partition()
        await finished.wait()
        tg.cancel_scope.cancel()
    terms = [term for _, term in ticks]
    assert terms == sorted(terms), "terms only grow"
    runners = " -> ".join(dict.fromkeys(name for name, _ in ticks))
    say(f"{len(ticks)} ticks, each run once, by {runners}")
