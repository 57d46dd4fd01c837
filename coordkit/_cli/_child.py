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

import anyio
from anyio.abc import Process

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


async def run_command(
    argv: Sequence[str],
    *,
    grace: float,
    kill_by: Callable[[], float] | None = None,
    env: Mapping[str, str] | None = None,
    capture: bytearray | None = None,
) -> int:
    """Run ``argv`` to completion and return its exit status; stop it (group-wide) if cancelled.

    Args:
        grace: seconds between SIGTERM and SIGKILL when the command must stop.
        kill_by: the latest time (``anyio.current_time()``) for SIGKILL, read again while waiting: the
            earliest server-side expiry of the lease that protects the command, which can come before
            ``grace`` is over when the lease is lost.
        env: variables to add to the command's environment.
        capture: the command's stdout is copied to ours as it comes and appended here; without it, the
            command writes straight to our stdout. stdin and stderr are always inherited.

    Raises:
        CommandError: the command was not found or is not executable.
    """
    process = await _start(argv, capture is not None, env)
    async with process:  # closes the pipe
        try:
            if capture is not None and process.stdout is not None:
                async for chunk in process.stdout:
                    capture += chunk
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            return exit_status(await process.wait())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stop_process_group(process, grace=grace, kill_by=kill_by or _never)
            raise


# On Linux the command runs under the guardian the Scheduler's command jobs use (coordkit/_command.py): the
# group's leader, which kills the whole group if coordkit dies without stopping it (kill -9, an OOM kill). Without
# it, a command would outlive its coordkit, and its lock, by as long as it likes.


def _check_runnable(program: str) -> None:
    found = shutil.which(program)
    if found is None:
        if os.sep in program and os.path.exists(program):
            raise CommandError(f"command not executable: {program}", EXIT_COMMAND_NOT_EXECUTABLE)
        raise CommandError(f"command not found: {program}", EXIT_COMMAND_NOT_FOUND)


async def _start(argv: Sequence[str], capture: bool, env: Mapping[str, str] | None) -> Process:
    _check_runnable(argv[0])
    try:
        return await open_process_group(argv, stdout=subprocess.PIPE if capture else None, env=env)
    except FileNotFoundError as exc:
        raise CommandError(f"command not found: {argv[0]}", EXIT_COMMAND_NOT_FOUND) from exc
    except PermissionError as exc:
        raise CommandError(f"command not executable: {argv[0]}", EXIT_COMMAND_NOT_EXECUTABLE) from exc


def _never() -> float:
    return math.inf
