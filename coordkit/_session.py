"""Session: one lease per client, kept alive by a task the session owns, with a local validity deadline.

The lease-loss guarantee: ``session.deadline`` is the send time of the last acknowledged keepalive + the
granted TTL - a safety margin, on the local monotonic clock. The server cannot expire the lease before
send time + TTL (it restarts the TTL when it receives the keepalive, which is after it was sent), so when the
local deadline passes without a renewal, coordkit declares the session lost and cancels every guarded block
*before* the server can hand what they guard to somebody else.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import final

import anyio

from . import _telemetry
from ._backends.protocol import Backend
from ._backends.types import Lease, check_ttl
from ._errors import (
    LeaseExpiredError,
    OwnershipLostError,
    SessionClosedError,
    error_text,
    is_permanent,
)
from ._retry import Backoff, retry_call


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """State and counters of a `Session`.

    Attributes:
        lease_id: the session's lease (0 before it is entered).
        ttl: the TTL the server granted, in seconds.
        deadline: local time (``anyio.current_time()``) until which the lease is known to be valid.
        lost: whether the session is lost.
        keepalives: keepalives acknowledged so far.
        keepalive_failures: keepalives that failed or got no answer in time (each retried until the deadline).
        guarded_blocks: guarded blocks (and `Session.wait_lost` calls) open now.
    """

    lease_id: int
    ttl: int
    deadline: float
    lost: bool
    keepalives: int
    keepalive_failures: int
    guarded_blocks: int


@dataclass(slots=True)
class KeysInUse:
    """The keys this process's tasks use under one session: the per-session state of the recipes.

    The store knows which keys a lease holds, not which task of this process holds them or why; the recipes keep
    that here, on the `Session` that owns it (``session._in_use``), so that it lives exactly as long as the session:
    it is emptied when the session exits. Only the recipes read and write it, from the event loop's thread.

    Attributes:
        contenders: key -> id of the task that holds it or waits with it (Lock, Semaphore, ReadWriteLock,
            Election: ``contenders.py``). A task that contends twice for one name in one session would wait for
            itself, and is refused; other tasks get keys of their own.
        members: the Group member keys this session has joined with (a second join with one id is refused).
        computing: the once() claim keys this session's tasks are computing. A claim with the session's lease that
            is not listed was made by an attempt whose reply was lost, and is adopted.
    """

    contenders: dict[bytes, int] = field(default_factory=dict)
    members: set[bytes] = field(default_factory=set)
    computing: set[bytes] = field(default_factory=set)

    def clear(self) -> None:
        """Forget everything (the session has ended: nothing it held is held any more)."""
        self.contenders.clear()
        self.members.clear()
        self.computing.clear()


@final
class Session:
    """A lease kept alive for as long as the ``async with`` lasts, shared by every recipe built on it.

    ``async with Session(backend, ttl=10) as session:`` grants a lease, refreshes it every ``ttl / 3`` seconds
    from a task the session owns, and revokes it on exit, so whatever it held is released at once rather than
    after a TTL. Many locks, elections and memberships share one session and one keepalive loop.

    When the local deadline passes without a renewal, or the server reports the lease gone, the session is
    *lost*: `lost` becomes true, `wait_lost` returns, and every block opened with `guarded`
    is cancelled and raises its typed error. A lost session stays lost; open a new one to go on.

    Args:
        backend: the store.
        ttl: lease time-to-live in seconds (the server may grant more: etcd's minimum is 2 s with default
            settings).
        safety_margin: seconds before the server-side expiry at which the session counts itself lost;
            default a tenth of the TTL, between 0.1 and 1 s. Must be less than two thirds of the TTL.

    Raises:
        TypeError, ValueError: (at once, before any I/O) not a backend, a TTL etcd would not grant (not an int
            from 1 to 9e9 s), a bad safety margin.
    """

    def __init__(self, backend: Backend, *, ttl: int = 10, safety_margin: float | None = None) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"a Session needs a Backend (MemoryBackend, EtcdBackend...), not {type(backend).__name__}")
        check_ttl(ttl)
        if safety_margin is None:
            safety_margin = max(0.1, min(1.0, ttl / 10))
        if (
            not isinstance(safety_margin, int | float)
            or isinstance(safety_margin, bool)
            or not math.isfinite(safety_margin)
            or safety_margin < 0
        ):
            raise ValueError(f"safety_margin must be a finite number >= 0, not {safety_margin!r}")
        if safety_margin >= ttl * 2 / 3:
            raise ValueError(f"safety_margin {safety_margin} leaves no time to renew a {ttl} s lease")
        self.backend = backend
        self._requested_ttl = ttl
        self._margin = float(safety_margin)
        self._lease_id = 0
        self._ttl = ttl
        self._deadline = -math.inf
        self._open = False
        self._lost_event: anyio.Event | None = None
        self._lost_reason = ""
        self._lost_cause: BaseException | None = None  # the refusal or last failure that lost it, for __cause__
        self._guards: set[anyio.CancelScope] = set()
        self._stack: AsyncExitStack | None = None  # the keepalive task's group, then the revoke
        self._keepalives = 0
        self._keepalive_failures = 0
        self._in_use = KeysInUse()  # the recipes' per-session state, emptied on exit

    # -- public state ----------------------------------------------------------------------------------

    @property
    def lease_id(self) -> int:
        """The session's lease id (0 before the session is entered)."""
        return self._lease_id

    @property
    def ttl(self) -> int:
        """The TTL the server granted, in seconds."""
        return self._ttl

    @property
    def deadline(self) -> float:
        """Local time (``anyio.current_time()``) until which the lease is known to be valid."""
        return self._deadline

    @property
    def safety_margin(self) -> float:
        """Seconds between `deadline` and the earliest time the server may expire the lease."""
        return self._margin

    @property
    def lost(self) -> bool:
        """True once the lease's validity could no longer be guaranteed."""
        return self._lost_event is not None and self._lost_event.is_set()

    async def wait_lost(self) -> None:
        """Return when the session is lost (never, while it stays healthy).

        Raises:
            SessionClosedError: the session has not been entered, or it exited (before or during the wait)
                without being lost: waiting would never end.
        """
        self._require_entered()
        with anyio.CancelScope() as scope:
            self._guards.add(scope)  # cancelled when the session is lost or exits
            try:
                if self._open and not self.lost:
                    await anyio.sleep_forever()
            finally:
                self._guards.discard(scope)
        if not self.lost:
            raise SessionClosedError("the session has exited; it was not lost")

    def statistics(self) -> SessionStatistics:
        """The session's lease, deadline and state, and its keepalive counters, now."""
        return SessionStatistics(
            self._lease_id,
            self._ttl,
            self._deadline,
            self.lost,
            self._keepalives,
            self._keepalive_failures,
            len(self._guards),
        )

    def _attrs(self) -> dict[str, str | int]:
        return _telemetry.attributes(backend=self.backend.name, lease_id=self._lease_id)

    def _require_entered(self) -> None:
        if self._lost_event is None:
            raise SessionClosedError("the session has not been entered (use 'async with Session(...)')")

    # -- guarded blocks --------------------------------------------------------------------------------

    @asynccontextmanager
    async def guarded(
        self, lost_error: type[OwnershipLostError] = OwnershipLostError, *, what: str = ""
    ) -> AsyncIterator[None]:
        """Run a block that must stop when the session is lost.

        The body is cancelled as soon as the session is lost (or closed under it), and the ``async with``
        then raises ``lost_error`` (its ``session`` attribute names this session). Cancellation from outside
        passes through untouched. ``what`` (e.g. ``"lock 'jobs'"``) starts the error messages.

        Raises:
            SessionClosedError: the session is not open.
            OwnershipLostError: (or the ``lost_error`` subclass) the session was lost before or during the body;
                also when the body meets a `LeaseExpiredError` about this session's lease (a write refused
                because the lease is gone), which loses the session at once.
        """
        about = f"{what}: " if what else ""
        if not self._open:
            entered = self._lost_event is not None
            raise SessionClosedError(f"{about}the session has {'exited' if entered else 'not been entered'}")
        if self.lost:
            raise lost_error(f"{about}session lost: {self._lost_reason}", session=self) from self._lost_cause
        with anyio.CancelScope() as scope:
            self._guards.add(scope)
            try:
                yield
            except LeaseExpiredError as exc:
                if exc.lease_id != self._lease_id:
                    raise
                # A write bound to our lease was refused: the store has no lease any more. The session is lost
                # now (every other guarded block is cancelled), not at the next keepalive.
                self._report_lease_gone(exc)
                raise lost_error(f"{about}session lost: {self._lost_reason}", session=self) from exc
            finally:
                self._guards.discard(scope)
        if scope.cancelled_caught:
            raise lost_error(f"{about}session lost: {self._lost_reason}", session=self) from self._lost_cause

    def _cancel_guards(self) -> None:
        for scope in self._guards:
            scope.cancel()

    def _report_lease_gone(self, exc: LeaseExpiredError) -> None:
        """For recipes: a write bound to this session's lease was refused because the store no longer has the
        lease. The session is lost now rather than at its next keepalive."""
        self._mark_lost("the server reports the lease expired", exc)

    def _mark_lost(self, reason: str, cause: BaseException | None = None) -> None:
        if self.lost:
            return
        assert self._lost_event is not None
        self._lost_reason = reason
        self._lost_cause = cause
        self._lost_event.set()
        self._cancel_guards()
        _telemetry.sessions_lost.add(1, self._attrs())

    # -- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        if self._lost_event is not None:
            raise RuntimeError("a Session can be entered once; create a new one")
        self._lost_event = anyio.Event()
        # A retried grant after an ambiguous failure can leave an unused lease behind; it expires by its TTL.
        sent = anyio.current_time()

        async def grant() -> Lease:
            nonlocal sent
            sent = anyio.current_time()
            return await self.backend.grant(self._requested_ttl)

        lease = await retry_call(grant, attempts=5)
        self._lease_id, self._ttl = lease.id, lease.ttl
        self._deadline = sent + lease.ttl - self._margin
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._revoke)  # last on exit: once the keepalive has stopped
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)  # first on exit: stop the keepalive
            task_group.start_soon(self._keep_alive, sent)
            self._stack = stack.pop_all()
        self._open = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._open = False
        self._lost_reason = self._lost_reason or "session closed"
        self._cancel_guards()  # blocks still running in other tasks no longer own anything
        stack, self._stack = self._stack, None
        assert stack is not None
        # Closed, not handed the body's outcome: the keepalive's group is cancelled and has nothing to report
        # (its task never raises), and the body's own exception goes on untouched.
        await stack.aclose()
        self._in_use.clear()

    async def _revoke(self) -> None:
        # The lease expires by itself within its TTL if the revoke cannot get through (unreachable, or refused:
        # credentials revoked meanwhile): nothing more to do, and nothing to raise over the body's own outcome.
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._ttl):
            try:
                await self.backend.revoke(self._lease_id)
            except Exception as exc:
                _telemetry.record_failure("coordkit.session.revoke", self._attrs(), exc)

    async def _keep_alive(self, last_sent: float) -> None:
        """Refresh the lease until the session exits; every way this can fail ends in `_mark_lost`, never raises."""
        backoff = Backoff()
        next_beat = last_sent + self._ttl / 3
        last_failure: Exception | None = None
        while True:
            await anyio.sleep_until(min(next_beat, self._deadline))
            if anyio.current_time() >= self._deadline:
                why = f" (last failure: {error_text(last_failure, limit=500)})" if last_failure else ""
                self._mark_lost(f"lease validity deadline passed without a keepalive{why}", last_failure)
                return
            sent = anyio.current_time()
            ttl: int | None = None
            try:
                with anyio.move_on_at(self._deadline):
                    ttl = await self.backend.refresh(self._lease_id)
                    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1:
                        raise TypeError(f"refresh answered {ttl!r}, not a TTL in seconds")  # a malformed reply
            except LeaseExpiredError as exc:
                self._mark_lost("the server reports the lease expired", exc)
                return
            except Exception as exc:
                self._keepalive_failures += 1
                _telemetry.record_failure("coordkit.session.keepalive", self._attrs(), exc)
                if is_permanent(exc):  # refused (credentials, permission): retrying until the deadline cannot help
                    self._mark_lost(f"the server refused the keepalive: {error_text(exc, limit=500)}", exc)
                    return
                last_failure = exc  # transient: unavailable, a timeout, a malformed reply; retried until the deadline
                next_beat = anyio.current_time() + backoff.next_delay()
                continue
            if ttl is None:  # no answer before the deadline: the loop's first check declares the loss
                self._keepalive_failures += 1
                continue
            last_failure = None
            latency = anyio.current_time() - sent
            self._keepalives += 1
            # Measured from the send time: the server restarted the TTL no earlier than that.
            self._deadline = sent + ttl - self._margin
            next_beat = sent + ttl / 3
            backoff.reset()
            _telemetry.keepalive_latency.record(latency, self._attrs())
            if latency > self._margin / 2:
                _telemetry.record_slow("coordkit.session.keepalive", self._attrs(), latency)


def require_session(session: object) -> Session:
    """The recipes' argument check: a Session, or TypeError."""
    if not isinstance(session, Session):
        raise TypeError(f"needs a Session, not {type(session).__name__}")
    return session


async def retry_while_valid(session: Session, operation: Callable[[], Awaitable[object]]) -> None:
    """Run a clean-up write (deleting a key bound to the session's lease), retried for as long as it is valid.

    The deadline is read again after each expiry: keepalives move it on, so an outage the session survives
    (a write stuck behind a dead etcd leader) does not make the clean-up give up and leave the key behind,
    held for as long as the session lives. Once the session is lost its lease ends, taking the key with it,
    and this returns without an error.
    """
    while not session.lost and anyio.current_time() < session.deadline:
        with anyio.move_on_at(session.deadline):
            await retry_call(operation)
            return
