"""Build once, share with everyone: five workers start at once; one builds the index, all get the result.

The etcd pattern "everybody tries to create the node; the winner computes (a full index build) and distributes
the result". The first worker to claim the name builds; the others wait for the published result. A late worker
arriving afterwards reads the stored result without building again.

    python examples/build_index_once.py                 # in-memory backend (the default)
    python examples/build_index_once.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import JSON, Backend, Session, invalidate_once, once

NAME = "examples/index/full-build"


async def worker(name: str, client: Backend, builds: list[str]) -> None:
    async def build_index() -> dict[str, object]:
        builds.append(name)
        print(f"{name}: building the index (everyone else waits)")
        await anyio.sleep(0.5)
        return {"documents": 1_000_000, "built_by": name}

    async with client, Session(client, ttl=5) as session:
        index = await once(session, NAME, build_index, codec=JSON)
        print(f"{name}: got index built by {index['built_by']} ({index['documents']:,} documents)")


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    async with connect() as backend:
        await invalidate_once(backend, NAME)  # start fresh, so the demo builds every time it runs
    builds: list[str] = []
    async with anyio.create_task_group() as tg:
        for i in range(1, 6):
            tg.start_soon(worker, f"worker-{i}", connect(), builds)
    await worker("late-worker", connect(), builds)
    print(f"built {len(builds)} time(s), by {builds[0]}")


if __name__ == "__main__":
    anyio.run(main)
