"""WorkQueue throughput and claim latency, and Scheduler claim cost, in one run, printing a table.

    python benchmarks/workqueue.py [--items 400]

(Not ``queue.py``: a script there would shadow the standard library's ``queue`` for every benchmark.)

- queue: ``--items`` items put up front, then drained by 1, 4 and 16 consumers (each on its own session and
  client), on EtcdBackend (etcd 3.5.1 on loopback) and MemoryBackend: end-to-end items/s, and claim latency
  (from asking for a lease to holding an item) p50/p99.
- scheduler: 10 workers, one job ticking every 100 ms: from each tick's scheduled time to its run starting
  (the sleep's overshoot plus the run record's compare-and-swap, which 10 workers race for), p50/p99, and runs
  per tick (1.00: every tick ran, once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import UTC, datetime, timedelta

import anyio
from _measure import percentile

from coordkit import Backend, EtcdBackend, JobSpec, MemoryBackend, RunContext, Scheduler, Session, WorkQueue
from coordkit.testing import EtcdServer

Connect = Callable[[], AbstractAsyncContextManager[Backend]]


async def drain(connect: Connect, name: str, items: int, consumers: int) -> tuple[float, list[float]]:
    claims: list[float] = []
    done = 0
    finished = 0.0
    async with AsyncExitStack() as stack:
        sessions = []
        for _ in range(consumers + 1):
            client = await stack.enter_async_context(connect())
            sessions.append(await stack.enter_async_context(Session(client, ttl=30)))
        producer = WorkQueue(sessions[0], name)
        for i in range(items):
            await producer.put(b"item %d" % i)
        started = time.perf_counter()

        async def consume(session: Session) -> None:
            nonlocal done, finished
            async with WorkQueue(session, name) as queue:
                await consume_all(queue)

        async def consume_all(queue: WorkQueue) -> None:
            nonlocal done, finished
            while done < items:
                asked = time.perf_counter()
                with anyio.move_on_after(1):
                    async with queue.lease(visibility_timeout=30):
                        claims.append(time.perf_counter() - asked)
                    done += 1
                    finished = time.perf_counter()

        async with anyio.create_task_group() as tg:
            for session in sessions[1:]:
                tg.start_soon(consume, session)
    # up to the last completion (idle consumers then give up waiting, which is not throughput)
    return items / (finished - started), claims


async def scheduler_claims(connect: Connect, ticks: int = 30) -> tuple[list[float], float]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    durations: list[float] = []
    async with AsyncExitStack() as stack:
        workers = []
        for i in range(10):
            client = await stack.enter_async_context(connect())
            session = await stack.enter_async_context(Session(client, ttl=30))
            clock = lambda: base + timedelta(seconds=anyio.current_time())  # noqa: E731
            scheduler = Scheduler(session, "bench/cron", worker=f"w{i}", now=clock, history=1000)

            async def job(context: RunContext) -> None:
                pass

            scheduler.register("job", job)
            workers.append(scheduler)
        async with AsyncExitStack() as running:
            for scheduler in workers:
                await running.enter_async_context(scheduler)
            await workers[0].put_job(JobSpec("tick", "job", interval=0.1))
            await anyio.sleep(ticks * 0.1)
            await workers[0].remove_job("tick")
        history = await workers[0].history("tick")
        for run in history:
            if run.ended:
                started = datetime.fromisoformat(run.started)
                durations.append((started - datetime.fromisoformat(run.tick)).total_seconds())
    return durations, len(history) / max(1, ticks)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400)
    args = parser.parse_args()
    rows = []
    with EtcdServer() as server:
        memory = MemoryBackend()
        backends: list[tuple[str, Connect]] = [
            ("etcd", lambda: EtcdBackend(server.endpoint)),
            ("memory", memory.connect),
        ]
        for label, connect in backends:
            for consumers in (1, 4, 16):
                rate, claims = await drain(connect, f"bench/queue/{label}/{consumers}", args.items, consumers)
                rows.append((label, consumers, rate, percentile(claims, 0.5), percentile(claims, 0.99)))
        cron = {label: await scheduler_claims(connect) for label, connect in backends}
    print(f"WorkQueue: {args.items} items drained by N consumers (own session each)")
    print(f"{'backend':<8} {'consumers':>9} {'items/s':>9} {'claim p50 ms':>13} {'p99 ms':>8}")
    for label, consumers, rate, p50, p99 in rows:
        print(f"{label:<8} {consumers:>9} {rate:>9.0f} {p50 * 1e3:>13.2f} {p99 * 1e3:>8.2f}")
    print()
    print("Scheduler: 10 workers, one job every 100 ms: tick time -> run start (the claim), ms")
    for label, (delays, ratio) in cron.items():
        print(
            f"{label:<8} p50 {percentile(delays, 0.5) * 1e3:7.2f}  p99 {percentile(delays, 0.99) * 1e3:7.2f}"
            f"  runs per tick {ratio:.2f}"
        )
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    anyio.run(main)
