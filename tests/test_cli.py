"""The ``coordkit`` command as scripts use it: real processes, a real etcd, etcdctl on the other side.

Every test runs ``python -m coordkit`` in subprocesses against the session's etcd server and checks what a
script relies on: exit codes, stdout, and what happens to the wrapped command.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import pytest
from click.testing import CliRunner

from coordkit import EtcdBackend, JobSpec, RunContext, Scheduler, Session
from coordkit._cli import load
from coordkit.testing import EtcdServer, PostgresServer

from .helpers import etcdctl

pytestmark = pytest.mark.anyio

CLI = (sys.executable, "-m", "coordkit")
coordkit_cli = load()
_names = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def env(etcd_server: EtcdServer) -> dict[str, str]:
    return {**os.environ, "COORDKIT_ETCD": etcd_server.endpoint, "NO_COLOR": "1"}


def unique(tag: str) -> str:
    return f"cli/{tag}-{os.getpid()}-{next(_names)}"


async def cli(env: Mapping[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process([*CLI, *args], env=env, check=False, input=stdin)


@asynccontextmanager
async def background(env: Mapping[str, str], *args: str) -> AsyncIterator[anyio.abc.Process]:
    """``coordkit ARGS`` running in the background; SIGTERM (then SIGKILL) on exit if still running."""
    process = await anyio.open_process([*CLI, *args], env=env)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def read_line(stream: anyio.abc.ByteReceiveStream | None, buffer: bytearray, timeout: float = 20) -> str:
    """The next line from ``stream`` (``buffer`` keeps what came after it)."""
    assert stream is not None
    with anyio.fail_after(timeout):
        while b"\n" not in buffer:
            buffer += await stream.receive()
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def read_until(stream: anyio.abc.ByteReceiveStream | None, pattern: str) -> re.Match[str]:
    buffer = bytearray()
    while True:
        if match := re.search(pattern, await read_line(stream, buffer)):
            return match


async def wait_exit(process: anyio.abc.Process, timeout: float = 30) -> int:
    with anyio.fail_after(timeout):
        return await process.wait()


def alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped by whoever inherited it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def wait_dead(pid: int, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        for _ in itertools.count():
            if not alive(pid):
                return
            await anyio.sleep(0.02)


# -- lock -------------------------------------------------------------------------------------------------------


async def test_lock_excludes_and_exits_with_the_command_status(env: dict[str, str], tmp_path: Path) -> None:
    name, log = unique("lock"), tmp_path / "log"
    script = f'echo "in $1" >> {log}; sleep 0.2; echo "out $1" >> {log}; exit $1'
    statuses: dict[int, int] = {}

    async def holder(n: int) -> None:
        statuses[n] = (await cli(env, "lock", name, "--", "sh", "-c", script, "sh", str(n))).returncode

    async with anyio.create_task_group() as tg:
        for n in (3, 4, 5):
            tg.start_soon(holder, n)
    assert statuses == {3: 3, 4: 4, 5: 5}, "each exits with its command's status"
    lines = log.read_text().split("\n")[:-1]
    pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
    assert len(pairs) == 3 and all(a.split()[1] == b.split()[1] and a < b for a, b in pairs), lines


async def test_lock_interoperates_with_etcdctl(env: dict[str, str], etcd_server: EtcdServer) -> None:
    name = unique("interop")
    async with etcdctl(etcd_server, "lock", name) as held_by_etcdctl:
        await read_until(held_by_etcdctl.stdout, name)  # etcdctl prints its key once it holds the lock
        waited = await cli(env, "lock", name, "--timeout", "1", "--", "true")
        assert waited.returncode == 124 and b"not acquired within" in waited.stderr
    assert (await cli(env, "lock", name, "--", "true")).returncode == 0, "etcdctl released: coordkit gets it"

    async with background(env, "lock", name, "--", "sh", "-c", "echo held; exec sleep 60") as held_by_coordkit:
        await read_until(held_by_coordkit.stdout, "held")
        async with etcdctl(etcd_server, "lock", name) as waiter:
            with anyio.move_on_after(1) as still_waiting:
                await read_until(waiter.stdout, name)
            assert still_waiting.cancelled_caught, "etcdctl got the lock while coordkit held it"
            held_by_coordkit.terminate()
            assert await wait_exit(held_by_coordkit) == 128 + signal.SIGTERM
            await read_until(waiter.stdout, name)  # coordkit stopped its command and released: etcdctl holds it


async def test_lost_lock_stops_the_command(env: dict[str, str], etcd_server: EtcdServer) -> None:
    name = unique("lost")
    # The command ignores SIGTERM (as does everything it starts). --grace is far longer than the time the lease
    # has left on the server: coordkit must not wait for it, but SIGKILL by the lease's earliest expiry.
    command = ["sh", "-c", "trap '' TERM; echo $$ $COORDKIT_FENCING_TOKEN; while :; do sleep 0.1; done"]
    async with background(env, "lock", name, "--ttl", "5", "--grace", "600", "--", *command) as holder:
        pid, token = map(int, (await read_line(holder.stdout, bytearray())).split())
        assert alive(pid)
        (kv,) = json.loads(etcd_server.run_etcdctl("get", f"{name}/", "--prefix", "-w", "json"))["kvs"]
        assert token == int(kv["create_revision"]), "the command is told its fencing token"
        etcd_server.run_etcdctl("lease", "revoke", f"{int(kv['lease']):x}")  # the lock is gone from under it
        assert await wait_exit(holder, timeout=60) == 75, "the command outlived its lease by --grace"
        assert holder.stderr is not None
        message = (await holder.stderr.receive()).decode()
        assert f"lock {name!r}" in message and "the command was stopped" in message, message
    assert not alive(pid), "the command outlived the lock"


async def test_stopped_holder_gets_its_grace_and_keeps_the_lock_meanwhile(
    env: dict[str, str], etcd_server: EtcdServer
) -> None:
    name = unique("grace")
    # On SIGTERM the command takes longer than the TTL to finish: the session must keep the lease alive (the
    # lock held) until the command is done, and release only then.
    command = ["sh", "-c", "trap 'echo stopping; sleep 3; exit 0' TERM; echo ready; while :; do sleep 0.1; done"]
    async with background(env, "lock", name, "--ttl", "2", "--grace", "30", "--", *command) as holder:
        buffer = bytearray()
        assert await read_line(holder.stdout, buffer) == "ready"
        holder.terminate()
        assert await read_line(holder.stdout, buffer) == "stopping"
        await anyio.sleep(2.5)  # longer than the TTL: a lease left without keepalives would be gone
        assert etcd_server.run_etcdctl("get", f"{name}/", "--prefix", "--keys-only").strip(), "released too early"
        assert await wait_exit(holder) == 128 + signal.SIGTERM
    assert not etcd_server.run_etcdctl("get", f"{name}/", "--prefix", "--keys-only").strip(), "not released"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
async def test_command_dies_with_a_killed_coordkit(env: dict[str, str], etcd_server: EtcdServer) -> None:
    name = unique("orphan")
    # kill -9 of coordkit cannot stop anything itself: the guardian must take the command's whole group down.
    command = ["sh", "-c", "sleep 60 & echo $$ $!; wait"]
    async with background(env, "lock", name, "--", *command) as holder:
        shell, child = map(int, (await read_line(holder.stdout, bytearray())).split())
        holder.kill()
        await wait_exit(holder)
        await wait_dead(shell)
        await wait_dead(child)


# -- elect ------------------------------------------------------------------------------------------------------


async def leader_of(port: int) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as reply:
        return (await reply.json())["name"]


async def wait_leader(port: int, expected: str, timeout: float = 20) -> float:
    """Seconds until the sidecar on ``port`` names ``expected`` (polled every 10 ms: the sidecar's API is a poll)."""
    started = anyio.current_time()
    with anyio.fail_after(timeout):
        for _ in itertools.count():
            if await leader_of(port) == expected:
                break
            await anyio.sleep(0.01)
    return anyio.current_time() - started


async def start_sidecar(env: dict[str, str], name: str, member: str, *extra: str) -> tuple[anyio.abc.Process, int]:
    process = await anyio.open_process([*CLI, "elect", name, "--id", member, "--http", "127.0.0.1:0", *extra], env=env)
    port = int((await read_until(process.stderr, r"on http://127\.0\.0\.1:(\d+)/"))[1])
    return process, port


async def test_sidecar_serves_the_leader_and_follows_failover(env: dict[str, str]) -> None:
    name = unique("elect")
    a, port_a = await start_sidecar(env, name, "a", "--ttl", "2")
    try:
        await wait_leader(port_a, "a")
        b, port_b = await start_sidecar(env, name, "b", "--ttl", "2")
        try:
            await wait_leader(port_b, "a")
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port_b}/healthz") as reply:
                assert reply.status == 200 and (await reply.json())["is_leader"] is False
            a.terminate()  # a resigns on its way out
            assert await wait_exit(a) == 128 + signal.SIGTERM
            seconds = await wait_leader(port_b, "b")
            print(f"sidecar: graceful failover seen over HTTP after {seconds * 1000:.0f} ms")
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port_b}/healthz") as reply:
                health = await reply.json()
                assert reply.status == 200 and health["is_leader"] is True and health["term"] > 0, health

            c, port_c = await start_sidecar(env, name, "c", "--ttl", "2")
            try:
                await wait_leader(port_c, "b")
                b.kill()  # a crash: no resignation, the lease must expire (TTL 2 s)
                await wait_exit(b)
                seconds = await wait_leader(port_c, "c")
                print(f"sidecar: failover after a crash seen over HTTP after {seconds * 1000:.0f} ms (TTL 2 s)")
            finally:
                c.terminate()
                await wait_exit(c)
        finally:
            if b.returncode is None:
                b.kill()
            await b.aclose()
    finally:
        if a.returncode is None:
            a.kill()
        await a.aclose()


async def test_elect_runs_the_command_only_while_leading(env: dict[str, str], etcd_server: EtcdServer) -> None:
    name = unique("elect-cmd")
    async with etcdctl(etcd_server, "elect", name, "etcd-leader") as go_leader:
        await read_until(go_leader.stdout, "etcd-leader")  # etcdctl leads
        async with background(env, "elect", name, "--id", "ck", "--", "sh", "-c", "echo ran; exit 9") as candidate:
            await read_until(candidate.stderr, "campaigning")
            with anyio.move_on_after(1) as not_yet:
                await read_until(candidate.stdout, "ran")
            assert not_yet.cancelled_caught, "the command ran while etcdctl was the leader"
            go_leader.send_signal(signal.SIGINT)  # etcdctl resigns
            await read_until(candidate.stdout, "ran")
            assert await wait_exit(candidate) == 9, "exits with the command's status, after resigning"
    async with background(env, "elect", name, "--id", "ck-sidecar") as sidecar:
        await read_until(sidecar.stderr, "leading")
        listen = await anyio.open_process(
            [etcd_server.etcdctl, f"--endpoints={etcd_server.endpoint}", "elect", "-l", name]
        )
        try:
            await read_until(listen.stdout, "ck-sidecar")  # etcdctl sees coordkit's leader
        finally:
            listen.kill()
            await listen.aclose()


# -- membership -------------------------------------------------------------------------------------------------


async def test_join_and_members(env: dict[str, str]) -> None:
    group = unique("group")
    async with background(env, "members", group, "--watch", "--json") as watcher:
        buffer = bytearray()
        assert json.loads(await read_line(watcher.stdout, buffer))["members"] == {}
        async with background(env, "join", group, "w1", "--metadata", "10.0.0.1:80") as member:
            assert json.loads(await read_line(watcher.stdout, buffer))["joined"] == {"w1": "10.0.0.1:80"}
            listed = await cli(env, "members", group)
            assert listed.returncode == 0 and re.search(rb"w1\s+10\.0\.0\.1:80", listed.stdout), listed.stdout
            duplicate = await cli(env, "join", group, "w1", "--", "true")
            assert duplicate.returncode == 1 and b"w1" in duplicate.stderr, duplicate.stderr
            member.terminate()
            assert await wait_exit(member) == 128 + signal.SIGTERM
            assert json.loads(await read_line(watcher.stdout, buffer))["left"] == ["w1"]
    ran = await cli(env, "join", group, "w2", "--", "sh", "-c", "exit 4")
    assert ran.returncode == 4


# -- cron -------------------------------------------------------------------------------------------------------


async def test_cron_lists_jobs_runs_and_workers_and_kills(env: dict[str, str], etcd_server: EtcdServer) -> None:
    prefix = unique("cron")
    started = anyio.Event()

    async def hang(context: RunContext) -> None:
        started.set()
        await anyio.sleep_forever()

    async with EtcdBackend(etcd_server.endpoint) as backend, Session(backend, ttl=5) as session:
        scheduler = Scheduler(session, prefix, worker="w1", capacity=2)
        scheduler.register("hang", hang)
        async with scheduler:
            await scheduler.put_job(JobSpec("job", "hang", interval=1000, misfire="late"))
            with anyio.fail_after(10):
                await started.wait()
                while not any(info.running for info in await scheduler.workers()):  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # the worker announces its run (a write we have no event for)
            jobs = await cli(env, "cron", "jobs", prefix, "--json")
            assert [job["name"] for job in json.loads(jobs.stdout)["jobs"]] == ["job"], jobs
            workers = await cli(env, "cron", "workers", prefix)
            assert re.search(rb"w1 .* 2 +job/\d{16}", workers.stdout), workers.stdout
            history = await cli(env, "cron", "history", prefix, "job", "--json")
            (run,) = json.loads(history.stdout)["runs"]
            assert run["outcome"] == "running", history
            killed = await cli(env, "cron", "kill", prefix, "job", "--run", run["run"])
            assert killed.returncode == 0, killed.stderr
            with anyio.fail_after(10):
                while (await scheduler.history("job"))[0].outcome != "killed":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
    missing = await cli(env, "cron", "history", prefix, "absent")
    assert missing.returncode == 4, missing.stderr


# -- config -----------------------------------------------------------------------------------------------------


async def test_config_get_put_cas_and_watch(env: dict[str, str], etcd_server: EtcdServer) -> None:
    prefix = unique("config") + "/"
    async with background(env, "config", "watch", prefix, "--json") as watcher:
        buffer = bytearray()
        first = await cli(env, "config", "put", prefix + "db", '"pg://a"')
        assert first.returncode == 0
        revision = int(first.stdout)
        assert json.loads(await read_line(watcher.stdout, buffer)) == {
            "key": prefix + "db",
            "value": '"pg://a"',
            "revision": revision,
        }
        stale = await cli(env, "config", "put", prefix + "db", '"pg://b"', "--expect-revision", str(revision - 1))
        assert stale.returncode == 3 and f"its revision is {revision}".encode() in stale.stderr
        cas = await cli(env, "config", "put", prefix + "db", "-", "--expect-revision", str(revision), stdin=b'"pg://c"')
        assert cas.returncode == 0
        assert json.loads(await read_line(watcher.stdout, buffer))["value"] == '"pg://c"'
        etcd_server.run_etcdctl("del", prefix + "db")
        assert json.loads(await read_line(watcher.stdout, buffer))["value"] is None

    assert (await cli(env, "config", "put", prefix + "a", "1")).returncode == 0
    assert (await cli(env, "config", "put", prefix + "b", "2", "--expect-revision", "0")).returncode == 0
    exact = await cli(env, "config", "get", prefix + "a")
    assert (exact.returncode, exact.stdout) == (0, b"1")
    listing = await cli(env, "config", "get", prefix, "--json")
    assert {key: value["value"] for key, value in json.loads(listing.stdout)["keys"].items()} == {
        prefix + "a": "1",
        prefix + "b": "2",
    }
    missing = await cli(env, "config", "get", prefix + "nothing")
    assert missing.returncode == 4


# -- once -------------------------------------------------------------------------------------------------------


async def test_once_runs_the_command_once_across_processes(env: dict[str, str], tmp_path: Path) -> None:
    key, log = unique("once"), tmp_path / "runs"
    script = f'echo run >> {log}; sleep 0.5; echo "result from $$"; exit 3'
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def caller() -> None:
        results.append(await cli(env, "once", key, "--", "sh", "-c", script))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(caller)
    assert log.read_text() == "run\n", "the command ran more than once"
    assert {result.returncode for result in results} == {3}
    assert len({result.stdout for result in results}) == 1 and results[0].stdout.startswith(b"result from ")
    late = await cli(env, "once", key, "--", "sh", "-c", script)
    assert (late.returncode, late.stdout, log.read_text()) == (3, results[0].stdout, "run\n")


# -- errors and the demo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("lock", "x", "--no-such-flag", "--", "true"), 2, "No such option"),
        (("lock", "", "--", "true"), 2, "must not be empty"),
        (("lock", "x"), 2, "Missing argument"),
        (("lock", "x", "--etcd", "ftp://127.0.0.1:1", "--", "true"), 2, "http:// or https://"),
        (("lock", "x", "--etcd", "", "--", "true"), 2, "no store: pass --etcd"),
        (("elect", "x", "--id", "a", "--http", "nowhere"), 2, "HOST:PORT"),
        (("lock", "x", "--timeout", "-1", "--", "true"), 2, "--timeout"),
        (("--etcd", "http://127.0.0.1:1", "lock", "x", "--", "true"), 69, "etcd unreachable"),
        (("--etcd", "http://127.0.0.1:1", "elect", "x", "--id", "a"), 69, "etcd unreachable"),
        (("lock", "x", "--", "/no/such/command"), 127, "command not found"),
        (("queue", "consume", "q", "--", "/no/such/command"), 127, "command not found"),
        (("queue", "put", "q", "x", "--timeout", "1"), 2, "--timeout is for --wait"),
    ],
)
async def test_bad_usage_and_unreachable_endpoints(
    env: dict[str, str], args: tuple[str, ...], status: int, message: str
) -> None:
    if args[0] == "--etcd" or "--etcd" in args:
        env = {key: value for key, value in env.items() if key != "COORDKIT_ETCD"}
    result = await cli(env, *args)
    assert result.returncode == status, result.stderr
    assert message in result.stderr.decode(), result.stderr


async def test_demo_runs_in_memory() -> None:
    env = {key: value for key, value in os.environ.items() if key != "COORDKIT_ETCD"}
    result = await cli(env, "demo")
    assert result.returncode == 0, result.stderr
    assert b"ticks, each run once, by replica-" in result.stdout
    assert b"main job cancelled" in result.stdout


def test_every_subcommand_has_help() -> None:
    commands = [(name,) for name in coordkit_cli.commands] + [("config", name) for name in ("get", "put", "watch")]
    commands += [("cron", name) for name in ("jobs", "history", "kill", "workers")]
    commands += [("queue", name) for name in ("put", "list", "depth", "dead", "requeue", "remove", "consume")]
    assert len(commands) == 23  # lock elect members join config once demo cron queue + config 3 + cron 4 + queue 7
    for command in [(), *commands]:
        result = CliRunner().invoke(coordkit_cli, [*command, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output, command
        assert "\n  Usage" not in result.output and len(result.output.splitlines()) > 5, result.output


async def test_console_script_and_version(env: dict[str, str]) -> None:
    version = await cli(env, "--version")  # python -m coordkit
    assert version.returncode == 0 and version.stdout.startswith(b"coordkit, version")


# -- packaging: the cli extra, and the CLI as a user of the public API ------------------------------------------


async def test_without_click_the_script_names_the_extra() -> None:
    # As if click were not installed: `import click` raises ImportError.
    code = "import runpy, sys; sys.modules['click'] = None; runpy.run_module('coordkit', run_name='__main__')"
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-c", code, "--help"], check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.decode() == "coordkit: the command line needs the 'cli' extra: pip install 'coordkit[cli]'\n"
    assert done.stdout == b""


def test_the_cli_imports_only_public_names() -> None:
    """coordkit/_cli is a user like any other: from coordkit it imports only names in coordkit.__all__."""
    import coordkit

    package = Path(coordkit.__file__).parent / "_cli"
    imported: set[str] = set()
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            where = f"{source.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("coordkit") for alias in node.names), where
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert not (node.module or "").startswith("coordkit"), f"{where}: import from the package as .."
                elif node.level == 1:
                    assert node.module is None or not node.module.startswith("."), where  # a module of _cli
                else:
                    assert node.level == 2 and node.module is None, f"{where}: from ..{node.module} is private"
                    imported |= {alias.name for alias in node.names}
    assert imported, "the scan found the CLI's imports"
    assert imported <= set(coordkit.__all__), imported - set(coordkit.__all__)


# -- queue ------------------------------------------------------------------------------------------------------


async def test_queue_pause_resume_and_dependencies(env: dict[str, str]) -> None:
    """``put --after``: the dependent comes after what it waits for, whatever its priority; an unknown id exits 4
    and puts nothing. ``pause``/``resume`` flip the gate a consumer waits on."""
    name = unique("gate")
    first = json.loads((await cli(env, "queue", "put", name, "first", "--json")).stdout)["id"]
    second = await cli(env, "queue", "put", name, "second", "--priority", "9", "--after", first, "--json")
    assert second.returncode == 0, second.stderr
    unknown = await cli(env, "queue", "put", name, "x", "--after", "nope")
    assert unknown.returncode == 4 and b"nothing was put" in unknown.stderr
    assert (await cli(env, "queue", "pause", name)).returncode == 0
    consume = ("queue", "consume", name, "--max-items", "2", "--json", "--", "cat")
    async with background(env, *consume) as consumer:
        await anyio.wait_all_tasks_blocked()
        assert (await cli(env, "queue", "resume", name)).returncode == 0
        assert await wait_exit(consumer) == 0
        assert consumer.stdout is not None
        lines = (await consumer.stdout.receive()).decode()
        while lines.count("\n") < 2:
            lines += (await consumer.stdout.receive()).decode()
    done = [json.loads(line)["id"] for line in lines.splitlines()]
    assert done == [first, json.loads(second.stdout)["id"]]


async def test_queue_put_list_consume_dead_requeue_remove(env: dict[str, str]) -> None:
    name = unique("queue")
    ids: dict[str, str] = {}

    async def put(payload: str, priority: int) -> None:
        done = await cli(env, "queue", "put", name, payload, "--priority", str(priority), "--json")
        ids[payload] = json.loads(done.stdout)["id"]

    async with anyio.create_task_group() as tg:  # their priorities order them, whatever the order of the puts
        for payload, priority in (("a", 0), ("bad", -1), ("b", 5)):
            tg.start_soon(put, payload, priority)
    a, bad, b = ids["a"], ids["bad"], ids["b"]
    listed = json.loads((await cli(env, "queue", "list", name, "--json")).stdout)["items"]
    assert [(item["id"], item["priority"], item["leased"]) for item in listed] == [
        (b, 5, False),
        (a, 0, False),
        (bad, -1, False),
    ]

    # A request among them: its reply is the command's stdout. The command fails on "bad" (exit 3).
    script = 'x=$(cat); [ "$x" = bad ] && { echo "cannot $x" >&2; exit 3; }; echo "$x done as $COORDKIT_ITEM_ID/'
    script += '$COORDKIT_ATTEMPT"'
    async with background(env, "queue", "put", name, "-", "--priority", "-2", "--wait", "--json") as requester:
        assert requester.stdin is not None
        await requester.stdin.send(b"req")
        await requester.stdin.aclose()
        await read_until(requester.stderr, "waiting for its reply")
        consume = ("queue", "consume", name, "--max-items", "4", "--max-attempts", "1", "--json", "--", "sh", "-c")
        consumed = await cli(env, *consume, script)
        assert consumed.returncode == 0, consumed.stderr
        reply = json.loads(await read_line(requester.stdout, bytearray()))
        assert await wait_exit(requester) == 0
    outcomes = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert [(o["id"], o["outcome"], o["status"]) for o in outcomes] == [
        (b, "completed", 0),
        (a, "completed", 0),
        (bad, "failed", 3),
        (reply["id"], "completed", 0),
    ]
    assert reply["reply"] == f"req done as {reply['id']}/1\n", reply
    assert b"cannot bad" in consumed.stderr, "the command's stderr goes to coordkit's"

    (dead,) = json.loads((await cli(env, "queue", "dead", name, "--json")).stdout)["dead"]
    assert (dead["id"], dead["payload"], dead["attempts"]) == (bad, "bad", 1)
    assert dead["error"] == "CommandFailed: exit status 3; stderr: cannot bad", dead
    assert (await cli(env, "queue", "requeue", name, bad)).returncode == 0
    depth, again = await gather(cli(env, "queue", "depth", name, "--json"), cli(env, "queue", "requeue", name, bad))
    assert json.loads(depth.stdout) == {"pending": 1, "leased": 0, "dead": 0}
    assert again.returncode == 4 and b"no dead letter" in again.stderr, "requeued already"
    assert (await cli(env, "queue", "remove", name, bad)).returncode == 0
    assert (await cli(env, "queue", "remove", name, bad)).returncode == 4


async def gather(*calls: Awaitable[subprocess.CompletedProcess[bytes]]) -> list[subprocess.CompletedProcess[bytes]]:
    """The results of concurrent CLI calls, in the order given."""
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    async def one(i: int, call: Awaitable[subprocess.CompletedProcess[bytes]]) -> None:
        results[i] = await call

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return [results[i] for i in range(len(calls))]


async def test_queue_consume_kills_the_command_group_when_the_claim_is_lost(
    env: dict[str, str], etcd_server: EtcdServer
) -> None:
    name = unique("queue-lost")
    # The command ignores SIGTERM and leaves a child in its group: both must die when the claim ends, however long
    # --grace is (another consumer may take the item soon after).
    command = ["sh", "-c", "trap '' TERM; sleep 60 & echo pids $$ $! >&2; while :; do sleep 0.1; done"]
    assert (await cli(env, "queue", "put", name, "one")).returncode == 0
    # 1. The visibility timeout passes: the group is killed, the item offered again, the consumer goes on.
    async with background(
        env,
        "queue",
        "consume",
        name,
        "--visibility-timeout",
        "2",
        "--max-items",
        "1",
        "--grace",
        "600",
        "--json",
        "--",
        *command,
    ) as consumer:
        pids = [int(pid) for pid in (await read_until(consumer.stderr, r"^pids (\d+) (\d+)$")).groups()]
        lost = json.loads(await read_line(consumer.stdout, bytearray()))
        assert lost["outcome"] == "lost" and "visibility timeout" in lost["error"], lost
        assert await wait_exit(consumer) == 0, "after --max-items"
        for pid in pids:
            await wait_dead(pid)
    # 2. The next consumer gets the item again (attempt 2); its session's lease is revoked: killed, and exit 75.
    async with background(env, "queue", "consume", name, "--grace", "600", "--", *command) as consumer:
        pids = [int(pid) for pid in (await read_until(consumer.stderr, r"^pids (\d+) (\d+)$")).groups()]
        (claim,) = json.loads(etcd_server.run_etcdctl("get", f"{name}/claims/", "--prefix", "-w", "json"))["kvs"]
        etcd_server.run_etcdctl("lease", "revoke", f"{int(claim['lease']):x}")
        assert await wait_exit(consumer) == 75
        assert consumer.stderr is not None
        message = (await consumer.stderr.receive()).decode()
        assert "the session was lost" in message and "the command, if any, was stopped" in message, message
        for pid in pids:
            await wait_dead(pid)
    (item,) = json.loads((await cli(env, "queue", "list", name, "--json")).stdout)["items"]
    assert (item["attempts"], item["leased"]) == (2, False), item


async def test_the_commands_run_on_postgresql(postgres_server: PostgresServer) -> None:
    """``--postgres DSN`` (or COORDKIT_POSTGRES) wherever ``--etcd`` goes: a lock around a command, config and the
    queue, on a real PostgreSQL; etcd's credentials or TLS files beside it, or both stores, are refused."""
    env = {**os.environ, "COORDKIT_POSTGRES": postgres_server.dsn, "NO_COLOR": "1"}
    env.pop("COORDKIT_ETCD", None)
    name = unique("pg")
    locked = await cli(env, "lock", name, "--", "sh", "-c", "echo held")
    assert (locked.returncode, locked.stdout) == (0, b"held\n"), locked.stderr
    assert (await cli(env, "config", "put", name + "/a", "1")).returncode == 0
    got = await cli(env, "config", "get", name + "/a")
    assert (got.returncode, got.stdout) == (0, b"1")
    put = await cli(env, "queue", "put", name + "-q", "payload")
    assert put.returncode == 0, put.stderr
    depth = await cli(env, "queue", "depth", name + "-q", "--json")
    assert json.loads(depth.stdout)["pending"] == 1
    flags = await cli({**env, "COORDKIT_POSTGRES": ""}, "--postgres", postgres_server.dsn, "config", "get", name + "/a")
    assert (flags.returncode, flags.stdout) == (0, b"1"), "the option works as the variable does"
    both = await cli({**env, "COORDKIT_ETCD": "http://127.0.0.1:1"}, "config", "get", name + "/a")
    assert both.returncode == 2 and b"give one" in both.stderr
    tls = await cli(env, "--user", "root:x", "config", "get", name + "/a")
    assert tls.returncode == 2 and b"go in the DSN" in tls.stderr
