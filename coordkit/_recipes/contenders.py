"""The fair queue under Lock and Semaphore: one key per contender, ordered by create revision.

A contender puts ``<name>/<lease id hex>`` bound to its session's lease; the keys with the lowest create
revisions own the name. This is etcd's Go ``concurrency.Mutex`` layout, so etcdctl and Go clients queue in the
same line. A session that contends for one name from several tasks at once gives the extra contenders the key
``<name>/<lease id hex>_<n>``: still under the prefix, still ordered by create revision, so every etcd client
honours it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType

import anyio

from .. import _telemetry
from .._backends.types import Compare, Delete, Put, PutResult, Range, RangeResult
from .._errors import OwnershipLostError
from .._keys import name_prefix
from .._retry import retry_call
from .._session import Session, require_session, retry_while_valid
from .._watch import wait_deleted


@dataclass(frozen=True, slots=True)
class Held:
    """Proof of ownership of a lock or a semaphore permit.

    Attributes:
        name: the lock or semaphore name.
        key: the owner's key in the store.
        token: the fencing token: the key's create revision. Successive owners of a name get strictly increasing
            tokens, so a resource that remembers the highest token it has seen can refuse a stale owner.
    """

    name: str
    key: bytes
    token: int

    def guard(self) -> Compare:
        """The compare that makes a transaction succeed only while this ownership lasts.

        ``await backend.txn([held.guard()], [Put(b"counter", b"42")])`` writes only if the owner key still
        exists as created at ``token``: after a release or a lease loss it fails (``succeeded`` is False).
        """
        return Compare.create(self.key, "==", self.token)


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """State of one Lock or Semaphore object in this process.

    Attributes:
        held: whether this object currently owns the name.
        token: the fencing token while held, else None.
        waiters: tasks of this process waiting for this object's turn (each object contends with one key at a
            time); the task whose turn it is does not count, even while it waits in the store's queue.
    """

    held: bool
    token: int | None
    waiters: int


class Contender(ABC):
    """Acquire, hold in a guarded block, release: written once for Lock and Semaphore.

    Subclasses say how many owners a name has, what value their key carries, and how a waiter waits.

    Attributes:
        session: the session whose lease the contender's key is bound to.
        name: the name contended for.
    """

    _lost_error: type[OwnershipLostError]
    #: span name: ``coordkit.<recipe>.<operation>``
    _span: str

    def __init__(self, session: Session, name: str) -> None:
        self.session = require_session(session)
        self.name = name
        self._prefix = name_prefix(name)
        # One acquisition at a time per object: tasks sharing an object take turns here, in FIFO order.
        self._turn = anyio.Semaphore(1)
        self._turn_task: int | None = None  # the task whose turn it is (acquiring or holding)
        self._waiting = 0
        self._held: Held | None = None
        self._held_since = 0.0
        # task id -> what its ``async with`` entered (the guarded block, the release): one entry at a time, but a
        # release from another task ends a turn early, so the next task's entry may start before the first exits
        self._entries: dict[int, AsyncExitStack] = {}

    # -- what differs between Lock and Semaphore -------------------------------------------------------

    @property
    @abstractmethod
    def _owners(self) -> int:
        """How many contenders own the name at once."""

    @abstractmethod
    def _value(self) -> bytes:
        """The value of this contender's key."""

    @abstractmethod
    def _check_queue(self, owners: RangeResult) -> None:
        """Validate what the acquire transaction saw of the queue (raise ValueError on a conflict)."""

    @property
    def _key_prefix(self) -> bytes:
        """Where this contender's key goes (``<name>/`` for Lock and Semaphore; a read/write lock splits it)."""
        return self._prefix

    def _owners_range(self) -> Range:
        """What the acquire transaction reads, after creating our key, to learn whether we own the name at once."""
        return Range(self._prefix, prefix=True, sort_by="create", limit=self._owners)

    def _owns(self, revision: int, owners: RangeResult) -> bool:
        """Whether our key, created at ``revision``, owns the name, given what `_owners_range` read."""
        return any(kv.create_revision == revision for kv in owners.kvs)

    @abstractmethod
    async def _wait_turn(self, key: bytes, revision: int) -> None:
        """Return when our key, created at ``revision``, is among the owners and still exists.

        Raises the recipe's lost error if the key vanished while waiting (the lease was lost).
        """

    # -- public API ------------------------------------------------------------------------------------

    @property
    def held(self) -> Held | None:
        """The current ownership, or None."""
        return self._held

    def statistics(self) -> LockStatistics:
        """Whether this object holds the name, its token, and how many local tasks wait for this object."""
        held = self._held
        return LockStatistics(held is not None, held.token if held else None, self._waiting)

    def _take_turn_check(self) -> int:
        task = anyio.get_current_task().id
        if self._turn_task == task:
            raise RuntimeError(
                f"this task already holds or is acquiring {type(self).__name__} {self.name!r} (not re-entrant)"
            )
        return task

    async def acquire(self) -> Held:
        """Wait until this contender owns the name; return the proof (with its fencing token).

        Cancel it (``anyio.fail_after``, ``move_on_after``) to give up: the waiter's key is deleted. Without
        ``async with`` there is no guarded block: check `Session.lost` or use fenced writes.

        Raises:
            RuntimeError: the calling task already holds this object, or contends for the same name in the same
                session through another object (waiting would deadlock).
            OwnershipLostError: (the recipe's subclass) the session was lost while waiting.
            SessionClosedError: the session is not open.
            UnavailableError: the store could not be reached to join the queue (in three attempts).
        """
        task = self._take_turn_check()
        started = anyio.current_time()
        self._waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self._waiting -= 1
        self._turn_task = task
        try:
            held = await self._acquire(wait=True, started=started)
        except BaseException:
            self._end_turn()
            raise
        assert held is not None
        return held

    async def try_acquire(self) -> bool:
        """Take the name if it is free now; never wait, neither for the store's queue nor for another task.

        Returns False when someone owns the name, or another task of this process is using this object.
        On success, `release` gives the name back.

        Raises:
            RuntimeError: the calling task already holds this object, or contends for the same name in the same
                session through another object.
            SessionClosedError, UnavailableError, OwnershipLostError: as `acquire`.
        """
        task = self._take_turn_check()
        started = anyio.current_time()
        try:
            self._turn.acquire_nowait()
        except anyio.WouldBlock:
            return False
        self._turn_task = task
        try:
            held = await self._acquire(wait=False, started=started)
        except BaseException:
            self._end_turn()
            raise
        if held is None:
            self._end_turn()
        return held is not None

    async def release(self) -> None:
        """Give the name back: delete the owner key, even when the caller is being cancelled.

        Any task may release. Releasing what an ``async with`` holds makes that block's exit raise RuntimeError.

        Raises:
            RuntimeError: the name is not held by this object.
        """
        held = self._held
        if held is None:
            raise RuntimeError(f"{type(self).__name__} {self.name!r} is not held")
        self._held = None
        try:
            # Shielded: a body cancelled from outside (fail_after, a cancelled task group) must still give the
            # name back. _delete stops trying when the session is lost, so this cannot outlive its validity.
            with anyio.CancelScope(shield=True):
                await _delete(self.session, held.key, held.token)
            _telemetry.lock_hold.record(anyio.current_time() - self._held_since, self._metric_attrs())
        finally:
            _free(self.session, held.key)
            self._end_turn()

    def _end_turn(self) -> None:
        self._turn_task = None
        self._turn.release()

    async def __aenter__(self) -> Held:
        held = await self.acquire()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._release_entry, held)  # also if the guarded block cannot be entered
            await stack.enter_async_context(self.session.guarded(self._lost_error, what=self._what))
            self._entries[anyio.get_current_task().id] = stack.pop_all()
        return held

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack = self._entries.pop(anyio.get_current_task().id)
        return await stack.__aexit__(exc_type, exc, tb)

    async def _release_entry(self, held: Held) -> None:
        """Release what an ``async with`` acquired, unless another task released it meanwhile (RuntimeError)."""
        if self._held is not held:  # released from another task (and maybe acquired again by another one)
            raise RuntimeError(f"{type(self).__name__} {self.name!r} is not held")
        await self.release()

    # -- the algorithm ---------------------------------------------------------------------------------

    def _metric_attrs(self) -> dict[str, str | int]:
        """Metric attributes: bounded cardinality (no lease ids, no tokens)."""
        return {
            "coordkit.backend": self.session.backend.name,
            "coordkit.name": self.name,
            "coordkit.recipe": self._recipe,
        }

    @property
    def _recipe(self) -> str:
        return self._span.split(".")[1]

    @property
    def _what(self) -> str:
        """What error messages call this contender: ``lock 'jobs'``."""
        return f"{self._recipe} {self.name!r}"

    def _attrs(self, token: int | None = None) -> dict[str, str | int]:
        attrs = _telemetry.attributes(backend=self.session.backend.name, lease_id=self.session.lease_id, name=self.name)
        if token is not None:
            attrs["coordkit.fencing_token"] = token
        return attrs

    async def _acquire(self, *, wait: bool, started: float) -> Held | None:
        """Join the queue and (with ``wait``) wait for our turn. Returns None when not waiting and not first."""
        session = self.session
        key = _reserve(session, self._key_prefix)
        revision = 0
        try:
            with _telemetry.span(self._span, self._attrs()) as span:
                async with session.guarded(self._lost_error, what=self._what):
                    # One round trip when uncontended: create our key unless it exists, and read the current
                    # owners at the same revision. Retried: after an ambiguous failure (a lost reply) the retry
                    # finds our key, created by the first attempt, and keeps its place in the line.
                    owners = self._owners_range()
                    result = await retry_call(
                        lambda: session.backend.txn(
                            [Compare.create(key, "==", 0)],
                            [Put(key, self._value(), session.lease_id), owners],
                            [Range(key), owners],
                        ),
                        attempts=_JOIN_ATTEMPTS,
                    )
                    mine, current = result.responses[0], result.responses[1]
                    assert isinstance(mine, RangeResult | PutResult) and isinstance(current, RangeResult)
                    revision = result.revision if result.succeeded else _created(mine)
                    self._check_queue(current)
                    if not self._owns(revision, current):
                        if not wait:
                            span.set_attribute("coordkit.acquired", False)
                            await _delete(session, key, revision)
                            _free(session, key)
                            return None
                        await self._wait_turn(key, revision)
                span.set_attribute("coordkit.fencing_token", revision)
        except BaseException:
            try:
                with anyio.CancelScope(shield=True):
                    await _delete(session, key, revision)
            finally:
                _free(session, key)  # even when the delete is refused too (no permission): else the name stays busy
            raise
        self._held = Held(self.name, key, revision)
        self._held_since = anyio.current_time()
        _telemetry.lock_wait.record(self._held_since - started, self._metric_attrs())
        return self._held


#: attempts at joining the line before acquire gives up with UnavailableError (a lost reply is one failed attempt)
_JOIN_ATTEMPTS = 3


def _created(mine: RangeResult | PutResult) -> int:
    assert isinstance(mine, RangeResult) and mine.kvs, "the failure branch reads our existing key"
    return mine.kvs[0].create_revision


def _reserve(session: Session, prefix: bytes) -> bytes:
    """This session's key for one more contender under ``prefix``, reserved for the calling task."""
    task = anyio.get_current_task().id
    keys = session._in_use.contenders  # reserved from acquire until release
    base = prefix + format(session.lease_id, "x").encode()
    for key, owner in keys.items():
        if owner == task and key.startswith(base) and key[len(base) : len(base) + 1] in (b"", b"_"):
            raise RuntimeError(
                f"this task already contends for {prefix[:-1].decode()!r} in this session; waiting again would "
                "deadlock (not re-entrant)"
            )
    key, n = base, 0
    while key in keys:
        n += 1
        key = base + b"_" + str(n).encode()
    keys[key] = task
    return key


def contends(session: Session, prefix: bytes) -> bool:
    """Whether the calling task holds or waits for a key under ``prefix`` in ``session``."""
    task = anyio.get_current_task().id
    return any(owner == task and key.startswith(prefix) for key, owner in session._in_use.contenders.items())


def _free(session: Session, key: bytes) -> None:
    session._in_use.contenders.pop(key, None)


async def _delete(session: Session, key: bytes, revision: int) -> None:
    """Delete our key: the incarnation created at ``revision``, or (0: unknown) whatever our lease put there.

    Retried through short outages for as long as the session is valid; once it is lost, its lease ends anyway
    (the session's exit revokes it) and with it the key.
    """
    # Only our own key: a key of the same name created since (after our lease ended) is someone else's turn.
    compare = Compare.create(key, "==", revision) if revision else Compare.lease(key, "==", session.lease_id)
    await retry_while_valid(session, lambda: session.backend.txn([compare], [Delete(key)]))


class Mutex(Contender):
    """A single-owner queue with etcd's Go ``concurrency.Mutex`` waiting: each waiter watches its predecessor."""

    @property
    def _owners(self) -> int:
        return 1

    def _check_queue(self, owners: RangeResult) -> None:
        pass

    @property
    def _blockers(self) -> bytes:
        """The prefix of the keys that must be gone before ours owns the name: all of them, for a mutex."""
        return self._prefix

    async def _wait_turn(self, key: bytes, revision: int) -> None:
        backend = self.session.backend
        # Our nearest predecessor is the newest blocking key created before ours (Go's waitDeletes). Read it
        # together with our own key, so that learning "it is our turn" and "our key still exists" costs one round
        # trip.
        predecessor = Range(
            self._blockers, prefix=True, sort_by="create", descending=True, limit=1, max_create_revision=revision - 1
        )
        while True:
            # A read, so retried through transient failures (a lost reply): one must not cost our place in line.
            result = await retry_call(lambda: backend.txn([], [predecessor, Range(key)]))
            ahead, mine = result.responses
            assert isinstance(ahead, RangeResult) and isinstance(mine, RangeResult)
            if [kv.create_revision for kv in mine.kvs] != [revision]:
                raise self._lost_error(
                    f"{self.name!r}: the waiter's key vanished (its lease was lost)", session=self.session
                )
            if not ahead.kvs:
                return
            await wait_deleted(backend, ahead.kvs[0].key, revision=result.revision)
