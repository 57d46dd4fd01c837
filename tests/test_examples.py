"""Every example runs, on memory and on a real etcd (or on etcd only, if it needs one), and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordkit.testing import EtcdServer, PostgresServer

EXAMPLES = Path(__file__).parent.parent / "examples"

# What each example must print to have done its job.
EXPECTED = {
    "demo.py": ["saw c leave within its TTL"],
    "locks.py": ["is refused", "counter = 9:", "never more than 2 inside"],
    "readers_writers.py": ["readers read at once; 6 writes, each made alone"],
    "phases.py": ["counter = 130:", "its session was lost inside the phase", "phases lined up"],
    "leader_latch.py": ["b: follower", "c took over from the frozen b", "the dashboard saw the leaders a -> b -> c"],
    "leader_only_cron.py": ["8 ticks, each run once", "job cancelled (leadership lost)"],
    "build_index_once.py": ["built 1 time(s)", "late-worker: got index built by"],
    "cluster_monitor.py": ["monitor saw worker-3 leave", "updated: worker-1"],
    "config_push.py": ["stale revision: refused", "10 services saw the bad value and kept rate_limit=250"],
    "work_queue.py": [
        "is killed while working on it",
        "was offered again after the kill and is now done",
        "all 20 items completed exactly once",
    ],
    "guarded_command.py": ["the command runs", "(exit -9)", "the child is gone too: True"],
    "events.py": [
        "none delivered: True",
        "sender: audit failed: removed",
        "deploy after build: True",
        "resize handled on attempt 2: True",
    ],
    "distributed_cron.py": ["killed   on", "workers now: w2, w3", "on w2 said 'up'", "every tick ran exactly once"],
    "monolith_sidecar.py": [
        "is killed with SIGKILL",
        "s after the crash",
        "ms after the SIGTERM",
        "never two replicas in the same tick",
    ],
}

# Examples that start 'coordkit' processes: separate processes can share only a real store.
ETCD_ONLY = {"monolith_sidecar.py"}
# Run on PostgreSQL too (every example takes --postgres; these few keep the default run short).
ON_POSTGRES = {"locks.py", "events.py", "build_index_once.py"}

CASES = [
    (example, kind)
    for example in sorted(EXPECTED)
    for kind in ("memory", "etcd", "postgres")
    if (kind == "etcd" or example not in ETCD_ONLY) and (kind != "postgres" or example in ON_POSTGRES)
]


def test_every_example_is_checked() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(EXPECTED)
    assert set(EXPECTED) >= ETCD_ONLY


@pytest.mark.parametrize(("example", "kind"), CASES)
def test_example(example: str, kind: str, request: pytest.FixtureRequest) -> None:
    args = [sys.executable, str(EXAMPLES / example)]
    if kind == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        args += ["--etcd", server.endpoint]
    if kind == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        args += ["--postgres", postgres.dsn]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in EXPECTED[example]:
        assert expected in done.stdout, done.stdout
