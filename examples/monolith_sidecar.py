"""Leader-only cron in a monolith that cannot be changed: a ``coordkit elect --http`` sidecar beside each replica.

Three replicas of a monolith each fire the same cron job every 0.2 s. The monolith cannot campaign itself, so
each replica gets a sidecar process, ``coordkit elect main-job --id replica-N --http 127.0.0.1:PORT``, and the
monolith's cron code asks its own sidecar "am I the leader?" over HTTP before every run. Then:

1. the leader's sidecar is killed with SIGKILL (a crash: no resignation): its replica stops at once (its sidecar
   no longer answers), and the next replica takes over once the crashed sidecar's lease expires (``--ttl 2``);
2. the new leader's sidecar is stopped with SIGTERM (a graceful shutdown): it resigns on its way out, and the
   last replica takes over within milliseconds.

The script checks that no tick was ever run by two replicas, and exits with 1 if one was. The sidecars are
separate processes, so this example needs a real etcd:

    python examples/monolith_sidecar.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

TTL = 2  # seconds: how long a crashed sidecar's leadership outlives it
PERIOD = 0.2  # seconds between two firings of the monolith's cron
TICKS_PER_LEADER = 5
REPLICAS = ("replica-1", "replica-2", "replica-3")


def i_am_leader(port: int, my_id: str) -> bool:
    """The check in the monolith's cron code (blocking, as a monolith's code would be): may I run the job?

    ``GET /`` names this replica only while its sidecar's campaign leads with a valid session (``""`` while
    the sidecar is cut off from etcd), so comparing the name with our id is as safe as ``/healthz``'s
    ``is_leader``. A sidecar that does not answer (crashed, stopped, not started) means "no". The answer is
    advisory: the leadership can move between the check and the end of the job.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as reply:
            leader: str = json.load(reply)["name"]
            return leader == my_id
    except OSError:  # a refused connection, a timeout
        return False


@dataclass
class Sidecar:
    """One ``coordkit elect --http`` process and the port it serves on."""

    name: str
    process: anyio.abc.Process
    port: int


@dataclass
class Cron:
    """What the three monoliths did: who ran each tick."""

    started: float
    first_tick: float = 0.0
    ran: dict[int, list[str]] = field(default_factory=dict)
    changed: anyio.Condition = field(default_factory=anyio.Condition)

    def say(self, message: str) -> None:
        print(f"[{anyio.current_time() - self.started:5.2f}s] {message}", flush=True)

    def runs_by(self, name: str) -> int:
        return sum(name in runners for runners in self.ran.values())

    async def wait_runs(self, count: int, *, by_one_of: set[str]) -> str:
        """Wait until one of ``by_one_of`` has run ``count`` ticks; return its name."""
        async with self.changed:
            while True:
                for name in sorted(by_one_of):
                    if self.runs_by(name) >= count:
                        return name
                await self.changed.wait()


def parse_args() -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--etcd", metavar="URL[,URL...]", help="the etcd cluster the sidecars campaign in (required)")
    args = parser.parse_args()
    if not args.etcd:
        parser.error("this example runs 'coordkit elect' sidecars, which need etcd: pass --etcd URL")
    return str(args.etcd)


@asynccontextmanager
async def sidecar(etcd: str, election: str, name: str, cron: Cron, tg: anyio.abc.TaskGroup) -> AsyncIterator[Sidecar]:
    """Start ``coordkit elect ELECTION --id NAME --http 127.0.0.1:0``; stop it (SIGTERM, then SIGKILL) on exit."""
    command = [sys.executable, "-m", "coordkit", "elect", election, "--id", name, "--http", "127.0.0.1:0"]
    command += ["--ttl", str(TTL), "--etcd", etcd]
    process = await anyio.open_process(command, stdin=subprocess.DEVNULL, stdout=None)
    try:
        assert process.stderr is not None
        stderr = BufferedByteReceiveStream(process.stderr)
        port = None
        with anyio.fail_after(30):
            while True:  # "serving the leader of ... on http://127.0.0.1:PORT/", then "campaigning in ..."
                line = (await stderr.receive_until(b"\n", 4096)).decode()
                cron.say(f"  {name}'s sidecar: {line}")
                if bound := re.search(r"serving the leader of .* on http://127\.0\.0\.1:(\d+)/", line):
                    port = int(bound[1])
                elif "campaigning in" in line and port is not None:
                    break  # it has a session with etcd and is in the election's queue
        tg.start_soon(show_stderr, name, stderr, cron)
        yield Sidecar(name, process, port)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()  # the sidecar resigns on SIGTERM
                with anyio.move_on_after(10):
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.aclose()


async def show_stderr(name: str, stderr: BufferedByteReceiveStream, cron: Cron) -> None:
    """Echo what a sidecar says (campaigning, leading, retrying) until it exits."""
    try:
        while True:
            line = (await stderr.receive_until(b"\n", 4096)).decode()
            cron.say(f"  {name}'s sidecar: {line}")
    except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        return  # the sidecar exited


async def monolith(name: str, port: int, cron: Cron) -> None:
    """One replica's cron: at every firing, ask its own sidecar, and run the job only when it leads."""
    leading: bool | None = None
    while True:
        tick = math.floor((anyio.current_time() - cron.first_tick) / PERIOD) + 1
        await anyio.sleep_until(cron.first_tick + tick * PERIOD)  # every replica fires at the same moments
        now_leading = await anyio.to_thread.run_sync(i_am_leader, port, name)
        if now_leading != leading and leading is not None:
            cron.say(f"{name}: {'I lead: running the job' if now_leading else 'not the leader: skipping the job'}")
        leading = now_leading
        if now_leading:
            async with cron.changed:
                cron.ran.setdefault(tick, []).append(name)
                cron.say(f"tick {tick}: job run by {name}")
                cron.changed.notify_all()


async def seconds_until_leader(sidecars: dict[str, Sidecar], candidates: set[str], since: float) -> tuple[str, float]:
    """Poll the candidates' sidecars every 10 ms: which one reports itself leader, and how long after ``since``."""
    while True:
        for name in sorted(candidates):
            if await anyio.to_thread.run_sync(i_am_leader, sidecars[name].port, name):
                return name, anyio.current_time() - since
        await anyio.sleep(0.01)


async def main() -> int:
    etcd = parse_args()
    election = f"examples/main-job-{uuid.uuid4().hex[:8]}"  # a fresh election each run
    cron = Cron(started=anyio.current_time())
    sidecars: dict[str, Sidecar] = {}
    async with anyio.create_task_group() as readers, AsyncExitStack() as stack:
        for name in REPLICAS:  # one after the other, so that they queue in this order
            sidecars[name] = await stack.enter_async_context(sidecar(etcd, election, name, cron, readers))
        cron.say(f"three sidecars campaign in {election!r} (TTL {TTL} s); the monoliths start their cron")

        alive = set(REPLICAS)
        async with anyio.create_task_group() as monoliths:
            cron.first_tick = anyio.current_time()
            for name, car in sidecars.items():
                monoliths.start_soon(monolith, name, car.port, cron)

            with anyio.fail_after(60):
                first = await cron.wait_runs(TICKS_PER_LEADER, by_one_of=alive)
                sidecars[first].process.kill()  # a crash: no resignation, its lease must expire
                crashed_at = anyio.current_time()
                alive.discard(first)
                cron.say(f"{first}'s sidecar is killed with SIGKILL (a crash: it cannot resign)")
                second, seconds = await seconds_until_leader(sidecars, alive, crashed_at)
                cron.say(f"{second}'s sidecar leads {seconds:.2f} s after the crash (its lease's TTL: {TTL} s)")

                await cron.wait_runs(TICKS_PER_LEADER, by_one_of={second})
                sidecars[second].process.terminate()  # a graceful stop: the sidecar resigns on its way out
                stopped_at = anyio.current_time()
                alive.discard(second)
                cron.say(f"{second}'s sidecar is stopped with SIGTERM (it resigns)")
                third, seconds = await seconds_until_leader(sidecars, alive, stopped_at)
                cron.say(f"{third}'s sidecar leads {seconds * 1000:.0f} ms after the SIGTERM")

                await cron.wait_runs(TICKS_PER_LEADER, by_one_of={third})
            monoliths.cancel_scope.cancel()

    runners = [cron.ran[tick][0] for tick in sorted(cron.ran)]
    idle = [tick for tick in range(min(cron.ran), max(cron.ran)) if tick not in cron.ran]
    for first_idle, last_idle in spans(idle):
        print(f"ticks {first_idle}-{last_idle}: run by nobody (no sidecar reported its own replica as the leader)")
    twice = {tick: names for tick, names in cron.ran.items() if len(names) > 1}
    if twice:
        print(f"VIOLATION: ticks run by two replicas: {twice}")
        return 1
    print(f"{len(runners)} ticks, run by {' -> '.join(dict.fromkeys(runners))}, never two replicas in the same tick")
    return 0


def spans(ticks: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of tick numbers, as (first, last)."""
    out: list[tuple[int, int]] = []
    for tick in ticks:
        if out and out[-1][1] == tick - 1:
            out[-1] = (out[-1][0], tick)
        else:
            out.append((tick, tick))
    return out


if __name__ == "__main__":
    try:
        sys.exit(anyio.run(main))
    except KeyboardInterrupt:  # Ctrl-C: the sidecars were stopped on the way out
        sys.exit(130)
