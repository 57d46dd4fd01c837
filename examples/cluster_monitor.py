"""Cluster monitor: workers heartbeat through their sessions; a monitor prints joins, leaves and load live.

Each worker joins the group "examples/fleet" with its address as metadata and updates its load now and then. One
worker is then killed (cut off, no goodbye): its key vanishes when its lease expires, and the monitor reports it
within the TTL. The others leave gracefully at the end and disappear at once.

    python examples/cluster_monitor.py                 # in-memory backend (the default)
    python examples/cluster_monitor.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

from contextlib import aclosing, suppress

import anyio
from _common import backend_factory

from coordkit import Backend, Group, MembershipLostError, Session
from coordkit.testing import FaultyBackend

GROUP = "examples/fleet"
TTL = 2


async def worker(name: str, client: Backend, stop: anyio.Event) -> None:
    with suppress(MembershipLostError):  # the killed worker's own session ends up lost
        async with client, Session(client, ttl=TTL) as session:
            async with Group(session, GROUP).join(name, metadata=f"10.0.0.{name[-1]}:8080 load=0".encode()) as me:
                for load in range(1, 4):
                    await anyio.sleep(0.3)
                    await me.update(f"10.0.0.{name[-1]}:8080 load={load}".encode())
                await stop.wait()


async def monitor(client: Backend, started: float, killed: anyio.Event, gone: anyio.Event) -> None:
    async with client, Session(client, ttl=10) as session, aclosing(Group(session, GROUP).watch()) as views:
        async for view in views:
            at = f"[{anyio.current_time() - started:5.2f}s]"
            for member in sorted(view.joined):
                print(f"{at} joined:  {member} ({view.members[member].decode()})")
            for member in sorted(view.updated):
                print(f"{at} updated: {member} ({view.members[member].decode()})")
            for member in sorted(view.left):
                print(f"{at} left:    {member}")
                if killed.is_set() and member == "worker-3":
                    gone.set()
            if gone.is_set() and not view.members:
                return


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    started = anyio.current_time()
    stop, killed, gone = anyio.Event(), anyio.Event(), anyio.Event()
    doomed = FaultyBackend(connect())
    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor, connect(), started, killed, gone)
        await anyio.sleep(0.1)
        tg.start_soon(worker, "worker-1", connect(), stop)
        tg.start_soon(worker, "worker-2", connect(), stop)
        tg.start_soon(worker, "worker-3", doomed, stop)
        await anyio.sleep(1.2)
        print(f"[{anyio.current_time() - started:5.2f}s] killing worker-3 (no goodbye, no more heartbeats)")
        killed_at = anyio.current_time()
        killed.set()
        doomed.partition()
        await gone.wait()
        print(f"monitor saw worker-3 leave {anyio.current_time() - killed_at:.2f}s after it died (TTL {TTL} s)")
        doomed.heal()
        stop.set()


if __name__ == "__main__":
    anyio.run(main)
