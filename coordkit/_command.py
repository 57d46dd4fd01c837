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
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream, Process

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
    try:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env} if env else None,
            start_new_session=True,  # its own process group: signals reach everything it starts
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
                await _stop(process, anyio.current_time() + grace, kill_by)
                outcome.status = exit_status(await process.wait())
                # The group is dead, so the pipes are at their end; a process that left the group (setsid)
                # and kept them open is not waited for.
                with anyio.move_on_after(1):
                    for event in done:
                        await event.wait()
            readers.cancel_scope.cancel()


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


async def _stop(process: Process, grace_end: float, kill_by: Callable[[], float]) -> None:
    """SIGTERM to the group if the command runs; SIGKILL to what is left at ``grace_end`` or ``kill_by()``.

    The group is signalled even when the command itself has exited: what it started must not outlive it.
    """
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        while process.returncode is None:
            limit = min(grace_end, kill_by())
            if anyio.current_time() >= limit:
                break
            with anyio.move_on_at(min(limit, anyio.current_time() + 0.1)):  # kill_by() moves while keepalives succeed
                await process.wait()
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is gone already
        os.killpg(pid, signum)  # the command leads its own group (start_new_session): its pgid is its pid
