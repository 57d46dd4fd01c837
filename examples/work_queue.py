"""Work queue with leases: a producer adds 20 items; three workers process them; one is killed mid-item.

Each worker leases an item (exclusively), works on it, and completes it. Worker "w3" is cut off while holding
an item: it never completes it, and once its session's lease expires (the claim is bound to it) or the item's
visibility timeout has passed, whichever is first, the item is offered again and another worker completes it.
At the end every item has been completed exactly once.

    python examples/work_queue.py                 # in-memory backend (the default)
    python examples/work_queue.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

from collections import Counter
from contextlib import suppress

import anyio
from _common import backend_factory

from coordkit import Backend, ClaimLostError, Session, WorkQueue
from coordkit.testing import FaultyBackend

QUEUE = "examples/queue/thumbnails"
ITEMS = 20


async def producer(client: Backend) -> None:
    async with client, Session(client, ttl=5) as session:
        queue = WorkQueue(session, QUEUE)
        for i in range(ITEMS):
            await queue.put(f"image-{i:02d}.png".encode())
        print(f"producer: added {ITEMS} items")


async def worker(
    name: str, client: Backend, completed: list[tuple[str, str]], doomed: anyio.Event | None, done: anyio.Event
) -> None:
    with suppress(ClaimLostError):  # the killed worker's claim ends without it
        async with client, Session(client, ttl=2) as session, WorkQueue(session, QUEUE) as queue:
            while len(completed) < ITEMS:
                with anyio.move_on_after(1):
                    async with queue.lease(visibility_timeout=2) as task:
                        item = task.payload.decode()
                        if doomed is not None and len(completed) >= 5:
                            print(f"{name}: took {item} (attempt {task.attempt}) and is killed while working on it")
                            doomed.set()
                            await anyio.sleep_forever()
                        await anyio.sleep(0.05)  # the work
                    completed.append((item, name))
                    print(f"{name}: completed {item} (attempt {task.attempt})")
                    if task.attempt > 1:
                        print(f"{name}: {item} was offered again after the kill and is now done")
                    if len(completed) == ITEMS:
                        done.set()


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    completed: list[tuple[str, str]] = []
    doomed_event, done = anyio.Event(), anyio.Event()
    doomed_client = FaultyBackend(connect())
    async with connect() as backend, Session(backend, ttl=5) as session:
        queue = WorkQueue(session, QUEUE)
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer, connect())
            tg.start_soon(worker, "w1", connect(), completed, None, done)
            tg.start_soon(worker, "w2", connect(), completed, None, done)
            tg.start_soon(worker, "w3", doomed_client, completed, doomed_event, done)
            await doomed_event.wait()
            doomed_client.partition()  # no completion, no release, no heartbeat
            with anyio.fail_after(30):
                await done.wait()
            doomed_client.heal()
            tg.cancel_scope.cancel()
        depth = await queue.depth()
    counts = Counter(item for item, _ in completed)
    assert len(counts) == ITEMS and set(counts.values()) == {1}, counts
    print(f"all {ITEMS} items completed exactly once; queue now: {depth.pending} pending, {depth.leased} leased")


if __name__ == "__main__":
    anyio.run(main)
