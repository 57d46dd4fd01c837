"""Scheduler: a distributed cron. Every worker sees every job spec; each tick runs exactly once cluster-wide.

Keys under ``<prefix>/``: ``jobs/<job>`` (the spec, JSON; followed live by every worker through a ConfigView),
``runs/<job>/<tick>`` (the run record: claimed by a compare-and-swap create, so one worker runs each tick; kept
after the run as history, trimmed to ``history`` records per job), ``running/<job>/<tick>`` (bound to the
runner's lease while it runs: when it vanishes with the record still "running", the runner died and any worker
records the run as "lost") and ``killer/<job>`` (a kill request: the worker running that job cancels it).

Ticks come from a cron expression (the ``croniter`` package: ``pip install 'coordkit[cron]'``) or a fixed
interval, on the wall clock given by ``now`` (UTC). A tick found late by more than ``misfire_grace`` seconds is
skipped, or run once late, as the job's ``misfire`` policy says.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, Literal, final

import anyio
import anyio.lowlevel

from ._config import ConfigChange, ConfigView, publish
from ._errors import LeaseExpiredError, OwnershipLostError, error_text, is_permanent
from ._queue import name_prefix
from ._retry import retry_call
from ._session import Session, require_session, retry_while_valid
from ._supervisor import Supervisor, keep_following, supervised
from ._types import Compare, Delete, EventType, Op, Put, Range
from ._watch import Snapshot, Watch

Outcome = Literal["running", "ok", "error", "killed", "lost"]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A scheduled job, as stored under ``<prefix>/jobs/<name>``.

    Attributes:
        name: the job's name (no "/").
        target: the name a worker registered the coroutine function under (`Scheduler.register`).
        cron: a cron expression as croniter reads it (5 fields; a 6th, last, field is seconds), or None.
        interval: seconds between ticks (ticks at multiples of it since the epoch), or None. Exactly one of
            ``cron`` and ``interval``.
        args: JSON arguments passed to the target after the run context.
        enabled: a disabled job does not tick.
        misfire: what to do with a tick found late by more than the scheduler's grace: "skip" it, or run it
            "late" (once: later missed ticks are skipped).

    Raises:
        TypeError, ValueError: a bad field: a name that is empty, holds "/" or is no valid name text; an interval
            that is not a finite number of seconds from 1 µs to 100 years; an invalid cron expression; ...
    """

    name: str
    target: str
    cron: str | None = None
    interval: float | None = None
    args: list[Any] = field(default_factory=list)
    enabled: bool = True
    misfire: Literal["skip", "late"] = "skip"

    def __post_init__(self) -> None:
        _check_job_name(self.name)
        if not isinstance(self.target, str):
            raise TypeError(f"job {self.name!r}: target is a str (the name given to register), not {self.target!r}")
        if (self.cron is None) == (self.interval is None):
            raise ValueError(f"job {self.name!r}: give exactly one of cron and interval")
        if self.interval is not None:
            _check_interval(self.name, self.interval)
        if self.cron is not None and not isinstance(self.cron, str):
            raise TypeError(f"job {self.name!r}: cron is a str, not {type(self.cron).__name__}")
        if self.cron is not None and not _croniter().is_valid(self.cron):
            raise ValueError(f"job {self.name!r}: invalid cron expression {self.cron!r}")
        if not isinstance(self.args, list) or not isinstance(self.enabled, bool):
            raise TypeError(f"job {self.name!r}: args is a list and enabled a bool")
        if self.misfire not in ("skip", "late"):
            raise ValueError(f"job {self.name!r}: misfire must be 'skip' or 'late'")

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after``."""
        if self.interval is not None:
            # Exact (timedelta) arithmetic: float seconds since the epoch would round ticks onto each other.
            step = timedelta(seconds=self.interval)
            return _EPOCH + ((after - _EPOCH) // step + 1) * step
        assert self.cron is not None
        next_time: datetime = _croniter()(self.cron, after).get_next(datetime)
        return next_time

    def previous_tick(self, before: datetime) -> datetime:
        """The last tick at or before ``before``."""
        if self.interval is not None:
            step = timedelta(seconds=self.interval)
            return _EPOCH + ((before - _EPOCH) // step) * step
        previous: datetime = _croniter()(self.cron, before + timedelta(microseconds=1)).get_prev(datetime)
        return previous


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: the longest interval: its ticks (multiples since the epoch) stay far from datetime's year 9999
_MAX_INTERVAL = timedelta(days=36525)


def _check_job_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"job names are str, not {type(name).__name__}")
    if not name or "/" in name:
        raise ValueError(f"job names are non-empty and contain no '/': {name!r}")
    name_prefix(name)  # the text rules of every name: valid UTF-8, no NUL


def _check_interval(name: str, interval: float) -> None:
    if not isinstance(interval, int | float) or isinstance(interval, bool):
        raise TypeError(f"job {name!r}: interval is a number of seconds, not {type(interval).__name__}")
    try:
        step = timedelta(seconds=interval)  # ticks are computed in timedelta: 1 µs resolution
    except (OverflowError, ValueError):  # inf, nan, too large
        step = _MAX_INTERVAL * 2
    if not timedelta(0) < step <= _MAX_INTERVAL:
        raise ValueError(f"job {name!r}: interval must be from 1 µs to 100 years (in seconds), not {interval!r}")


def _croniter() -> Any:
    try:
        import croniter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cron schedules need the croniter package: pip install 'coordkit[cron]'") from exc
    return croniter.croniter


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run of a job: which tick, where, when, how it ended.

    Attributes:
        job: the job name.
        tick: the scheduled time (UTC) this run is for.
        worker: the worker that ran it.
        started: when it started (the scheduler's clock, UTC ISO text).
        ended: when it ended, or None while running (or when lost).
        outcome: "running", "ok", "error", "killed" or "lost" (the worker died while running it).
        error: the error text for "error" ("<type>: <message>", cut to 4096 characters).
    """

    job: str
    tick: str
    worker: str
    started: str
    ended: str | None
    outcome: Outcome
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a job's coroutine receives: which job and tick it runs, and where."""

    job: str
    tick: datetime
    worker: str


class _Killed(Exception):
    pass


@final
class Scheduler:
    """A distributed cron worker. Every worker of ``prefix`` follows all job specs; each tick runs once.

    ``scheduler.register("report", send_report)`` names the coroutine functions this worker can run, then
    ``async with scheduler:`` works until the block ends. The block is guarded by the session: if it is lost,
    the worker stops, the body is cancelled and ``OwnershipLostError`` is raised. If the store refuses the
    worker (`AuthenticationError`: credentials or permission revoked), the body is cancelled and that error is
    raised; transient failures (unavailable, malformed replies) are retried. Add, change or remove jobs
    with `put_job` / `remove_job` from anywhere: every worker picks the change up at once. `kill` cancels a
    job's running instance on whichever worker runs it; `history` lists its runs.

    Args:
        session: the worker's session (running markers are bound to its lease).
        prefix: the scheduler's key prefix (e.g. "cron").
        worker: this worker's name in run records (default: its lease id).
        now: the wall clock, returning an aware UTC datetime (default: the system clock). Tests pass a clock
            derived from ``anyio.current_time()`` to run on virtual time.
        misfire_grace: seconds a tick may be late before the job's misfire policy applies (finite, >= 0).
        history: run records kept per job (oldest removed first; >= 1).

    A Scheduler runs in one ``async with`` at a time (entering it again while it runs raises RuntimeError); it
    can be entered again after leaving, and then schedules every job afresh.

    Raises:
        TypeError, ValueError: (at once) a bad argument.
    """

    def __init__(
        self,
        session: Session,
        prefix: str,
        *,
        worker: str | None = None,
        now: Callable[[], datetime] | None = None,
        misfire_grace: float = 1.0,
        history: int = 100,
    ) -> None:
        if not isinstance(history, int) or isinstance(history, bool):
            raise TypeError(f"history is an int number of runs, not {type(history).__name__}")
        if history < 1:
            raise ValueError("history must keep at least one run")
        if not isinstance(misfire_grace, int | float) or isinstance(misfire_grace, bool):
            raise TypeError(f"misfire_grace is a number of seconds, not {type(misfire_grace).__name__}")
        if not 0 <= misfire_grace < math.inf:
            raise ValueError(f"misfire_grace must be a finite number of seconds >= 0, not {misfire_grace!r}")
        if worker is not None and not isinstance(worker, str):
            raise TypeError(f"worker is a str, not {type(worker).__name__}")
        if now is not None and not callable(now):
            raise TypeError(f"now is a function returning a datetime, not {type(now).__name__}")
        self.session = require_session(session)
        self.prefix = prefix
        self._prefix = name_prefix(prefix)
        self._worker = worker
        self._now = now or (lambda: datetime.now(UTC))
        self._grace = misfire_grace
        self._history = history
        self._targets: dict[str, Callable[..., Awaitable[None]]] = {}
        self._tickers: dict[str, tuple[JobSpec, anyio.CancelScope]] = {}
        self._running: dict[str, anyio.CancelScope] = {}
        self._stack: AsyncExitStack | None = None
        self._supervisor: Supervisor | None = None

    @property
    def worker(self) -> str:
        return self._worker or format(self.session.lease_id, "x")

    def register(self, target: str, fn: Callable[..., Awaitable[None]]) -> None:
        """Let this worker run jobs whose ``target`` is ``target``: ``await fn(RunContext, *spec.args)``."""
        if not isinstance(target, str) or not callable(fn):
            raise TypeError(f"register takes a str target and a coroutine function, not {target!r}, {fn!r}")
        self._targets[target] = fn

    # -- managing jobs (from any process) --------------------------------------------------------------

    async def put_job(self, spec: JobSpec) -> None:
        """Add or replace a job spec; every worker follows it at once."""
        await publish(self.session.backend, f"{self.prefix}/jobs/{spec.name}", asdict(spec), expected_revision=None)

    async def remove_job(self, name: str) -> None:
        """Remove job ``name``; every worker stops ticking it (a run in progress finishes)."""
        _check_job_name(name)
        await publish(self.session.backend, f"{self.prefix}/jobs/{name}", None, expected_revision=None)

    async def kill(self, name: str) -> None:
        """Cancel the running instance of job ``name`` wherever it runs (the request lives 10 s)."""
        _check_job_name(name)
        lease = await self.session.backend.grant(10)
        await self.session.backend.txn([], [Put(self._prefix + b"killer/" + name.encode(), b"", lease.id)])

    async def history(self, name: str) -> list[RunRecord]:
        """The runs of job ``name`` still kept, oldest first."""
        _check_job_name(name)
        result = await self.session.backend.range(Range(self._runs(name), prefix=True))
        return [RunRecord(**json.loads(kv.value)) for kv in result.kvs]

    # -- working -----------------------------------------------------------------------------------------

    async def __aenter__(self) -> Scheduler:
        # The worker's whole life is a guarded block: if the session is lost, its work and the body of
        # ``async with scheduler`` are cancelled, and the exit raises OwnershipLostError (never silently idle).
        # Inside it, the supervisor: a background task refused by the store cancels the body too, and the exit
        # raises that refusal (typed, once, whichever task met it first).
        if self._stack is not None:
            raise RuntimeError(f"Scheduler {self.prefix!r} is already running (entered twice)")
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.session.guarded(OwnershipLostError, what=f"scheduler {self.prefix!r}"))
            stack.callback(self._tickers.clear)  # stopped: it may be entered again (and schedules afresh)
            self._supervisor = await stack.enter_async_context(supervised(f"scheduler {self.prefix!r}"))
            ready = anyio.Event()
            self._supervisor.start_soon(self._keep_following, partial(self._follow_jobs, ready))
            self._supervisor.start_soon(self._keep_following, self._follow_kills)
            self._supervisor.start_soon(self._keep_following, self._detect_lost)
            await ready.wait()  # cancelled (and the failure raised by the stack) if a follower is refused first
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _keep_following(self, follow: Callable[[], Awaitable[None]]) -> None:
        await keep_following(follow, span="coordkit.scheduler.follow", backend=self.session.backend.name)

    def _runs(self, job: str) -> bytes:
        return self._prefix + b"runs/" + job.encode() + b"/"

    async def _follow_jobs(self, ready: anyio.Event) -> None:
        async with ConfigView(self.session.backend, f"{self.prefix}/jobs/") as jobs:
            changes = jobs.changes()
            for name, raw in jobs.snapshot().items():
                self._reschedule(name, raw)
            ready.set()
            async for change in changes:
                self._apply(change)

    def _apply(self, change: ConfigChange[Any]) -> None:
        if change.error is None:
            self._reschedule(change.key, change.value)

    def _reschedule(self, name: str, raw: Any) -> None:
        try:
            spec = None if raw is None else JobSpec(**raw)
        except (TypeError, ValueError, ImportError):
            spec = None  # a bad spec (or a cron spec without croniter) must not stop the worker: not scheduled
        old = self._tickers.get(name)
        if old is not None and old[0] == spec:
            return  # republished unchanged
        if old is not None:
            del self._tickers[name]
            old[1].cancel()  # the old ticker stops; a run it started goes on (it is a task of its own)
        if spec is None or not spec.enabled:
            return
        if not spec.enabled:
            return
        scope = anyio.CancelScope()
        self._tickers[name] = (spec, scope)
        assert self._supervisor is not None
        self._supervisor.start_soon(self._tick, spec, scope)

    async def _tick(self, spec: JobSpec, scope: anyio.CancelScope) -> None:
        with scope:
            last = self._now()
            if spec.misfire == "late":
                last = spec.previous_tick(last) - timedelta(microseconds=1)  # a tick missed just before we started
            while True:
                tick = spec.next_tick(last)
                delay = (tick - self._now()).total_seconds()
                if delay > 0:
                    await anyio.sleep(delay)
                last = tick
                late = (self._now() - tick).total_seconds()
                if late > self._grace:
                    if spec.misfire == "skip":
                        continue
                    # "late": this one runs; every tick missed after it is skipped
                    last = spec.previous_tick(self._now())
                assert self._supervisor is not None
                self._supervisor.start_soon(self._run, spec, tick)  # not under the ticker: a spec change lets it finish
                await anyio.lowlevel.checkpoint()

    async def _run(self, spec: JobSpec, tick: datetime) -> None:
        fn = self._targets.get(spec.target)
        if fn is None:
            return  # this worker cannot run it; another one can claim it
        session = self.session
        tick_id = f"{int(tick.timestamp() * 1000):016d}".encode()
        record_key = self._runs(spec.name) + tick_id
        running_key = self._prefix + b"running/" + spec.name.encode() + b"/" + tick_id
        record = RunRecord(spec.name, tick.isoformat(), self.worker, self._now().isoformat(), None, "running")
        # Exactly once: the run record is created only if absent, and only for a tick after the newest one claimed
        # (``last/<job>``), so a trimmed record cannot let an old tick run again. The running marker lives with
        # our lease.
        last_key = self._prefix + b"last/" + spec.name.encode()
        writes: list[Op] = [
            Put(record_key, _encode(record)),
            Put(running_key, b"", session.lease_id),
            Put(last_key, tick_id),
        ]
        try:
            claim = await session.backend.txn(
                [Compare.create(record_key, "==", 0), Compare.value(last_key, "<", tick_id)], writes
            )
            if not claim.succeeded:  # maybe the job's very first tick: no last/ key yet
                claim = await session.backend.txn(
                    [Compare.create(record_key, "==", 0), Compare.create(last_key, "==", 0)], writes
                )
        except LeaseExpiredError as exc:  # the running marker is bound to our lease: the session is gone
            session._report_lease_gone(exc)  # its guard stops this worker, with OwnershipLostError
            return
        except Exception as exc:
            if is_permanent(exc):
                raise  # refused: the supervisor stops the worker with this error
            return  # cannot claim now (unavailable, a malformed reply): another worker will
        if not claim.succeeded:
            return
        outcome: Outcome = "ok"
        error = None
        try:
            async with session.guarded(OwnershipLostError):
                with anyio.CancelScope() as kill:  # cancelled by a kill request
                    self._running[spec.name] = kill
                    try:
                        await fn(RunContext(spec.name, tick, self.worker), *spec.args)
                    finally:
                        self._running.pop(spec.name, None)
            if kill.cancelled_caught:
                outcome = "killed"
        except OwnershipLostError:
            return  # our lease is going: the running marker vanishes and the run is recorded as lost
        except Exception as exc:
            outcome, error = "error", error_text(exc)
        final = RunRecord(**{**asdict(record), "ended": self._now().isoformat(), "outcome": outcome, "error": error})
        with anyio.CancelScope(shield=True):
            await retry_while_valid(
                session, lambda: session.backend.txn([], [Put(record_key, _encode(final)), Delete(running_key)])
            )
            await retry_while_valid(session, lambda: self._trim_history(spec.name))

    async def _trim_history(self, job: str) -> None:
        records = await self.session.backend.range(Range(self._runs(job), prefix=True, keys_only=True))
        excess = records.kvs[: max(0, len(records.kvs) - self._history)]
        if excess:
            await self.session.backend.txn([], [Delete(kv.key) for kv in excess])

    async def _follow_kills(self) -> None:
        killer = self._prefix + b"killer/"
        async with Watch(self.session.backend, killer, prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    continue  # requests already there were for instances running before we looked
                for event in item.events:
                    name = event.kv.key[len(killer) :].decode(errors="replace")  # no job has a non-UTF-8 name
                    scope = self._running.get(name)
                    if event.type is EventType.PUT and scope is not None:
                        scope.cancel()

    async def _detect_lost(self) -> None:
        """A running marker deleted while its record still says running: the runner died. Record it once."""
        running = self._prefix + b"running/"
        backend = self.session.backend
        async with Watch(backend, running, prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    continue
                for event in item.events:
                    if event.type is EventType.DELETE:
                        job, _, tick_id = event.kv.key[len(running) :].partition(b"/")
                        record_key = self._prefix + b"runs/" + job + b"/" + tick_id
                        await retry_call(partial(self._record_lost, record_key))

    async def _record_lost(self, record_key: bytes) -> None:
        current = await self.session.backend.range(Range(record_key))
        if not current.kvs:
            return
        try:
            record = json.loads(current.kvs[0].value)
            running = record["outcome"] == "running"
        except (ValueError, TypeError, KeyError):
            return  # not a record of ours (written by something else): nothing to mark
        if running:  # compare-and-swap: however many workers saw it, one records it
            lost = json.dumps({**record, "outcome": "lost"}, separators=(",", ":")).encode()
            await self.session.backend.txn(
                [Compare.mod(record_key, "==", current.kvs[0].mod_revision)], [Put(record_key, lost)]
            )


def _encode(record: RunRecord) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode()
