"""Leader-only cron: three replicas each want to run a job every half second; only the leader runs it.

The seed case: a monolith run as N replicas whose scheduled jobs must run once, not N times. Each replica calls
``run_while_leader``; the elected one runs the job. After a few ticks the leader is cut off (its process hangs,
its keepalives stop): its job is cancelled as soon as its session is lost, before its lease expires on the
server, and another replica is elected and carries on. The output shows who ran each tick, with the term (a
fencing token that only grows).

    python examples/leader_only_cron.py                 # in-memory backend (the default)
    python examples/leader_only_cron.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import Leadership, run_while_leader
from coordkit.testing import FaultyBackend

TICKS = 8


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    started = anyio.current_time()
    ran: list[tuple[str, int]] = []
    cut_off, done = anyio.Event(), anyio.Event()
    replicas = {name: FaultyBackend(connect()) for name in ("replica-1", "replica-2", "replica-3")}

    async def replica(name: str, client: FaultyBackend) -> None:
        async def nightly_job(leadership: Leadership) -> None:
            try:
                while len(ran) < TICKS:
                    ran.append((name, leadership.term))
                    at = anyio.current_time() - started
                    print(f"[{at:5.2f}s] tick {len(ran)}: run by {name} (term {leadership.term})")
                    if len(ran) == 3:
                        cut_off.set()
                    await anyio.sleep(0.5)
                done.set()
            except anyio.get_cancelled_exc_class():
                print(f"[{anyio.current_time() - started:5.2f}s] {name}: job cancelled (leadership lost)")
                raise

        async with client:
            await run_while_leader(client, "examples/cron/nightly", nightly_job, value=name.encode(), ttl=2)

    async with anyio.create_task_group() as tg:
        for name, client in replicas.items():
            tg.start_soon(replica, name, client)
        await cut_off.wait()
        leader = ran[-1][0]
        print(f"[{anyio.current_time() - started:5.2f}s] {leader} is cut off (its keepalives stop)")
        replicas[leader].partition()
        await done.wait()
        replicas[leader].heal()
        tg.cancel_scope.cancel()
    runners = [name for name, _ in ran]
    terms = [term for _, term in ran]
    assert terms == sorted(terms), "terms only grow"
    print(f"{len(ran)} ticks, each run once, by {' -> '.join(dict.fromkeys(runners))}")


if __name__ == "__main__":
    anyio.run(main)
