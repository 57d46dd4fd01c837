"""Scheduler: a distributed cron. Every worker sees every job spec; each tick runs exactly once cluster-wide.

Keys under ``<prefix>/``: ``jobs/<job>`` (the spec, JSON; followed live by every worker through a ConfigView),
``runs/<job>/<run>`` (the run record, the run id being the tick in ms: claimed by a compare-and-swap create, so
one worker runs each tick; kept after the run as history, trimmed by count and age), ``last/<job>`` (the newest
tick claimed: a claim needs a later one), ``running/<job>/<run>`` (bound to the runner's lease while it runs:
when it vanishes with the record still "running", the runner died and any worker records the run as "lost"),
``active/<job>`` (the newest active run, bound to its runner's lease: the overlap policy compares it in the
claim), ``killer/<job>`` and ``killer/<job>/<run>`` (kill requests: every run claimed before the request's
revision is cancelled, wherever it runs) and ``workers/<member>`` (the workers' membership group).

Ticks come from a cron expression (the ``croniter`` package: ``pip install 'coordkit[cron]'``; 5 fields, or 6
with seconds first when the spec says so; in a time zone per job) or a fixed interval, on the wall clock given
by ``now`` (UTC). A tick found late by more than ``misfire_grace`` seconds (or the job's starting deadline) is
skipped and recorded as missed, or run once late, as the job's ``misfire`` policy says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from functools import partial
from types import TracebackType
from typing import Any, Literal, final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import anyio.lowlevel

from .. import _telemetry
from .._backends.types import Compare, CompareTarget, Delete, EventType, Op, Put, Range, RangeResult, TxnResult
from .._errors import LeaseExpiredError, OwnershipLostError, error_text, is_permanent
from .._keys import name_prefix
from .._retry import retry_call
from .._session import Session, require_session, retry_while_valid
from .._supervisor import Supervisor, keep_following, supervised
from .._version import __version__
from .._watch import Snapshot, Watch
from .command import CommandOutcome, kill_deadline, run_command
from .config import ConfigChange, ConfigView, publish
from .group import Group, Membership

Outcome = Literal["running", "ok", "error", "killed", "timeout", "lost", "skipped", "missed"]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A scheduled job, as stored under ``<prefix>/jobs/<name>``.

    Attributes:
        name: the job's name (no "/").
        target: the name a worker registered the coroutine function under (`Scheduler.register`), or None for
            a command job.
        cron: a cron expression, or None. 5 fields (minute hour day month weekday) or an alias such as
            "@hourly"; with ``cron_seconds`` 6 fields, seconds FIRST (as Go's robfig/cron reads them).
        interval: seconds between ticks (ticks at multiples of it since the epoch), or None. Exactly one of
            ``cron`` and ``interval``.
        args: JSON arguments passed to the target after the run context.
        enabled: a disabled job does not tick.
        misfire: what to do with a tick found late by more than the scheduler's grace (or ``starting_deadline``):
            "skip" it (recorded as "missed"), or run it "late" (once: later missed ticks are skipped).
        overlap: what a tick does while a run of the job is active anywhere in the cluster: "forbid" (the
            default: the tick is skipped, recorded as "skipped"), "allow" (it runs too), "replace" (the
            active runs are killed and the new one starts).
        starting_deadline: seconds after its tick by which a run must start, else the tick is missed (for this
            job, instead of the scheduler's ``misfire_grace``); None: the scheduler's grace.
        timeout: seconds a run may last; then it is cancelled (a command's process group is stopped) and
            recorded as "timeout". None: no limit.
        command: instead of ``target``, a command to run: an argv list (``["backup", "--full"]``) or a shell
            line (``"backup --full | gzip > /tmp/b.gz"``, run by ``/bin/sh -c``). Only workers made with
            ``run_commands=True`` run them.
        cron_seconds: ``cron`` has 6 fields, the first being seconds ("*/10 * * * * *": every 10 s).
        timezone: the IANA time zone ``cron`` is read in ("Europe/Paris"; zoneinfo), or None for UTC.

    Raises:
        TypeError, ValueError: a bad field: a name that is empty, holds "/" or is no valid name text; an interval
            that is not a finite number of seconds from 1 µs to 100 years; an invalid or ambiguous cron
            expression (6 fields without ``cron_seconds``); an unknown time zone; ...
    """

    name: str
    target: str | None = None
    cron: str | None = None
    interval: float | None = None
    args: list[Any] = field(default_factory=list)
    enabled: bool = True
    misfire: Literal["skip", "late"] = "skip"
    overlap: Overlap = "forbid"
    starting_deadline: float | None = None
    timeout: float | None = None
    command: list[str] | str | None = None
    cron_seconds: bool = False
    timezone: str | None = None

    def __post_init__(self) -> None:
        _check_job_name(self.name)
        if (self.target is None) == (self.command is None):
            raise ValueError(f"job {self.name!r}: give exactly one of target and command")
        if self.target is not None and not isinstance(self.target, str):
            raise TypeError(f"job {self.name!r}: target is a str (the name given to register), not {self.target!r}")
        if self.command is not None:
            _check_command(self.name, self.command)
        if (self.cron is None) == (self.interval is None):
            raise ValueError(f"job {self.name!r}: give exactly one of cron and interval")
        if self.interval is not None:
            _check_interval(self.name, self.interval)
            if self.cron_seconds or self.timezone is not None:
                raise ValueError(f"job {self.name!r}: cron_seconds and timezone apply to cron jobs only")
        if not isinstance(self.cron_seconds, bool):
            raise TypeError(f"job {self.name!r}: cron_seconds is a bool")
        if self.timezone is not None:
            _zone(self.name, self.timezone)
        if self.cron is not None:
            _check_cron(self.name, self.cron, self.cron_seconds)
        if not isinstance(self.args, list) or not isinstance(self.enabled, bool):
            raise TypeError(f"job {self.name!r}: args is a list and enabled a bool")
        if self.misfire not in ("skip", "late"):
            raise ValueError(f"job {self.name!r}: misfire must be 'skip' or 'late'")
        if self.overlap not in ("forbid", "allow", "replace"):
            raise ValueError(f"job {self.name!r}: overlap must be 'forbid', 'allow' or 'replace', not {self.overlap!r}")
        for what in ("starting_deadline", "timeout"):
            value = getattr(self, what)
            if value is not None and (
                not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf
            ):
                raise ValueError(f"job {self.name!r}: {what} is a finite number of seconds >= 0, or None")

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (an aware datetime), in UTC."""
        if self.interval is not None:
            # Exact (timedelta) arithmetic: float seconds since the epoch would round ticks onto each other.
            step = timedelta(seconds=self.interval)
            return _EPOCH + ((after - _EPOCH) // step + 1) * step
        start = after.astimezone(_zone(self.name, self.timezone))
        next_time: datetime = self._croniter(start).get_next(datetime)
        return next_time.astimezone(UTC)

    def previous_tick(self, before: datetime) -> datetime:
        """The last tick at or before ``before`` (an aware datetime), in UTC."""
        if self.interval is not None:
            step = timedelta(seconds=self.interval)
            return _EPOCH + ((before - _EPOCH) // step) * step
        start = (before + timedelta(microseconds=1)).astimezone(_zone(self.name, self.timezone))
        previous: datetime = self._croniter(start).get_prev(datetime)
        return previous.astimezone(UTC)

    def _croniter(self, start: datetime) -> Any:
        return _croniter()(self.cron, start, second_at_beginning=self.cron_seconds)


Overlap = Literal["forbid", "allow", "replace"]


def _check_command(name: str, command: object) -> None:
    if isinstance(command, str):
        if not command.strip() or "\0" in command:
            raise ValueError(f"job {name!r}: a command line is a non-empty shell line without NUL")
        return
    if not isinstance(command, list) or not command or not all(isinstance(a, str) and "\0" not in a for a in command):
        raise TypeError(f"job {name!r}: command is a non-empty list of str (argv) or a shell line (str)")
    if not command[0]:
        raise ValueError(f"job {name!r}: the command's program is empty")


def _check_cron(name: str, cron: object, seconds: bool) -> None:
    if not isinstance(cron, str):
        raise TypeError(f"job {name!r}: cron is a str, not {type(cron).__name__}")
    fields = cron.split()
    if cron.strip().startswith("@"):
        if seconds:
            raise ValueError(f"job {name!r}: an alias such as {cron!r} has no seconds field: drop cron_seconds")
    elif seconds and len(fields) != 6:
        raise ValueError(
            f"job {name!r}: with cron_seconds, a cron expression has 6 fields, seconds first "
            f"(second minute hour day month weekday), not {len(fields)}: {cron!r}"
        )
    elif not seconds and len(fields) != 5:
        hint = (
            " (a 6-field line is ambiguous: Go's robfig/cron reads the first field as seconds, croniter the"
            " last; set cron_seconds=True for seconds first, the only 6-field form accepted)"
            if len(fields) == 6
            else ""
        )
        raise ValueError(
            f"job {name!r}: a cron expression has 5 fields (minute hour day month weekday), "
            f"not {len(fields)}: {cron!r}{hint}"
        )
    if not _croniter().is_valid(cron, second_at_beginning=seconds):
        raise ValueError(f"job {name!r}: invalid cron expression {cron!r}")


def _zone(name: str, timezone: str | None) -> tzinfo:
    if timezone is None:
        return UTC
    if not isinstance(timezone, str):
        raise TypeError(f"job {name!r}: timezone is an IANA zone name (str), not {type(timezone).__name__}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"job {name!r}: unknown time zone {timezone!r}") from exc


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: the longest interval: its ticks (multiples since the epoch) stay far from datetime's year 9999
_MAX_INTERVAL = timedelta(days=36525)


def _check_job_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"job names are str, not {type(name).__name__}")
    if not name or "/" in name:
        raise ValueError(f"job names are non-empty and contain no '/': {name!r}")
    name_prefix(name)  # the text rules of every name: valid UTF-8, no NUL


def check_job_name(name: str) -> None:
    """Check that ``name`` can name a `JobSpec` (or a run, as `Scheduler.kill` takes it): before using it.

    Raises:
        TypeError: not a str.
        ValueError: empty, containing "/" or NUL, or not valid UTF-8.
    """
    _check_job_name(name)


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
    """One tick of a job: which run, where, when, how it ended.

    Attributes:
        job: the job name.
        run: the run's id, unique per job (its tick in milliseconds since the epoch, on 16 digits): what
            ``kill(job, run=...)`` takes.
        tick: the scheduled time (UTC) this run is for.
        worker: the worker that ran it (or recorded it skipped or missed).
        started: when it started (the scheduler's clock, UTC ISO text).
        ended: when it ended, or None while running (or when lost).
        outcome: "running"; "ok"; "error" (the job raised, or the command exited non-zero or could not start);
            "killed"; "timeout"; "lost" (the worker died while running it); "skipped" (a run of the job was
            active and its overlap policy is "forbid"); "missed" (no worker reached the tick in time).
        error: the error text for "error" ("<type>: <message>", cut to 4096 characters).
        exit_status: a command's exit status (128 + N for a death by signal N), else None.
        stdout, stderr: a command's last 4 KiB of output (decoded as UTF-8, bad bytes replaced), else None.
    """

    job: str
    run: str
    tick: str
    worker: str
    started: str
    ended: str | None
    outcome: Outcome
    error: str | None = None
    exit_status: int | None = None
    stdout: str | None = None
    stderr: str | None = None


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a job's coroutine receives: which job, run and tick it runs, and where.

    Attributes:
        job: the job's name.
        tick: the scheduled time (UTC) this run is for.
        worker: the name of the worker running it.
        run: the run's id (`RunRecord.run`): what ``kill(job, run=...)`` takes.
    """

    job: str
    tick: datetime
    worker: str
    run: str = ""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A scheduler worker, as it announces itself in the workers' membership group (`Scheduler.workers`).

    Attributes:
        worker: its name in run records.
        host: its host name.
        pid: its process id.
        version: its coordkit version.
        capacity: the most runs it takes at once, or None (no limit).
        running: the runs it is running now, as (job, run) pairs.
        commands: whether it runs command jobs.
        targets: the targets registered on it (the function jobs it runs); None if it does not say (a worker of
            an older version): it may run any.
    """

    worker: str
    host: str
    pid: int
    version: str
    capacity: int | None
    running: tuple[tuple[str, str], ...]
    commands: bool
    targets: tuple[str, ...] | None = None

    def can_take(self, spec: JobSpec) -> bool:
        """Whether this worker, as announced, runs ``spec``'s kind of job and has room for one more run."""
        runs = self.commands if spec.command is not None else self.targets is None or spec.target in self.targets
        return runs and (self.capacity is None or len(self.running) < self.capacity)


#: bytes of a command's stdout and of its stderr kept in its run record
OUTPUT_TAIL = 4096

_BUSY = "busy"  # a claim refused because a run of the job is active (overlap "forbid")


@dataclass(eq=False)
class _Run:
    """A run in progress on this worker: what a kill request must reach."""

    job: str
    run: str
    claimed: int  # the store revision of its claim: kill requests written after it do not concern it
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


def _check_options(
    worker: str | None,
    now: Callable[[], datetime] | None,
    misfire_grace: float,
    history: int,
    history_age: float | None,
    run_commands: bool,
    stop_grace: float,
    capacity: int | None,
) -> None:
    """`Scheduler`'s argument checks: TypeError or ValueError, at once, before anything is started."""
    if not isinstance(history, int) or isinstance(history, bool):
        raise TypeError(f"history is an int number of runs, not {type(history).__name__}")
    if history < 1:
        raise ValueError("history must keep at least one run")
    for what, value, optional in (
        ("misfire_grace", misfire_grace, False),
        ("history_age", history_age, True),
        ("stop_grace", stop_grace, False),
    ):
        if value is None and optional:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"{what} is a number of seconds, not {type(value).__name__}")
        if not 0 <= value < math.inf:
            raise ValueError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    if worker is not None and not isinstance(worker, str):
        raise TypeError(f"worker is a str, not {type(worker).__name__}")
    if now is not None and not callable(now):
        raise TypeError(f"now is a function returning a datetime, not {type(now).__name__}")
    if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool)):
        raise TypeError(f"capacity is an int number of runs, or None, not {type(capacity).__name__}")
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be at least 1 run, not {capacity}")
    if not isinstance(run_commands, bool):
        raise TypeError(f"run_commands is a bool, not {type(run_commands).__name__}")


@final
class Scheduler:
    """A distributed cron worker. Every worker of ``prefix`` follows all job specs; each tick runs once.

    ``scheduler.register("report", send_report)`` names the coroutine functions this worker can run, then
    ``async with scheduler:`` works until the block ends. The block is guarded by the session: if it is lost,
    the worker stops, the body is cancelled and ``OwnershipLostError`` is raised. If the store refuses the
    worker (`AuthenticationError`: credentials or permission revoked), the body is cancelled and that error is
    raised; transient failures (unavailable, malformed replies) are retried. Add, change or remove jobs
    with `put_job` / `remove_job` from anywhere: every worker picks the change up at once. `kill` cancels a
    job's running runs on whichever workers run them; `jobs`, `job`, `history` and `workers` read the state.

    Args:
        session: the worker's session (running markers are bound to its lease).
        prefix: the scheduler's key prefix (e.g. "cron").
        worker: this worker's name in run records (default: its lease id).
        now: the wall clock, returning an aware UTC datetime (default: the system clock). Tests pass a clock
            derived from ``anyio.current_time()`` to run on virtual time.
        misfire_grace: seconds a tick may be late before the job's misfire policy applies (finite, >= 0).
        history: run records kept per job (oldest removed first; >= 1).
        history_age: seconds a run record is kept after its tick (None: no limit by age).
        run_commands: run command jobs (`JobSpec.command`). Off by default: whoever can write the jobs prefix
            could otherwise run any program on every worker.
        stop_grace: seconds between SIGTERM and SIGKILL when a command's process group must stop (SIGKILL comes
            sooner if the session's lease may end before).
        capacity: the most runs this worker takes at once (>= 1); at capacity it leaves ticks to other workers.
            None: no limit.

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
        history_age: float | None = None,
        run_commands: bool = False,
        stop_grace: float = 5.0,
        capacity: int | None = None,
    ) -> None:
        _check_options(worker, now, misfire_grace, history, history_age, run_commands, stop_grace, capacity)
        self.session = require_session(session)
        self.prefix = prefix
        self._prefix = name_prefix(prefix)
        self._worker = worker
        self._now = now or (lambda: datetime.now(UTC))
        self._grace = misfire_grace
        self._history = history
        self._history_age = history_age
        self._run_commands = run_commands
        self._stop_grace = stop_grace
        self._capacity = capacity
        self._busy = 0  # runs claimed or being claimed on this worker (for the capacity)
        self._membership: Membership | None = None
        self._announce: anyio.Event | None = None  # set: what this worker runs changed (made when entered)
        self._targets: dict[str, Callable[..., Awaitable[None]]] = {}
        self._tickers: dict[str, tuple[JobSpec, anyio.CancelScope]] = {}
        self._running: dict[str, set[_Run]] = {}
        # The newest kill request seen per job (all runs) and per run: a run claimed before it is killed,
        # even if it registers after the request arrived.
        self._kills: dict[str, int] = {}
        self._run_kills: dict[tuple[str, str], int] = {}
        self._supervisor: Supervisor | None = None
        self._stack: AsyncExitStack | None = None
        self._member = ""  # this worker's member id in the workers' group (set when entered)
        self._peers: dict[str, WorkerInfo] = {}  # member id -> announcement, followed by watch
        self._last: dict[bytes, bytes] = {}  # job -> the newest tick claimed (last/<job>), followed by watch

    @property
    def worker(self) -> str:
        """This worker's name in run records."""
        return self._worker if self._worker is not None else format(self.session.lease_id, "x")

    def register(self, target: str, fn: Callable[..., Awaitable[None]]) -> None:
        """Let this worker run jobs whose ``target`` is ``target``: ``await fn(RunContext, *spec.args)``."""
        if not isinstance(target, str) or not callable(fn):
            raise TypeError(f"register takes a str target and a coroutine function, not {target!r}, {fn!r}")
        self._targets[target] = fn
        self._changed()  # announced: the other workers count on this one for the target's ticks

    # -- managing jobs (from any process) --------------------------------------------------------------

    async def put_job(self, spec: JobSpec) -> None:
        """Add or replace a job spec; every worker follows it at once."""
        if not isinstance(spec, JobSpec):
            raise TypeError(f"put_job takes a JobSpec, not {type(spec).__name__}")
        await publish(self.session.backend, f"{self.prefix}/jobs/{spec.name}", asdict(spec), expected_revision=None)

    async def remove_job(self, name: str) -> None:
        """Remove job ``name``; every worker stops ticking it (a run in progress finishes)."""
        _check_job_name(name)
        await publish(self.session.backend, f"{self.prefix}/jobs/{name}", None, expected_revision=None)

    async def kill(self, name: str, *, run: str | None = None) -> None:
        """Cancel the runs of job ``name`` running now, on every worker; or only run ``run``.

        Every run claimed before the request is written is killed, wherever it runs (even one whose worker
        has not started it yet); runs claimed after it are not. The runs are recorded as "killed". The request
        key lives 10 s.
        """
        _check_job_name(name)
        key = self._prefix + b"killer/" + name.encode()
        if run is not None:
            _check_job_name(run)
            key += b"/" + run.encode()
        lease = await self.session.backend.grant(10)
        # No compare: a newer request supersedes an older one (its revision is what runs are compared with).
        await self.session.backend.txn([], [Put(key, b"", lease.id)])

    async def workers(self) -> list[WorkerInfo]:
        """The workers of this prefix now running (entered), by name, with what each runs.

        A worker that crashed stays listed until its session's lease ends. Entries that cannot be read (written
        by another tool) are left out, and reported.
        """
        view = await self._group().members()
        found = []
        for raw in view.members.values():
            try:
                found.append(_worker_info(raw))
            except (TypeError, ValueError, KeyError) as exc:
                self._report("bad_worker", exc)
        return sorted(found, key=lambda info: (info.worker, info.pid))

    def _group(self) -> Group:
        return Group(self.session, f"{self.prefix}/workers")

    def _announcement(self) -> bytes:
        running = sorted((run.job, run.run) for runs in self._running.values() for run in runs)
        info = WorkerInfo(
            self.worker,
            socket.gethostname(),
            os.getpid(),
            __version__,
            self._capacity,
            tuple(running),
            self._run_commands,
            tuple(sorted(self._targets)),
        )
        return json.dumps(asdict(info), separators=(",", ":")).encode()

    async def _keep_announcing(self) -> None:
        # Coalesced: one update for however many runs started or ended since the last one.
        while True:
            assert self._announce is not None
            await self._announce.wait()
            self._announce = anyio.Event()
            assert self._membership is not None
            await self._membership.update(self._announcement())

    async def jobs(self) -> list[JobSpec]:
        """Every valid job spec stored, by name. Invalid ones (written by another tool) are left out, and reported."""
        result = await self.session.backend.range(Range(self._prefix + b"jobs/", prefix=True))
        specs = []
        for kv in result.kvs:
            try:
                specs.append(_decode_spec(kv.key, kv.value))
            except (TypeError, ValueError, ImportError) as exc:
                self._report("bad_spec", exc)
        return specs

    async def job(self, name: str) -> JobSpec | None:
        """Job ``name``'s spec, or None if there is none.

        Raises:
            ValueError: the stored spec is not a valid `JobSpec` (written by another tool).
        """
        _check_job_name(name)
        result = await self.session.backend.range(Range(self._prefix + b"jobs/" + name.encode()))
        if not result.kvs:
            return None
        try:
            return _decode_spec(result.kvs[0].key, result.kvs[0].value)
        except TypeError as exc:
            raise ValueError(f"job {name!r}: the stored spec is invalid: {exc}") from exc

    async def history(self, name: str) -> list[RunRecord]:
        """The runs of job ``name`` still kept, oldest first. Records that cannot be read are left out, and reported."""
        _check_job_name(name)
        result = await self.session.backend.range(Range(self._runs(name), prefix=True))
        records = []
        for kv in result.kvs:
            try:
                records.append(_decode_record(kv.key, kv.value))
            except (TypeError, ValueError) as exc:
                self._report("bad_record", exc)
        return records

    def _report(self, what: str, exc: BaseException) -> None:
        _telemetry.record_failure(
            f"coordkit.scheduler.{what}", _telemetry.attributes(backend=self.session.backend.name), exc
        )

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
            # Members are keyed by lease and a random tag: a worker restarted under the same name joins at once.
            self._member = member = f"{self.session.lease_id:x}.{secrets.token_hex(4)}"
            self._announce = anyio.Event()
            self._membership = await stack.enter_async_context(
                self._group().join(member, metadata=self._announcement())
            )
            self._supervisor = await stack.enter_async_context(supervised(f"scheduler {self.prefix!r}"))
            self._supervisor.start_soon(self._keep_following, self._keep_announcing)
            ready = anyio.Event()
            self._supervisor.start_soon(self._keep_following, partial(self._follow_jobs, ready))
            self._supervisor.start_soon(self._keep_following, self._follow_kills)
            self._supervisor.start_soon(self._keep_following, self._detect_lost)
            self._supervisor.start_soon(self._keep_following, self._follow_peers)
            self._supervisor.start_soon(self._keep_following, self._follow_last)
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
            for error in jobs.errors.values():
                self._report("bad_spec", error)
            ready.set()
            async for change in changes:
                self._apply(change)

    def _apply(self, change: ConfigChange[Any]) -> None:
        if change.error is None:
            self._reschedule(change.key, change.value)
        else:  # not JSON: the view keeps the previous value, and so does the ticker
            self._report("bad_spec", change.error)

    def _reschedule(self, name: str, raw: Any) -> None:
        try:
            spec = None if raw is None else _spec_at(name, raw)
        except (TypeError, ValueError, ImportError) as exc:
            spec = None  # a bad spec (or a cron spec without croniter) must not stop the worker: not scheduled
            self._report("bad_spec", exc)
        old = self._tickers.get(name)
        if old is not None and old[0] == spec:
            return  # republished unchanged
        if old is not None:
            del self._tickers[name]
            old[1].cancel()  # the old ticker stops; a run it started goes on (it is a task of its own)
        if spec is None or not spec.enabled:
            return
        scope = anyio.CancelScope()
        self._tickers[name] = (spec, scope)
        assert self._supervisor is not None
        self._supervisor.start_soon(self._tick, spec, scope)

    def _can_run(self, spec: JobSpec) -> bool:
        return self._run_commands if spec.command is not None else spec.target in self._targets

    async def _tick(self, spec: JobSpec, scope: anyio.CancelScope) -> None:
        # The ticker never waits for a run (each is a task of its own): what a tick does while a run of the
        # job is active is the job's overlap policy, decided cluster-wide in the claim.
        limit = self._grace if spec.starting_deadline is None else spec.starting_deadline
        assert self._supervisor is not None
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
                if late > limit:
                    if spec.misfire == "skip":
                        # One record for however many ticks were missed (after a suspended host, say): the newest.
                        last = max(tick, spec.previous_tick(self._now() - timedelta(seconds=limit)))
                        self._supervisor.start_soon(self._record, spec, last, "missed")
                        await anyio.lowlevel.checkpoint()
                        continue
                    # "late": this one runs; every tick missed after it is skipped
                    last = spec.previous_tick(self._now())
                self._supervisor.start_soon(self._run, spec, tick)  # not under the ticker: a spec change lets it finish
                await anyio.lowlevel.checkpoint()

    async def _claim(self, spec: JobSpec, tick: datetime, outcome: Outcome) -> tuple[TxnResult, RunRecord] | str | None:
        """Create the tick's run record (a run, or a skipped or missed tick): the result, _BUSY, or None (taken).

        Exactly once: the record is created only if absent, and only for a tick after the newest one claimed
        (``last/<job>``), so a trimmed record cannot let an old tick run again. A run also writes its running
        marker and the job's ``active/<job>`` key, both bound to our lease; under overlap "forbid" the claim
        requires that no run holds ``active/<job>``, so at most one run of the job is active in the cluster.
        """
        session = self.session
        run_id = _run_id(tick)
        record = RunRecord(spec.name, run_id, tick.isoformat(), self.worker, self._now().isoformat(), None, outcome)
        job = spec.name.encode()
        record_key = self._runs(spec.name) + run_id.encode()
        last_key = self._prefix + b"last/" + job
        active_key = self._prefix + b"active/" + job
        compares = [Compare.create(record_key, "==", 0)]
        writes: list[Op] = [Put(record_key, _encode(record)), Put(last_key, run_id.encode())]
        if outcome == "running":
            writes += [
                Put(self._prefix + b"running/" + job + b"/" + run_id.encode(), b"", session.lease_id),
                Put(active_key, run_id.encode(), session.lease_id),
            ]
            if spec.overlap == "forbid":
                compares.append(Compare.create(active_key, "==", 0))
            elif spec.overlap == "replace":  # a kill request for every run claimed before this one
                writes.append(Put(self._prefix + b"killer/" + job, b"", session.lease_id))
        # Compares (see the docstring): no record yet, a tick after the newest claimed, no active run (overlap
        # "forbid"). A failure reads all three: taken, past or busy, or a last/ compare that did not fit (retried).
        last_compare = Compare.value(last_key, "<", run_id.encode())
        for _ in range(4):
            result = await session.backend.txn(
                [*compares, last_compare],
                writes,
                [Range(record_key, keys_only=True), Range(last_key), Range(active_key, keys_only=True)],
            )
            if result.succeeded:
                return result, record
            found_record, found_last, found_active = (r for r in result.responses if isinstance(r, RangeResult))
            if found_record.kvs:
                return None  # another worker claimed the tick
            if found_last.kvs and found_last.kvs[0].value >= run_id.encode():
                return None  # a later tick was claimed: this one is past (its record may have been trimmed)
            # The compare on last/ held if it matched what is there: then what failed is the active run's.
            held = (last_compare.target is CompareTarget.VALUE) == bool(found_last.kvs)
            if held and found_active.kvs:
                return _BUSY
            if found_last.kvs:
                last_compare = Compare.value(last_key, "<", run_id.encode())
            else:
                last_compare = Compare.create(last_key, "==", 0)  # the job's very first tick
        return None  # contended every time: others are claiming it

    async def _record(self, spec: JobSpec, tick: datetime, outcome: Outcome) -> None:
        """Record a tick that does not run ("skipped", "missed"), once, however many workers see it."""
        if not self._can_run(spec) or not await self._my_turn(spec, tick):
            return  # this worker would not have run it, or another one recorded it
        try:
            claimed = await self._claim(spec, tick, outcome)
        except Exception as exc:
            if is_permanent(exc):
                raise
            return  # best effort: another worker may record it
        if isinstance(claimed, tuple):
            await retry_while_valid(self.session, lambda: self._trim_history(spec.name))

    async def _run(self, spec: JobSpec, tick: datetime) -> None:
        if not self._can_run(spec) or not await self._my_turn(spec, tick):
            return  # this worker cannot run it, or another one claimed it
        if self._capacity is not None and self._busy >= self._capacity:
            return  # full: another worker can claim it
        self._busy += 1
        try:
            await self._claim_and_run(spec, tick)
        finally:
            self._busy -= 1

    async def _my_turn(self, spec: JobSpec, tick: datetime) -> bool:
        """Whether this worker should claim the tick now: at once if it is first in the tick's line, else after a
        hand-off delay, unless the tick was claimed meanwhile (seen through the watch of ``last/``).

        The line (rendezvous hashing over the live workers that, as announced, can take the job) spreads the
        ticks evenly and lets one worker claim each, instead of every worker racing with a transaction. A first
        worker that is gone, full or slow costs the tick the hand-off delay, never the tick itself.
        """
        run_id = _run_id(tick)
        line = [member for member, info in self._peers.items() if info.can_take(spec)]
        if self._member not in line:
            line.append(self._member)  # our own announcement may not have come back yet
        if max(line, key=partial(_rank, spec.name, run_id)) == self._member:
            return True
        limit = self._grace if spec.starting_deadline is None else spec.starting_deadline
        await anyio.sleep(min(limit / 4, 1.0))
        return self._last.get(spec.name.encode(), b"") < run_id.encode()

    async def _follow_peers(self) -> None:
        async for view in self._group().watch():
            peers = {}
            for member, raw in view.members.items():
                try:
                    peers[member] = _worker_info(raw)
                except (TypeError, ValueError, KeyError) as exc:
                    self._report("bad_worker", exc)
            self._peers = peers

    async def _follow_last(self) -> None:
        last = self._prefix + b"last/"
        async with Watch(self.session.backend, last, prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    self._last = {kv.key[len(last) :]: kv.value for kv in item.kvs}
                    continue
                for event in item.events:
                    if event.type is EventType.PUT:
                        self._last[event.kv.key[len(last) :]] = event.kv.value
                    else:
                        self._last.pop(event.kv.key[len(last) :], None)

    async def _claim_and_run(self, spec: JobSpec, tick: datetime) -> None:
        session = self.session
        try:
            claimed = await self._claim(spec, tick, "running")
        except LeaseExpiredError as exc:  # the running marker is bound to our lease: the session is gone
            session._report_lease_gone(exc)  # its guard stops this worker, with OwnershipLostError
            return
        except Exception as exc:
            if is_permanent(exc):
                raise  # refused: the supervisor stops the worker with this error
            return  # cannot claim now (unavailable, a malformed reply): another worker will
        if claimed == _BUSY:
            await self._record(spec, tick, "skipped")
            return
        if not isinstance(claimed, tuple):
            return
        claim, record = claimed
        run = _Run(spec.name, record.run, claim.revision)
        self._register(run)  # no await since the claim: a kill request seen meanwhile is applied here
        outcome: Outcome = "ok"
        error = None
        command = CommandOutcome(OUTPUT_TAIL) if spec.command is not None else None
        try:
            async with session.guarded(OwnershipLostError):
                with run.scope, anyio.move_on_after(math.inf if spec.timeout is None else spec.timeout) as timer:
                    context = RunContext(spec.name, tick, self.worker, record.run)
                    await anyio.lowlevel.checkpoint()  # killed already (see _register): the job does not start
                    if command is not None:
                        await self._run_command(spec, context, command)
                    else:
                        await self._targets[spec.target or ""](context, *spec.args)
            if run.scope.cancelled_caught:
                outcome = "killed"
            elif timer.cancelled_caught:
                outcome = "timeout"
        except OwnershipLostError:
            return  # our lease is going: the running marker vanishes and the run is recorded as lost
        except Exception as exc:
            outcome, error = "error", error_text(exc)
        finally:
            self._running.get(spec.name, set()).discard(run)
            self._changed()
        await self._finish(spec.name, record.run, self._ended(record, outcome, error, command))

    def _ended(
        self, record: RunRecord, outcome: Outcome, error: str | None, command: CommandOutcome | None
    ) -> RunRecord:
        """The record of a run that ended now (with a command's exit status and output: a failing status is an
        error)."""
        extra: dict[str, Any] = {}
        if command is not None:
            extra = {
                "exit_status": command.status,
                "stdout": command.stdout.decode(errors="replace"),
                "stderr": command.stderr.decode(errors="replace"),
            }
            if outcome == "ok" and command.status != 0:
                outcome, error = "error", command.error or f"exit status {command.status}"
        return RunRecord(
            **{**asdict(record), "ended": self._now().isoformat(), "outcome": outcome, "error": error, **extra}
        )

    async def _run_command(self, spec: JobSpec, context: RunContext, outcome: CommandOutcome) -> None:
        argv = ["/bin/sh", "-c", spec.command] if isinstance(spec.command, str) else list(spec.command or ())
        env = {
            "COORDKIT_JOB": context.job,
            "COORDKIT_RUN": context.run,
            "COORDKIT_TICK": context.tick.isoformat(),
            "COORDKIT_WORKER": context.worker,
        }
        await run_command(argv, outcome, grace=self._stop_grace, kill_by=kill_deadline(self.session), env=env)

    async def _finish(self, job: str, run_id: str, final: RunRecord) -> None:
        session = self.session
        name = job.encode()
        record_key = self._runs(job) + run_id.encode()
        running_key = self._prefix + b"running/" + name + b"/" + run_id.encode()
        active_key = self._prefix + b"active/" + name
        writes: list[Op] = [Put(record_key, _encode(final)), Delete(running_key)]
        with anyio.CancelScope(shield=True):
            # The job's active key goes too, if it is still ours (a "replace" or "allow" run may hold it now).
            await retry_while_valid(
                session,
                lambda: session.backend.txn(
                    [Compare.value(active_key, "==", run_id.encode())], [*writes, Delete(active_key)], writes
                ),
            )
            await retry_while_valid(session, lambda: self._trim_history(job))

    def _changed(self) -> None:
        if self._announce is not None:
            self._announce.set()

    def _register(self, run: _Run) -> None:
        self._running.setdefault(run.job, set()).add(run)
        self._changed()
        if run.claimed < max(self._kills.get(run.job, 0), self._run_kills.get((run.job, run.run), 0)):
            run.scope.cancel()  # the kill request arrived before the run registered: it still applies

    def _on_kill(self, job: str, run_id: str | None, revision: int) -> None:
        if run_id is None:
            self._kills[job] = max(self._kills.get(job, 0), revision)
        else:
            self._run_kills[(job, run_id)] = max(self._run_kills.get((job, run_id), 0), revision)
        for run in self._running.get(job, ()):
            if run.claimed < revision and run_id in (None, run.run):
                run.scope.cancel()

    async def _trim_history(self, job: str) -> None:
        records = await self.session.backend.range(Range(self._runs(job), prefix=True, keys_only=True))
        excess = list(records.kvs[: max(0, len(records.kvs) - self._history)])
        if self._history_age is not None:
            oldest = _run_id(self._now() - timedelta(seconds=self._history_age)).encode()
            excess += [kv for kv in records.kvs[len(excess) :] if kv.key.rpartition(b"/")[2] < oldest]
        if excess:  # no compare: the records are finished ones, and trimming twice deletes nothing more
            await self.session.backend.txn([], [Delete(kv.key) for kv in excess])

    async def _follow_kills(self) -> None:
        killer = self._prefix + b"killer/"
        async with Watch(self.session.backend, killer, prefix=True) as watch:
            async for item in watch:
                # Requests already there are applied by their revision too: a run claimed before one (on a
                # worker whose watch was not open yet) is killed, a later one is not.
                kvs = item.kvs if isinstance(item, Snapshot) else [e.kv for e in item.events if e.type is EventType.PUT]
                for kv in kvs:
                    name, _, run_id = kv.key[len(killer) :].decode(errors="replace").partition("/")
                    self._on_kill(name, run_id or None, kv.mod_revision)

    async def _detect_lost(self) -> None:
        """A running marker deleted while its record still says running: the runner died. Record it once.

        One watch covers ``running/`` and ``runs/`` (both start with ``run``): a run that ended wrote its record
        at the revision that deleted its marker, so only a marker deleted alone (its lease ended) costs a read.
        """
        running, runs = self._prefix + b"running/", self._prefix + b"runs/"
        async with Watch(self.session.backend, self._prefix + b"run", prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    continue
                written = {event.kv.key for event in item.events if event.type is EventType.PUT}
                for event in item.events:
                    if event.type is EventType.DELETE and event.kv.key.startswith(running):
                        record_key = runs + event.kv.key[len(running) :]
                        if record_key not in written:  # not ended by its runner in this revision
                            await retry_call(partial(self._record_lost, record_key))

    async def _record_lost(self, record_key: bytes) -> None:
        current = await self.session.backend.range(Range(record_key))
        if not current.kvs:
            return
        try:
            record = json.loads(current.kvs[0].value)
            running = record["outcome"] == "running"
        except (ValueError, TypeError, KeyError) as exc:
            self._report("bad_record", exc)
            return  # not a record of ours (written by something else): nothing to mark
        if running:  # compare-and-swap: however many workers saw it, one records it
            lost = json.dumps({**record, "outcome": "lost"}, separators=(",", ":")).encode()
            await self.session.backend.txn(
                [Compare.mod(record_key, "==", current.kvs[0].mod_revision)], [Put(record_key, lost)]
            )


def _run_id(tick: datetime) -> str:
    return f"{int(tick.timestamp() * 1000):016d}"


def _decode_spec(key: bytes, value: bytes) -> JobSpec:
    return _spec_at(key.rpartition(b"/")[2].decode(errors="replace"), json.loads(value))


def _spec_at(name: str, raw: Any) -> JobSpec:
    """The spec stored at ``jobs/<name>``: its own name must be that one (its runs are kept under it)."""
    if not isinstance(raw, dict):
        raise TypeError(f"a job spec is a JSON object, not {type(raw).__name__}")
    spec = JobSpec(**raw)
    if spec.name != name:
        raise ValueError(f"the spec at jobs/{name} names another job: {spec.name!r}")
    return spec


def _worker_info(raw: bytes) -> WorkerInfo:
    """A worker's announcement. Raises TypeError, ValueError or KeyError for one that is not (another tool's)."""
    info = json.loads(raw)
    targets = info.get("targets")
    return WorkerInfo(
        **{
            **info,
            "running": tuple(tuple(pair) for pair in info["running"]),
            "targets": None if targets is None else tuple(targets),
        }
    )


def _rank(job: str, run_id: str, member: str) -> bytes:
    """A worker's place in the line for one tick (rendezvous hashing: highest first; spread evenly, stable)."""
    return hashlib.blake2b(f"{job}\0{run_id}\0{member}".encode(), digest_size=8).digest()


def _decode_record(key: bytes, value: bytes) -> RunRecord:
    raw = json.loads(value)
    if not isinstance(raw, dict):
        raise TypeError(f"a run record is a JSON object, not {type(raw).__name__}")
    # Records written before runs had ids: the id is the key's last segment.
    raw.setdefault("run", key.rpartition(b"/")[2].decode(errors="replace"))
    return RunRecord(**raw)


def _encode(record: RunRecord) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode()
