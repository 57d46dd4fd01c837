"""Randomized fault schedules on MemoryBackend, in virtual time, checked by tests/history.py (issue 8).

A schedule is a seed. It runs a few clients, each a simulated process (its own `MemoryBackend` client of one
shared `MemoryStore`, its own `Session`) whose tasks loop over lock, semaphore, election, run_while_leader,
once() and config work (compare-and-swap publishes, short-lived extra views) while the process follows the
config, the election and a membership group it belongs to. Meanwhile a fault driver, at random virtual times,
pauses clients (partitions, often until just around their session's deadline), starves their keepalives,
expires leases by force, breaks watch streams, compacts (also while a client is cut off), adds latency and
failing calls, cancels work and crashes clients mid-operation (a crashed client is cut off for good and replaced
by a new incarnation). Then the faults heal and the work stops (within a bound: a waiter stuck after the faults
are gone is a failure), the observers must converge on the store and every lock, permit, candidate and claim key
must be gone, and the checker (tests/history.py) runs over the whole history.

``COORDKIT_CHAOS_SCHEDULES=N`` runs N schedules (default 300); ``COORDKIT_CHAOS_SEED=S`` replays schedule S alone.
Each schedule is bounded in virtual time and, by a watchdog thread, in real time: a hang fails with its seed.
"""

from __future__ import annotations

import faulthandler
import os
import random
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import hypothesis  # noqa: F401  (see run_schedule: importing it makes trio's scheduling deterministic)
import pytest
import trio
import trio._core._run
from trio.testing import MockClock

from coordkit import (
    Barrier,
    Compare,
    ConfigView,
    Delete,
    Election,
    Group,
    Leadership,
    LeaseExpiredError,
    Lock,
    MemberExistsError,
    MemoryBackend,
    MemoryStore,
    NotOwnerError,
    OwnershipLostError,
    Put,
    Range,
    ReadWriteLock,
    Semaphore,
    Session,
    UnavailableError,
    once,
    publish,
    run_while_leader,
)

from .history import (
    ORDERED_KINDS,
    BarrierWait,
    Counts,
    History,
    Hold,
    Increment,
    Kind,
    OnceResult,
    Oracle,
    Outcome,
    Stamp,
    Trace,
    Violation,
    caught_up,
    check,
    leaked,
)

pytestmark = pytest.mark.chaos

SCHEDULES = int(os.environ.get("COORDKIT_CHAOS_SCHEDULES", "300"))
REPLAY_SEED = os.environ.get("COORDKIT_CHAOS_SEED")
PER_TEST = 25  # schedules per test item
REAL_TIME_LIMIT = 60.0  # real seconds one schedule may take before it counts as hung
QUIESCE = 60.0  # virtual seconds the work gets to stop once the faults are healed
CONVERGE = 30.0  # virtual seconds the observers get to show the store's final state
ONCE_NAMES = 4
FAULTS = (
    "pause",
    "keepalive loss",
    "forced expiry",
    "watch break",
    "compaction",
    "latency",
    "failing calls",
    "cancel",
    "crash",
    "lost replies",
    "late replies",
)
FAULT_WEIGHTS = (2, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1)  # the lease faults most: they test the guarantees that matter most
#: What a client's work may raise under faults; anything else fails the schedule.
EXPECTED = (OwnershipLostError, UnavailableError, LeaseExpiredError, NotOwnerError)


class Flaky(Exception):
    """The deliberate failure of a once() computation (another caller must compute instead)."""


def replay_command(seed: int) -> str:
    return f"COORDKIT_CHAOS_SEED={seed} .venv/bin/pytest tests/test_chaos.py"


@dataclass(frozen=True, slots=True)
class Plan:
    """The shape of one schedule, drawn from its seed."""

    seed: int
    clients: int
    ttl: int
    workers: int  # work loops per client process (tasks of one process contend like processes)
    permits: int
    work: float  # virtual seconds of work under faults
    fault_gap: float  # mean virtual seconds between faults

    @classmethod
    def draw(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        return cls(
            seed,
            clients=rng.randint(2, 4),
            ttl=rng.randint(2, 4),
            workers=rng.randint(1, 2),
            permits=rng.randint(1, 2),
            work=rng.uniform(3.0, 7.0),
            fault_gap=rng.uniform(0.4, 1.5),
        )


@dataclass(eq=False)
class Process:
    """One incarnation of a client, until it crashes, loses its session, or the schedule ends."""

    client: int
    incarnation: int
    backend: MemoryBackend
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)  # cancelled: the process crashes
    done: anyio.Event = field(default_factory=anyio.Event)  # crashed, finished, or idle at the end
    session: Session | None = None
    view: ConfigView[Any] | None = None
    work: list[anyio.CancelScope] = field(default_factory=list)  # a list: replays must not depend on ids
    traces: list[Trace] = field(default_factory=list)
    crashed: bool = False
    lingering: bool = False

    @property
    def name(self) -> str:
        return f"c{self.client}.{self.incarnation}"

    @property
    def live_session(self) -> Session:
        assert self.session is not None, "work runs inside the session"
        return self.session


class Schedule:
    """One seeded run: clients doing work, a fault driver, then quiescence, convergence and the checker."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.store = MemoryStore(seed=plan.seed)
        prefixes = [b"ctr/", b"cfg/", b"elect/", b"grp/", b"once/", b"lock/", b"sem/", b"cron/", b"rw/", b"bar/"]
        self.oracle = Oracle(self.store, prefixes)
        self.history = History()
        self.history.released = [
            b"lock/",
            b"rw/",
            b"bar/",
            b"sem/",
            b"elect/",
            b"cron/",
            *(f"once/{n}/claim".encode() for n in range(ONCE_NAMES)),
        ]
        self.violations: list[Violation] = []
        self.stats: Counter[str] = Counter()
        self.processes: list[Process] = []
        self.stopping = False
        self.released = anyio.Event()
        self._unsettled = plan.clients
        self._settled = anyio.Event()
        self.hung = False

    # -- the run ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the schedule, then the checker; `violations` holds what it found."""
        with anyio.CancelScope() as guard:
            watchdog = Watchdog(self, trio.lowlevel.current_trio_token(), guard)
            try:
                with anyio.fail_after(self.plan.work + QUIESCE + CONVERGE + 60):
                    await self._run()
            finally:
                watchdog.stop()
        if self.hung:
            raise AssertionError(f"hung: no end after {REAL_TIME_LIMIT} s of real time (a livelock?)")
        self.oracle.catch_up()
        self.violations.extend(check(self.history, self.oracle))

    async def _run(self) -> None:
        async with anyio.create_task_group() as processes:
            for client in range(self.plan.clients):
                processes.start_soon(self._client, client, processes)
            await self._drive_faults()
            self._stop()
            with anyio.move_on_after(QUIESCE) as quiesce:
                await self._settled.wait()
            if quiesce.cancelled_caught:
                stuck = [p.name for p in self.processes if not p.done.is_set()]
                self.violations.append(Violation("liveness", f"work still running {QUIESCE} s after healing: {stuck}"))
                processes.cancel_scope.cancel()
                return
            await self._converge()
            self.released.set()

    async def _client(self, client: int, processes: anyio.abc.TaskGroup) -> None:
        """Run incarnations of one client: a crashed or lost one is replaced until the work phase ends."""
        incarnation = 0
        while not self.stopping:
            process = Process(client, incarnation, MemoryBackend(store=self.store))
            self.processes.append(process)
            processes.start_soon(self._process, process)
            await process.done.wait()
            incarnation += 1
            if not self.stopping:
                await anyio.sleep(random.Random(f"{self.plan.seed}/{process.name}").uniform(0, 1))
        self._unsettled -= 1
        if not self._unsettled:
            self._settled.set()

    async def _process(self, process: Process) -> None:
        # Not every process watches the election and the group: every watch wakes on every change of the store.
        chosen = random.Random(f"{self.plan.seed}/{process.name}/observers")
        watchers = [watcher for watcher in (self._observe_leader, self._watch_group) if chosen.random() < 0.6]
        try:
            with process.scope:
                async with process.backend, Session(process.backend, ttl=self.plan.ttl) as session:
                    process.session = session
                    async with ConfigView(process.backend, "cfg/") as view, anyio.create_task_group() as observers:
                        process.view = view
                        observers.start_soon(self._follow_config, process, view)
                        for watcher in watchers:
                            observers.start_soon(watcher, process)
                        observers.start_soon(self._member, process)
                        async with anyio.create_task_group() as workers:
                            for worker in range(self.plan.workers):
                                workers.start_soon(self._work, process, worker)
                        if self.stopping:
                            process.lingering = True
                            process.done.set()
                            await self.released.wait()
                        observers.cancel_scope.cancel()
        except UnavailableError:
            self.stats["grant failed"] += 1  # the session's grant gave up under failing calls
        finally:
            process.done.set()

    async def _work(self, process: Process, worker: int) -> None:
        rng = random.Random(f"{self.plan.seed}/{process.name}/{worker}")
        operations: list[Callable[[Process, random.Random], Awaitable[None]]] = [
            self._lock,
            self._semaphore,
            self._lead,
            self._once,
            self._publish,
            self._peek,
            self._cron,
            self._read_write,
            self._barrier,
        ]
        session = process.live_session
        while not self.stopping and not session.lost:
            operation = rng.choices(operations, weights=(3, 2, 2, 2, 2, 1, 1, 2, 1))[0]
            with anyio.CancelScope() as scope, anyio.move_on_after(rng.uniform(0.5, 5.0)):
                process.work.append(scope)
                try:
                    await operation(process, rng)
                except (*EXPECTED, Flaky):
                    pass
                finally:
                    process.work.remove(scope)
            await anyio.sleep(rng.uniform(0, 0.3))

    def _end(self, hold: Hold, session: Session | None) -> None:
        """End ``hold`` now, noting whether its lease is alive in the store (expiring what is due, as any call
        would)."""
        self.store.expire_due()
        self.history.end(hold, lease_alive=hold.lease in self.store.lease_ids())
        if session is not None and session.lost:
            self.stats["holds ended by session loss"] += 1

    # -- work ------------------------------------------------------------------------------------------

    async def _lock(self, process: Process, rng: random.Random) -> None:
        session = process.live_session
        async with Lock(session, "lock") as held:
            hold = self.history.begin(Kind.LOCK, "lock", process.name, session.lease_id, held.token)
            try:
                for _ in range(rng.randint(1, 3)):
                    await self._increment(process, rng, b"ctr/lock", held.guard(), held.token)
                await anyio.sleep(rng.uniform(0, 0.5))
            finally:
                self._end(hold, session)

    async def _increment(
        self, process: Process, rng: random.Random, counter: bytes, guard: Compare, token: int
    ) -> None:
        """Read the counter, wait a little (where a second holder would interleave), write + 1 with the guard."""
        backend = process.backend
        current = await backend.range(Range(counter))
        number = int(current.kvs[0].value.split()[0]) if current.kvs else 0
        await anyio.sleep(rng.uniform(0, 0.2))
        increment: Increment = self.history.increment(counter, process.name, token)
        try:
            result = await backend.txn([guard], [Put(counter, f"{number + 1} {token} {increment.op}".encode())])
        except BaseException:
            increment.outcome = Outcome.AMBIGUOUS
            raise
        increment.outcome = Outcome.APPLIED if result.succeeded else Outcome.REFUSED

    async def _semaphore(self, process: Process, rng: random.Random) -> None:
        session = process.live_session
        limit = self.plan.permits
        async with Semaphore(session, "sem", limit=limit) as permit:
            hold = self.history.begin(Kind.SEMAPHORE, "sem", process.name, session.lease_id, permit.token, limit=limit)
            try:
                await anyio.sleep(rng.uniform(0, 1))
            finally:
                self._end(hold, session)

    async def _read_write(self, process: Process, rng: random.Random) -> None:
        session = process.live_session
        lock = ReadWriteLock(session, "rw")
        if rng.random() < 0.4:
            async with lock.write() as held:
                hold = self.history.begin(Kind.WRITE, "rw", process.name, session.lease_id, held.token)
                try:
                    await self._increment(process, rng, b"ctr/rw", held.guard(), held.token)
                    await anyio.sleep(rng.uniform(0, 0.3))
                finally:
                    self._end(hold, session)
        else:
            async with lock.read() as held:
                hold = self.history.begin(Kind.READ, "rw", process.name, session.lease_id, held.token, limit=1 << 30)
                try:
                    await anyio.sleep(rng.uniform(0, 0.5))
                finally:
                    self._end(hold, session)

    async def _barrier(self, process: Process, rng: random.Random) -> None:
        """Raise the barrier for a while (bound to the session: it falls with it), or wait for it to be down."""
        session = process.live_session
        barrier = Barrier(process.backend, "bar/gate")
        if rng.random() < 0.3:
            if await barrier.hold(session=session):
                try:
                    await anyio.sleep(rng.uniform(0, 1.5))
                finally:
                    await self._release_barrier(barrier, session)
            return
        first = self.store.revision
        await barrier.wait()
        self.history.barrier_waits.append(BarrierWait(b"bar/gate", process.name, first, self.store.revision))
        self.stats["barrier waits passed"] += 1

    async def _release_barrier(self, barrier: Barrier, session: Session) -> None:
        """Release, shielded, while the session is valid (once it is not, the barrier falls with its lease)."""
        with anyio.CancelScope(shield=True):
            while not session.lost and anyio.current_time() < session.deadline:
                with anyio.move_on_after(1), suppress(*EXPECTED):
                    await barrier.release()
                    return
                await anyio.sleep(0.1)

    async def _lead(self, process: Process, rng: random.Random) -> None:
        session = process.live_session
        async with Election(session, "elect").campaign(process.name.encode()) as leadership:
            hold = self.history.begin(Kind.LEADER, "elect", process.name, session.lease_id, leadership.term)
            try:
                for _ in range(rng.randint(1, 3)):
                    await self._increment(process, rng, b"ctr/leader", leadership.guard(), leadership.term)
                if rng.random() < 0.5:
                    await leadership.proclaim(f"{process.name} again at {anyio.current_time():.3f}".encode())
                await anyio.sleep(rng.uniform(0, 1))
            finally:
                self._end(hold, session)

    async def _once(self, process: Process, rng: random.Random) -> None:
        session = process.live_session
        name = f"once/{rng.randrange(ONCE_NAMES)}"

        async def compute() -> bytes:
            hold = self.history.begin(Kind.COMPUTER, name, process.name, session.lease_id, 0)
            try:
                await anyio.sleep(rng.uniform(0, 1))
                if rng.random() < 0.25:
                    raise Flaky(name)
                return f"{name} by {process.name} at {hold.start}".encode()
            finally:
                self._end(hold, session)

        self.history.once_returned(name, process.name, await once(session, name, compute))

    async def _publish(self, process: Process, rng: random.Random) -> None:
        """Compare-and-swap ``value + 1`` on a config key, or delete it, from what this process's view shows."""
        assert process.view is not None
        key = f"k{rng.randrange(3)}"
        expected = process.view.key_revision(key)
        value = None if expected and rng.random() < 0.15 else (process.view.get(key) or 0) + 1
        counts: Counts = self.history.publishes["cfg/" + key]
        try:
            revision = await publish(process.backend, "cfg/" + key, value, expected_revision=expected)
        except BaseException:
            counts.ambiguous += 1
            raise
        if revision is not None:
            counts.succeeded += 1

    async def _peek(self, process: Process, rng: random.Random) -> None:
        """Open a second, short-lived view of the config: it shares the process's watch, joins it late, leaves."""
        async with ConfigView(process.backend, "cfg/") as view:
            trace = self._trace(process, "config", b"cfg/", lasting=False)
            with anyio.move_on_after(rng.uniform(0, 2)):
                await self._record_config(trace, view)

    async def _cron(self, process: Process, rng: random.Random) -> None:
        """run_while_leader: a job that must run on one replica at a time, re-campaigning (new sessions) on loss."""

        async def job(leadership: Leadership) -> None:
            lease = int(leadership.key.rsplit(b"/", 1)[1], 16)  # <name>/<lease id hex>
            hold = self.history.begin(Kind.LEADER, "cron", process.name, lease, leadership.term)
            try:
                for _ in range(rng.randint(1, 3)):
                    await self._increment(process, rng, b"ctr/cron", leadership.guard(), leadership.term)
                await anyio.sleep(rng.uniform(0, 1))
            finally:
                self._end(hold, None)

        await run_while_leader(process.backend, "cron", job, value=process.name.encode(), ttl=self.plan.ttl)

    # -- observers -------------------------------------------------------------------------------------

    def _trace(self, process: Process, kind: str, prefix: bytes, *, lasting: bool = True) -> Trace:
        """A new trace; ``lasting`` ones follow the store for the process's life and must end on its state."""
        trace = self.history.trace(f"{process.name}/{kind}{len(self.history.traces)}", kind, prefix)
        if lasting:
            process.traces.append(trace)
        return trace

    async def _record_config(self, trace: Trace, view: ConfigView[Any]) -> None:
        async with aclosing(view.changes()) as changes:
            self.history.saw(trace, view.revision, dict(view.snapshot()))
            async for _ in changes:
                self.history.saw(trace, view.revision, dict(view.snapshot()))

    async def _follow_config(self, process: Process, view: ConfigView[Any]) -> None:
        await self._record_config(self._trace(process, "config", b"cfg/"), view)

    async def _observe_leader(self, process: Process) -> None:
        trace = self._trace(process, "leader", b"elect/")
        async with aclosing(Election(process.live_session, "elect").observe()) as leaders:
            async for leader in leaders:
                self.history.saw(trace, 0, None if leader is None else (leader.term, leader.value))

    async def _watch_group(self, process: Process) -> None:
        trace = self._trace(process, "group", b"grp/")
        async with aclosing(Group(process.live_session, "grp").watch()) as views:
            async for view in views:
                self.stats["group resyncs after compaction"] += view.resync
                self.history.saw(trace, view.revision, dict(view.members))

    async def _member(self, process: Process) -> None:
        """Be a member of the group for the process's lifetime (its id is taken while a crashed one's lingers)."""
        session = process.live_session
        group = Group(session, "grp")
        member_id = f"c{process.client}"
        while True:
            try:
                async with group.join(member_id, metadata=process.name.encode()) as member:
                    hold = self.history.begin(Kind.MEMBER, member_id, process.name, session.lease_id, member.revision)
                    try:
                        await anyio.sleep_forever()
                    finally:
                        self._end(hold, session)
            except OwnershipLostError:
                return
            except (MemberExistsError, UnavailableError, LeaseExpiredError):
                self.stats["join refused"] += 1
                await anyio.sleep(0.5)

    # -- faults ----------------------------------------------------------------------------------------

    async def _drive_faults(self) -> None:
        rng = random.Random(f"{self.plan.seed}/faults")
        async with anyio.create_task_group() as pending:  # heals and restorations due later
            with anyio.move_on_after(self.plan.work):
                while True:
                    await anyio.sleep(rng.expovariate(1 / self.plan.fault_gap))
                    self._inject(rng, pending)
            pending.cancel_scope.cancel()

    def _inject(self, rng: random.Random, pending: anyio.abc.TaskGroup) -> None:
        fault = rng.choices(FAULTS, weights=FAULT_WEIGHTS)[0]
        running = [p for p in self.processes if p.session is not None and not p.crashed and not p.done.is_set()]
        if not running or self.store.revision == self.store.compact_revision:
            return
        process = rng.choice(running)
        if fault == "forced expiry" and rng.random() < 0.7:  # mostly at a holder of a fenced resource
            process = rng.choice(self._fenced_holders(running) or running)
        faults = process.backend.faults
        self.stats[fault] += 1
        if fault == "compaction":
            self._compact(rng.randint(self.store.compact_revision + 1, self.store.revision))
            if rng.random() < 0.5:
                faults.break_watches()  # they resume across the compaction: a resync
        elif fault in ("pause", "keepalive loss"):
            faults.partition() if fault == "pause" else faults.suspend_keepalives()
            # A pause that ends after a compaction: the client's watches must resync over what they missed.
            compact = fault == "pause" and rng.random() < 0.5
            # Keepalives starved on a slow link: clean-up writes are still in flight when the renewal comes.
            if fault == "keepalive loss" and rng.random() < 0.5:
                faults.set_latency(rng.uniform(0.1, 0.6))
            pending.start_soon(self._heal_later, process, self._outage(rng, process.live_session), compact)
        elif fault == "forced expiry":
            lease = process.live_session.lease_id
            self.history.revoke(lease)
            faults.expire_lease(lease)
        elif fault == "watch break":
            faults.break_watches()
        elif fault == "latency":
            faults.set_latency(rng.uniform(0.005, 0.6))
            pending.start_soon(self._restore_latency_later, process, rng.uniform(0.5, 5))
        elif fault == "failing calls":
            faults.fail_calls(rng.randint(1, 3))
        elif fault == "lost replies":  # applied, then the caller sees UnavailableError: the ambiguous failure
            faults.lose_replies(rng.randint(1, 3))
        elif fault == "late replies":
            faults.delay_replies(rng.uniform(0.005, 0.6))
            pending.start_soon(self._restore_replies_later, process, rng.uniform(0.5, 5))
        elif fault == "cancel":
            for scope in process.work[: rng.randint(1, 2)]:
                scope.cancel()
        else:  # crash: cut off for good, abandoned mid-operation; its lease expires by itself
            process.crashed = True
            faults.partition()
            process.scope.cancel()
            process.done.set()

    def _fenced_holders(self, running: list[Process]) -> list[Process]:
        fenced = {*ORDERED_KINDS, Kind.COMPUTER}
        names = {hold.holder for hold in self.history.holds if hold.end is None and hold.kind in fenced}
        return [process for process in running if process.name in names]

    def _outage(self, rng: random.Random, session: Session) -> float:
        """How long a pause lasts: often until just before or after the session's deadline (the edge where a
        renewal races the clean-up writes and the guard), else anything up to two and a half TTLs."""
        if rng.random() < 0.5:
            return max(0.01, session.deadline - anyio.current_time() + rng.uniform(-0.6, 0.2))
        return rng.uniform(0.1, 2.5 * self.plan.ttl)

    async def _heal_later(self, process: Process, delay: float, compact: bool = False) -> None:
        await anyio.sleep(delay)
        if compact and self.store.revision > self.store.compact_revision:
            self._compact(self.store.revision)
        if not process.crashed:
            process.backend.faults.heal()
            process.backend.faults.set_latency(0)

    def _compact(self, revision: int) -> None:
        self.oracle.catch_up()  # first: the oracle needs the history the compaction drops
        self.store.compact(revision)

    async def _restore_latency_later(self, process: Process, delay: float) -> None:
        await anyio.sleep(delay)
        process.backend.faults.set_latency(0)

    async def _restore_replies_later(self, process: Process, delay: float) -> None:
        await anyio.sleep(delay)
        process.backend.faults.delay_replies(0)

    def _stop(self) -> None:
        """End the work phase: no more faults, every client that is not dead is healed."""
        self.stopping = True
        for process in self.processes:
            if not process.crashed:
                process.backend.faults.heal()
                process.backend.faults.set_latency(0)
                process.backend.faults.fail_calls(0)
                process.backend.faults.lose_replies(0)
                process.backend.faults.delay_replies(0)

    async def _converge(self) -> None:
        """Give crashed clients' leases time to expire and the surviving observers time to show the store's final
        state; the checker judges the result."""
        survivors = [trace for p in self.processes if p.lingering for trace in p.traces]
        with anyio.move_on_after(CONVERGE):
            while True:
                self.oracle.catch_up()
                revision = self.store.revision
                settled = not leaked(self.history, self.oracle, revision)
                if settled and all(caught_up(trace, self.oracle, revision) for trace in survivors):
                    break
                await anyio.sleep(0.1)
        self.oracle.catch_up()
        self.history.final_revision = self.store.revision
        self.history.survivors = {trace.observer for trace in survivors}


class Watchdog:
    """Bounds a schedule in real time: cancels it when it takes too long (a livelock under virtual time), and
    if even that cannot stop it, dumps every thread's stack and exits, naming the seed."""

    def __init__(self, schedule: Schedule, token: trio.lowlevel.TrioToken, scope: anyio.CancelScope) -> None:
        self._schedule, self._token, self._scope = schedule, token, scope
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(REAL_TIME_LIMIT):
            return
        self._schedule.hung = True
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._scope.cancel)
        if self._done.wait(REAL_TIME_LIMIT):
            return
        seed = self._schedule.plan.seed
        faulthandler.dump_traceback(all_threads=True)
        print(f"\nchaos schedule {seed} hung beyond cancellation; replay: {replay_command(seed)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)


def run_schedule(seed: int) -> Schedule:
    """Run schedule ``seed`` on trio with a virtual clock: the same seed replays the same run.

    Replay needs three things: every choice drawn from the seed; `random` seeded (tenacity's jitter); and trio's
    scheduler deterministic. Trio registers a hypothesis plugin that, once hypothesis is imported, sorts each batch
    of runnable tasks by creation order before shuffling it with its own `random.Random`, which is seeded here;
    without it, tasks woken at one virtual instant run in an order that depends on object ids.
    """
    assert trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING, "trio no longer honours hypothesis' plugin"
    schedule = Schedule(Plan.draw(seed))
    saved = random.getstate()
    random.seed(seed)  # tenacity's jittered backoff
    trio._core._run._r.seed(seed)  # trio's run-queue order
    try:
        anyio.run(schedule.run, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})
    finally:
        random.setstate(saved)
    return schedule


def check_schedule(seed: int) -> Schedule:
    """Run schedule ``seed`` and fail with its seed and replay command if it broke anything."""
    try:
        schedule = run_schedule(seed)
    except Exception as exc:
        raise AssertionError(f"chaos schedule {seed} failed: {exc!r}\nreplay: {replay_command(seed)}") from exc
    report = "\n".join(str(violation) for violation in schedule.violations[:20])
    assert not schedule.violations, (
        f"chaos schedule {seed} ({schedule.plan}) broke {len(schedule.violations)} guarantee(s):\n{report}\n"
        f"replay: {replay_command(seed)}"
    )
    return schedule


def seed_chunks() -> list[range]:
    if REPLAY_SEED is not None:
        return [range(int(REPLAY_SEED), int(REPLAY_SEED) + 1)]
    return [range(start, min(start + PER_TEST, SCHEDULES)) for start in range(0, SCHEDULES, PER_TEST)]


@pytest.mark.parametrize("seeds", seed_chunks(), ids=lambda seeds: f"seeds{seeds.start}-{seeds.stop - 1}")
def test_fault_schedules_keep_every_guarantee(seeds: range) -> None:
    for seed in seeds:
        check_schedule(seed)


def test_schedules_exercise_every_fault_and_recipe() -> None:
    """The schedules are not vacuous: faults of every kind hit holders, fencing refuses stale writes, etc."""
    stats: Counter[str] = Counter()
    kinds: Counter[Kind] = Counter()
    outcomes: Counter[Outcome] = Counter()
    for seed in range(10_000, 10_020):
        schedule = check_schedule(seed)
        stats.update(schedule.stats)
        kinds.update(hold.kind for hold in schedule.history.holds)
        outcomes.update(increment.outcome for increment in schedule.history.increments)
    assert all(stats[fault] for fault in FAULTS), stats
    assert stats["holds ended by session loss"] and stats["group resyncs after compaction"], stats
    assert all(kinds[kind] for kind in Kind), kinds
    assert outcomes[Outcome.APPLIED] and outcomes[Outcome.REFUSED], outcomes


def test_a_seed_replays_identically() -> None:
    def fingerprint(schedule: Schedule) -> list[str]:
        return [str(hold) for hold in schedule.history.holds] + [str(schedule.store.revision)]

    assert fingerprint(run_schedule(7)) == fingerprint(run_schedule(7))


# -- the checker can fail ----------------------------------------------------------------------------------


def at(seq: int) -> Stamp:
    return Stamp(seq, seq / 10)


def hold(kind: Kind, holder: str, token: int, start: int, end: int, *, lease: int = 0, limit: int = 1) -> Hold:
    return Hold(kind, kind.value, holder, lease or token, token, limit, at(start), at(end))


def rules(violations: list[Violation]) -> Counter[str]:
    return Counter(violation.rule for violation in violations)


def recorded(store: MemoryStore, *writes: tuple[str, bytes | None]) -> Oracle:
    """An oracle of a store to which ``writes`` (key, value; None deletes) were applied in order."""
    oracle = Oracle(store, [b"ctr/", b"cfg/", b"elect/", b"once/", b"lock/"])
    for key, value in writes:
        store.txn([], [Delete(key.encode()) if value is None else Put(key.encode(), value)], [])
    oracle.catch_up()
    return oracle


def test_checker_accepts_a_correct_history() -> None:
    history = History()
    history.holds += [
        hold(Kind.LOCK, "a", 2, 1, 4),
        hold(Kind.LOCK, "b", 3, 5, 8),  # enters after a left
        hold(Kind.SEMAPHORE, "a", 4, 10, 20, limit=2),
        hold(Kind.SEMAPHORE, "b", 5, 11, 21, limit=2),
        hold(Kind.LOCK, "c", 6, 22, 30, lease=99),  # its lease is expired by force at 25: b may enter then
        hold(Kind.LOCK, "b", 7, 26, 28),
    ]
    history.revoked[99] = at(25)
    history.holds[4].lease_alive = False
    history.increments += [Increment(b"ctr/lock", "op0", "a", 2, Outcome.APPLIED)]
    history.increments += [Increment(b"ctr/lock", "op1", "c", 6, Outcome.REFUSED)]
    history.publishes["cfg/k"].succeeded = 4
    oracle = recorded(
        MemoryStore(),
        ("ctr/lock", b"1 2 op0"),
        ("cfg/k", b"1"),
        ("cfg/k", None),  # a delete restarts the count
        ("cfg/k", b"1"),
        ("cfg/k", b"2"),
        ("elect/a", b"a"),
        ("elect/b", b"b"),
        ("elect/a", None),
        ("lock/1", b""),
        ("once/0/claim", b""),
        ("once/0/result", b"r"),
        ("once/0/claim", None),
        ("lock/1", None),
    )
    leaders = history.trace("o1", "leader", b"elect/")
    leaders.seen += [(at(40), 0, None), (at(41), 0, (7, b"a")), (at(42), 0, (8, b"b"))]
    config = history.trace("o2", "config", b"cfg/")
    config.seen += [(at(43), 2, {}), (at(44), 4, {}), (at(45), 6, {"k": 2}), (at(46), 9, {"k": 2})]
    history.once_results += [OnceResult("once/0", "a", at(50), b"r"), OnceResult("once/0", "b", at(51), b"r")]
    history.survivors, history.final_revision = {"o1", "o2"}, oracle.revision
    history.released = [b"lock/", b"once/0/claim"]
    assert check(history, oracle) == []


def test_checker_reports_overlapping_holders_outlived_leases_and_leaks() -> None:
    history = History()
    history.holds += [
        hold(Kind.LOCK, "a", 2, 1, 4),
        hold(Kind.LOCK, "b", 3, 3, 6),  # enters one step before a leaves
        hold(Kind.SEMAPHORE, "a", 4, 10, 20, limit=2),
        hold(Kind.SEMAPHORE, "b", 5, 11, 21, limit=2),
        hold(Kind.SEMAPHORE, "c", 6, 12, 13, limit=2),  # a third holder of two permits
        hold(Kind.LEADER, "a", 7, 30, 40, lease=98),  # its lease is expired by force at 35, after b entered
        hold(Kind.LEADER, "b", 8, 33, 38),
        hold(Kind.MEMBER, "a", 9, 50, 51),  # its lease was gone when the block ended
    ]
    history.revoked[98] = at(35)
    history.holds[-1].lease_alive = False
    history.released = [b"lock/"]
    oracle = recorded(MemoryStore(), ("lock/2", b""))  # released, yet still there at the end
    history.final_revision = oracle.revision
    violations = check(history, oracle)
    assert rules(violations) == {"exclusion": 3, "lease": 1, "leak": 1}, violations


def test_checker_reports_readers_beside_writers_and_barriers_passed_while_held() -> None:
    def rw(kind: Kind, holder: str, token: int, start: int, end: int) -> Hold:
        return Hold(kind, "rw", holder, token, token, 1 << 30 if kind is Kind.READ else 1, at(start), at(end))

    history = History()
    history.holds += [
        rw(Kind.READ, "a", 2, 1, 10),
        rw(Kind.READ, "b", 3, 2, 9),  # readers share: fine
        rw(Kind.WRITE, "c", 4, 11, 20),
        rw(Kind.READ, "d", 5, 15, 25),  # a reader beside the writer
        rw(Kind.WRITE, "e", 6, 24, 30),  # a writer beside the reader
        rw(Kind.WRITE, "f", 7, 31, 40),
    ]
    store = MemoryStore()
    oracle = Oracle(store, [b"bar/"])
    store.txn([], [Put(b"bar/gate", b"")], [])  # revision 2: held
    store.txn([], [Put(b"bar/other", b"")], [])  # revision 3
    store.txn([], [Delete(b"bar/gate")], [])  # revision 4: down
    oracle.catch_up()
    history.barrier_waits += [
        BarrierWait(b"bar/gate", "w1", 2, 3),  # passed while it was held throughout
        BarrierWait(b"bar/gate", "w2", 2, 4),  # passed after it fell: fine
        BarrierWait(b"bar/gate", "w3", 1, 1),  # not held when it began: fine
    ]
    violations = check(history, oracle)
    assert rules(violations) == {"exclusion": 2, "barrier": 1}, violations


def test_checker_reports_tokens_that_do_not_increase() -> None:
    history = History()
    history.holds += [
        hold(Kind.LOCK, "a", 5, 1, 2),
        hold(Kind.LOCK, "b", 5, 3, 4),
        hold(Kind.LEADER, "a", 9, 5, 6),
        hold(Kind.LEADER, "b", 8, 7, 8),
        hold(Kind.SEMAPHORE, "a", 4, 9, 10, limit=2),
        hold(Kind.SEMAPHORE, "b", 4, 11, 12, limit=2),
    ]
    violations = check(history, recorded(MemoryStore()))
    assert rules(violations) == {"token": 3}, violations


def test_checker_reports_lost_and_phantom_updates() -> None:
    history = History()
    history.increments += [
        Increment(b"ctr/lock", "op0", "a", 5, Outcome.APPLIED),
        Increment(b"ctr/lock", "op1", "a", 5, Outcome.APPLIED),
        Increment(b"ctr/lock", "op2", "b", 7, Outcome.APPLIED),  # read 1 like op1 did: op1's update is lost
        Increment(b"ctr/lock", "op3", "c", 6, Outcome.REFUSED),  # refused, yet applied, with an older token
        Increment(b"ctr/lock", "op4", "b", 7, Outcome.APPLIED),  # reported success, never applied
        Increment(b"ctr/lock", "op5", "b", 7, Outcome.APPLIED),  # reported success, never applied
    ]
    history.publishes["cfg/k"].succeeded = 4
    oracle = recorded(
        MemoryStore(),
        ("ctr/lock", b"1 5 op0"),
        ("ctr/lock", b"2 5 op1"),
        ("ctr/lock", b"2 7 op2"),
        ("ctr/lock", b"3 6 op3"),
        ("ctr/lock", b"4 7 op9"),  # nobody wrote op9
        ("cfg/k", b"1"),
        ("cfg/k", b"2"),
        ("cfg/k", b"2"),
    )
    details = [violation.detail for violation in check(history, oracle)]
    for expected in (
        "write #3 (op2) set 2: an update was lost",
        "op3 with token 6 applied after token 7",
        "op3 was refused but the store applied it",
        "op4 reported success but the store never applied it",
        "the store applied op9, which nobody wrote",
        "final value 4 != 5 successful fenced increments",
        "applied values [1, 2, 2]",
        "3 writes applied, 4 reported success",
    ):
        assert any(expected in detail for detail in details), (expected, details)


def test_checker_reports_stale_leaders_and_views_going_back() -> None:
    history = History()
    oracle = recorded(
        MemoryStore(),
        ("elect/a", b"a"),  # 2: a leads
        ("elect/b", b"b"),  # 3: b queues
        ("elect/a", None),  # 4: b leads
        ("cfg/k", b"1"),  # 5
        ("cfg/k", b"2"),  # 6
        ("elect/b", None),  # 7: nobody leads
    )
    stale = history.trace("stale", "leader", b"elect/")
    stale.seen += [(at(1), 0, (2, b"a")), (at(2), 0, (3, b"b")), (at(3), 0, (2, b"a"))]
    ghost = history.trace("ghost", "leader", b"elect/")
    ghost.seen += [(at(4), 0, (9, b"ghost"))]
    back = history.trace("back", "config", b"cfg/")
    back.seen += [(at(5), 6, {"k": 2}), (at(6), 5, {"k": 1})]
    wrong = history.trace("wrong", "config", b"cfg/")
    wrong.seen += [(at(7), 6, {"k": 1})]
    history.survivors, history.final_revision = {"back"}, oracle.revision  # the store ends on {"k": 2}
    details = [violation.detail for violation in check(history, oracle)]
    for expected in (
        "observer stale saw stale leader (2, b'a')",
        "observer stale saw (2, b'a') at t=0.300#3, not in the store's order",
        "observer ghost saw (9, b'ghost')",
        "config view back went back from 6 to 5",
        "config view wrong at t=0.700#7 shows {'k': 1} as revision 6; the store had {'k': 2}",
        "config observer back ends on {'k': 1}, the store on {'k': 2}",
    ):
        assert any(expected in detail for detail in details), (expected, details)


def test_checker_reports_once_results_that_differ_or_are_recomputed() -> None:
    history = History()
    history.once_results += [
        OnceResult("once/0", "a", at(10), b"x"),
        OnceResult("once/0", "b", at(11), b"y"),
        OnceResult("once/1", "a", at(12), b"z"),
    ]
    history.holds += [Hold(Kind.COMPUTER, "once/1", "c", 3, 0, 1, at(13), at(14))]
    oracle = recorded(MemoryStore(), ("once/0/result", b"x"), ("once/1/result", b"z"), ("once/1/result", b"w"))
    details = [violation.detail for violation in check(history, oracle)]
    for expected in (
        "once/0: callers got different results [b'x', b'y']",
        "once/1: the result was written 2 times",
        "once/1: c computed again after a result at t=1.200#12",
    ):
        assert any(expected in detail for detail in details), (expected, details)
