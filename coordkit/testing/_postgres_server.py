"""PostgresServer: a real, throwaway PostgreSQL for tests, started from the installed server binaries.

Guarantees: the server listens only on 127.0.0.1, on a free port, with no Unix socket, in a temporary data
directory made by ``initdb``; it is stopped by its PID (the one ``postgres`` process this object started) and never
by name. A stopped server restarts on the same port with the same data. PostgreSQL refuses to run as root: when
the tests run as root, the server runs as the ``postgres`` user (made by Debian's ``postgresql`` package).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, final

from ._etcd_process import free_ports

__all__ = ("PostgresServer",)


def find_postgres_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: ``$COORDKIT_POSTGRES_BIN``, the newest Debian
    ``/usr/lib/postgresql/<version>/bin``, or the one on ``PATH``; None when there is none."""
    configured = os.environ.get("COORDKIT_POSTGRES_BIN")
    if configured:
        return Path(configured)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    # finalizer of last resort (interpreter exit, object dropped while running): immediate shutdown, as a crash
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@final
class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 for tests (sync context manager).

    ``with PostgresServer() as srv: ... srv.dsn ...`` runs ``initdb``, starts the server and, on exit, stops it and
    deletes its data. Durability is traded for speed (``fsync=off``): a test server only.

    Args:
        password: require this password (SCRAM) for the superuser `user`; None: trust local connections.
        bin_dir: the directory of ``initdb`` and ``postgres`` (default: `find_postgres_bin_dir`).
        max_connections: the server's ``max_connections`` (every client of the tests holds a few).
        startup_timeout: seconds to wait for the server to accept connections after each start.

    Raises:
        RuntimeError: PostgreSQL is not installed, no unprivileged user exists to run it as root, or the server
            did not come up (the message has its log).
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        max_connections: int = 400,
        startup_timeout: float = 60.0,
    ) -> None:
        found = Path(bin_dir) if bin_dir is not None else find_postgres_bin_dir()
        if found is None or not (found / "initdb").is_file():
            raise RuntimeError(
                "PostgreSQL server binaries not found: install them (Debian: apt-get install postgresql) "
                "or set COORDKIT_POSTGRES_BIN"
            )
        self._bin = found
        self.user = "coordkit"
        self.password = password
        (self.port,) = free_ports(1)
        self._max_connections = max_connections
        self._startup_timeout = startup_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="coordkit-pg-"))
        self._remove_dir = weakref.finalize(self, shutil.rmtree, str(self._dir), ignore_errors=True)
        self.data_dir = self._dir / "data"
        self.log_file = self._dir / "postgres.log"
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError("PostgreSQL refuses to run as root and there is no 'postgres' user") from exc
            os.chown(self._dir, self._run_as.pw_uid, self._run_as.pw_gid)
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._initialized = False

    # -- properties ------------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """A libpq URL of the server's ``postgres`` database (it has no TLS), e.g.
        ``postgresql://coordkit@127.0.0.1:41234/postgres?sslmode=disable``."""
        secret = f":{self.password}" if self.password is not None else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/postgres?sslmode=disable"

    @property
    def pid(self) -> int | None:
        """PID of the running server, None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle -------------------------------------------------------------------------------------

    def _popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, **kwargs)

    def _initdb(self) -> None:
        args = [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", self.user, "-E", "UTF8", "--locale=C"]
        args.append("--no-sync")
        if self.password is not None:
            pwfile = self._dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._run_as is not None:
                os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args.append("--auth=trust")
        with open(self.log_file, "ab") as log:
            if self._run_as is not None:
                os.chown(self.log_file, self._run_as.pw_uid, self._run_as.pw_gid)
            proc = self._popen(args, stdout=log, stderr=log)
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"initdb failed; log:\n{self._log_tail()}")
        self._initialized = True

    def start(self) -> None:
        """Start the server (same port and data as before; ``initdb`` the first time) and wait until it answers.

        Raises:
            RuntimeError: it exited or did not answer within ``startup_timeout`` seconds.
        """
        if self.running:
            return
        if not self._initialized:
            self._initdb()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": str(self._max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
        }
        args = [str(self._bin / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log_file, "ab") as log:
            self._proc = self._popen(args, stdout=log, stderr=log)
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Stop the server (a fast shutdown: clients are disconnected), SIGKILL after 30 s; wait. Idempotent."""
        self._signal(signal.SIGINT, 30)

    def kill(self) -> None:
        """Stop the server at once, as a crash would (an immediate shutdown: recovery runs at the next start)."""
        self._signal(signal.SIGQUIT, 10)

    def _signal(self, signum: int, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None

    def restart(self) -> None:
        """Stop and start again: every client connection breaks."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its data and log."""
        self.stop()
        self._remove_dir()

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresServer 127.0.0.1:{self.port} pid={self.pid}>"

    # -- internals -------------------------------------------------------------------------------------

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        # The only wait here is for an external process to come up: poll pg_isready, bounded by startup_timeout.
        deadline = time.monotonic() + self._startup_timeout
        isready = [str(self._bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user]
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(f"postgres exited during startup (code {code}); log:\n{self._log_tail()}")
            if subprocess.run(isready, check=False, timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections in {self._startup_timeout} s; log:\n{self._log_tail()}"
                )
            time.sleep(0.05)
