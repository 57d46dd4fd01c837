"""A shell command that may run only while its lock is held: what ``coordkit lock NAME -- CMD`` does, in a program.

The command runs in a process group of its own (``open_process_group``), so stopping it stops everything it
started. Here the holder's process "freezes" (its keepalives stop): its guarded block is cancelled, and the
whole group is stopped with SIGTERM, then SIGKILL no later than ``kill_deadline``, the earliest time the lease
may end on the server and another process may take the lock. The command ignores SIGTERM and leaves a child
behind, so only the group-wide SIGKILL by that deadline ends it.

    python examples/guarded_command.py                 # in-memory backend (the default)
    python examples/guarded_command.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import subprocess

import anyio
from _common import backend_factory

from coordkit import Lock, LockLostError, Session, check_name, kill_deadline, open_process_group, stop_process_group
from coordkit.testing import FaultyBackend

NAME = "examples/guarded/nightly-report"
check_name(NAME)  # ValueError at once if it could never be a lock's name (empty, NUL, not UTF-8, too long)
SCRIPT = "trap '' TERM; sleep 1000 & echo $!; wait"  # ignores SIGTERM; its child would outlive a plain kill


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def main() -> None:
    client = FaultyBackend(backend_factory(__doc__ or "")())
    async with client, Session(client, ttl=2) as session:
        try:
            async with Lock(session, NAME):
                process = await open_process_group(["sh", "-c", SCRIPT], stdout=subprocess.PIPE)
                try:
                    assert process.stdout is not None
                    child = int((await process.stdout.receive()).decode())
                    print(f"holding the lock; the command runs, its child is {child}")
                    client.suspend_keepalives()  # the holder freezes: the session's deadline will pass
                    print("keepalives stopped")
                    await process.wait()
                finally:
                    with anyio.CancelScope(shield=True):
                        started = anyio.current_time()
                        await stop_process_group(process, grace=600, kill_by=kill_deadline(session))
                        waited = anyio.current_time() - started
                        print(
                            f"the command's group was stopped {waited:.1f} s after the loss (exit {process.returncode})"
                        )
                        await process.aclose()
        except LockLostError as exc:
            print(f"lock lost: {exc}")
    print(f"the child is gone too: {not alive(child)}")


if __name__ == "__main__":
    anyio.run(main)
