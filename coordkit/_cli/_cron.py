"""'coordkit cron': read and steer a distributed cron (`Scheduler`) from the shell: jobs, history, kill, workers.

These are requests, not a worker: nothing here runs jobs, and only ``kill`` writes (a kill request).
"""

from __future__ import annotations

from dataclasses import asdict

import click

from .. import JobSpec, RunRecord, Scheduler, Session, check_job_name
from ._app import EXIT_NOT_FOUND, Connection, Failure, check_name, cli, connection_options, json_option, run
from ._output import Output


@cli.group()
def cron() -> None:
    """List the jobs, runs and workers of a distributed cron (a Scheduler's PREFIX); kill runs.

    Workers are programs using coordkit's Scheduler; these commands read what they store under PREFIX.
    """


def _job_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: job names (and run ids) are non-empty text without "/" or NUL."""
    if value is not None:
        try:
            check_job_name(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _scheduler(connection: Connection, prefix: str) -> Scheduler:
    # A session that is never entered: these requests need no lease (kill grants its own, short one).
    return Scheduler(Session(connection.backend()), prefix)


def _schedule(spec: JobSpec) -> str:
    if spec.interval is not None:
        return f"every {spec.interval:g} s"
    zone = f" ({spec.timezone})" if spec.timezone else ""
    return f"{spec.cron}{zone}"


@cron.command("jobs")
@click.argument("prefix", callback=check_name)
@json_option
@connection_options
def cron_jobs(connection: Connection, prefix: str, as_json: bool) -> None:
    """List the job specs stored under PREFIX (those that are not valid specs are left out)."""
    scheduler = _scheduler(connection, prefix)
    output = Output(as_json=as_json)

    async def work() -> int:
        async with scheduler.session.backend:
            specs = await scheduler.jobs()
        if as_json:
            output.json({"jobs": [asdict(spec) for spec in specs]})
        else:
            rows = [
                (
                    spec.name,
                    _schedule(spec),
                    spec.target if spec.target is not None else f"command: {spec.command}",
                    spec.overlap,
                    "yes" if spec.enabled else "no",
                )
                for spec in specs
            ]
            output.table(("job", "schedule", "runs", "overlap", "enabled"), rows)
        return 0

    run(work)


@cron.command("history")
@click.argument("prefix", callback=check_name)
@click.argument("job", callback=_job_name)
@json_option
@connection_options
def cron_history(connection: Connection, prefix: str, job: str, as_json: bool) -> None:
    """List the runs of JOB kept under PREFIX, oldest first. Exit 4 if there are none."""
    scheduler = _scheduler(connection, prefix)
    output = Output(as_json=as_json)

    async def work() -> int:
        async with scheduler.session.backend:
            runs = await scheduler.history(job)
        if not runs:
            raise Failure(f"no runs of {job!r} under {prefix!r}", EXIT_NOT_FOUND)
        if as_json:
            output.json({"job": job, "runs": [asdict(record) for record in runs]})
        else:
            output.table(("run", "tick", "worker", "outcome", "error"), [_row(record) for record in runs])
        return 0

    run(work)


def _row(record: RunRecord) -> tuple[str, str, str, str, str]:
    return record.run, record.tick, record.worker, record.outcome, record.error or ""


@cron.command("kill")
@click.argument("prefix", callback=check_name)
@click.argument("job", callback=_job_name)
@click.option("--run", "run_id", callback=_job_name, help="kill this run only (a RUN id from 'cron history')")
@connection_options
def cron_kill(connection: Connection, prefix: str, job: str, run_id: str | None) -> None:
    """Kill every run of JOB running now, on every worker (--run: one run).

    Runs that start after the request are not killed: to stop a job for good, disable or remove its spec.
    """
    scheduler = _scheduler(connection, prefix)

    async def work() -> int:
        async with scheduler.session.backend:
            await scheduler.kill(job, run=run_id)
        return 0

    run(work)


@cron.command("workers")
@click.argument("prefix", callback=check_name)
@json_option
@connection_options
def cron_workers(connection: Connection, prefix: str, as_json: bool) -> None:
    """List the workers running under PREFIX, with what each runs now."""
    scheduler = _scheduler(connection, prefix)
    output = Output(as_json=as_json)

    async def work() -> int:
        async with scheduler.session.backend:
            found = await scheduler.workers()
        if as_json:
            output.json({"workers": [asdict(info) for info in found]})
        else:
            rows = [
                (
                    info.worker,
                    f"{info.host}:{info.pid}",
                    info.version,
                    "-" if info.capacity is None else str(info.capacity),
                    " ".join(f"{job}/{run}" for job, run in info.running),
                )
                for info in found
            ]
            output.table(("worker", "process", "version", "capacity", "running"), rows)
        return 0

    run(work)
