"""coordkit in one minute: three simulated processes, each with a session-backed membership key; one crashes.

Each "process" opens a Session (a lease kept alive by heartbeats) and writes a key bound to that lease. A
monitor follows the prefix with a reliable Watch. Worker "c" then crashes: its heartbeats stop and nothing is
cleaned up. Its own guarded block is cancelled as soon as its local validity deadline passes (before the server
can expire the lease); then the lease expires on the server, its key vanishes, and the monitor reports it.

    python examples/demo.py                 # in-memory backend (the default)
    python examples/demo.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import Backend, OwnershipLostError, Put, Session, Snapshot, Watch
from coordkit.testing import FaultyBackend

PREFIX = b"demo/members/"
TTL = 2


def stamp(started: float) -> str:
    return f"[{anyio.current_time() - started:5.2f}s]"


async def worker(name: str, client: Backend, started: float, crash: anyio.Event | None) -> None:
    async with client, Session(client, ttl=TTL) as session:
        await client.txn([], [Put(PREFIX + name.encode(), b"alive", session.lease_id)])
        print(f"{stamp(started)} {name}: joined with lease {session.lease_id:x}")
        try:
            async with session.guarded():
                if crash is None:
                    await anyio.sleep(TTL * 4)
                    return
                await anyio.sleep(1)
                print(f"{stamp(started)} {name}: crashing (heartbeats stop, nothing cleaned up)")
                crash.set()
                await anyio.sleep_forever()
        except OwnershipLostError as exc:
            print(f"{stamp(started)} {name}: guarded block cancelled: {exc}")
        print(f"{stamp(started)} {name}: leaving")


async def monitor(client: Backend, started: float, done: anyio.Event) -> None:
    async with client, Watch(client, PREFIX, prefix=True) as watch:
        async for item in watch:
            if isinstance(item, Snapshot):
                names = [kv.key.removeprefix(PREFIX).decode() for kv in item.kvs]
                print(f"{stamp(started)} monitor: members at start {names}")
                continue
            for event in item.events:
                name = event.kv.key.removeprefix(PREFIX).decode()
                print(f"{stamp(started)} monitor: {name} {'joined' if event.type.value == 'PUT' else 'left'}")
                if name == "c" and event.type.value == "DELETE":
                    done.set()
                    return


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    started = anyio.current_time()
    crashed, gone = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor, connect(), started, gone)
        for name in ("a", "b"):
            tg.start_soon(worker, name, connect(), started, None)
        # The crash: the client is cut off from the store, so heartbeats stop and its cleanup never arrives.
        crashing = FaultyBackend(connect())
        tg.start_soon(worker, "c", crashing, started, crashed)
        await crashed.wait()
        crashing.partition()
        await gone.wait()
        print(f"{stamp(started)} monitor: saw c leave within its TTL of {TTL} s")
        crashing.heal()  # let the dead worker's task finish quickly; its lease is already gone
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
