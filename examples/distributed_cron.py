"""Distributed cron: three workers, three jobs; every tick runs exactly once; a kill and a worker stop.

Every worker follows the job specs (stored under "examples/cron/jobs/") and computes the ticks itself; each
tick is claimed by one worker only. Job "heartbeat" runs every second, "report" every 3 s (cron syntax with a
seconds field: first, as cron_seconds=True says) and takes 2 s. One "report" run is killed while running; then
worker w1 stops. Job "uptime" is a command, run every 2 s by w2 only (the one worker that runs commands); its
output is kept in its run records. The printed history shows each tick once, with who ran it and how it ended.

    pip install 'coordkit[cron]'                        # cron expressions need croniter
    python examples/distributed_cron.py                 # in-memory backend (the default)
    python examples/distributed_cron.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack

import anyio
from _common import backend_factory

from coordkit import JobSpec, RunContext, Scheduler, Session

PREFIX = "examples/cron"
running_reports: list[anyio.Event] = []  # set when a report run starts (the admin kills one while it runs)


async def heartbeat(context: RunContext) -> None:
    print(f"  {context.tick:%H:%M:%S} heartbeat on {context.worker}")


async def report(context: RunContext) -> None:
    print(f"  {context.tick:%H:%M:%S} report starts on {context.worker}")
    for started in running_reports:
        started.set()
    await anyio.sleep(2)
    print(f"  {context.tick:%H:%M:%S} report done on {context.worker}")


async def run_worker(scheduler: Scheduler, stop: anyio.Event) -> None:
    async with scheduler:
        await stop.wait()


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    async with AsyncExitStack() as stack:
        workers: dict[str, Scheduler] = {}
        for name in ("w1", "w2", "w3"):
            client = await stack.enter_async_context(connect())
            session = await stack.enter_async_context(Session(client, ttl=5))
            # Only w2 runs command jobs: whoever can write the jobs prefix can run programs where this is on.
            workers[name] = scheduler = Scheduler(session, PREFIX, worker=name, run_commands=name == "w2")
            scheduler.register("heartbeat", heartbeat)
            scheduler.register("report", report)
        admin = workers["w3"]
        stops = {name: anyio.Event() for name in workers}
        async with anyio.create_task_group() as tg:
            for name, scheduler in workers.items():
                tg.start_soon(run_worker, scheduler, stops[name])
            await admin.put_job(JobSpec("heartbeat", "heartbeat", interval=1))
            await admin.put_job(JobSpec("report", "report", cron="*/3 * * * * *", cron_seconds=True))
            await admin.put_job(JobSpec("uptime", command=["echo", "up"], interval=2))
            print("jobs:", ", ".join(job.name for job in await admin.jobs()))
            report_started = anyio.Event()
            running_reports.append(report_started)
            await report_started.wait()
            await anyio.sleep(0.5)  # well inside the run's 2 s
            print("admin: kill the running report")
            await admin.kill("report")
            await anyio.sleep(2)
            print("w1 stops")
            stops["w1"].set()
            await anyio.sleep(3)
            alive = sorted(info.worker for info in await admin.workers())
            print("workers now:", ", ".join(alive))  # w1 left the workers' group when it stopped
            for job in ("heartbeat", "report", "uptime"):
                await admin.remove_job(job)
            history = {job: await admin.history(job) for job in ("heartbeat", "report", "uptime")}
            for stop in stops.values():
                stop.set()
    for job, runs in history.items():
        print(f"history of {job}:")
        for run in runs:
            output = f" said {run.stdout.strip()!r}" if run.stdout else ""
            print(f"  {run.tick[11:19]} {run.outcome:<8} on {run.worker}{output}")
        ticks = Counter(run.tick for run in runs)
        assert set(ticks.values()) == {1}, ticks
    print("every tick ran exactly once")


if __name__ == "__main__":
    anyio.run(main)
