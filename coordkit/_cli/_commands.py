"""The 'coordkit' subcommands: each is a recipe wrapped around a command or printed for a shell."""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import click

from .. import (
    MAX_REQUEST_BYTES,
    Backend,
    ConfigView,
    Group,
    GroupView,
    Leadership,
    LeadershipLostError,
    Lock,
    MemoryBackend,
    OwnershipLostError,
    Range,
    Session,
    kill_deadline,
    observe_leader,
    once as once_,
    publish,
    run_while_leader,
)
from ._app import (
    EXIT_CONFLICT,
    EXIT_LOST,
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    Connection,
    Failure,
    check_name,
    cli,
    connection_options,
    grace_option,
    json_option,
    run,
    stoppable,
    ttl_option,
)
from ._child import run_command
from ._demo import demo as play_demo
from ._output import Output, note, text
from ._sidecar import SidecarState, parse_address, serve


class _Raw:
    """The bytes as they are: what the shell gives is what is stored."""

    def encode(self, value: bytes) -> bytes:
        return value

    def decode(self, data: bytes) -> bytes:
        return data


RAW = _Raw()

_COMMAND = click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND...")
_OPTIONAL_COMMAND = click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND...]")


def _protected_by(session: Session, token: int, grace: float) -> dict[str, Any]:
    """How to run a command that ownership protects (`run_command`'s arguments).

    It is killed by the time the lease may end on the server, and told its fencing token
    (``COORDKIT_FENCING_TOKEN``) to pass on with its writes.
    """
    return {"grace": grace, "kill_by": kill_deadline(session), "env": {"COORDKIT_FENCING_TOKEN": str(token)}}


def _lost(what: str, exc: OwnershipLostError, *, running: bool = True) -> Failure:
    consequence = "the command was stopped" if running else "the command did not start"
    return Failure(f"{what} was lost ({exc}); {consequence}", EXIT_LOST)


# -- lock -------------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("name", callback=check_name)
@_COMMAND
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="give up (exit 124) when the lock is not acquired within this many seconds",
)
@grace_option
@ttl_option
@connection_options
def lock(
    connection: Connection, name: str, command: tuple[str, ...], timeout: float | None, grace: float, ttl: int
) -> None:
    """Run COMMAND while holding the lock NAME, and exit with its status.

    Waits (FIFO) for the lock; interoperates with 'etcdctl lock NAME'. If the lock is lost (the session's
    lease could not be kept alive), COMMAND is stopped before the lease can expire on the server, and coordkit
    exits with 75.

    \b
        coordkit lock nightly-report -- ./report.sh --full
    """
    backend = connection.backend()

    async def work() -> int:
        async with backend, Session(backend, ttl=ttl) as session:
            waiting = anyio.CancelScope(deadline=math.inf if timeout is None else anyio.current_time() + timeout)
            holding = False
            try:
                with stoppable(), waiting:
                    async with Lock(session, name) as held:
                        waiting.deadline = math.inf  # the deadline bounds the wait, not the command
                        holding = True
                        return await run_command(command, **_protected_by(session, held.token, grace))
            except OwnershipLostError as exc:
                raise _lost(f"lock {name!r}", exc, running=holding) from None
            raise Failure(f"lock {name!r} was not acquired within {timeout} s", EXIT_TIMEOUT)

    run(work)


# -- elect ------------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("name", callback=check_name)
@_OPTIONAL_COMMAND
@click.option(
    "--id", "member_id", required=True, callback=check_name, help="this instance's id: the leader name others see"
)
@click.option("--http", metavar="HOST:PORT", help="serve GET / {'name': leader} and GET /healthz")
@grace_option
@ttl_option
@connection_options
def elect(
    connection: Connection,
    name: str,
    command: tuple[str, ...],
    member_id: str,
    http: str | None,
    grace: float,
    ttl: int,
) -> None:
    """Campaign in the election NAME as --id, and run COMMAND only while leading.

    When the leadership is lost, COMMAND is stopped and the campaign starts again. When COMMAND exits by itself,
    coordkit resigns and exits with its status. Without COMMAND, it leads until stopped (a sidecar).
    Interoperates with 'etcdctl elect NAME'.

    With --http HOST:PORT it serves the Kubernetes leader-elector sidecar's API: 'GET /' answers
    '{"name": "<leader id>"}' (empty while nobody leads, or while this instance's session is not valid: it
    cannot tell) and 'GET /healthz' is 200 while this instance's
    session is valid, 503 otherwise, so a program that cannot campaign itself can ask "am I the leader?".

    \b
        coordkit elect main-job --id "$HOSTNAME" --http 127.0.0.1:4040
    """
    elector = _Elector(connection.backend(), name, command, member_id, grace, ttl, SidecarState(member_id))
    run(partial(elector.work, parse_address(http) if http else None))


@dataclass
class _Elector:
    """What `elect` does: campaign with `run_while_leader`, run COMMAND while leading, keep the sidecar told."""

    backend: Backend
    name: str
    command: tuple[str, ...]
    member_id: str
    grace: float
    ttl: int
    state: SidecarState
    connected: bool = False  # once a session was granted, outages are waited out

    async def work(self, address: tuple[str, int] | None) -> int:
        async with self.backend, anyio.create_task_group() as tg:
            if address is not None:
                port = await tg.start(_serve_sidecar, self.state, *address)
                host = f"[{address[0]}]" if ":" in address[0] else address[0]
                note(f"serving the leader of {self.name!r} on http://{host}:{port}/")
                tg.start_soon(self.follow_leader)
            status = await self.campaign()
            tg.cancel_scope.cancel()
        return status

    async def follow_leader(self) -> None:
        async with aclosing(observe_leader(self.backend, self.name)) as leaders:
            async for leader in leaders:
                self.state.observed = "" if leader is None else text(leader.value)

    async def campaign(self) -> int:
        """Campaign until COMMAND has run to the end as leader; a lost leadership campaigns again."""
        try:
            return await run_while_leader(
                self.backend,
                self.name,
                self.lead,
                value=self.member_id.encode(),
                ttl=self.ttl,
                on_campaign=self.campaigning,
                on_lost=self.lost,
            )
        finally:
            self.state.session = None

    async def lead(self, leadership: Leadership) -> int:
        """Lead once: COMMAND's status when it finishes (without COMMAND, lead until stopped)."""
        note(f"leading {self.name!r} (term {leadership.term})")
        self.state.term = leadership.term
        try:
            with stoppable():
                if self.command:
                    session = self.state.session
                    assert session is not None
                    return await run_command(self.command, **_protected_by(session, leadership.term, self.grace))
                await anyio.sleep_forever()
        finally:
            self.state.term = 0  # before resigning: the sidecar stops vouching for us first
        raise AssertionError("unreachable")

    def campaigning(self, session: Session) -> None:
        self.connected = True
        self.state.session = session
        note(f"campaigning in {self.name!r} as {self.member_id!r}")

    def lost(self, exc: Exception) -> None:
        if not self.connected:
            raise exc  # a first connection that fails is a configuration problem: say so and exit
        self.state.session = None
        if isinstance(exc, LeadershipLostError):
            stopped = "; the command was stopped" if self.command else ""
            note(f"leadership of {self.name!r} lost ({exc}){stopped}; campaigning again")
        else:
            note(f"etcd unavailable ({exc}); retrying")


async def _serve_sidecar(
    state: SidecarState, host: str, port: int, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with serve(state, host, port) as bound:
        task_status.started(bound)
        await anyio.sleep_forever()


# -- members, join ----------------------------------------------------------------------------------------------


@cli.command()
@click.argument("group", callback=check_name)
@click.option("--watch", is_flag=True, help="after the table, stream joins, leaves and updates")
@json_option
@connection_options
def members(connection: Connection, group: str, watch: bool, as_json: bool) -> None:
    """List the members of GROUP with their metadata (--watch: and follow them).

    Observing takes no lease: only reads and a watch.
    """
    backend = connection.backend()
    output = Output(as_json=as_json)

    async def work() -> int:
        async with backend:
            observed = Group(Session(backend), group)  # a session that is never entered: observing needs no lease
            if not watch:
                _print_members(output, await observed.members())
                return 0
            first = True
            async with aclosing(observed.watch()) as views:
                async for view in views:
                    if first or view.resync:
                        _print_members(output, view)
                    else:
                        _print_changes(output, view)
                    first = False
        return 0

    run(work)


def _print_members(output: Output, view: GroupView) -> None:
    if output.as_json:
        members = {member: text(metadata) for member, metadata in sorted(view.members.items())}
        output.json({"revision": view.revision, "members": members, "resync": view.resync})
        return
    output.table(("member", "metadata"), [(member, text(data)) for member, data in sorted(view.members.items())])


def _print_changes(output: Output, view: GroupView) -> None:
    if output.as_json:
        output.json(
            {
                "revision": view.revision,
                "joined": {member: text(view.members[member]) for member in sorted(view.joined)},
                "left": sorted(view.left),
                "updated": {member: text(view.members[member]) for member in sorted(view.updated)},
            }
        )
        return
    for member in sorted(view.joined):
        output.line(f"+ {member} {text(view.members[member])}", fg="green")
    for member in sorted(view.left):
        output.line(f"- {member}", fg="red")
    for member in sorted(view.updated):
        output.line(f"~ {member} {text(view.members[member])}", fg="yellow")


@cli.command()
@click.argument("group", callback=check_name)
@click.argument("member_id", metavar="ID")
@_OPTIONAL_COMMAND
@click.option("--metadata", default="", help="text others see with this member (an address, a version)")
@grace_option
@ttl_option
@connection_options
def join(
    connection: Connection, group: str, member_id: str, command: tuple[str, ...], metadata: str, grace: float, ttl: int
) -> None:
    """Be member ID of GROUP for as long as COMMAND runs (without COMMAND: until stopped).

    The member key lives on this process's lease: if coordkit dies, the member leaves within --ttl. If the
    membership is lost, COMMAND is stopped and coordkit exits with 75. An ID already in the group is refused.
    """
    backend = connection.backend()
    observed = Group(Session(backend), group)
    try:
        observed.join(member_id, metadata=metadata.encode())  # checks the id before anything is sent
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from None

    async def work() -> int:
        async with backend, Session(backend, ttl=ttl) as session:
            try:
                with stoppable():
                    return await membership(session)
            except OwnershipLostError as exc:
                raise _lost(f"membership {member_id!r} of {group!r}", exc) from None

    async def membership(session: Session) -> int:
        async with Group(session, group).join(member_id, metadata=metadata.encode()) as member:
            if command:
                return await run_command(command, **_protected_by(session, member.revision, grace))
            await anyio.sleep_forever()
        raise AssertionError("unreachable")

    run(work)


# -- config -----------------------------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Read, write (compare-and-swap) and follow configuration keys.

    Values are bytes, written as given; ConfigView's default codec reads them as JSON, so publish JSON text
    (''"a string"'', ''{"a": 1}'') for programs that use it.
    """


@config.command("get")
@click.argument("path")
@json_option
@connection_options
def config_get(connection: Connection, path: str, as_json: bool) -> None:
    """Print the value of the key PATH, or every key under the prefix PATH.

    A key named exactly PATH prints its value as is (for '$(coordkit config get app/db)'); otherwise a
    table of the keys that start with PATH. Exit 4 if there is nothing.
    """
    backend = connection.backend()
    output = Output(as_json=as_json)

    async def work() -> int:
        async with backend:
            found = await backend.range(Range(path.encode(), prefix=True))
        exact = [kv for kv in found.kvs if kv.key == path.encode()]
        if not found.kvs:
            raise Failure(f"nothing at {path!r}", EXIT_NOT_FOUND)
        if exact:
            kv = exact[0]
            if as_json:
                output.json({"key": path, "value": text(kv.value), "revision": kv.mod_revision})
            else:
                sys.stdout.buffer.write(kv.value)
                sys.stdout.buffer.flush()
            return 0
        if as_json:
            keys = {text(kv.key): {"value": text(kv.value), "revision": kv.mod_revision} for kv in found.kvs}
            output.json({"revision": found.revision, "keys": keys})
        else:
            output.table(
                ("key", "revision", "value"), [(text(kv.key), str(kv.mod_revision), text(kv.value)) for kv in found.kvs]
            )
        return 0

    run(work)


@config.command("put")
@click.argument("key")
@click.argument("value")
@click.option(
    "--expect-revision",
    type=click.IntRange(min=0),
    help="write only if the key's revision is still this (0: only if it does not exist); else exit 3",
)
@json_option
@connection_options
def config_put(connection: Connection, key: str, value: str, expect_revision: int | None, as_json: bool) -> None:
    """Write VALUE ('-': read it from stdin) at KEY; print the revision of the write.

    With --expect-revision this is a compare-and-swap: read the revision with 'config get --json', change,
    write back with the revision you read; if someone wrote in between, nothing is written and coordkit exits
    with 3.
    """
    if not key:
        raise click.BadParameter("the key must not be empty", param_hint="KEY")
    data = sys.stdin.buffer.read() if value == "-" else value.encode()
    backend = connection.backend()
    output = Output(as_json=as_json)

    async def work() -> int:
        async with backend:
            revision = await publish(backend, key, data, expected_revision=expect_revision, codec=RAW)
            if revision is None:
                current = await backend.range(Range(key.encode()))
                now = current.kvs[0].mod_revision if current.kvs else 0
                raise Failure(f"{key!r} changed: its revision is {now}, not {expect_revision}", EXIT_CONFLICT)
        if as_json:
            output.json({"key": key, "revision": revision})
        else:
            output.line(str(revision))
        return 0

    run(work)


@config.command("watch")
@click.argument("prefix")
@json_option
@connection_options
def config_watch(connection: Connection, prefix: str, as_json: bool) -> None:
    """Print every key under PREFIX, then every change as it happens (never a gap, across reconnects)."""
    backend = connection.backend()
    output = Output(as_json=as_json)

    async def work() -> int:
        async with backend, ConfigView(backend, prefix, codec=RAW) as view:
            changes = view.changes()  # registered before the first print: nothing is missed in between
            for key, data in sorted(view.snapshot().items()):
                _print_change(output, prefix + key, data, view.key_revision(key))
            async with aclosing(changes):
                async for change in changes:
                    _print_change(output, prefix + change.key, change.value, change.revision)
        return 0

    run(work)


def _print_change(output: Output, key: str, value: bytes | None, revision: int) -> None:
    if output.as_json:
        output.json({"key": key, "value": None if value is None else text(value), "revision": revision})
    elif value is None:
        output.line(f"{revision} {key} deleted", fg="red")
    else:
        output.line(f"{revision} {key} {text(value)}")


# -- once -------------------------------------------------------------------------------------------------------

#: What 'once' stores of a command's stdout: within etcd's default request limit, with room for the rest.
ONCE_STDOUT_LIMIT = MAX_REQUEST_BYTES // 2


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: int
    stdout: bytes
    truncated: bool


class _OutcomeCodec:
    def encode(self, value: _Outcome) -> bytes:
        stdout = base64.b64encode(value.stdout).decode("ascii")
        return json.dumps({"status": value.status, "stdout": stdout, "truncated": value.truncated}).encode()

    def decode(self, data: bytes) -> _Outcome:
        document = json.loads(data)
        return _Outcome(int(document["status"]), base64.b64decode(document["stdout"]), bool(document["truncated"]))


@cli.command()
@click.argument("key", callback=check_name)
@_COMMAND
@click.option(
    "--result-ttl",
    type=click.IntRange(min=1),
    help="keep the result this many seconds (default: forever; later callers get it without running COMMAND)",
)
@grace_option
@ttl_option
@connection_options
def once(
    connection: Connection, key: str, command: tuple[str, ...], result_ttl: int | None, grace: float, ttl: int
) -> None:
    """Run COMMAND once cluster-wide for KEY: every caller prints its stdout and exits with its status.

    The first caller to claim KEY runs COMMAND (its stdout goes to the terminal as it comes); every other
    caller, now or later, waits and then prints the stored stdout and exits with the stored status. If the
    runner dies or is stopped, another caller runs COMMAND. Stored stdout is capped at 768 KiB (a warning says
    when it was cut).
    """
    backend = connection.backend()

    async def work() -> int:
        ran = False

        async with backend, Session(backend, ttl=ttl) as session:

            async def compute() -> _Outcome:
                nonlocal ran
                ran = True
                captured = bytearray()
                status = await run_command(
                    command,
                    grace=grace,
                    kill_by=kill_deadline(session),
                    capture=captured,
                    capture_limit=ONCE_STDOUT_LIMIT + 1,  # one more: enough to know it was cut
                )
                truncated = len(captured) > ONCE_STDOUT_LIMIT
                return _Outcome(status, bytes(captured[:ONCE_STDOUT_LIMIT]), truncated)

            try:
                with stoppable():
                    outcome = await once_(session, key, compute, codec=_OutcomeCodec(), result_ttl=result_ttl)
            except OwnershipLostError as exc:
                raise _lost(f"the claim on {key!r}", exc) from None
        if not ran:
            sys.stdout.buffer.write(outcome.stdout)
            sys.stdout.buffer.flush()
        if outcome.truncated:
            note(f"the stored output of {key!r} was cut at {ONCE_STDOUT_LIMIT} bytes")
        return outcome.status

    run(work)


# -- demo -------------------------------------------------------------------------------------------------------


@cli.command()
@connection_options
def demo(connection: Connection) -> None:
    """The main job of a monolith run as three replicas: it runs once, and survives its leader freezing.

    In memory by default (one process plays the three replicas); with --etcd, on a real cluster.
    """
    output = Output(as_json=False)
    if connection.endpoints:
        connect: Callable[[], Backend] = connection.backend
    else:
        connect = MemoryBackend().connect

    async def work() -> int:
        await play_demo(connect, output)
        return 0

    run(work)
