"""WorkQueue throughput and claim latency against the store's own ceiling, and Scheduler claim cost, in one run.

    PYTHONPATH=. python benchmarks/workqueue.py [--items 256] [--consumers 1,4,16,64] [--backlog 10000]
        [--no-scheduler]

(``PYTHONPATH=.``: the checkout's coordkit, not an installed one; the last line says which was measured.)

(Not ``queue.py``: a script there would shadow the standard library's ``queue`` for every benchmark.)

- queue: ``--items`` items put up front (``put_many``), then drained by N consumers, each holding ``async with
  queue``, on EtcdBackend (etcd 3.5.1 on loopback) and MemoryBackend, in two client layouts: "own" (each consumer
  its own client and session: N processes' worth of clients, all in this one process) and "shared" (the N
  consumers are tasks of one process sharing one client and session: one watch, each event decoded once), and in
  two modes: each item's processing is a 20 ms sleep ("20ms"), or nothing ("none"). End-to-end items/s (up to the
  last completion) and claim latency (from asking for a lease to holding an item) p50/p99; "x 1" is items/s over
  one consumer's in the same mode, "% ceiling" items/s over the ceiling below; writes/item is the store
  revisions the drain used per item (the store counts one per write), puts counted as one per item.
- backlog: the same drain of ``--items`` items from the head of a queue that holds ``--backlog`` more behind
  them, by 1 and by 16 consumers (shared client): "x short" is items/s over the same drain from a queue of only
  ``--items`` items (1.00: a claim costs the same whatever the queue's length).
- ceiling: the same etcd's raw throughput of small compare-and-put transactions from 16 concurrent clients, and
  one client's txn round trip p50; divided by the 3 writes an item costs (put, claim, completion), the most
  items/s any design with 3 writes per item could reach here.
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

import coordkit
from coordkit import (
    Backend,
    Compare,
    EtcdBackend,
    JobSpec,
    MemoryBackend,
    Put,
    Range,
    RunContext,
    Scheduler,
    Session,
    WorkQueue,
)
from coordkit.testing import EtcdServer

Connect = Callable[[], AbstractAsyncContextManager[Backend]]
WRITES_PER_ITEM = 3


async def drain(
    connect: Connect, name: str, items: int, consumers: int, work: float, *, shared: bool, backlog: int = 0
) -> tuple[float, list[float], float]:
    claims: list[float] = []
    done = 0
    finished = 0.0
    all_done = anyio.Event()
    async with AsyncExitStack() as stack:
        sessions = []
        for _ in range(2 if shared else consumers + 1):
            client = await stack.enter_async_context(connect())
            sessions.append(await stack.enter_async_context(Session(client, ttl=30)))
        first = (await sessions[0].backend.range(Range(b"bench/none"))).revision
        total = items + backlog  # the first ``items`` are drained
        for start in range(0, total, 64):  # 64 per put (put_many writes 100 per transaction; count them as 1 each)
            await WorkQueue(sessions[0], name).put_many([b"item %d" % i for i in range(start, min(total, start + 64))])
        entered, all_in, go = 0, anyio.Event(), anyio.Event()

        async def consume(session: Session) -> None:
            nonlocal done, finished, entered
            async with WorkQueue(session, name) as queue:
                entered += 1  # the consumer follows the queue (its view of the queue is read): the clock starts
                if entered == consumers:  # when every consumer does, so startup is not counted
                    all_in.set()
                await go.wait()
                while True:
                    asked = time.perf_counter()
                    async with queue.lease(visibility_timeout=30):
                        claims.append(time.perf_counter() - asked)
                        if work:
                            await anyio.sleep(work)
                    done += 1
                    if done == items:
                        finished = time.perf_counter()
                        all_done.set()

        async with anyio.create_task_group() as tg:
            for index in range(consumers):
                tg.start_soon(consume, sessions[1 if shared else index + 1])
            await all_in.wait()
            started = time.perf_counter()
            go.set()
            await all_done.wait()
            last = (await sessions[0].backend.range(Range(b"bench/none"))).revision
            tg.cancel_scope.cancel()
    # Store writes per item: revisions from before the puts to the last completion, the puts counted one per item
    # (as `put` writes them), whatever put_many saved.
    puts = -(-(items + backlog) // 64)
    return items / (finished - started), claims, (last - first - puts) / items + 1


async def ceiling(connect: Connect, clients: int = 16, seconds: float = 3.0) -> tuple[float, float]:
    """Raw compare-and-put transactions per second from ``clients`` concurrent clients; one client's txn p50."""
    count = 0
    async with AsyncExitStack() as stack:
        backends = [await stack.enter_async_context(connect()) for _ in range(clients)]
        single: list[float] = []
        for i in range(200):
            sent = time.perf_counter()
            await backends[0].txn([Compare.mod(b"bench/rtt", ">", -1)], [Put(b"bench/rtt", b"%d" % i)])
            single.append(time.perf_counter() - sent)

        async def hammer(index: int, backend: Backend) -> None:
            nonlocal count
            key = b"bench/ceiling/%d" % index
            revision = 0
            while True:
                result = await backend.txn([Compare.mod(key, "==", revision)], [Put(key, b"x" * 100)])
                revision = result.revision
                count += 1

        async with anyio.create_task_group() as tg:
            for index, backend in enumerate(backends):
                tg.start_soon(hammer, index, backend)
            await anyio.sleep(0.5)  # warm up
            count, started = 0, time.perf_counter()
            await anyio.sleep(seconds)
            rate = count / (time.perf_counter() - started)
            tg.cancel_scope.cancel()
    return rate, percentile(single, 0.5)


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
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--consumers", default="1,4,16,64")
    parser.add_argument("--backlog", type=int, default=10000)
    parser.add_argument("--no-scheduler", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.consumers.split(",")]
    rows = []
    with EtcdServer() as server:
        memory = MemoryBackend()
        backends: list[tuple[str, Connect]] = [
            ("etcd", lambda: EtcdBackend(server.endpoint)),
            ("memory", memory.connect),
        ]
        raw = {label: await ceiling(connect) for label, connect in backends}
        for label, connect in backends:
            for layout in ("own", "shared"):
                for mode, work in (("20ms", 0.02), ("none", 0.0)):
                    for consumers in counts:
                        name = f"bench/queue/{label}/{layout}/{mode}/{consumers}"
                        shared = layout == "shared"
                        rate, claims, writes = await drain(connect, name, args.items, consumers, work, shared=shared)
                        p50, p99 = percentile(claims, 0.5), percentile(claims, 0.99)
                        rows.append((label, layout, mode, consumers, rate, p50, p99, writes))
        deep = []
        for label, connect in backends:
            for consumers in (1, 16):
                name = f"bench/queue/{label}/backlog/{consumers}"
                drained = drain(connect, name, args.items, consumers, 0.0, shared=True, backlog=args.backlog)
                rate, claims, _ = await drained
                deep.append((label, consumers, rate, percentile(claims, 0.5)))
        cron = {} if args.no_scheduler else {label: await scheduler_claims(connect) for label, connect in backends}
    print(f"WorkQueue: {args.items} items drained by N consumers (clients: own = one each, shared = one for all)")
    ceilings = {label: rate / WRITES_PER_ITEM for label, (rate, _) in raw.items()}
    singles = {(label, layout, mode): rate for label, layout, mode, consumers, rate, *_ in rows if consumers == 1}
    print(
        f"{'backend':<8} {'clients':>7} {'work':>5} {'consumers':>9} {'items/s':>9} {'x 1':>6} {'% ceiling':>9}"
        f" {'claim p50 ms':>13} {'p99 ms':>8} {'writes/item':>11}"
    )
    for label, layout, mode, consumers, rate, p50, p99, writes in rows:
        print(
            f"{label:<8} {layout:>7} {mode:>5} {consumers:>9} {rate:>9.0f} {rate / singles[label, layout, mode]:>6.2f}"
            f" {100 * rate / ceilings[label]:>8.1f}% {p50 * 1e3:>13.2f} {p99 * 1e3:>8.2f} {writes:>11.2f}"
        )
    print(f"\nBacklog: the first {args.items} items drained from behind {args.backlog} more (shared client, no work)")
    print(f"{'backend':<8} {'consumers':>9} {'items/s':>9} {'x short':>8} {'claim p50 ms':>13}")
    shorts = {(r[0], r[3]): r[4] for r in rows if r[1] == "shared" and r[2] == "none"}
    for label, consumers, rate, p50 in deep:
        baseline = shorts.get((label, consumers))
        relative = f"{rate / baseline:8.2f}" if baseline else f"{'-':>8}"  # (no short drain of that size in this run)
        print(f"{label:<8} {consumers:>9} {rate:>9.0f} {relative} {p50 * 1e3:>13.2f}")
    print()
    print(f"Ceiling: raw compare-and-put txns/s from 16 clients, / {WRITES_PER_ITEM} writes per item; one txn p50")
    for label, (rate, rtt) in raw.items():
        print(
            f"{label:<8} {rate:9.0f} txn/s -> {rate / WRITES_PER_ITEM:7.0f} items/s ceiling;"
            f"  txn round trip p50 {rtt * 1e3:.2f} ms"
        )
    for label, (delays, ratio) in cron.items():
        if label == next(iter(cron)):
            print("\nScheduler: 10 workers, one job every 100 ms: tick time -> run start (the claim), ms")
        print(
            f"{label:<8} p50 {percentile(delays, 0.5) * 1e3:7.2f}  p99 {percentile(delays, 0.99) * 1e3:7.2f}"
            f"  runs per tick {ratio:.2f}"
        )
    print(
        f"\nPython {sys.version.split()[0]}, {os.cpu_count()} cores, coordkit from {os.path.dirname(coordkit.__file__)}"
    )


if __name__ == "__main__":
    anyio.run(main)
