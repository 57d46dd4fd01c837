"""Barriers and a counter: workers start together on a signal, count what they did, and finish phases together.

A coordinator raises a Barrier; five workers wait at it and all start when it is released. Each worker does some
work per phase and adds it to a shared Counter (no update is lost, however many add at once). A DoubleBarrier
makes the phases line up: nobody starts phase 2 before all five entered phase 1, and nobody leaves a phase before
everyone finished it. One worker crashes inside phase 2: the others see its lease end and do not wait for it.

    python examples/phases.py                 # in-memory backend (the default)
    python examples/phases.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import Barrier, BarrierLostError, Counter, DoubleBarrier, Session
from coordkit.testing import FaultyBackend

WORKERS = 5
log: list[str] = []


async def worker(i: int, client: FaultyBackend) -> None:
    async with client, Session(client, ttl=2) as session:
        await Barrier(client, "examples/phases/start").wait()
        done = Counter(client, "examples/phases/done")
        for phase in (1, 2):
            try:
                async with DoubleBarrier(session, f"examples/phases/phase-{phase}", count=WORKERS):
                    log.append(f"enter {phase}")
                    await anyio.sleep(0.02 * (i + 1))
                    if phase == 2 and i == 0:
                        print("worker-0: crashes inside phase 2 (its keepalives stop)")
                        client.suspend_keepalives()
                        await anyio.sleep_forever()
                    await done.add(10 * phase)
                    log.append(f"leave {phase}")
            except BarrierLostError:
                print("worker-0: its session was lost inside the phase: it left the barrier")
                return
        print(f"worker-{i}: done")


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    async with connect() as coordinator:
        start = Barrier(coordinator, "examples/phases/start")
        await start.hold()
        async with anyio.create_task_group() as tg:
            for i in range(WORKERS):
                tg.start_soon(worker, i, FaultyBackend(connect()))
            await anyio.sleep(0.3)
            print(f"coordinator: {WORKERS} workers wait at the start barrier; releasing it")
            await start.release()
        total = await Counter(coordinator, "examples/phases/done").get()
        await Counter(coordinator, "examples/phases/done").compare_and_set(0, expected_revision=total.revision)
    entered_2 = log.index("enter 2")
    assert all(entry != "enter 1" for entry in log[entered_2:]), "phase 2 started after everyone entered phase 1"
    print(f"counter = {total.value}: 5 workers x 10 in phase 1, 4 x 20 in phase 2, no update lost")
    print("phases lined up: nobody entered phase 2 before all five had entered phase 1")


if __name__ == "__main__":
    anyio.run(main)
