"""A read/write lock over a shared catalog: readers share it, a writer holds it alone, and is not starved.

Four readers keep reading the catalog (each read takes a while); two writers update it. Readers overlap each
other; a writer waits for the readers ahead of it, and readers that arrive while a writer waits queue behind
it, so the writers get in although reads never stop. Every write is fenced: it succeeds only while the writer
still holds the lock.

    python examples/readers_writers.py                 # in-memory backend (the default)
    python examples/readers_writers.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import Backend, Put, Range, ReadWriteLock, Session

CATALOG = b"examples/rw/catalog"
state = {"readers": 0, "writers": 0, "peak_readers": 0, "writes": 0}


async def reader(name: str, client: Backend, rounds: int) -> None:
    async with client, Session(client, ttl=5) as session:
        catalog = ReadWriteLock(session, "examples/rw/catalog")
        for _ in range(rounds):
            async with catalog.read():
                state["readers"] += 1
                state["peak_readers"] = max(state["peak_readers"], state["readers"])
                assert state["writers"] == 0, "a reader never sees a writer inside"
                await client.range(Range(CATALOG))
                await anyio.sleep(0.05)
                state["readers"] -= 1


async def writer(name: str, client: Backend, rounds: int) -> None:
    async with client, Session(client, ttl=5) as session:
        catalog = ReadWriteLock(session, "examples/rw/catalog")
        for version in range(rounds):
            await anyio.sleep(0.03)
            async with catalog.write() as held:
                state["writers"] += 1
                assert state["writers"] == 1 and state["readers"] == 0, "a writer is alone"
                fenced = await client.txn([held.guard()], [Put(CATALOG, f"{name} v{version}".encode())])
                print(
                    f"{name}: writes alone (token {held.token}), fenced write {'ok' if fenced.succeeded else 'REFUSED'}"
                )
                state["writes"] += fenced.succeeded
                state["writers"] -= 1


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(reader, f"reader-{i}", connect(), 8)
        for name in ("writer-a", "writer-b"):
            tg.start_soon(writer, name, connect(), 3)
    print(f"up to {state['peak_readers']} readers read at once; {state['writes']} writes, each made alone")


if __name__ == "__main__":
    anyio.run(main)
