"""Developer sessions. ``bash scripts/check`` runs them all in one environment (what CI does).

On their own (``nox -s tests``) each session builds its own virtualenv.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "docs", "wheel", "tests"]


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite on every backend (memory on a virtual clock; a real etcd and a real PostgreSQL started by
    the tests).

    Three workers (each with its own etcd and PostgreSQL): most etcd and PostgreSQL tests wait on real time, so they
    overlap well on 2 cores.
    """
    session.install("-e", ".[test]")
    session.run("pytest", "-n", "4", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """The long reliability runs: 10,000 fault schedules, 10,000 differential sequences (MemoryBackend against a
    real etcd), 42,000 broken watch streams, the 3-member cluster kill/restart rounds, stuck leaders and the
    crash-failover measurement (``slow``)."""
    session.install("-e", ".[test]")
    env = {
        name: session.env.get(name, default)
        for name, default in (
            ("COORDKIT_CHAOS_SCHEDULES", "10000"),
            ("COORDKIT_WATCH_BREAKS", "40000"),  # tests/test_watch_breaks.py, on memory
            ("COORDKIT_WATCH_BREAKS_ETCD", "2000"),
            ("COORDKIT_DIFF_SEQUENCES", "10000"),  # tests/test_differential.py, 200 ops each
        )
    }
    session.run("pytest", "-m", "chaos or slow", *session.posargs, env=env)


@nox.session
def examples(session: nox.Session) -> None:
    """Every example, on memory and on a real etcd (also part of ``tests``)."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_examples.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    session.install("-e", ".[docs]")
    with tempfile.TemporaryDirectory() as site:
        session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it in a clean virtualenv, and run a lock-free smoke test on MemoryBackend."""
    session.install("hatchling")
    with tempfile.TemporaryDirectory() as tmp:
        dist, venv = Path(tmp, "dist"), Path(tmp, "venv")
        session.run("python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), ".")
        (wheel_file,) = dist.glob("coordkit-*.whl")
        session.run("python", "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        session.run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel_file), external=True)
        with session.chdir(tmp):  # not the checkout: the import must come from the installed wheel
            session.run(python, "-c", SMOKE, external=True)


SMOKE = """
import anyio, coordkit
from coordkit import MemoryBackend, Put, Range, Session

assert "site-packages" in coordkit.__file__, coordkit.__file__

async def main():
    async with MemoryBackend() as backend, MemoryBackend(store=backend.store) as observer:
        async with Session(backend, ttl=5) as session, session.guarded():
            await backend.txn([], [Put(b"smoke", b"ok", session.lease_id)])
            assert (await observer.range(Range(b"smoke"))).kvs[0].value == b"ok"
        assert (await observer.range(Range(b"smoke"))).count == 0, "the session's exit revokes its lease"

anyio.run(main)

# click is the cli extra's, not a core dependency: without it, the script names the extra.
import subprocess, sys
done = subprocess.run([sys.executable, "-m", "coordkit", "--help"], capture_output=True, text=True)
assert done.returncode == 1 and "pip install 'coordkit[cli]'" in done.stderr, done
print("wheel smoke test passed:", coordkit.__version__)
"""
