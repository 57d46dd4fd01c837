"""Running the wrapped command: in its own process group, stopped with SIGTERM then SIGKILL when cancelled.

The command is the thing a lock, a leadership or a membership protects, so stopping it must reach everything
it started: it runs in a new session (its own process group) and signals go to the whole group. A command that
is cancelled (the ownership was lost, coordkit got a signal) gets SIGTERM; SIGKILL follows after ``grace``
seconds, or sooner, by ``kill_by()``: the time the lease protecting it may end on the server. The cancellation
is then re-raised: the caller learns why, the command is gone.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream

from .. import open_process_group, stop_process_group

#: Shell conventions for a command that could not be started.
EXIT_COMMAND_NOT_EXECUTABLE = 126
EXIT_COMMAND_NOT_FOUND = 127


class CommandError(Exception):
    """The command could not be started; ``status`` is the shell's code for why (126 or 127)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def exit_status(returncode: int) -> int:
    """A process's return code as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


async def _open(
    argv: Sequence[str], env: Mapping[str, str] | None, *, stdin: bool, stdout: bool, stderr: bool
) -> anyio.abc.Process:
    """Start ``argv`` in a process group of its own, with pipes for the streams asked for.

    Raises:
        CommandError: the command was not found or is not executable.
    """
    check_runnable(argv[0])
    try:
        return await open_process_group(
            argv,
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE if stdout else None,
            stderr=subprocess.PIPE if stderr else None,
            env=env,
        )
    except FileNotFoundError as exc:
        raise CommandError(f"command not found: {argv[0]}", EXIT_COMMAND_NOT_FOUND) from exc
    except PermissionError as exc:
        raise CommandError(f"command not executable: {argv[0]}", EXIT_COMMAND_NOT_EXECUTABLE) from exc


async def run_command(
    argv: Sequence[str],
    *,
    grace: float,
    kill_by: Callable[[], float] | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    capture: bytearray | None = None,
    capture_limit: int | None = None,
    echo: bool = True,
    stderr_tail: bytearray | None = None,
    reap: bool = False,
) -> int:
    """Run ``argv`` to completion and return its exit status; stop it (group-wide) if cancelled.

    Args:
        grace: seconds between SIGTERM and SIGKILL when the command must stop.
        kill_by: the latest time (``anyio.current_time()``) for SIGKILL, read again while waiting: the earliest
            server-side expiry of the protecting lease, which can come before ``grace`` is over.
        env: variables to add to the command's environment.
        stdin: what the command reads on its stdin (then closed); without it, it inherits ours.
        capture: the command's stdout is appended here (its first ``capture_limit`` bytes, if given), and
            copied to ours as it comes if ``echo``; without it, the command writes straight to our stdout.
        stderr_tail: the command's stderr is copied to ours as it comes, and its last `TAIL_BYTES` kept here;
            without it, the command writes straight to our stderr.
        reap: when the command exits by itself, SIGKILL what it left running in its group (the work is over).

    Raises:
        CommandError: the command was not found or is not executable.
    """
    process = await _open(
        argv, env, stdin=stdin is not None, stdout=capture is not None, stderr=stderr_tail is not None
    )
    async with process:  # closes the pipes
        try:
            async with anyio.create_task_group() as pipes:
                if stdin is not None and process.stdin is not None:
                    pipes.start_soon(_feed, process.stdin, stdin)
                if capture is not None and process.stdout is not None:
                    out = sys.stdout.buffer if echo else None
                    pipes.start_soon(_copy, process.stdout, capture, out, None, capture_limit)
                if stderr_tail is not None and process.stderr is not None:
                    pipes.start_soon(_copy, process.stderr, stderr_tail, sys.stderr.buffer, TAIL_BYTES, None)
                status = exit_status(await process.wait())
                if reap:
                    await stop_process_group(process, grace=0)  # the command is gone: SIGKILL what it left
            return status
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stop_process_group(process, grace=grace, kill_by=kill_by or _never)
            raise


#: How much of a command's stderr `run_command` keeps in ``stderr_tail``.
TAIL_BYTES = 2048


async def _feed(stream: ByteSendStream, data: bytes) -> None:
    try:
        async with stream:  # closed when written: the command sees the end of its input
            await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the command exited (or closed its stdin) without reading it all: its business


async def _copy(
    stream: ByteReceiveStream, into: bytearray, echo: BinaryIO | None, tail: int | None, head: int | None
) -> None:
    """Read ``stream`` to its end into ``into``: its last ``tail`` bytes, or its first ``head``, or all of it."""
    try:
        async for chunk in stream:
            if head is None:
                into += chunk
            elif len(into) < head:
                into += chunk[: head - len(into)]
            if tail is not None and len(into) > tail:
                del into[: len(into) - tail]
            if echo is not None:
                echo.write(chunk)
                echo.flush()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


# On Linux the command runs under the guardian the Scheduler's command jobs use (`open_process_group`): the
# group's leader, which kills the whole group if coordkit dies without stopping it (kill -9, an OOM kill). Without
# it, a command would outlive its coordkit, and its lock, by as long as it likes.


def check_runnable(program: str) -> None:
    """Raise `CommandError` (127: not found, 126: not executable) unless ``program`` can be run."""
    found = shutil.which(program)
    if found is None:
        if os.sep in program and os.path.exists(program):
            raise CommandError(f"command not executable: {program}", EXIT_COMMAND_NOT_EXECUTABLE)
        raise CommandError(f"command not found: {program}", EXIT_COMMAND_NOT_FOUND)


def _never() -> float:
    return math.inf
