"""Scheduler (distributed cron) on both backends: each tick once, live spec changes, kill, crash, misfire, history.

The scheduler's wall clock is derived from the event loop's clock, so memory runs on virtual time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import pytest

from coordkit import (
    Backend,
    Compare,
    JobSpec,
    Op,
    OwnershipLostError,
    Put,
    RunContext,
    RunRecord,
    Scheduler,
    Session,
    Snapshot,
    TxnResult,
    Watch,
)
from coordkit.testing import Harness

from .helpers import Counted

pytestmark = pytest.mark.anyio

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def loop_clock() -> datetime:
    return BASE + timedelta(seconds=anyio.current_time())


@asynccontextmanager
async def workers(harness: Harness, prefix: str, count: int, **options: object) -> AsyncIterator[list[Scheduler]]:
    async with AsyncExitStack() as stack:
        out = []
        for i in range(count):
            client = await stack.enter_async_context(harness.client())
            session = await stack.enter_async_context(Session(client, ttl=2))
            scheduler = Scheduler(session, prefix, worker=f"w{i}", now=loop_clock, **options)  # type: ignore[arg-type]
            out.append(scheduler)
        yield out


async def wait_outcome(scheduler: Scheduler, prefix: str, job: str, outcome: str) -> None:
    """Follow the job's run records until one has ``outcome`` (another worker writes it)."""
    runs = f"{prefix}/runs/{job}/".encode()
    async with Watch(scheduler.session.backend, runs, prefix=True) as watch:
        async for item in watch:
            kvs = item.kvs if isinstance(item, Snapshot) else tuple(e.kv for e in item.events)
            if any(kv.value and json.loads(kv.value)["outcome"] == outcome for kv in kvs):
                return


async def test_each_tick_runs_once_across_workers(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "cron"
    runs: list[tuple[str, datetime]] = []

    async def job(context: RunContext) -> None:
        runs.append((context.worker, context.tick))

    async with workers(harness, prefix, 3) as group, AsyncExitStack() as running:
        for scheduler in group:
            scheduler.register("job", job)
            await running.enter_async_context(scheduler)
        # overlap="allow": this checks the claims alone (under "forbid" a slow final write would skip a tick)
        await group[0].put_job(JobSpec("tick", "job", interval=0.5, overlap="allow"))
        await anyio.sleep(3.1)
        history = await group[0].history("tick")
    ticks = [tick for _, tick in runs]
    assert len(ticks) >= 5 and len(set(ticks)) == len(ticks), "no tick ran twice"
    gaps = {(b - a).total_seconds() for a, b in zip(sorted(ticks), sorted(ticks)[1:], strict=False)}
    assert gaps == {0.5}, f"no tick skipped: {gaps}"
    assert [r.outcome for r in history if r.outcome != "running"] == ["ok"] * len([r for r in history if r.ended])
    assert {r.tick for r in history} >= {t.isoformat() for t in ticks[:-1]}


@asynccontextmanager
async def counted_workers(
    harness: Harness, prefix: str, count: int, *, ttl: int = 5
) -> AsyncIterator[list[tuple[Scheduler, Counted]]]:
    """Workers whose clients count their requests (and keep the writes of their txns)."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(count):
            client = Counted(await stack.enter_async_context(harness.client()))
            session = await stack.enter_async_context(Session(client, ttl=ttl))
            out.append((Scheduler(session, prefix, worker=f"w{i}", now=loop_clock), client))
        yield out


def claims(client: Counted) -> int:
    """The claim transactions a worker sent (each writes the job's ``last/`` key)."""
    return sum(any(isinstance(op, Put) and b"/last/" in op.key for op in ops) for ops in client.writes)


async def test_one_worker_claims_each_tick_and_the_ticks_spread(harness: Harness) -> None:
    """Each tick is claimed by the first worker of its line (rendezvous hashing over the live workers): about
    one claim transaction per tick, not one per worker, and the ticks spread over the workers."""
    prefix = harness.namespace.decode() + "line"
    runs: list[tuple[str, datetime]] = []

    async def job(context: RunContext) -> None:
        runs.append((context.worker, context.tick))

    async with counted_workers(harness, prefix, 3) as group, AsyncExitStack() as running:
        for scheduler, _ in group:
            scheduler.register("job", job)
            await running.enter_async_context(scheduler)
        with anyio.fail_after(10):  # every worker knows the others before the job ticks
            for scheduler, _ in group:
                while len(scheduler._peers) < 3:  # noqa: ASYNC110 - a test waiting on the worker's own state
                    await anyio.sleep(0.05)
        await group[0][0].put_job(JobSpec("tick", "job", interval=0.5, overlap="allow"))
        await anyio.sleep(6.1)
    ticks = [tick for _, tick in runs]
    assert len(ticks) >= 10 and len(set(ticks)) == len(ticks), "no tick ran twice"
    sent = sum(claims(client) for _, client in group)
    assert sent <= len(ticks) + 3, f"{sent} claims for {len(ticks)} ticks: one worker claims each"
    assert len({worker for worker, _ in runs}) >= 2, "the ticks spread over the workers"
    record_reads = [r for _, client in group for r in client.reads if b"/runs/" in r.key and not r.prefix]
    assert record_reads == [], "a run that ended is seen ended in the watch: nobody reads its record"


async def test_a_tick_runs_when_the_first_worker_of_its_line_cannot_claim(harness: Harness) -> None:
    """One of three workers is cut off from the store (its claims hang, its lease outlives the test): the ticks
    it is first in line for are claimed by another worker after the hand-off delay; every tick runs once."""
    prefix = harness.namespace.decode() + "handoff"
    runs: list[tuple[str, datetime]] = []

    async def job(context: RunContext) -> None:
        runs.append((context.worker, context.tick))

    async with counted_workers(harness, prefix, 3, ttl=60) as group, AsyncExitStack() as running:
        for scheduler, _ in group:
            scheduler.register("job", job)
            await running.enter_async_context(scheduler)
        with anyio.fail_after(10):
            for scheduler, _ in group:
                while len(scheduler._peers) < 3:  # noqa: ASYNC110 - a test waiting on the worker's own state
                    await anyio.sleep(0.05)
        cut = group[0][1]
        harness.partition(cut.inner)
        await group[1][0].put_job(JobSpec("tick", "job", interval=1, overlap="allow"))
        await anyio.sleep(8.1)
        ticks = sorted(tick for _, tick in runs)
        harness.heal(cut.inner)
    assert len(ticks) >= 7 and len(set(ticks)) == len(ticks), "no tick ran twice"
    assert {(b - a).total_seconds() for a, b in pairwise(ticks)} == {1.0}, "no tick was lost"
    assert {worker for worker, _ in runs} <= {"w1", "w2"}


async def test_spec_changes_apply_live_and_kill(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "live"
    started = anyio.Event()
    async with workers(harness, prefix, 2) as group, AsyncExitStack() as running:
        ran: list[str] = []

        async def fast(context: RunContext, label: str) -> None:
            ran.append(label)

        async def slow(context: RunContext) -> None:
            started.set()
            await anyio.sleep(60)

        for scheduler in group:
            scheduler.register("fast", fast)
            scheduler.register("slow", slow)
            await running.enter_async_context(scheduler)
        await group[0].put_job(JobSpec("job", "fast", interval=1, args=["v1"]))
        await anyio.sleep(2.2)
        await group[0].put_job(JobSpec("job", "fast", interval=1, args=["v2"]))
        await anyio.sleep(2.2)
        await group[0].put_job(JobSpec("job", "fast", interval=1, enabled=False))
        await anyio.sleep(1.1)  # a tick claimed before the workers saw the change may still run
        count = len(ran)
        await anyio.sleep(2.2)
        assert len(ran) == count, "a disabled job does not tick"
        assert "v1" in ran and "v2" in ran and ran.index("v2") > ran.index("v1")
        await group[1].put_job(JobSpec("long", "slow", interval=1))
        with anyio.fail_after(5):
            await started.wait()
        killed_at = anyio.current_time()
        await group[1].kill("long")
        await group[1].remove_job("long")
        with anyio.fail_after(5):
            await wait_outcome(group[0], prefix, "long", "killed")
        assert anyio.current_time() - killed_at < 2


async def test_crashed_worker_run_is_recorded_lost(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "crash"
    async with harness.client() as crashing, harness.client() as other_client:
        async with Session(other_client, ttl=5) as other_session:
            watcher = Scheduler(other_session, prefix, worker="watcher", now=loop_clock)
            started = anyio.Event()

            async def hang(context: RunContext) -> None:
                started.set()
                await anyio.sleep_forever()

            async with watcher, anyio.create_task_group() as tg:

                async def doomed() -> None:
                    async with Session(crashing, ttl=2) as session:
                        scheduler = Scheduler(session, prefix, worker="doomed", now=loop_clock)
                        scheduler.register("hang", hang)
                        with pytest.raises(OwnershipLostError):  # cut off: its session is lost, and it says so
                            async with scheduler:
                                await scheduler.put_job(JobSpec("job", "hang", interval=1))
                                await anyio.sleep_forever()

                tg.start_soon(doomed)
                with anyio.fail_after(5):
                    await started.wait()
                harness.partition(crashing)
                with anyio.fail_after(2 + 2):
                    await wait_outcome(watcher, prefix, "job", "lost")
                (lost,) = [r for r in await watcher.history("job") if r.outcome == "lost"]
                assert lost.worker == "doomed"
                harness.heal(crashing)
                tg.cancel_scope.cancel()


async def test_misfire_policies_and_history_retention(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "misfire"
    ran: list[tuple[str, datetime]] = []

    async def job(context: RunContext) -> None:
        ran.append((context.job, context.tick))

    async with workers(harness, prefix, 1, history=3) as (scheduler,):
        scheduler.register("job", job)
        # Specs published while no worker runs: their last tick (up to 60 s ago) was missed.
        await scheduler.put_job(JobSpec("late", "job", interval=60, misfire="late"))
        await scheduler.put_job(JobSpec("skip", "job", interval=60, misfire="skip"))
        await scheduler.put_job(JobSpec("often", "job", interval=0.5))
        started = loop_clock()
        async with scheduler:
            await anyio.sleep(3)
        # Only ticks before the worker started count: a tick of the 3 s window itself (one in 20 windows on real
        # time) runs on time, whatever the misfire policy.
        missed = [name for name, tick in ran if tick <= started]
        assert missed.count("late") == 1, "the missed tick ran once, late"
        assert missed.count("skip") == 0, "the missed tick was skipped"
        records = await scheduler.history("often")
        if records and records[-1].outcome == "running":
            records.pop()  # claimed just before the exit cancelled it: its end (and the trim after it) never came
        assert len(records) == 3, "history keeps the newest 3 runs"


def test_job_spec_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JobSpec("x", "t")
    with pytest.raises(ValueError, match="cron"):
        JobSpec("x", "t", cron="not a cron")
    with pytest.raises(ValueError, match="no '/'"):
        JobSpec("a/b", "t", interval=1)
    spec = JobSpec("x", "t", cron="*/5 * * * *")
    assert spec.next_tick(BASE) == BASE + timedelta(minutes=5)
    assert JobSpec("y", "t", interval=10).next_tick(BASE) == BASE + timedelta(seconds=10)


async def test_spec_change_lets_the_running_run_finish_and_trimmed_ticks_never_rerun(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "finish"
    runs: list[datetime] = []
    started = anyio.Event()

    async def slow(context: RunContext) -> None:
        runs.append(context.tick)
        started.set()
        await anyio.sleep(1.5)

    async with workers(harness, prefix, 2, history=1) as group, AsyncExitStack() as running:
        for scheduler in group:
            scheduler.register("slow", slow)
            await running.enter_async_context(scheduler)
        await group[0].put_job(JobSpec("job", "slow", interval=1, misfire="late", overlap="allow"))
        with anyio.fail_after(5):
            await started.wait()
        await group[0].put_job(
            JobSpec("job", "slow", interval=1, misfire="late", overlap="allow")
        )  # unchanged: no restart
        await group[0].put_job(
            JobSpec("job", "slow", interval=2, misfire="late", overlap="allow")
        )  # changed: the run goes on
        await anyio.sleep(3)
        await group[0].remove_job("job")
        await anyio.sleep(2)
        history = await group[0].history("job")
    assert runs and len(set(runs)) == len(runs), "no tick ran twice, even with history=1 and late misfires"
    assert history[-1].outcome == "ok", "a spec change does not kill the running instance"


async def test_stopped_worker_with_late_policy_does_not_rerun_trimmed_ticks(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "rerun"
    runs: list[datetime] = []

    async def job(context: RunContext) -> None:
        runs.append(context.tick)

    async with workers(harness, prefix, 1, history=1) as (scheduler,):
        scheduler.register("job", job)
        await scheduler.put_job(JobSpec("job", "job", interval=1, misfire="late"))
        for _ in range(3):  # the worker restarts: each time the previous tick may be offered late
            async with scheduler:
                await anyio.sleep(2.2)
    assert len(set(runs)) == len(runs)


def test_fractional_interval_ticks_always_advance() -> None:
    """Regression: float arithmetic once rounded 0.1 s ticks onto each other (an endless loop)."""
    spec = JobSpec("x", "t", interval=0.1)
    tick = BASE + timedelta(seconds=12345.678901)
    for _ in range(1000):
        following = spec.next_tick(tick)
        assert timedelta(0) < following - tick <= timedelta(seconds=0.1)
        assert spec.previous_tick(following) == following
        tick = following


# -- per-run identity and kill -----------------------------------------------------------------------------


async def until(scheduler: Scheduler, job: str, predicate: Callable[[list[RunRecord]], bool]) -> list[RunRecord]:
    """Follow the job's run records until ``predicate(history)`` holds; return that history."""
    runs = f"{scheduler.prefix}/runs/{job}/".encode()
    async with Watch(scheduler.session.backend, runs, prefix=True) as watch:
        async for _ in watch:
            history = await scheduler.history(job)
            if predicate(history):
                return history
    raise AssertionError("unreachable")


def outcomes(history: list[RunRecord]) -> list[str]:
    return [r.outcome for r in history]


async def test_kill_reaches_every_run_on_every_worker_or_one_run(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "killall"
    active: set[str] = set()

    async def hang(context: RunContext) -> None:
        active.add(context.run)
        try:
            await anyio.sleep_forever()
        finally:
            active.discard(context.run)

    async with workers(harness, prefix, 2) as group, AsyncExitStack() as running:
        for scheduler in group:
            scheduler.register("hang", hang)
            await running.enter_async_context(scheduler)
        admin = group[0]
        await admin.put_job(JobSpec("job", "hang", interval=0.5, overlap="allow"))
        with anyio.fail_after(10):
            history = await until(admin, "job", lambda h: outcomes(h).count("running") >= 3)
        await admin.put_job(JobSpec("job", "hang", interval=0.5, overlap="allow", enabled=False))  # no new runs
        first = history[0]
        assert first.run and len({r.run for r in history}) == len(history), "every run has its own id"
        await admin.kill("job", run=first.run)
        with anyio.fail_after(5):
            history = await until(admin, "job", lambda h: h[0].outcome == "killed")
        assert "running" in outcomes(history[1:]), "a kill of one run leaves the others running"
        assert {r.worker for r in history if r.outcome == "running"} == {"w0", "w1"} or len(history) >= 3
        await admin.kill("job")
        with anyio.fail_after(5):
            history = await until(admin, "job", lambda h: "running" not in outcomes(h))
        assert set(outcomes(history)) == {"killed"}
        assert not active, "every run was cancelled"


class ClaimThenKill:
    """A client whose first run claim answers only after a kill request written after it reached the worker."""

    def __init__(self, inner: Backend, on_claim: Callable[[], Awaitable[None]]) -> None:
        self.inner = inner
        self.name = inner.name
        self.on_claim: Callable[[], Awaitable[None]] | None = on_claim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        result = await self.inner.txn(compare, success, failure)
        claims_run = any(isinstance(op, Put) and b"/running/" in op.key for op in success)
        if self.on_claim is not None and result.succeeded and claims_run:
            on_claim, self.on_claim = self.on_claim, None
            await on_claim()
        return result


async def test_a_kill_that_arrives_before_the_run_registers_still_kills_it(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "race"
    started = anyio.Event()

    async def hang(context: RunContext) -> None:
        started.set()
        await anyio.sleep_forever()

    async with harness.client() as admin_client, harness.client() as client:
        async with Session(admin_client, ttl=5) as admin_session:
            admin = Scheduler(admin_session, prefix, now=loop_clock)
            holder: list[Scheduler] = []

            async def kill_and_wait_until_seen() -> None:
                await admin.kill("job")
                # Until the worker has seen the request (internal state: there is no event to wait on).
                while "job" not in holder[0]._kills:  # noqa: ASYNC110
                    await anyio.sleep(0.01)

            racy = ClaimThenKill(client, kill_and_wait_until_seen)
            async with Session(racy, ttl=5) as session:
                worker = Scheduler(session, prefix, worker="w", now=loop_clock)
                holder.append(worker)
                worker.register("hang", hang)
                async with worker:
                    await admin.put_job(JobSpec("job", "hang", interval=10, misfire="late"))
                    with anyio.fail_after(5):
                        history = await until(admin, "job", lambda h: bool(h) and h[0].outcome != "running")
                    assert outcomes(history) == ["killed"]
                    assert not started.is_set(), "the run was cancelled before its function started"


# -- overlap policies and starting deadlines -----------------------------------------------------------------


async def test_overlap_forbid_is_cluster_wide_and_records_skipped_ticks(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "forbid"
    active: list[str] = []
    most = 0

    async def slow(context: RunContext) -> None:
        nonlocal most
        active.append(context.worker)
        most = max(most, len(active))
        try:
            await anyio.sleep(1.2)
        finally:
            active.remove(context.worker)

    async with workers(harness, prefix, 2) as group, AsyncExitStack() as running:
        for scheduler in group:
            scheduler.register("slow", slow)
            await running.enter_async_context(scheduler)
        await group[0].put_job(JobSpec("job", "slow", interval=0.5))  # overlap="forbid" by default
        with anyio.fail_after(10):
            history = await until(group[0], "job", lambda h: outcomes(h).count("ok") >= 2)
    assert most == 1, "never two runs of the job at once, on one worker or on two"
    assert "skipped" in outcomes(history), "ticks during a run are recorded as skipped"
    assert len({r.tick for r in history}) == len(history)


async def test_overlap_replace_kills_the_active_run(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "replace"

    async def hang(context: RunContext) -> None:
        await anyio.sleep_forever()

    async with workers(harness, prefix, 2) as group, AsyncExitStack() as running:
        for scheduler in group:
            scheduler.register("hang", hang)
            await running.enter_async_context(scheduler)
        await group[0].put_job(JobSpec("job", "hang", interval=0.5, overlap="replace"))
        with anyio.fail_after(10):
            history = await until(group[0], "job", lambda h: outcomes(h).count("killed") >= 2)
    assert outcomes(history)[:2] == ["killed", "killed"], "each run is replaced by the next"
    assert outcomes(history).count("running") <= 2


async def test_a_tick_later_than_its_starting_deadline_is_recorded_missed(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "deadline"
    skew = timedelta(0)
    ran: list[datetime] = []

    def clock() -> datetime:
        return loop_clock() + skew

    async def job(context: RunContext) -> None:
        ran.append(context.tick)

    async with harness.client() as client, Session(client, ttl=5) as session:
        scheduler = Scheduler(session, prefix, worker="w", now=clock, misfire_grace=60)
        scheduler.register("job", job)
        async with scheduler:
            await scheduler.put_job(JobSpec("job", "job", interval=1, starting_deadline=0.3))
            with anyio.fail_after(5):
                await until(scheduler, "job", lambda h: outcomes(h) == ["ok"])
            # The wall clock jumps: the next tick is found 3.6 s late, and the 3 after it are past too.
            skew = timedelta(seconds=3.6)
            with anyio.fail_after(5):
                history = await until(scheduler, "job", lambda h: len(h) == 3 and h[-1].outcome == "ok")
    assert outcomes(history) == ["ok", "missed", "ok"], "one record for the 4 missed ticks: the newest"
    assert len(ran) == 2


# -- command jobs: real processes --------------------------------------------------------------------------


def real_wait(kind: str) -> float:
    """A bound for waiting on real processes. On virtual time (memory), the clock runs ahead while a process
    works, in steps of the session's keepalives: a bound of 10^4 virtual seconds is a few real seconds.
    """
    return 10_000 if kind == "memory" else 10


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # gone (reading a vanishing process's stat can also fail with ESRCH)
        return False


async def pids_written(directory: Path, *names: str) -> list[int]:
    """Wait until the command has written its PIDs (a real process, on the real clock)."""
    while not all((directory / name).exists() and (directory / name).read_text().strip() for name in names):  # noqa: ASYNC110
        await anyio.sleep(0.02)
    return [int((directory / name).read_text()) for name in names]


async def all_dead(pids: list[int]) -> None:
    while any(alive(pid) for pid in pids):  # noqa: ASYNC110 - nothing to wait on: processes we did not start
        await anyio.sleep(0.02)


async def test_command_jobs_run_only_where_allowed_and_keep_status_and_output(harness: Harness, kind: str) -> None:
    prefix = harness.namespace.decode() + "command"
    async with harness.client() as c0, harness.client() as c1, Session(c0, ttl=5) as s0, Session(c1, ttl=5) as s1:
        refusing = Scheduler(s0, prefix, worker="refusing", now=loop_clock)
        running = Scheduler(s1, prefix, worker="running", now=loop_clock, run_commands=True)
        async with refusing, running:
            line = "yes abcdefgh | head -c 10000; printf END; printf oops >&2; exit 3"
            await refusing.put_job(JobSpec("line", command=line, interval=1000, misfire="late"))
            await refusing.put_job(
                JobSpec("argv", command=["sh", "-c", "echo $COORDKIT_JOB"], interval=1000, misfire="late")
            )
            await refusing.put_job(JobSpec("absent", command=["/nonexistent/x"], interval=1000, misfire="late"))
            with anyio.fail_after(real_wait(kind)):
                for job in ("line", "argv", "absent"):
                    await until(refusing, job, lambda h: bool(h) and h[0].outcome != "running")
            # The first run of each (on memory the virtual clock runs on while real processes work, so a later
            # tick may have run as well).
            line_run = (await refusing.history("line"))[0]
            argv_run = (await refusing.history("argv"))[0]
            absent_run = (await refusing.history("absent"))[0]
    assert {line_run.worker, argv_run.worker, absent_run.worker} == {"running"}, "only the opted-in worker runs them"
    assert (line_run.outcome, line_run.exit_status, line_run.error) == ("error", 3, "exit status 3")
    assert line_run.stdout is not None and len(line_run.stdout) == 4096 and line_run.stdout.endswith("abcdefgh\naEND")
    assert line_run.stderr == "oops"
    assert (argv_run.outcome, argv_run.exit_status, argv_run.stdout) == ("ok", 0, "argv\n")
    assert absent_run.outcome == "error" and absent_run.exit_status == 127
    assert absent_run.error is not None and "not found" in absent_run.error


async def test_kill_and_timeout_end_a_commands_whole_process_group(harness: Harness, kind: str, tmp_path: Path) -> None:
    prefix = harness.namespace.decode() + "group"
    line = f"echo $$ > {tmp_path}/$COORDKIT_JOB.sh; sleep 1000 & echo $! > {tmp_path}/$COORDKIT_JOB.child; wait"
    async with workers(harness, prefix, 1, run_commands=True) as (scheduler,), scheduler:
        await scheduler.put_job(JobSpec("killed", command=line, interval=1000, misfire="late"))
        with anyio.fail_after(real_wait(kind)):
            pids = await pids_written(tmp_path, "killed.sh", "killed.child")
        assert all(alive(pid) for pid in pids)
        await scheduler.kill("killed")
        with anyio.fail_after(real_wait(kind)):
            # The first run (on memory the virtual clock runs on while real processes work: a later tick may
            # have started by now).
            run = (await until(scheduler, "killed", lambda h: h[0].outcome != "running"))[0]
            await all_dead(pids)
        assert run.outcome == "killed" and run.exit_status == 128 + signal.SIGTERM
        # A time limit ends the group too; its shell may not even have started on virtual time.
        await scheduler.put_job(JobSpec("slow", command=line, interval=1000, misfire="late", timeout=0.5))
        with anyio.fail_after(real_wait(kind)):
            run = (await until(scheduler, "slow", lambda h: bool(h) and h[0].outcome != "running"))[0]
        assert run.outcome == "timeout"
        written = [name for name in ("slow.sh", "slow.child") if (tmp_path / name).exists()]
        with anyio.fail_after(real_wait(kind)):
            await all_dead(await pids_written(tmp_path, *written))


async def test_a_command_ignoring_sigterm_dies_by_the_lease_deadline_when_the_session_is_lost(
    harness: Harness, kind: str, tmp_path: Path
) -> None:
    prefix = harness.namespace.decode() + "lease"
    line = f"trap '' TERM; sleep 1000 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/sh; wait; wait"
    async with harness.client() as client, Session(client, ttl=2) as session, anyio.create_task_group() as tg:
        scheduler = Scheduler(session, prefix, now=loop_clock, run_commands=True, stop_grace=1000)

        async def work() -> None:
            with pytest.raises(OwnershipLostError):
                async with scheduler:
                    await scheduler.put_job(JobSpec("job", command=line, interval=1000, misfire="late"))
                    await anyio.sleep_forever()

        tg.start_soon(work)
        with anyio.fail_after(real_wait(kind)):
            pids = await pids_written(tmp_path, "child", "sh")
        harness.partition(client)  # the session will be lost; SIGTERM is ignored; SIGKILL by the lease's end
        with anyio.fail_after(real_wait(kind)):
            await all_dead(pids)
        harness.heal(client)


# -- reading the state; records written by someone else -----------------------------------------------------


def kept_for(age: timedelta) -> Callable[[list[RunRecord]], bool]:
    """A history predicate: records kept, none older than ``age`` before the newest."""

    def holds(history: list[RunRecord]) -> bool:
        if not history:
            return False
        newest = datetime.fromisoformat(history[-1].tick)
        return all(newest - datetime.fromisoformat(r.tick) <= age for r in history)

    return holds


async def test_jobs_job_and_history_retention_by_count_and_age_despite_bad_records(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "state"
    ran: list[str] = []

    async def job(context: RunContext) -> None:
        ran.append(context.job)

    async with harness.client() as client, Session(client, ttl=5) as session:
        scheduler = Scheduler(session, prefix, worker="w", now=loop_clock, history_age=1.2)
        scheduler.register("job", job)
        backend = session.backend
        base = prefix.encode() + b"/"
        # Written by another tool: not JSON, JSON but no spec, a record that is not a record.
        await backend.txn([], [Put(base + b"jobs/garbage", b"{not json"), Put(base + b"jobs/odd", b'{"name": 1}')])
        elsewhere = json.dumps(asdict(JobSpec("often", "job", interval=0.5)))  # at another job's key
        await backend.txn([], [Put(base + b"jobs/mismatch", elsewhere.encode())])
        await backend.txn([], [Put(base + b"runs/often/0000000000000001", b"[]")])
        old = {"job": "hourly", "tick": "t", "worker": "w", "started": "s", "ended": None, "outcome": "lost"}
        await backend.txn([], [Put(base + b"runs/hourly/0000000000000002", json.dumps(old).encode())])
        often = JobSpec("often", "job", interval=0.5)
        hourly = JobSpec("hourly", "job", cron="0 * * * *", timezone="Europe/Paris")
        await scheduler.put_job(often)
        await scheduler.put_job(hourly)
        assert await scheduler.jobs() == [hourly, often], "valid specs, by name; the others are left out"
        assert await scheduler.job("often") == often
        assert await scheduler.job("absent") is None
        (record,) = await scheduler.history("hourly")
        assert record.run == "0000000000000002", "a record from before run ids gets its id from its key"
        with pytest.raises(ValueError, match="invalid"):
            await scheduler.job("odd")
        with pytest.raises(ValueError, match="names another job"):
            await scheduler.job("mismatch")
        async with scheduler:  # the bad specs do not stop the worker
            await anyio.sleep(2.6)
            # Trimmed after each run ends: the newest run may not have ended (and trimmed) yet when we look, so
            # follow the records until a trim has caught up (it must, within a few runs).
            with anyio.fail_after(5):  # a trim follows every run's end, every 0.5 s
                history = await until(scheduler, "often", kept_for(timedelta(seconds=1.2)))
        assert len(ran) >= 4 and 0 < len(history) < len(ran)


# -- cron expressions ---------------------------------------------------------------------------------------


def test_cron_fields_are_never_ambiguous() -> None:
    with pytest.raises(ValueError, match=r"ambiguous.*cron_seconds=True"):
        JobSpec("x", "t", cron="* * * * * */10")  # croniter would read the last field as seconds
    with pytest.raises(ValueError, match="6 fields, seconds first"):
        JobSpec("x", "t", cron="*/5 * * * *", cron_seconds=True)
    with pytest.raises(ValueError, match="5 fields"):
        JobSpec("x", "t", cron="* * * * * * *")
    with pytest.raises(ValueError, match="no seconds field"):
        JobSpec("x", "t", cron="@hourly", cron_seconds=True)
    with pytest.raises(ValueError, match="unknown time zone"):
        JobSpec("x", "t", cron="0 2 * * *", timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="cron jobs only"):
        JobSpec("x", "t", interval=1, timezone="UTC")
    seconds_first = JobSpec("x", "t", cron="*/10 5 * * * *", cron_seconds=True)  # robfig/cron: second minute ...
    assert seconds_first.next_tick(BASE) == BASE + timedelta(minutes=5)
    assert seconds_first.next_tick(BASE + timedelta(minutes=5)) == BASE + timedelta(minutes=5, seconds=10)
    assert JobSpec("x", "t", cron="@hourly").next_tick(BASE) == BASE + timedelta(hours=1)


def test_cron_in_a_time_zone() -> None:
    paris = JobSpec("x", "t", cron="0 2 * * *", timezone="Europe/Paris")
    assert paris.next_tick(BASE) == datetime(2026, 1, 1, 1, tzinfo=UTC), "02:00 in Paris is 01:00 UTC in winter"
    assert paris.next_tick(datetime(2026, 6, 30, 12, tzinfo=UTC)) == datetime(2026, 7, 1, 0, tzinfo=UTC), "summer"
    assert paris.previous_tick(datetime(2026, 1, 1, 1, tzinfo=UTC)) == datetime(2026, 1, 1, 1, tzinfo=UTC)


def test_command_and_target_specs() -> None:
    with pytest.raises(ValueError, match="exactly one of target and command"):
        JobSpec("x", "t", command="true", interval=1)
    with pytest.raises(ValueError, match="exactly one of target and command"):
        JobSpec("x", interval=1)
    with pytest.raises(TypeError, match="argv"):
        JobSpec("x", command=["ls", 3], interval=1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="overlap"):
        JobSpec("x", "t", interval=1, overlap="queue")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        JobSpec("x", "t", interval=1, timeout=-1)
    with pytest.raises(ValueError, match="starting_deadline"):
        JobSpec("x", "t", interval=1, starting_deadline=float("nan"))


# -- workers -------------------------------------------------------------------------------------------------


async def test_workers_are_listed_with_what_they_run_and_keep_to_their_capacity(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "workers"

    async def hang(context: RunContext) -> None:
        await anyio.sleep_forever()

    async with harness.client() as c0, harness.client() as c1, Session(c0, ttl=5) as s0, Session(c1, ttl=5) as s1:
        small = Scheduler(s0, prefix, worker="small", now=loop_clock, capacity=1)
        large = Scheduler(s1, prefix, worker="large", now=loop_clock, run_commands=True)
        for scheduler in (small, large):
            scheduler.register("hang", hang)
        assert await small.workers() == []
        async with small, large:
            await small.put_job(JobSpec("job", "hang", interval=0.5, overlap="allow"))
            with anyio.fail_after(10):
                history = await until(small, "job", lambda h: outcomes(h).count("running") >= 5)
            assert sum(r.worker == "small" for r in history) <= 1, "small takes one run at most"
            await small.put_job(JobSpec("job", "hang", interval=0.5, overlap="allow", enabled=False))
            with anyio.fail_after(10):
                while True:  # the workers announce their runs (coalesced updates): wait until they agree
                    found = await large.workers()
                    history = await small.history("job")
                    running = {(r.job, r.run) for r in history if r.outcome == "running"}
                    if {run for info in found for run in info.running} == running:
                        break
                    await anyio.sleep(0.05)
            assert [(info.worker, info.capacity, info.commands) for info in found] == [
                ("large", None, True),
                ("small", 1, False),
            ]
            assert all(info.pid == os.getpid() and info.host and info.version for info in found)
            await small.kill("job")
        assert await small.workers() == [], "a stopped worker leaves the group"
    with pytest.raises(ValueError, match="capacity"):
        Scheduler(s0, prefix, capacity=0)


WORKER = """
import sys

import anyio

from coordkit import JobSpec, MemoryBackend, Scheduler, Session


async def main() -> None:
    async with MemoryBackend() as backend, Session(backend, ttl=10) as session:
        async with Scheduler(session, "cron", run_commands=True) as scheduler:
            await scheduler.put_job(JobSpec("job", command=sys.argv[1], interval=1000, misfire="late"))
            await anyio.sleep_forever()


anyio.run(main)
"""


def test_a_command_dies_with_its_worker_killed_by_sigkill(tmp_path: Path) -> None:
    """The worker gets no chance to stop the command: the command's guardian kills its group (Linux)."""
    line = f"trap '' TERM; sleep 1000 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/sh; wait; wait"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, line], env=env)
    pids: list[int] = []
    try:
        bound = time.monotonic() + 20  # real processes, real time: a bound, not a measure
        while not all((tmp_path / name).exists() and (tmp_path / name).read_text().strip() for name in ("child", "sh")):
            assert time.monotonic() < bound and worker.poll() is None, "the command did not start"
            time.sleep(0.02)
        pids = [int((tmp_path / name).read_text()) for name in ("child", "sh")]
        worker.kill()
        worker.wait()
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < bound, "the command outlived its worker"
            time.sleep(0.02)
    finally:
        worker.kill()
        worker.wait()
        for pid in pids:  # clean up what a failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
