"""Election: leader election with etcd's Go ``concurrency.Election`` algorithm and key layout.

Guarantees: at most one leader per name while every candidate's session is valid; leaders in FIFO order of
their campaigns; a leader's block is cancelled (and ``LeadershipLostError`` raised) as soon as its session is
lost, before the server can expire its lease and elect the next candidate; terms (the leader key's create
revision) strictly increase across leaders. Resigning hands over at once. ``etcdctl elect`` and Go clients
campaign in the same election.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar, final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import _telemetry
from .._backends.protocol import Backend
from .._backends.types import Compare, KeyValue, Put, Range, check_ttl
from .._errors import NotOwnerError, OwnershipLostError, UnavailableError
from .._keys import name_prefix
from .._retry import Backoff
from .._session import Session, require_session
from .._supervisor import supervised
from .._watch import Watch, apply
from .contenders import Held, Mutex

_T = TypeVar("_T")


class LeadershipLostError(OwnershipLostError):
    """The session under a leadership was lost: the leader's block was cancelled; another may lead now."""


@dataclass(frozen=True, slots=True)
class Leader:
    """Who leads an election.

    Attributes:
        value: the leader's proclamation (what it campaigned with, or proclaimed since).
        term: the leader key's create revision: strictly increasing across successive leaders (a fencing token).
        key: the leader's key (``<name>/<lease id hex>``).
        lease: the leader's lease id.
    """

    value: bytes
    term: int
    key: bytes
    lease: int


@final
class _Candidate(Mutex):
    _lost_error = LeadershipLostError
    _span = "coordkit.election.campaign"

    def __init__(self, session: Session, name: str, value: bytes) -> None:
        super().__init__(session, name)
        self.value = value

    def _value(self) -> bytes:
        return self.value


@final
class Leadership:
    """Being the leader, inside ``async with election.campaign(value) as leadership``.

    Attributes:
        name: the election's name.
        term: the fencing token of this leadership (its key's create revision).
        key: the leader key.
    """

    def __init__(self, candidate: _Candidate, held: Held) -> None:
        self._candidate = candidate
        self.name = held.name
        self.term = held.token
        self.key = held.key
        self._held = held

    @property
    def value(self) -> bytes:
        """The current proclamation."""
        return self._candidate.value

    def guard(self) -> Compare:
        """The compare that makes a transaction succeed only while this leadership lasts."""
        return self._held.guard()

    async def proclaim(self, value: bytes) -> None:
        """Change the leader's value without a new election (observers see the change).

        Raises:
            NotOwnerError: this leadership is over (resigned, or the lease is gone).
            TypeError: ``value`` is not bytes.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, not {type(value).__name__}")
        session = self._candidate.session
        # Only while our key is the one created at our term: a lost leadership cannot overwrite a successor's.
        result = await session.backend.txn([self.guard()], [Put(self.key, value, session.lease_id)])
        if not result.succeeded:
            raise NotOwnerError(f"election {self.name!r}: not the leader any more (term {self.term})")
        self._candidate.value = value


class _Campaign:
    """``async with election.campaign(value) as leadership``: wait to lead, lead in a guarded block, resign."""

    def __init__(self, candidate: _Candidate) -> None:
        self._candidate = candidate
        self._entries: dict[int, AsyncExitStack] = {}  # task id -> its entry (tasks may share a campaign object)

    async def __aenter__(self) -> Leadership:
        async with AsyncExitStack() as stack:
            held = await stack.enter_async_context(self._candidate)
            self._entries[anyio.get_current_task().id] = stack.pop_all()
        attrs = {**self._candidate._metric_attrs(), "coordkit.transition": "gained"}
        _telemetry.election_transitions.add(1, attrs)
        return Leadership(self._candidate, held)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack = self._entries.pop(anyio.get_current_task().id)
        transition = "resigned"
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        except LeadershipLostError:
            transition = "lost"
            raise
        finally:
            attrs = {**self._candidate._metric_attrs(), "coordkit.transition": transition}
            _telemetry.election_transitions.add(1, attrs)


@final
class Election:
    """A leader election named ``name``, campaigning through ``session``'s lease.

    ``async with election.campaign(b"host-a") as leadership:`` waits until this candidate leads, runs the body
    in a guarded block (cancelled if the session is lost, then ``LeadershipLostError``), and resigns on exit so
    the next candidate leads at once. ``leadership.term`` is a fencing token; ``await leadership.proclaim(v)``
    changes the leader's value. ``await election.leader()`` tells who leads now, and ``election.observe()``
    follows every change of leader, including "no leader". Bound a campaign with ``anyio.fail_after``: a
    candidate that gives up leaves no key behind.

    Args:
        session: the session whose lease the candidate's key is bound to.
        name: the election's name; keys live under ``<name>/``.
    """

    def __init__(self, session: Session, name: str) -> None:
        self.session = require_session(session)
        self.name = name
        self._prefix = name_prefix(name)

    def campaign(self, value: bytes = b"") -> _Campaign:
        """Campaign with ``value``; ``async with`` it to lead (see the class docstring).

        Raises:
            TypeError: ``value`` is not bytes.
            LeadershipLostError: (from ``async with``) the session was lost while campaigning or leading.
            RuntimeError: (from ``async with``) this task already campaigns in this election with this session.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, not {type(value).__name__}")
        return _Campaign(_Candidate(self.session, self.name, value))

    async def leader(self) -> Leader | None:
        """The current leader, or None when nobody campaigns."""
        result = await self.session.backend.range(Range(self._prefix, prefix=True, sort_by="create", limit=1))
        return _leader(result.kvs[0]) if result.kvs else None

    def latch(self, value: bytes = b"") -> LeaderLatch:
        """Campaign in the background and know at any moment whether this candidate leads (``async with`` it).

        Raises:
            TypeError: ``value`` is not bytes.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, not {type(value).__name__}")
        return LeaderLatch(self, value)

    def observe(self) -> AsyncGenerator[Leader | None, None]:
        """Every change of leader, starting with the current one: a new leader, a new proclamation, or None.

        Reported in the store's order, so a stale leader never follows a newer one; reconnects resume without
        a gap and a compaction resynchronises. Iterate it with ``async for``; to stop early and release the
        watch at once, wrap it in ``contextlib.aclosing``.
        """
        return _observe(self.session.backend, self._prefix)


@final
class LeaderLatch:
    """A candidate that campaigns in the background, for code that asks "do I lead?" (Curator's LeaderLatch).

    ``async with election.latch(b"host-a") as latch:`` returns at once and campaigns from a task of its own;
    `is_leader` says whether this candidate leads now, `wait_leader` waits until it does, and ``async for leading
    in latch.changes()`` yields True when it becomes leader and False when it stops (the first item is the state
    when iteration starts). Leaving the block resigns. Leadership is not a guarded block here: code whose effects
    must stop with leadership should run inside ``async with election.campaign()`` instead, or fence its writes
    with `guard`.

    If the session is lost, the latch says False, then its body is cancelled and ``LeadershipLostError`` raised
    from ``async with`` (a lost session cannot campaign again); a refusal by the store is raised the same way.
    """

    def __init__(self, election: Election, value: bytes) -> None:
        self._election = election
        self._value = value
        self._leadership: Leadership | None = None
        self._changed = anyio.Event()
        self._listeners: set[MemoryObjectSendStream[bool]] = set()
        self._stack: AsyncExitStack | None = None

    @property
    def is_leader(self) -> bool:
        """Whether this candidate leads now (as of the last change this process saw)."""
        return self._leadership is not None

    @property
    def term(self) -> int | None:
        """The fencing token of the current leadership, or None when not leading."""
        return None if self._leadership is None else self._leadership.term

    def guard(self) -> Compare:
        """The compare that makes a transaction succeed only while this leadership lasts.

        Raises:
            NotOwnerError: not leading now.
        """
        if self._leadership is None:
            raise NotOwnerError(f"election {self._election.name!r}: this latch does not lead")
        return self._leadership.guard()

    async def wait_leader(self) -> None:
        """Return once this candidate leads (at once if it does). Bound it with ``anyio.fail_after``."""
        while self._leadership is None:
            await self._changed.wait()

    def changes(self) -> AsyncGenerator[bool, None]:
        """True when this candidate becomes leader, False when it stops; the current state first.

        Every transition from this call on is delivered, however fast they follow each other. Stop early with
        ``contextlib.aclosing``.
        """
        send, receive = anyio.create_memory_object_stream[bool](math.inf)
        send.send_nowait(self.is_leader)
        self._listeners.add(send)  # registered now: no transition between this call and the iteration is missed
        return self._changes(send, receive)

    async def _changes(
        self, send: MemoryObjectSendStream[bool], receive: MemoryObjectReceiveStream[bool]
    ) -> AsyncGenerator[bool, None]:
        try:
            async with receive:
                async for leading in receive:
                    yield leading
        finally:
            self._listeners.discard(send)
            send.close()

    def _set(self, leadership: Leadership | None) -> None:
        if (leadership is None) == (self._leadership is None):
            return
        self._leadership = leadership
        for listener in self._listeners:
            listener.send_nowait(leadership is not None)
        self._changed.set()
        self._changed = anyio.Event()

    async def _campaign(self) -> None:
        try:
            async with self._election.campaign(self._value) as leadership:
                self._set(leadership)
                await anyio.sleep_forever()
        finally:
            self._set(None)

    async def __aenter__(self) -> LeaderLatch:
        if self._stack is not None:
            raise RuntimeError(f"this latch of election {self._election.name!r} is already entered")
        async with AsyncExitStack() as stack:
            supervisor = await stack.enter_async_context(supervised(f"leader latch {self._election.name!r}"))
            supervisor.start_soon(self._campaign)
            stack.callback(self._close_listeners)  # first thing on exit: iterators of changes() end
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()


def _leader(kv: KeyValue) -> Leader:
    return Leader(kv.value, kv.create_revision, kv.key, kv.lease)


def observe_leader(backend: Backend, name: str) -> AsyncGenerator[Leader | None, None]:
    """`Election.observe` without a session: every change of leader of the election ``name``, the current first.

    For a program that only watches an election (a dashboard, a sidecar that reports who leads): it takes no
    lease and writes nothing, only reads and a watch. Yields the same items as `Election.observe`.

    Raises:
        TypeError, ValueError: ``name`` is not a valid name (raised here, before anything is read).
    """
    return _observe(backend, name_prefix(name))


async def _observe(backend: Backend, prefix: bytes) -> AsyncGenerator[Leader | None, None]:
    candidates: dict[bytes, KeyValue] = {}
    last: Leader | bool | None = False  # False: nothing reported yet
    async with Watch(backend, prefix, prefix=True) as watch:
        async for item in watch:
            candidates = apply(candidates, item)
            first = min(candidates.values(), key=lambda kv: kv.create_revision, default=None)
            current = None if first is None else _leader(first)
            if current != last:
                last = current
                yield current


def _check_run_while_leader(name: str, job: object, ttl: int, value: object) -> None:
    name_prefix(name)
    if not callable(job):
        raise TypeError(f"run_while_leader({name!r}): job must be a coroutine function, not {type(job).__name__}")
    check_ttl(ttl)
    if not isinstance(value, bytes):
        raise TypeError(f"values are bytes, not {type(value).__name__}")


async def _campaign_in(
    session: Session,
    name: str,
    job: Callable[[Leadership], Awaitable[_T]],
    value: bytes,
    backoff: Backoff,
    on_campaign: Callable[[Session], object] | None,
    on_lost: Callable[[Exception], object] | None,
) -> _T | object:
    """One session's campaign and leadership (see `run_while_leader`): what the job returned, or `_LOST` when
    the leadership was lost (reported to ``on_lost`` already)."""
    if on_campaign is not None:
        on_campaign(session)
    try:
        return await _lead(session, name, job, value, backoff)
    except LeadershipLostError as exc:
        if on_lost is not None:  # said now, not after the lost session's clean-up (a revoke may hang)
            try:
                on_lost(exc)
            except Exception as refused:
                raise _JobFailed from refused  # the hook's own error: it stops the loop as it is
        return _LOST


_LOST = object()  # a leadership lost: campaign again


async def run_while_leader(
    backend: Backend,
    name: str,
    job: Callable[[Leadership], Awaitable[_T]],
    *,
    value: bytes = b"",
    ttl: int = 10,
    on_campaign: Callable[[Session], object] | None = None,
    on_lost: Callable[[Exception], object] | None = None,
) -> _T:
    """Run ``job`` only while leading ``name``; when leadership is lost, cancel it and campaign again.

    The "scheduled jobs of N replicas must run once" helper: every replica calls it; one leads and runs
    ``job(leadership)``. If that replica loses its lease (a partition, a pause), its job is cancelled before
    another replica can be elected, and it re-campaigns with a new session after a backoff. Returns what
    ``job`` returns, when it returns (resigning at once); cancel it to stop campaigning. An exception ``job``
    raises itself (even a ``LeadershipLostError`` of a block of its own) propagates, after resigning.

    Args:
        backend: the store.
        name: the election's name.
        job: the coroutine function to run while leader.
        value: this candidate's proclamation (e.g. its host name).
        ttl: the TTL of each session's lease.
        on_campaign: called with each new session, once its lease is granted and before it campaigns (to
            report progress, or to follow the session's health).
        on_lost: called with the error when a campaign or a leadership ends by a lost session
            (``LeadershipLostError``) or an unreachable store (``UnavailableError``), before campaigning again;
            a loss of the leadership is reported as soon as the job is stopped, before the lost session is
            cleaned up. If it raises, campaigning stops and its exception propagates (to give up when the
            store cannot be reached at all, say).
    """
    _check_run_while_leader(name, job, ttl, value)  # bad arguments fail here, not in the loop
    backoff = Backoff()
    while True:
        try:
            async with Session(backend, ttl=ttl) as session:
                led = await _campaign_in(session, name, job, value, backoff, on_campaign, on_lost)
                if led is not _LOST:
                    return led  # type: ignore[return-value]
        except (LeadershipLostError, UnavailableError) as exc:
            # A lost session stays lost: campaign again with a new one.
            if on_lost is not None:
                on_lost(exc)
        except _JobFailed as failed:
            assert failed.__cause__ is not None
            raise failed.__cause__ from None
        await anyio.sleep(backoff.next_delay())


async def _lead(
    session: Session, name: str, job: Callable[[Leadership], Awaitable[_T]], value: bytes, backoff: Backoff
) -> _T:
    async with Election(session, name).campaign(value) as leadership:
        backoff.reset()
        try:
            return await job(leadership)
        except (LeadershipLostError, UnavailableError) as exc:
            raise _JobFailed from exc  # the job's own error: not a reason to campaign again


class _JobFailed(Exception):
    """Carries an error the job (or a hook) raised itself through run_while_leader's retry handler."""
