"""WorkQueue: a queue whose items are leased to one consumer at a time and re-offered when a consumer fails.

The "work queue with leases" pattern. Guarantees: every item is held by at most one consumer at a time; a claim
ends when the consumer completes the item (removed, fenced by the claim: a consumer whose claim already ended
cannot complete or delete an item someone else now holds), when it fails (re-offered with its attempt count, or
dead-lettered after ``max_attempts``), when its visibility timeout passes without `extend` (the claim's own lease
expires on the server and the item is re-offered; the late consumer's body is cancelled and told why), or when
its session is lost. Consumers wait by watch, never by polling; items are offered by priority, then in creation
order.

Keys under ``<name>/``: ``items/<id>`` (the item: payload, priority, attempts, last error), ``claims/<id>``
(bound to the claim's lease) and ``dead/<id>`` (dead letters).
"""

from __future__ import annotations

import base64
import json
import math
import random
import uuid
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, final

import anyio

from ._errors import LeaseExpiredError, OwnershipLostError, error_text
from ._feed import Subscription, subscribe
from ._queue import name_prefix
from ._retry import retry_call
from ._session import Session, require_session
from ._types import Compare, Delete, KeyValue, Op, Put, Range, check_ttl
from ._watch import apply

#: after losing a claim race, a consumer picks at random among this many next items
_SPREAD = 16


class ClaimLostError(OwnershipLostError):
    """A leased item's claim ended before the consumer finished: its visibility timeout passed, or the session was
    lost. The body was cancelled; the item is offered again (or was completed by someone else)."""


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """How many items are waiting, held by a consumer, and dead-lettered."""

    pending: int
    leased: int
    dead: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item that failed ``max_attempts`` times.

    Attributes:
        id: the item id.
        payload: the item.
        attempts: how many times it was delivered.
        error: the last error (text), or why it was given up.
    """

    id: str
    payload: bytes
    attempts: int
    error: str


@dataclass(frozen=True, slots=True)
class _Item:
    """What an item key holds: the payload and its delivery record."""

    payload: bytes
    priority: int = 0
    attempts: int = 0
    error: str | None = None

    def encode(self) -> bytes:
        record = {"payload": base64.b64encode(self.payload).decode(), "priority": self.priority}
        return json.dumps({**record, "attempts": self.attempts, "error": self.error}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> _Item:
        record = json.loads(data)
        return cls(base64.b64decode(record["payload"]), record["priority"], record["attempts"], record["error"])


@final
class Task:
    """A leased item, inside ``async with queue.lease() as task``.

    Attributes:
        id: the item id.
        payload: the item.
        attempt: which delivery this is (1 for the first).
        priority: the item's priority.
    """

    def __init__(self, queue: WorkQueue, item_id: str, item: _Item, claim_revision: int, lease_id: int) -> None:
        self._queue = queue
        self.id = item_id
        self.payload = item.payload
        self.attempt = item.attempts
        self.priority = item.priority
        self._item = item
        self._claim_revision = claim_revision
        self._lease_id = lease_id
        self._scope: anyio.CancelScope | None = None
        self._deadline = math.inf

    @property
    def deadline(self) -> float:
        """Local time (``anyio.current_time()``) by which the consumer must finish or `extend`."""
        return self._deadline

    async def extend(self) -> None:
        """Restart the visibility timeout (the claim's lease on the server, and the local deadline).

        Raises:
            ClaimLostError: the claim already ended (the item was completed or given back, or its lease expired).
        """
        sent = anyio.current_time()
        try:
            ttl = await self._queue.session.backend.refresh(self._lease_id)
        except LeaseExpiredError as exc:
            raise ClaimLostError(
                f"item {self.id}: the claim already ended (completed, given back, or its visibility timeout passed)"
            ) from exc
        self._deadline = sent + ttl - self._queue._margin
        if self._scope is not None:
            self._scope.deadline = self._deadline


class _Lease:
    """``async with queue.lease() as task``: wait for an item, claim it, run the body, settle the claim."""

    def __init__(self, queue: WorkQueue, visibility_timeout: int) -> None:
        self._queue = queue
        self._visibility = visibility_timeout
        self._task: Task | None = None
        self._guard: Any = None
        self._scope: anyio.CancelScope | None = None

    async def __aenter__(self) -> Task:
        task = await self._queue._claim(self._visibility)
        self._task = task
        guard = self._queue.session.guarded(ClaimLostError, what=f"queue {self._queue.name!r}, item {task.id}")
        try:
            await guard.__aenter__()
        except BaseException:
            # Claimed, but cancelled (or the session went) before the body: give the item back uncounted.
            await self._queue._settle(task, error=None, release=True)
            raise
        self._guard = guard
        scope = anyio.CancelScope(deadline=task.deadline)
        scope.__enter__()
        self._scope = task._scope = scope
        return task

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        task, scope, guard = self._task, self._scope, self._guard
        assert task is not None and scope is not None
        timed_out = bool(scope.__exit__(exc_type, exc, tb)) and scope.cancelled_caught
        if timed_out:
            exc_type, exc, tb = None, None, None
        try:
            await guard.__aexit__(exc_type, exc, tb)
        except ClaimLostError:
            await self._queue._settle(task, error="the consumer's session was lost", release=True)
            raise
        if timed_out:
            await self._queue._settle(task, error="visibility timeout passed", release=True)
            raise ClaimLostError(f"item {task.id}: the visibility timeout passed before the consumer finished")
        if exc is None:
            await self._queue._complete(task)
        elif isinstance(exc, Exception):
            await self._queue._settle(task, error=error_text(exc), release=True)
        else:  # cancelled from outside: give the item back untouched, without counting it against the item
            await self._queue._settle(task, error=None, release=True)
        return None


@final
class WorkQueue:
    """A distributed work queue with leased items, visibility timeouts, retries and dead letters.

    Producers ``await queue.put(b"job")``; consumers ``async with queue.lease(visibility_timeout=30) as task:``
    (a consumer that leases in a loop should hold ``async with queue:`` around it: the queue then keeps one
    follower of its keys open, and a claim costs two round trips instead of opening a watch first);
    wait for an item and hold it exclusively. Leaving the block normally completes the item (it is removed);
    an exception re-offers it (counting the attempt) and propagates; after ``max_attempts`` deliveries the item
    goes to the dead letters with its last error. If the body runs past the visibility timeout without
    ``task.extend()``, or the session is lost, the body is cancelled and ``ClaimLostError`` raised, and the item
    is offered again.

    Args:
        session: the consumer's session (claims also hold a lease of their own, for the visibility timeout).
        name: the queue's name; keys live under ``<name>/``.
        max_attempts: deliveries before an item is dead-lettered (>= 1).

    A consumer's failure is recorded with the item as ``"<type>: <message>"``, cut to 4096 characters.
    """

    def __init__(self, session: Session, name: str, *, max_attempts: int = 5) -> None:
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool):
            raise TypeError(f"max_attempts must be an int, not {type(max_attempts).__name__}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")
        self.session = require_session(session)
        self.name = name
        self.max_attempts = max_attempts
        self._prefix = name_prefix(name)
        self._items = self._prefix + b"items/"
        self._claims = self._prefix + b"claims/"
        self._dead = self._prefix + b"dead/"
        self._margin = 0.5
        self._subscription: Subscription | None = None
        self._subscription_busy = False

    async def __aenter__(self) -> WorkQueue:
        """Optional: keep one follower of the queue open across leases, so a claim does not open a watch."""
        if self._subscription is not None:
            raise RuntimeError(f"WorkQueue {self.name!r} is already entered")
        self._subscription = await subscribe(self.session.backend, self._prefix)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.aclose()

    async def put(self, payload: bytes, *, priority: int = 0) -> str:
        """Add an item; return its id. Higher ``priority`` is offered first; equal ones in creation order.

        Raises:
            TypeError: ``payload`` is not bytes, or ``priority`` not an int.
            RequestTooLargeError: the item is larger than the server accepts. It is stored base64-encoded, so the
                payload limit is about 1.1 MiB with etcd's default 1.5 MiB request limit.
        """
        if not isinstance(payload, bytes):
            raise TypeError(f"payloads are bytes, not {type(payload).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        item_id = uuid.uuid4().hex
        await self.session.backend.txn([], [Put(self._items + item_id.encode(), _Item(payload, priority).encode())])
        return item_id

    def lease(self, *, visibility_timeout: int = 30) -> _Lease:
        """Wait for an item and hold it (``async with``); see the class docstring. Bound with ``anyio.fail_after``."""
        check_ttl(visibility_timeout)
        return _Lease(self, visibility_timeout)

    async def depth(self) -> QueueDepth:
        """Items waiting, held, and dead-lettered now (one consistent read)."""
        result = await self.session.backend.txn(
            [],
            [
                Range(self._items, prefix=True, count_only=True),
                Range(self._claims, prefix=True, count_only=True),
                Range(self._dead, prefix=True, count_only=True),
            ],
        )
        items, claims, dead = (getattr(r, "count", 0) for r in result.responses)
        return QueueDepth(items - claims, claims, dead)

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead-lettered item, oldest first."""
        result = await self.session.backend.range(Range(self._dead, prefix=True, sort_by="create"))
        letters = []
        for kv in result.kvs:
            item = _Item.decode(kv.value)
            letters.append(
                DeadLetter(kv.key[len(self._dead) :].decode(), item.payload, item.attempts, item.error or "")
            )
        return letters

    async def requeue(self, item_id: str) -> bool:
        """Put a dead letter back in the queue with its attempts reset. False if there is no such dead letter."""
        if not isinstance(item_id, str):
            raise TypeError(f"item ids are str, not {type(item_id).__name__}")
        dead_key = self._dead + item_id.encode()
        current = await self.session.backend.range(Range(dead_key))
        if not current.kvs:
            return False
        fresh = replace(_Item.decode(current.kvs[0].value), attempts=0, error=None)
        moved = await self.session.backend.txn(
            [Compare.mod(dead_key, "==", current.kvs[0].mod_revision)],
            [Delete(dead_key), Put(self._items + item_id.encode(), fresh.encode())],
        )
        return moved.succeeded

    # -- claiming --------------------------------------------------------------------------------------

    def _candidates(self, state: dict[bytes, KeyValue]) -> list[tuple[int, int, bytes, KeyValue]]:
        claimed = {key[len(self._claims) :] for key in state if key.startswith(self._claims)}
        out = []
        for key, kv in state.items():
            if key.startswith(self._items) and key[len(self._items) :] not in claimed:
                out.append((-_Item.decode(kv.value).priority, kv.create_revision, key, kv))
        out.sort()
        return out

    async def _claim(self, visibility: int) -> Task:
        # Guarded: a session that is closed, or lost while we wait, claims nothing.
        async with self.session.guarded(ClaimLostError, what=f"queue {self.name!r}"):
            return await self._wait_and_claim(visibility)

    async def _wait_and_claim(self, visibility: int) -> Task:
        # Inside ``async with queue`` the queue's own subscription is reused (no new watch per lease), when no
        # other task of this object is using it.
        own = self._subscription if self._subscription is not None and not self._subscription_busy else None
        subscription: Subscription = own or await subscribe(self.session.backend, self._prefix)
        self._subscription_busy |= own is not None
        try:
            state = subscription.state
            while True:
                task = await self._claim_one(state, visibility)
                if task is not None:
                    return task
                # Nothing free: wait for the next change of the queue (by watch, never by polling).
                state = subscription.state = apply(state, await subscription.next())
        finally:
            if own is None:
                await subscription.aclose()
            else:
                self._subscription_busy = False

    async def _claim_one(self, state: dict[bytes, KeyValue], visibility: int) -> Task | None:
        """Claim the first candidate another consumer has not taken; one claim lease for the whole round.

        A candidate whose claim fails was claimed (or changed, or removed) since our view of the queue: it is
        marked claimed in ``state`` until the store says otherwise, so it is not tried again in vain.
        """
        backend = self.session.backend
        lease = None
        sent = 0.0
        try:
            candidates = self._candidates(state)
            lost_a_race = False
            while candidates:
                # The head of the queue first. After losing a race for it, the consumers that lost spread out
                # over the next few items at random instead of all racing for the same next one.
                pick = random.randrange(min(len(candidates), _SPREAD)) if lost_a_race else 0
                _, _, key, kv = candidates.pop(pick)
                item = _Item.decode(kv.value)
                delivered = replace(item, attempts=item.attempts + 1)
                if delivered.attempts > self.max_attempts:
                    # Delivered max_attempts times and no consumer finished (crashes, timeouts): give it up.
                    reason = item.error or "max attempts exceeded (no consumer finished)"
                    await self._dead_letter(key, kv, replace(item, error=reason))
                    continue
                if lease is None:
                    sent = anyio.current_time()
                    lease = await backend.grant(visibility)
                item_id = key[len(self._items) :].decode()
                claim = self._claims + item_id.encode()
                # One transaction: the item unchanged and unclaimed -> count the delivery, claim it under the lease.
                result = await backend.txn(
                    [Compare.mod(key, "==", kv.mod_revision), Compare.create(claim, "==", 0)],
                    [Put(key, delivered.encode()), Put(claim, str(self.session.lease_id).encode(), lease.id)],
                )
                if not result.succeeded:
                    # Taken meanwhile: until the store's events say otherwise (the claim ends, the item goes).
                    state[claim] = KeyValue(claim, b"", 0, 0, 0)
                    lost_a_race = True
                    continue
                task = Task(self, item_id, delivered, result.revision, lease.id)
                task._deadline = sent + lease.ttl - self._margin
                lease = None  # the task owns it now
                return task
            return None
        finally:
            if lease is not None:
                await self._revoke(lease.id)

    async def _dead_letter(self, key: bytes, kv: KeyValue, item: _Item) -> None:
        dead = self._dead + key[len(self._items) :]
        await self.session.backend.txn(
            [Compare.mod(key, "==", kv.mod_revision)], [Delete(key), Put(dead, item.encode())]
        )

    # -- settling --------------------------------------------------------------------------------------

    async def _complete(self, task: Task) -> None:
        """Remove the item, fenced by our claim: only while the claim is the one we created."""
        claim, item_key = self._claims + task.id.encode(), self._items + task.id.encode()
        result = await retry_call(
            lambda: self.session.backend.txn(
                [Compare.create(claim, "==", task._claim_revision)],
                [Delete(item_key), Delete(claim)],
                [Range(item_key)],
            )
        )
        await self._revoke(task._lease_id)
        gone = not result.succeeded and not getattr(result.responses[0], "kvs", True)
        if not result.succeeded and not gone:  # (gone: an earlier attempt whose reply was lost removed it)
            raise ClaimLostError(f"item {task.id}: the claim ended before completion; the item was not removed")

    async def _settle(self, task: Task, *, error: str | None, release: bool) -> None:
        """Give the item back after a failure (or dead-letter it); shielded, fenced by our claim.

        ``error`` None means the consumer was cancelled from outside: the delivery is not counted.
        """
        item_key, claim = self._items + task.id.encode(), self._claims + task.id.encode()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.session.ttl):
            if release:
                item = task._item
                ops: list[Op]
                if error is None:
                    ops = [Put(item_key, replace(item, attempts=item.attempts - 1).encode()), Delete(claim)]
                elif item.attempts >= self.max_attempts:
                    ops = [
                        Delete(item_key),
                        Delete(claim),
                        Put(self._dead + task.id.encode(), replace(item, error=error).encode()),
                    ]
                else:
                    ops = [Put(item_key, replace(item, error=error).encode()), Delete(claim)]
                mine = Compare.create(claim, "==", task._claim_revision)
                await retry_call(lambda: self.session.backend.txn([mine], ops))
            await self._revoke(task._lease_id)

    async def _revoke(self, lease_id: int) -> None:
        """Drop a claim's lease (and with it the claim): shielded, bounded; it expires by itself otherwise."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.session.ttl):
            await retry_call(lambda: self.session.backend.revoke(lease_id))
