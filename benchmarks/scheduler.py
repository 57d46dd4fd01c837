"""Scheduler: claim cost, kill latency and command-job overhead, on etcd and in memory, printing a table.

    python benchmarks/scheduler.py [--workers 10] [--ticks 30]

- claim: ``--workers`` workers, one job ticking every 100 ms (overlap "forbid": the claim also compares the
  job's active key): from each tick's scheduled time to its run starting, p50/p99, and "ok" runs per tick
  (1.00: every tick ran, once; the tick cut by the job's removal at the end counts as not run).
- kill: a job with overlap "allow" has one hanging run on each of ``--workers`` workers; from ``kill(job)``
  to the last of them cancelled (the request's write, its watch delivery to every worker), over 10 rounds.
- command: a command job running ``true`` on one worker: from the tick to its record's end (process start
  under the guardian, exit, the final write), p50/p99.
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

from coordkit import Backend, EtcdBackend, JobSpec, MemoryBackend, RunContext, Scheduler, Session
from coordkit.testing import EtcdServer

Connect = Callable[[], AbstractAsyncContextManager[Backend]]
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def clock() -> datetime:
    return BASE + timedelta(seconds=anyio.current_time())


async def started_workers(stack: AsyncExitStack, connect: Connect, prefix: str, count: int) -> list[Scheduler]:
    workers = []
    for i in range(count):
        client = await stack.enter_async_context(connect())
        session = await stack.enter_async_context(Session(client, ttl=30))
        workers.append(Scheduler(session, prefix, worker=f"w{i}", now=clock, history=1000, run_commands=True))
    return workers


async def claims(connect: Connect, prefix: str, count: int, ticks: int) -> tuple[list[float], float]:
    async def job(context: RunContext) -> None:
        pass

    async with AsyncExitStack() as stack:
        workers = await started_workers(stack, connect, prefix, count)
        async with AsyncExitStack() as running:
            for scheduler in workers:
                scheduler.register("job", job)
                await running.enter_async_context(scheduler)
            await workers[0].put_job(JobSpec("tick", "job", interval=0.1))
            await anyio.sleep(ticks * 0.1)
            await workers[0].remove_job("tick")
        history = [run for run in await workers[0].history("tick") if run.outcome == "ok"]
    delays = [(datetime.fromisoformat(r.started) - datetime.fromisoformat(r.tick)).total_seconds() for r in history]
    return delays, len(history) / ticks


async def kills(connect: Connect, prefix: str, count: int, rounds: int = 10) -> list[float]:
    samples: list[float] = []
    cancelled = 0
    all_cancelled = anyio.Event()
    running = 0
    all_running = anyio.Event()

    async def hang(context: RunContext) -> None:
        nonlocal cancelled, running
        running += 1
        if running == count:
            all_running.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled += 1
            if cancelled == count:
                all_cancelled.set()

    async with AsyncExitStack() as stack:
        workers = await started_workers(stack, connect, prefix, count)
        for i, scheduler in enumerate(workers):
            scheduler.register(f"hang{i}", hang)
            await stack.enter_async_context(scheduler)
        for round_ in range(rounds):
            cancelled = running = 0
            all_cancelled, all_running = anyio.Event(), anyio.Event()
            # One job per worker (only it registered the target), all with the same name prefix: one kill each.
            for i, scheduler in enumerate(workers):
                await scheduler.put_job(JobSpec(f"r{round_}-{i}", f"hang{i}", interval=3600, misfire="late"))
            await all_running.wait()
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(workers[0].kill, f"r{round_}-{i}")
            await all_cancelled.wait()
            samples.append(time.perf_counter() - start)
            for i in range(count):
                await workers[0].remove_job(f"r{round_}-{i}")
    return samples


async def commands(connect: Connect, prefix: str, ticks: int) -> list[float]:
    async with AsyncExitStack() as stack:
        (worker,) = await started_workers(stack, connect, prefix, 1)
        async with worker:
            await worker.put_job(JobSpec("true", command=["true"], interval=0.2))
            await anyio.sleep(ticks * 0.2 + 0.5)
            await worker.remove_job("true")
        history = [run for run in await worker.history("true") if run.ended]
    return [(datetime.fromisoformat(r.ended or "") - datetime.fromisoformat(r.tick)).total_seconds() for r in history]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    results = {}
    with EtcdServer() as server:
        memory = MemoryBackend()
        backends: list[tuple[str, Connect]] = [
            ("etcd", lambda: EtcdBackend(server.endpoint)),
            ("memory", memory.connect),
        ]
        for label, connect in backends:
            results[label] = (
                await claims(connect, f"bench/{label}/claims", args.workers, args.ticks),
                await kills(connect, f"bench/{label}/kills", args.workers),
                await commands(connect, f"bench/{label}/commands", args.ticks),
            )
    print(f"Scheduler, {args.workers} workers (ms)")
    print(
        f"{'backend':<8} {'claim p50':>9} {'p99':>7} {'runs/tick':>9}"
        f" {'kill p50':>9} {'p99':>7} {'cmd p50':>8} {'p99':>7}"
    )
    for label, ((delays, ratio), kill, command) in results.items():
        print(
            f"{label:<8} {percentile(delays, 0.5) * 1e3:>9.1f} {percentile(delays, 0.99) * 1e3:>7.1f} {ratio:>9.2f}"
            f" {percentile(kill, 0.5) * 1e3:>9.1f} {percentile(kill, 0.99) * 1e3:>7.1f}"
            f" {percentile(command, 0.5) * 1e3:>8.1f} {percentile(command, 0.99) * 1e3:>7.1f}"
        )
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    anyio.run(main)
