"""Scheduler: claim cost, kill latency and command-job overhead, and a load run, on etcd and in memory.

    python benchmarks/scheduler.py [--workers 10] [--ticks 30]
    python benchmarks/scheduler.py --mode load [--workers 10] [--jobs 100] [--duration 60] [--run-time 2.5]

Run on demand (never part of the tests); it prints a table. On etcd: a real etcd 3.5.1 started by
`coordkit.testing.EtcdServer` on loopback (its default: no fsync); in memory: clients of one `MemoryBackend` store,
in real time. Every worker has its own client and `Session`.

``--mode micro`` (the default):

- claim: ``--workers`` workers, one job ticking every 100 ms (overlap "forbid": the claim also compares the
  job's active key): from each tick's scheduled time to its run starting, p50/p99, and "ok" runs per tick
  (1.00: every tick ran, once; the tick cut by the job's removal at the end counts as not run).
- kill: a job with overlap "allow" has one hanging run on each of ``--workers`` workers; from ``kill(job)``
  to the last of them cancelled (the request's write, its watch delivery to every worker), over 10 rounds.
- command: a command job running ``true`` on one worker: from the tick to its record's end (process start
  under the guardian, exit, the final write), p50/p99.

``--mode load`` (issue 13): ``--workers`` workers (default 10) run ``--jobs`` jobs (default 100) ticking every
second for ``--duration`` seconds (default 60), in two scenarios:

- quick: each run returns at once.
- overrun: each run takes ``--run-time`` seconds (default 2.5: it overruns its 1 s interval), overlap "forbid".

For each: the ticks expected (jobs x whole seconds of the window, minus the first and last second: the edges,
where jobs are being put or removed); of those, the ticks whose function ran exactly once, the ticks recorded
"skipped" (a run of the job was active) or "missed" (no worker reached it within the 1 s grace), and the ticks
neither run nor recorded ("lost", must be 0); the ticks run twice or more (counted over the whole run, edges
included: must be 0). Distinct (job, tick) pairs are counted from the function's own calls, not from records.
Tick -> start: from the tick's scheduled time to the function starting, on the scheduler's clock, p50/p99.
Store writes per run: the txns with a Put or Delete in either branch (failed claims included), plus lease grants
and revokes, made by the workers from the first job put to the end of the last run, divided by the runs (each
run's share of the losing claims of the other workers, of skipped records, of membership updates...); committed:
of those, the ones whose branch taken wrote (the claims won, ...); txns per run: every txn (writing or not);
reads per run: every range. cpu: this process's CPU seconds (all the workers and their clients, and the memory
store; not etcd) per second of the scenario: near 1.0, the single Python process is saturated. Overlaps: runs of
a job that started before the job's previous run (by start) ended, on the function's own clock readings (must be 0
under "forbid"). A scenario stopped early (a worker's session lost under the load, say) is reported below the
table, its figures measured until then.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import astuple, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from types import TracebackType
from typing import Self

import anyio
from _measure import percentile

from coordkit import (
    Backend,
    Compare,
    Delete,
    EtcdBackend,
    JobSpec,
    Lease,
    MemoryBackend,
    Op,
    Put,
    Range,
    RangeResult,
    RunContext,
    RunRecord,
    Scheduler,
    Session,
    TxnResult,
    UnavailableError,
    WatchBatch,
)
from coordkit.testing import EtcdServer

Connect = Callable[[], AbstractAsyncContextManager[Backend]]
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def clock() -> datetime:
    return BASE + timedelta(seconds=anyio.current_time())


@dataclass
class Counts:
    """Calls made through `CountingBackend` clients."""

    txns: int = 0
    writes: int = 0  # txns with a Put or Delete in either branch, plus grants and revokes
    committed: int = 0  # of those, the ones that wrote: the branch taken had a Put or Delete (and grants, revokes)
    ranges: int = 0


class CountingBackend:
    """A `Backend` that passes every call to ``inner``, counting txns and writes into ``counts``.

    It does not own ``inner``: whoever opened it closes it.
    """

    def __init__(self, inner: Backend, counts: Counts) -> None:
        self.inner = inner
        self.name = inner.name
        self.counts = counts

    async def range(self, request: Range) -> RangeResult:
        self.counts.ranges += 1
        return await self.inner.range(request)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        self.counts.txns += 1
        if any(isinstance(op, Put | Delete) for op in (*success, *failure)):
            self.counts.writes += 1
        result = await self.inner.txn(compare, success, failure)
        if any(isinstance(op, Put | Delete) for op in (success if result.succeeded else failure)):
            self.counts.committed += 1
        return result

    async def grant(self, ttl: int) -> Lease:
        self.counts.writes += 1
        self.counts.committed += 1
        return await self.inner.grant(ttl)

    async def refresh(self, lease_id: int) -> int:
        return await self.inner.refresh(lease_id)

    async def revoke(self, lease_id: int) -> None:
        self.counts.writes += 1
        self.counts.committed += 1
        await self.inner.revoke(lease_id)

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        return self.inner.watch(key, prefix=prefix, start_revision=start_revision)

    async def aclose(self) -> None:
        pass  # ``inner`` is closed by whoever opened it

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def started_workers(
    stack: AsyncExitStack,
    connect: Connect,
    prefix: str,
    count: int,
    *,
    counts: Counts | None = None,
    history: int = 1000,
) -> list[Scheduler]:
    workers = []
    for i in range(count):
        client = await stack.enter_async_context(connect())
        backend: Backend = client if counts is None else CountingBackend(client, counts)
        session = await stack.enter_async_context(Session(backend, ttl=30))
        workers.append(Scheduler(session, prefix, worker=f"w{i}", now=clock, history=history, run_commands=True))
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


@dataclass
class Load:
    """One load scenario's outcome (see the module docstring)."""

    expected: int = 0  # ticks in the window
    once: int = 0  # of those, run exactly once
    skipped: int = 0  # of those, recorded "skipped" (and not run)
    missed: int = 0  # of those, recorded "missed" (and not run)
    lost: int = 0  # of those, neither run nor recorded
    repeated: int = 0  # ticks (edges included) run twice or more
    runs: int = 0  # function calls (edges included)
    overlaps: int = 0  # runs of a job started before its previous run (by start) ended
    delays: list[float] = field(default_factory=list)  # tick -> start, seconds
    counts: Counts = field(default_factory=Counts)  # the workers' calls from the first put to the last run's end
    lost_records: Counter[str] = field(default_factory=Counter)  # the lost ticks' records: outcome, or "no record"
    failure: str = ""  # what stopped the scenario early, if anything
    cpu: float = 0.0  # this process's CPU time (all workers, the clients, the memory store) per second of the scenario


async def read_history(admin: Scheduler, name: str) -> list[RunRecord]:
    for _ in range(10):  # etcd may still be catching up after an overload
        try:
            return await admin.history(name)
        except UnavailableError:
            await anyio.sleep(1)
    return await admin.history(name)


async def load(connect: Connect, prefix: str, workers: int, jobs: int, duration: float, run_time: float) -> Load:
    """``workers`` workers, ``jobs`` jobs every second for ``duration`` seconds; each run lasts ``run_time``."""
    result = Load()
    calls: Counter[tuple[str, datetime]] = Counter()
    intervals: dict[str, list[tuple[float, float]]] = {}

    async def job(context: RunContext) -> None:
        start = clock()
        calls[context.job, context.tick] += 1
        result.delays.append((start - context.tick).total_seconds())
        try:
            if run_time:
                await anyio.sleep(run_time)
        finally:
            intervals.setdefault(context.job, []).append(
                ((start - BASE).total_seconds(), (clock() - BASE).total_seconds())
            )

    names = [f"j{i:03}" for i in range(jobs)]
    history = max(100, math.ceil(duration) + 20)  # every record of the run is kept (no trimming loses the skipped)
    counted = Counts()
    async with AsyncExitStack() as stack:
        admin_client = await stack.enter_async_context(connect())  # puts and reads jobs, uncounted
        admin = Scheduler(await stack.enter_async_context(Session(admin_client, ttl=30)), prefix, now=clock)
        scheduled = await started_workers(stack, connect, prefix, workers, counts=counted, history=history)
        before = Counts()
        cpu = time.process_time()
        begin = anyio.current_time()
        end: float | None = None  # when the jobs stopped ticking (or the scenario stopped early)
        lost: list[float] = []  # when a worker's session was first seen lost

        async def watch_session(session: Session) -> None:
            await session.wait_lost()
            lost.append(anyio.current_time())

        try:
            async with anyio.create_task_group() as watching, AsyncExitStack() as running:
                for scheduler in scheduled:
                    watching.start_soon(watch_session, scheduler.session)
                running.callback(watching.cancel_scope.cancel)
                for scheduler in scheduled:
                    scheduler.register("job", job)
                    await running.enter_async_context(scheduler)
                before = replace(counted)
                async with anyio.create_task_group() as tg:  # at once: the window starts when all are put
                    for name in names:
                        tg.start_soon(admin.put_job, JobSpec(name, "job", interval=1, overlap="forbid"))
                begin = anyio.current_time()
                await anyio.sleep(duration)
                end = anyio.current_time()
                async with anyio.create_task_group() as tg:
                    for name in names:
                        tg.start_soon(admin.remove_job, name)
                await anyio.sleep(run_time + 2.0)  # the last runs end, and their final writes are made
        except Exception as exc:  # reported with what was measured until then: a worker lost its session, say
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            stopped = min([anyio.current_time(), *lost])
            end = stopped if end is None else min(end, stopped)
            result.failure = f"{stopped - begin:.1f} s after the jobs were put: {type(exc).__name__}: {exc}"
            with anyio.move_on_after(30):
                async with anyio.create_task_group() as tg:
                    for name in names:
                        tg.start_soon(admin.remove_job, name)
        result.cpu = (time.process_time() - cpu) / (anyio.current_time() - begin)
        result.counts = Counts(*(now - then for now, then in zip(astuple(counted), astuple(before), strict=True)))
        records = {name: await read_history(admin, name) for name in names}
    assert end is not None
    window = [BASE + timedelta(seconds=s) for s in range(math.ceil(begin + 1), math.floor(end - 1) + 1)]
    for name in names:
        outcomes = {datetime.fromisoformat(r.tick): r.outcome for r in records[name]}
        for tick in window:
            result.expected += 1
            ran = calls[name, tick]
            if ran == 1:
                result.once += 1
            elif ran == 0 and outcomes.get(tick) == "skipped":
                result.skipped += 1
            elif ran == 0 and outcomes.get(tick) == "missed":
                result.missed += 1
            elif ran == 0:
                result.lost += 1
                result.lost_records[outcomes.get(tick, "no record")] += 1
        spans = sorted(intervals.get(name, []))
        result.overlaps += sum(1 for a, b in pairwise(spans) if b[0] < a[1])
    result.repeated = sum(1 for n in calls.values() if n > 1)
    result.runs = sum(calls.values())
    return result


def ms(samples: list[float], q: float) -> float:
    return percentile(samples, q) * 1e3 if samples else math.nan


async def load_mode(args: argparse.Namespace) -> None:
    loads = os.getloadavg()
    results: dict[tuple[str, str], Load] = {}
    with EtcdServer() as server:
        memory = MemoryBackend()
        backends: list[tuple[str, Connect]] = [
            ("etcd", lambda: EtcdBackend(server.endpoint)),
            ("memory", memory.connect),
        ]
        for label, connect in backends:
            if label not in args.backends.split(","):
                continue
            for scenario, run_time in (("quick", 0.0), ("overrun", args.run_time)):
                results[label, scenario] = await load(
                    connect, f"bench/{label}/load-{scenario}", args.workers, args.jobs, args.duration, run_time
                )
    print(
        f"Scheduler load: {args.workers} workers, {args.jobs} jobs every 1 s for {args.duration:g} s;"
        f" overrun: each run takes {args.run_time:g} s, overlap forbid"
    )
    print(
        f"{'backend':<7} {'scenario':<8} {'ticks':>6} {'ran 1x':>6} {'skipped':>7} {'missed':>6} {'lost':>4}"
        f" {'ran 2x+':>7} {'runs':>6} {'start p50':>9} {'p99 ms':>7} {'writes/run':>10} {'committed':>9}"
        f" {'txns/run':>8} {'reads/run':>9}"
        f" {'overlaps':>8} {'cpu':>4}"
    )
    for (label, scenario), r in results.items():
        runs = max(1, r.runs)
        print(
            f"{label:<7} {scenario:<8} {r.expected:>6} {r.once:>6} {r.skipped:>7} {r.missed:>6} {r.lost:>4}"
            f" {r.repeated:>7} {r.runs:>6} {ms(r.delays, 0.5):>9.1f} {ms(r.delays, 0.99):>7.1f}"
            f" {r.counts.writes / runs:>10.2f}"
            f" {r.counts.committed / runs:>9.2f} {r.counts.txns / runs:>8.2f} {r.counts.ranges / runs:>9.2f}"
            f" {r.overlaps:>8} {r.cpu:>4.2f}"
        )
    for (label, scenario), r in results.items():
        if r.lost:
            print(f"{label} {scenario}: the lost ticks' records: {dict(r.lost_records)}")
        if r.failure:
            print(f"{label} {scenario} stopped early {r.failure}"[:600])
    print(
        f"\nPython {sys.version.split()[0]}, {os.cpu_count()} cores (shared with other work);"
        f" load average {loads[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("micro", "load"), default="micro")
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--ticks", type=int, default=30, help="micro: ticks per measure")
    parser.add_argument("--jobs", type=int, default=100, help="load: jobs, each ticking every second")
    parser.add_argument("--duration", type=float, default=60.0, help="load: seconds the jobs tick")
    parser.add_argument("--run-time", type=float, default=2.5, help="load, overrun scenario: seconds each run takes")
    parser.add_argument("--backends", default="etcd,memory", help="load: which backends, comma-separated")
    args = parser.parse_args()
    if args.mode == "load":
        await load_mode(args)
        return
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
