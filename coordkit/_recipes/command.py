"""Running a scheduled command: in its own process group, which is stopped whole, by the lease's end at the latest.

A command job's process may start others (``sh -c 'a & b'``); stopping the run must reach all of them. The
command runs in a new session (its own process group) and every signal goes to the group: SIGTERM when the run
is cancelled (killed, timed out, the worker's session lost, the worker stopping), SIGKILL ``grace`` seconds
later, or sooner, by ``kill_by()``: the time the lease protecting the run may end on the server. When the
command exits by itself, what it left running in its group is killed too: the run is over.

The tails of its stdout and stderr (the last ``tail`` bytes of each) are kept for the run record.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream, Process

from .._session import Session

#: Shell conventions for a command that could not be started.
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


@dataclass
class CommandOutcome:
    """What is known of a command's run so far (filled in while it runs, so a cancelled run still has it)."""

    tail: int
    status: int | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    error: str | None = None


def exit_status(returncode: int) -> int:
    """A process's return code as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


async def run_command(
    argv: Sequence[str],
    outcome: CommandOutcome,
    *,
    grace: float,
    kill_by: Callable[[], float] = lambda: math.inf,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``argv`` to completion, filling ``outcome``; if cancelled, stop its whole group, then re-raise.

    A command that cannot be started is not an exception: ``outcome.status`` is 127 (not found) or 126 (not
    executable) and ``outcome.error`` says why.
    """
    refused = _not_runnable(argv[0])  # checked here: the guardian could say so only with its exit status
    if refused is not None:
        outcome.status, outcome.error = refused
        return
    try:
        process = await open_process_group(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
    except FileNotFoundError as exc:
        outcome.status, outcome.error = EXIT_NOT_FOUND, f"command not found: {argv[0]} ({exc.strerror})"
        return
    except PermissionError as exc:
        outcome.status, outcome.error = EXIT_NOT_EXECUTABLE, f"command not executable: {argv[0]} ({exc.strerror})"
        return
    async with process, anyio.create_task_group() as readers:
        assert process.stdout is not None and process.stderr is not None
        done = [anyio.Event(), anyio.Event()]
        readers.start_soon(_keep_tail, process.stdout, outcome.stdout, outcome.tail, done[0])
        readers.start_soon(_keep_tail, process.stderr, outcome.stderr, outcome.tail, done[1])
        try:
            outcome.status = exit_status(await process.wait())
        finally:
            with anyio.CancelScope(shield=True):
                await stop_group(process, anyio.current_time() + grace, kill_by)
                outcome.status = exit_status(await process.wait())
                # The group is dead, so the pipes are at their end; a process that left the group (setsid)
                # and kept them open is not waited for.
                with anyio.move_on_after(1):
                    for event in done:
                        await event.wait()
            readers.cancel_scope.cancel()


# On Linux the command runs under a guardian, the leader of its process group, which kills the whole group when
# the worker dies without stopping it (kill -9, an OOM kill): the parent-death signal tells it. Without it a
# command would outlive its worker, and the lease that marks it running, by as long as it likes. While the worker
# lives, the guardian ignores the group's SIGTERM (the command's to handle), waits for the command and exits as
# it did. A command that cannot be started is reported as a shell would (127: not found, 126: not executable).
_GUARDIAN = """
import os, signal, subprocess, sys
parent = int(sys.argv[1])
def on_term(signum, frame):
    if os.getppid() != parent:
        os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, on_term)
import ctypes
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    os.killpg(0, signal.SIGKILL)
try:
    command = subprocess.Popen(sys.argv[2:])
except OSError as exc:
    print(f"cannot run {sys.argv[2]}: {exc.strerror}", file=sys.stderr)
    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)
status = command.wait()
if status < 0:
    if -status not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
"""


async def open_process_group(
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start ``argv`` in a process group of its own, which dies with this process; stop it with `stop_process_group`.

    The command runs in a new session (its own process group), so a signal sent to the group reaches everything
    it starts. On Linux it runs under a small guardian process that leads the group and kills the whole group
    with SIGKILL if this process dies without stopping it (``kill -9``, the OOM killer): a command protected by a
    lock must not outlive its holder. Elsewhere, a command orphaned that way runs on.

    Args:
        argv: the program and its arguments (not run through a shell).
        stdin: as for `anyio.open_process`: ``None`` (inherited), ``subprocess.PIPE``, ``subprocess.DEVNULL``, ...
        stdout: the same.
        stderr: the same.
        env: variables to add to this process's environment for the command.

    Raises:
        FileNotFoundError, PermissionError: (where there is no guardian) the program cannot be started. Under
            the guardian, the command exits with 127 (not found) or 126 (not executable) instead, as in a shell.
    """
    return await anyio.open_process(
        guarded_argv(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env={**os.environ, **env} if env else None,
        start_new_session=True,  # its own process group: signals reach everything it starts
    )


async def stop_process_group(
    process: Process, *, grace: float, kill_by: Callable[[], float] = lambda: math.inf
) -> None:
    """Stop a command started by `open_process_group`, with everything in its group, and wait for it.

    The group gets SIGTERM if the command still runs, then SIGKILL when ``grace`` seconds have passed or at
    ``kill_by()`` (read again while waiting; see `kill_deadline`), whichever comes first, or as soon as the
    command has exited: what it started must not outlive it. Call it shielded when the caller was cancelled.
    """
    await stop_group(process, anyio.current_time() + grace, kill_by)


def guarded_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` under the guardian, where there is a parent-death signal (Linux); else as it is."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _GUARDIAN, str(os.getpid()), *argv]


def _not_runnable(program: str) -> tuple[int, str] | None:
    if shutil.which(program) is not None:
        return None
    if os.sep in program and os.path.exists(program):
        return EXIT_NOT_EXECUTABLE, f"command not executable: {program}"
    return EXIT_NOT_FOUND, f"command not found: {program}"


async def _keep_tail(stream: ByteReceiveStream, tail: bytearray, size: int, done: anyio.Event) -> None:
    try:
        async for chunk in stream:
            tail += chunk
            if len(tail) > size:
                del tail[: len(tail) - size]
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        done.set()


async def stop_group(process: Process, grace_end: float, kill_by: Callable[[], float]) -> None:
    """SIGTERM to the group if the command runs; SIGKILL to what is left at ``grace_end`` or ``kill_by()``.

    The group is signalled even when the command itself has exited: what it started must not outlive it.
    """
    if process.returncode is None:
        signal_group(process.pid, signal.SIGTERM)
        while process.returncode is None:
            limit = min(grace_end, kill_by())
            if anyio.current_time() >= limit:
                break
            with anyio.move_on_at(min(limit, anyio.current_time() + 0.1)):  # kill_by() moves while keepalives succeed
                await process.wait()
    signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is gone already
        os.killpg(pid, signum)  # the command leads its own group (start_new_session): its pgid is its pid


def kill_deadline(session: Session) -> Callable[[], float]:
    """The latest time (``anyio.current_time()``) by which work protected by ``session``'s lease must be stopped.

    The returned function reads the session again at each call: while keepalives succeed, the time moves on;
    once the session is lost, it is the earliest time the lease may end on the server (a safety margin after
    the session's deadline, or after the loss was noticed), after which another process may hold what the
    lease held. Pass it as ``kill_by`` to `stop_process_group`.
    """
    lost_at = math.inf

    def kill_by() -> float:
        # The lease may end on the server a safety margin after the session's deadline, or after its loss
        # was noticed (a revoked lease is lost before its deadline): SIGKILL by then, whatever the grace says.
        nonlocal lost_at
        if session.lost and lost_at == math.inf:
            lost_at = anyio.current_time()
        return min(session.deadline, lost_at) + session.safety_margin

    return kill_by
