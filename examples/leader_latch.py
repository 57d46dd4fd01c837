"""Leader latches: three replicas campaign in the background and report "leader" / "follower" as it changes.

For code that asks "do I lead now?" (a health endpoint, a dashboard, a component that only reacts) rather than
running a leader-only job (for that, use ``election.campaign()`` or ``run_while_leader``). Each replica holds a
latch and prints every transition. Replica a leads first, then stops: b takes over at once. Then b's process
freezes (its keepalives stop): its latch says "follower" and its block ends with LeadershipLostError before its
lease can expire on the server, and c takes over. A dashboard follows the leader meanwhile with
``observe_leader``: it reads, with no session and no campaign of its own.

    python examples/leader_latch.py                 # in-memory backend (the default)
    python examples/leader_latch.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

from contextlib import aclosing

import anyio
from _common import backend_factory

from coordkit import Backend, Election, LeadershipLostError, Session, observe_leader
from coordkit.testing import FaultyBackend

NAME = "examples/latch/reports"
transitions: list[str] = []
became_leader: dict[str, anyio.Event] = {}


async def replica(name: str, client: FaultyBackend, stop: anyio.Event, freeze: anyio.Event) -> None:
    async with client, Session(client, ttl=2) as session:
        try:
            async with Election(session, NAME).latch(name.encode()) as latch, aclosing(latch.changes()) as changes:
                async with anyio.create_task_group() as tg:

                    async def report() -> None:
                        async for leading in changes:
                            role = "leader" if leading else "follower"
                            transitions.append(f"{name} {role}")
                            if leading:
                                became_leader[name].set()
                            print(f"{name}: {role}" + (f" (term {latch.term})" if leading else ""))

                    tg.start_soon(report)
                    await freeze.wait() if name == "b" else await stop.wait()
                    if name == "b":
                        client.suspend_keepalives()
                        await anyio.sleep_forever()
                    tg.cancel_scope.cancel()
        except LeadershipLostError as exc:
            print(f"{name}: {exc}")


async def dashboard(client: Backend, seen: list[str]) -> None:
    async with client, aclosing(observe_leader(client, NAME)) as leaders:
        async for leader in leaders:
            shown = "nobody" if leader is None else leader.value.decode()
            if not seen or seen[-1] != shown:
                seen.append(shown)


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    stops = {name: anyio.Event() for name in "abc"}
    became_leader.update({name: anyio.Event() for name in "abc"})
    freeze = anyio.Event()
    seen: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(dashboard, connect(), seen)
        for name in "abc":
            tg.start_soon(replica, name, FaultyBackend(connect()), stops[name], freeze)
            await anyio.sleep(0.2)  # a campaigns first, then b, then c
        stops["a"].set()
        await became_leader["b"].wait()
        freeze.set()
        await became_leader["c"].wait()
        stops["c"].set()
        tg.cancel_scope.cancel()
    b_led = transitions.index("b leader")
    assert "b follower" in transitions[b_led:], "b's latch said so when b froze"
    assert transitions.index("c leader") > b_led, "c led after b"
    print("c took over from the frozen b; transitions: " + ", ".join(transitions))
    led = [name for name in seen if name != "nobody"]
    print("the dashboard saw the leaders " + " -> ".join(dict.fromkeys(led)))


if __name__ == "__main__":
    anyio.run(main)
