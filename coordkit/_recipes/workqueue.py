"""WorkQueue: a queue whose items are leased to one consumer at a time and re-offered when a consumer fails.

The "work queue with leases" pattern. Guarantees:

- **One holder at a time.** An item is claimed by writing ``claims/<id>`` (bound to the consumer's session
  lease) in the same transaction that counts the delivery; completion, give-back and `Task.extend` are fenced by
  that claim's create revision, so a consumer whose claim ended cannot complete an item someone else now holds.
- **Order.** A claim transaction that commits at revision *r* hands out the first *k* free items at *r* (by
  priority, then the item key's create revision, then id), to the waiters it serves by place in line: no item
  left free at *r* is ahead of any of them. It proves it by comparing the gate, the ``tail`` (rewritten by every
  write that makes an item free: put, give-back, re-offer, requeue), each item handed out (unchanged, unclaimed),
  each waiter served (still in line) and each dependency-blocked item ahead (its dependency still there). An item
  whose claim went with its holder's lease is still marked ``held`` in its record: not free until re-offered.
- **No race for the head.** A consumer whose claim is refused is put in line by the refused transaction's failure
  branch (``waiting/<lease>/<visibility>/<token>``, bound to its lease); a completion inside ``async with queue``
  puts its consumer in line in the same transaction. Whoever claims hands items to the waiters, oldest first, in
  its own transaction, writing their claims under their leases; the waiters learn of it through their watch.
- **Re-offer.** A claim ends when the consumer completes the item (removed), fails (re-offered with its attempt
  count, or dead-lettered after ``max_attempts``), passes its visibility timeout (its own clock cancels the body
  and gives the item back; should it not, any other consumer takes the claim back once the timeout has passed by
  its own clock since it saw the claim), or loses its session (the claim goes with the session's lease).
- **Control, time, replies.** `pause` closes the gate every claim compares; ``after`` items wait for others to
  complete (dead-lettered if one of them is dead-lettered or removed); `remove` deletes an item and its claim
  (fencing the holder); `items` lists the queue
  from one read; ``not_before`` items are not free until due by the consumer's ``now`` clock (a waiting consumer
  sets a timer); ``expires_in`` items not completed in time are dead-lettered with "expired"; `WorkQueue.request`
  items get a reply written in the completion's transaction (``replies/<id>``, bound to the producer's lease).
- **Bad records never stop the queue.** An item record no consumer can decode (not JSON, missing or mistyped
  fields, a key that is not UTF-8) is moved to the dead letters with the reason, atomically; the rest flows.

Keys under ``<name>/``: ``items/<id>`` (the item record, JSON: see the guide for the format other languages
write), ``claims/<id>`` (the holder, bound to its lease), ``dead/<id>`` (dead letters), ``replies/<id>``
(request replies), ``waiting/...`` (consumers in line), ``gate`` (``paused``) and ``tail``. An item costs three
writes from put to completion: the put, its share of a claim transaction (or the write that put its consumer in
line), the completion.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, final

import anyio
import anyio.lowlevel

from .._backends.types import (
    MAX_INT64,
    Compare,
    Delete,
    EventType,
    KeyValue,
    Op,
    Put,
    Range,
    TxnResult,
    WatchBatch,
    check_ttl,
)
from .._errors import CoordkitError, LeaseExpiredError, OwnershipLostError, error_text
from .._feed import Subscription, subscribe
from .._keys import name_prefix
from .._retry import retry_call
from .._session import Session, require_session
from .._watch import Snapshot, apply

#: etcd refuses more than 128 compares (and 128 operations) in one transaction
_MAX_TXN = 128
#: items one claim transaction hands out at most (3 operations each: the item, its claim, the waiter's key)
_HAND_OFF = 16
#: items per put_many transaction (etcd's limit is 128 operations, and the tail is one more)
_PUT_BATCH = 100
#: ids an item may depend on (each is one compare of the put)
_MAX_AFTER = 100
#: another consumer takes a claim back this long after the holder's visibility timeout, by its own clock since
#: it saw the claim (the holder's own deadline is ``_MARGIN`` before the timeout, from before it wrote it)
_TAKEOVER_GRACE = 1.0
_MARGIN = 0.5
#: a waiting consumer that is not the oldest hands items out itself only after the line did not move for this long
#: (the oldest waiter hands out at once; this covers an oldest waiter that is slow, gone, or between two leases)
_QUIET = 0.2
#: the value of the ``gate`` key while the queue is paused
_PAUSED = b"paused"


class ClaimLostError(OwnershipLostError):
    """A leased item's claim ended before the consumer finished: its visibility timeout passed, or the session was
    lost. The body was cancelled; the item is offered again (or was completed by someone else)."""


class RequestFailedError(CoordkitError):
    """A request (`WorkQueue.request`) will never be answered: it was dead-lettered or removed.

    Attributes:
        item_id: the request's item id.
        reason: the dead letter's error (``"expired"``, the last failure of a body, ...), or "removed".
    """

    def __init__(self, item_id: str, reason: str) -> None:
        self.item_id = item_id
        self.reason = reason
        super().__init__(f"request {item_id} will not be answered: {reason}")


class UnknownDependencyError(CoordkitError):
    """`WorkQueue.put` (or ``put_many``, ``request``) named in ``after`` an id that is not in the queue (never put,
    or already completed, removed or dead-lettered). Nothing was written.

    Attributes:
        ids: the ids of ``after`` that are not in the queue.
    """

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        super().__init__(f"not in the queue, cannot be waited for: {', '.join(ids)}")


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """How many items are waiting, held by a consumer, and dead-lettered.

    Attributes:
        pending: items not held by any consumer (offered now, or later: not before their time, or after their
            dependencies).
        leased: items a consumer holds now (claimed, not yet completed, failed or given back).
        dead: dead letters kept.
    """

    pending: int
    leased: int
    dead: int


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """An item in the queue, pending or leased, as `WorkQueue.items` read it.

    Attributes:
        id: the item id.
        priority: the item's priority.
        attempts: deliveries so far (a leased item's current delivery included).
        leased: whether a consumer holds it.
        holder: the holder's session lease id (hex), as its claim records it; None when pending.
        visibility_timeout: the visibility timeout the claim records (seconds); None when pending, or when a
            foreign claim records none.
        claim_revision: the claim's create revision (the fencing token of the holder's completion); 0 when pending.
        not_before: when the item becomes due (aware UTC datetime), if it was put with ``not_before``.
        expires: when the item expires (aware UTC datetime), if it was put with ``expires_in``.
    """

    id: str
    priority: int
    attempts: int
    leased: bool
    holder: str | None = None
    visibility_timeout: int | None = None
    claim_revision: int = 0
    not_before: datetime | None = None
    expires: datetime | None = None


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item that failed ``max_attempts`` times, or whose record could not be decoded.

    Attributes:
        id: the item id (a key that is not UTF-8 is shown with ``surrogateescape``).
        payload: the item; for a record that could not be decoded, the record's raw bytes.
        attempts: how many times it was delivered.
        error: the last error (text), or why it was given up.
    """

    id: str
    payload: bytes
    attempts: int
    error: str


class _Undecodable(ValueError):
    """An item record that does not follow the published format."""


def _int_field(record: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = record.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_INT64:
        raise _Undecodable(f"{name!r} must be an integer from {minimum} to 2**63 - 1, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class _Item:
    """What an item key holds: the payload and its delivery record."""

    payload: bytes
    priority: int = 0
    attempts: int = 0
    error: str | None = None
    not_before: float | None = None  # wall clock, UTC seconds since the epoch: not offered before
    expires: float | None = None  # wall clock, UTC seconds since the epoch: dead-lettered if not completed by then
    reply: int | None = None  # a reply is expected: the lease (0: none) the reply key is bound to
    held: bool = False  # claimed and not given back: not free, even when the claim vanished with its lease
    after: tuple[str, ...] = ()  # ids that must complete before the item is offered

    def encode(self) -> bytes:
        record: dict[str, Any] = {"payload": base64.b64encode(self.payload).decode(), "priority": self.priority}
        record.update(attempts=self.attempts, error=self.error)
        if self.not_before is not None:
            record["not_before"] = self.not_before
        if self.expires is not None:
            record["expires"] = self.expires
        if self.reply is not None:
            record["reply"] = self.reply
        if self.held:
            record["held"] = True
        if self.after:
            record["after"] = list(self.after)
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> _Item:
        """Decode a record of the published format, or raise `_Undecodable` saying what is wrong with it."""
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Undecodable(f"not a JSON document ({exc})") from None
        if not isinstance(record, dict):
            raise _Undecodable(f"not a JSON object but {type(record).__name__}")
        payload = record.get("payload")
        if not isinstance(payload, str):
            raise _Undecodable(f"'payload' must be a base64 string, not {payload!r:.80}")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Undecodable(f"'payload' is not valid base64 ({exc})") from None
        error = record.get("error")
        if error is not None and not isinstance(error, str):
            raise _Undecodable(f"'error' must be a string or null, not {error!r:.80}")
        priority = _int_field(record, "priority", 0, -MAX_INT64 - 1)
        not_before, expires = _time_field(record, "not_before"), _time_field(record, "expires")
        reply = None if record.get("reply") is None else _int_field(record, "reply", 0, 0)
        after = record.get("after") or []
        if not isinstance(after, list) or not all(isinstance(dep, str) and dep for dep in after):
            raise _Undecodable(f"'after' must be a list of item ids (non-empty strings), not {after!r:.80}")
        attempts = _int_field(record, "attempts", 0, 0)
        held = record.get("held") is True
        return cls(raw, priority, attempts, error, not_before, expires, reply, held, tuple(after))


def _time_field(record: dict[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _Undecodable(f"{name!r} must be a number (UTC seconds since the epoch) or null, not {value!r:.80}")
    return float(value)


def _claim_text(value: bytes, name: str) -> str | None:
    """A text field of a claim record: ``holder`` (the holder's session lease id, hex) or ``waiter`` (the token
    of the waiter a hand-off gave the item to); None if the claim has none."""
    try:
        text = json.loads(value)[name]
    except (ValueError, TypeError, KeyError):
        return None
    return text if isinstance(text, str) else None


def _claim_visibility(value: bytes) -> int | None:
    """The visibility timeout a claim declares, or None (a foreign claim: only its lease ends it)."""
    try:
        record = json.loads(value)
        visibility = record["visibility"]
    except (ValueError, TypeError, KeyError):
        return None
    return visibility if isinstance(visibility, int) and not isinstance(visibility, bool) else None


def _read_back(compares: list[Compare]) -> list[Range]:
    """Point reads (keys only) of the keys ``compares`` name, for a transaction's failure branch: never the
    whole queue (etcd would read and sort every key of the prefix)."""
    return [Range(key, keys_only=True) for key in dict.fromkeys(c.key for c in compares)][: _MAX_TXN - 1]


def _newest(result: TxnResult) -> int:
    """The newest mod revision the failure branch's reads (`_read_back`) found, 0 if none: a revision of the
    queue's own keys to catch up to. (A refused transaction's own revision is the store's, which may be a write
    anywhere: the queue's view would wait for it for ever.)"""
    return max((kv.mod_revision for response in result.responses for kv in getattr(response, "kvs", ())), default=0)


def _encode_id(item_id: str) -> bytes:
    if not isinstance(item_id, str):
        raise TypeError(f"item ids are str, not {type(item_id).__name__}")
    try:
        return item_id.encode()
    except UnicodeEncodeError:
        raise ValueError(f"item id {item_id!r} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class _Behind:
    """A claim was refused: our view is behind the store; catch up to at least ``revision``, then look again."""

    revision: int


@dataclass(frozen=True, slots=True)
class _Waiter:
    """A consumer waiting in line for an item: its ``waiting/<lease hex>/<token>`` key, bound to its lease."""

    key: bytes
    revision: int  # the key's create revision: its place in line
    lease: int
    token: str
    visibility: int

    @classmethod
    def parse(cls, key: bytes, kv: KeyValue, skip: int) -> _Waiter | None:
        """The waiter a key names (``waiting/<lease hex>/<visibility>/<token>``), or None (ignored)."""
        try:
            lease_hex, visibility, token = key[skip:].decode().split("/")
            lease = int(lease_hex, 16)
            seconds = int(visibility)
        except (ValueError, UnicodeDecodeError):
            return None
        return cls(key, kv.create_revision, lease, token, seconds) if lease > 0 and seconds > 0 else None


@dataclass(frozen=True, slots=True)
class _Line:
    """A place in line a completion took for this queue's next lease (see `WorkQueue._complete`)."""

    token: str
    visibility: int
    revision: int  # the waiting key's create revision
    since: float  # local time the completion was sent: a claim handed to us is newer than that


@dataclass(slots=True)
class _Scan:
    """What one look at the queue found (`WorkQueue._scan`)."""

    #: the first free items in order: key, key as seen, the record as delivered, how many of ``ahead`` precede it
    free: list[tuple[bytes, KeyValue, _Item, int]] = field(default_factory=list)
    #: one compare per item ahead that waits for a dependency: it still waits when the hand-off commits
    ahead: list[Compare] = field(default_factory=list)
    waiters: list[_Waiter] = field(default_factory=list)  # oldest first
    gate: Compare | None = None
    paused: bool = False
    tail: Compare | None = None
    wake: float = math.inf  # local time of the next timer (a claim to take back, a delayed item due)
    chore: Callable[[], Awaitable[int]] | None = None  # a write to do first; returns the revision to catch up to


@final
class _RecordCodec:
    """The item record format as a codec, so a record version is decoded once for every follower of the queue in
    the process (`Subscription.decoded`)."""

    def encode(self, value: _Item) -> bytes:
        return value.encode()

    def decode(self, data: bytes) -> _Item:
        return _Item.decode(data)


_RECORDS = _RecordCodec()


class _View(dict[bytes, KeyValue]):
    """A queue's keys as one consumer's subscription shows them, with what a claim reads kept up to date on each
    change: the items in offer order, the records that cannot be decoded, the consumers in line, and the claims
    handed to waiters (by waiter token). So a claim costs the same whatever the queue's length.

    Every change goes through ``view[key] = kv``, `pop` or ``del`` (as `apply` makes them); a snapshot is a new
    view (`_Claimer.apply`).
    """

    def __init__(self, queue: WorkQueue, subscription: Subscription, state: dict[bytes, KeyValue]) -> None:
        super().__init__()
        self._queue, self._sub = queue, subscription
        self.order: list[tuple[int, int, bytes]] = []  # (-priority, create revision, key), sorted: offer order
        self._ranks: dict[bytes, tuple[int, int, bytes]] = {}
        self.decoded: dict[bytes, _Item] = {}
        self.bad: dict[bytes, str] = {}  # item key -> why its record cannot be decoded
        self.waiters: dict[bytes, _Waiter] = {}
        self.handed: dict[str, bytes] = {}  # waiter token -> the claim a hand-off wrote for it
        self._tokens: dict[bytes, str] = {}  # claim key -> waiter token
        super().update(state)
        for key, kv in state.items():
            self._index(key, kv, insort=False)
        self.order.sort()  # once, not an insertion per item

    def __setitem__(self, key: bytes, kv: KeyValue) -> None:
        self._unindex(key)
        super().__setitem__(key, kv)
        self._index(key, kv)

    def _index(self, key: bytes, kv: KeyValue, *, insort: bool = True) -> None:
        queue = self._queue
        if key.startswith(queue._items):
            decoded = queue._decode(key, kv, self._sub)
            if isinstance(decoded, str):
                self.bad[key] = decoded
                return
            self.decoded[key] = decoded
            rank = self._ranks[key] = (-decoded.priority, kv.create_revision, key)
            if insort:
                bisect.insort(self.order, rank)
            else:
                self.order.append(rank)
        elif key.startswith(queue._waiting):
            waiter = _Waiter.parse(key, kv, len(queue._waiting))
            if waiter is not None:
                self.waiters[key] = waiter
        elif key.startswith(queue._claims) and b'"waiter":' in kv.value:
            token = _claim_text(kv.value, "waiter")
            if token is not None:
                self.handed[token], self._tokens[key] = key, token

    def __delitem__(self, key: bytes) -> None:
        self._unindex(key)
        super().__delitem__(key)

    def pop(self, key: bytes, *default: Any) -> Any:
        self._unindex(key)
        return super().pop(key, *default)

    def _unindex(self, key: bytes) -> None:
        rank = self._ranks.pop(key, None)
        if rank is not None:
            del self.order[bisect.bisect_left(self.order, rank)]
        self.decoded.pop(key, None)
        self.bad.pop(key, None)
        self.waiters.pop(key, None)
        token = self._tokens.pop(key, None)
        if token is not None and self.handed.get(token) == key:
            del self.handed[token]


@final
class _Claimer:
    """One consumer's wait for an item (`WorkQueue.lease`).

    It claims the first free items itself, handing the ones ahead of its own to the consumers waiting in line
    (oldest first) in the same transaction; when that transaction is refused (another consumer claimed first),
    its failure branch puts the consumer in line (``waiting/...``, bound to its session lease), and the consumer
    then waits by watch until someone hands it an item, or until it is the oldest in line and items are free.
    """

    def __init__(
        self, queue: WorkQueue, subscription: Subscription, visibility: int, line: _Line | None = None
    ) -> None:
        self.queue, self.sub, self.visibility = queue, subscription, visibility
        self.token = line.token if line is not None else uuid.uuid4().hex[:16]
        self.key = queue._waiting_key(line.visibility if line is not None else visibility, self.token)
        self.registered = line.revision if line is not None else 0  # our waiting key's create revision; 0: none
        # A claim found at the first look may have been handed to us any time since we took our place in line.
        self.since: float | None = line.since if line is not None else None
        self.changed = anyio.current_time()  # when the line last moved (someone left it) in our view

    async def run(self) -> Task:
        """Wait for an item and claim it (or be handed it); leave the line if this ends any other way."""
        while (item := self.sub.next_nowait()) is not None:
            self.apply(item)  # what other followers already read: claim from the newest view
        try:
            while True:
                outcome = await self.step()
                if isinstance(outcome, Task):
                    return outcome
                await self.wait(outcome)
        except BaseException:
            if self.registered:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.queue.session.ttl or 10):
                    await self.leave_line()
            raise

    async def step(self) -> Task | float | _Behind:
        """Act on the current view: our handed item, a chore, a hand-off, or the local time to wait until."""
        state, now = self.view, anyio.current_time()
        if self.registered and self.key not in state:
            # Our place in line is gone: an item was handed to us (its claim came in the same batch) or our
            # lease ended (the session guard stops us).
            self.registered = 0
            task = self.handed(state, self.since if self.since is not None else now)
            if task is not None:
                return task
        self.since = None
        if self.registered and now < self.changed + _QUIET and not self.first_in_line(state):
            # Not the oldest in line: the oldest hands out (to us too); we step in only if the line stops moving
            # (the oldest may be gone, or between two leases of its own).
            return self.changed + _QUIET
        scan = self.queue._scan(state, now)
        if scan.chore is not None:
            # Look again once the view has our write (or whatever refused it: the store moved past our view).
            return _Behind(await scan.chore())
        if scan.paused or not scan.free:
            return scan.wake  # nothing to hand out: wait for a change, by watch, or a timer
        return await self.hand_out(scan)

    @property
    def view(self) -> _View:
        view = self.sub.state
        assert isinstance(view, _View)
        return view

    def first_in_line(self, view: _View) -> bool:
        """Whether no consumer in line in the view took its place before ours."""
        ours = self.registered
        return not any(waiter.revision < ours for waiter in view.waiters.values())

    def handed(self, view: _View, now: float) -> Task | None:
        """The item a hand-off gave us (a claim that names our token), if our view shows one."""
        queue, claim = self.queue, view.handed.get(self.token)
        if claim is None:
            return None
        item_key = queue._items + claim[len(queue._claims) :]
        item_kv, decoded = view.get(item_key), view.decoded.get(item_key)
        if item_kv is None or decoded is None:
            return None
        task = Task(
            queue, item_key[len(queue._items) :].decode(), decoded, view[claim].create_revision, self.visibility
        )
        # Counted from when we saw it (after it was written): other consumers count from when they saw it.
        task._deadline = now + self.visibility - _MARGIN
        task._create_revision = item_kv.create_revision
        return task

    async def hand_out(self, scan: _Scan) -> Task | float | _Behind:
        """One transaction: the first free items to the oldest waiters and to us (last in line, unless we are
        in line already); refused, it puts us in line (its failure branch) and we catch up."""
        queue = self.queue
        line: list[_Waiter | None] = [*scan.waiters] if self.registered else [*scan.waiters, None]
        assert scan.gate is not None and scan.tail is not None
        compares: list[Compare] = [scan.gate, scan.tail]
        ops: list[Op] = []
        given: list[Any] = []
        ahead = 0
        for (key, kv, delivered, before), waiter in zip(scan.free, line, strict=False):
            blocked = scan.ahead[ahead:before]
            room = _MAX_TXN - len(compares) - 3
            if len(blocked) > room or len(ops) + 4 > _MAX_TXN:
                if given:
                    break  # hand out fewer items rather than prove less
                blocked = blocked[:room]  # the head itself: prove what fits (the oldest blocked items)
            compares += blocked
            ahead = max(ahead, before)
            claim = queue._claims + key[len(queue._items) :]
            # The item unchanged (so free, not held) and unclaimed: count the delivery, claim it for the waiter
            # under the waiter's session lease (any client may attach any lease), and take the waiter out of line.
            compares += [Compare.mod(key, "==", kv.mod_revision), Compare.create(claim, "==", 0)]
            visibility = self.visibility if waiter is None else waiter.visibility
            value = queue._claim_value(
                visibility, None if waiter is None else waiter.lease, self.token if waiter is None else waiter.token
            )
            ops += [
                Put(key, delivered.encode()),
                Put(claim, value, queue.session.lease_id if waiter is None else waiter.lease),
            ]
            if waiter is not None:
                compares.append(Compare.create(waiter.key, "==", waiter.revision))
                ops.append(Delete(waiter.key))
            given.append((key, kv, delivered, claim, value, waiter))
        served = any(waiter is None or waiter.key == self.key for *_, waiter in given)
        enter: list[Op] = (
            [] if self.registered or served else [Put(self.key, self._line_value(), queue.session.lease_id)]
        )
        # The gate open and the tail unchanged since our view (no item put, given back or requeued that we have
        # not seen), every dependency-blocked item ahead still blocked: the items given are the first free ones.
        return await self._commit(compares, [*ops, *enter], given, entered=bool(enter))

    async def _commit(
        self, compares: list[Compare], ops: list[Op], given: list[Any], *, entered: bool
    ) -> Task | float | _Behind:
        """Send a hand-off. Refused, its failure branch puts us in line and reads back the keys compared (keys
        only, each a point read, never the whole queue), so we know which revision to catch up to; a compared key
        that was deleted shows no revision, and we then wait for the next change instead (see `wait`)."""
        sent = anyio.current_time()
        result = await self.queue.session.backend.txn(compares, ops, [*self._enter_line(), *_read_back(compares)])
        if not result.succeeded:
            self.joined(result.revision)
            return _Behind(max(_newest(result), self.registered))
        return self.given(given, result.revision, sent, entered)

    def _line_value(self) -> bytes:
        return b""

    def _enter_line(self) -> list[Op]:
        return [] if self.registered else [Put(self.key, self._line_value(), self.queue.session.lease_id)]

    def joined(self, revision: int) -> None:
        """We wrote our waiting key at ``revision`` (a failure branch, or a hand-off that had none for us)."""
        if not self.registered:
            self.registered, self.changed = revision, anyio.current_time()
            self.sub.state[self.key] = KeyValue(
                self.key, self._line_value(), revision, revision, 1, self.queue.session.lease_id
            )

    def given(self, given: list[Any], revision: int, sent: float, entered: bool) -> Task | float:
        """Our hand-off committed at ``revision``: our own writes into the view (the next claim need not wait for
        the watch to bring them); our task if we gave ourselves an item."""
        queue, state, mine = self.queue, self.view, None
        for key, kv, delivered, claim, value, waiter in given:
            lease = queue.session.lease_id if waiter is None else waiter.lease
            state[claim] = KeyValue(claim, value, revision, revision, 1, lease)
            state[key] = KeyValue(key, delivered.encode(), kv.create_revision, revision, kv.version + 1)
            if waiter is not None:
                state.pop(waiter.key, None)
            if waiter is None or waiter.key == self.key:
                mine = Task(queue, key[len(queue._items) :].decode(), delivered, revision, self.visibility)
                mine._deadline = sent + self.visibility - _MARGIN
                mine._create_revision = kv.create_revision
        if mine is not None:
            self.registered = 0
            return mine
        if entered:
            self.joined(revision)
        return anyio.current_time()

    async def wait(self, outcome: float | _Behind) -> None:
        """Wait for the view to catch up (``_Behind``), or for the next change or the local time ``outcome``."""
        sub = self.sub
        if isinstance(outcome, _Behind):
            # If the view already has that revision, what we missed is a deletion: the next change.
            behind = max(outcome.revision, sub.revision + 1)
            while sub.revision < behind:
                self.apply(await sub.next())
        elif outcome <= anyio.current_time():
            await anyio.lowlevel.checkpoint()
        else:
            with anyio.move_on_after(outcome - anyio.current_time()):
                while not self.apply(await sub.next()):
                    pass
        # Batches that already arrived: act on the newest view, not on each step of it.
        while (item := sub.next_nowait()) is not None:
            self.apply(item)

    def apply(self, item: Snapshot | WatchBatch) -> bool:
        """Bring the view up to date with ``item``; whether we should look at it (a waiter behind others in
        line looks only when someone leaves the line: its own hand-off, or an older waiter's)."""
        state = apply(self.sub.state, item)
        if not isinstance(state, _View):  # a snapshot: a new view
            state = _View(self.queue, self.sub, state)
        self.sub.state, self.sub.revision = state, item.revision
        if not self.registered or isinstance(item, Snapshot):
            return True
        waiting = self.queue._waiting
        for event in item.events:
            if event.type is EventType.DELETE and event.kv.key.startswith(waiting):
                # Someone left the line: maybe us (handed an item), maybe we are first now.
                self.changed = anyio.current_time()
                return True
        # The first in line hands out, so it looks at every change (a waiter joining, an item put or freed).
        return self.first_in_line(state)

    async def leave_line(self) -> None:
        """Take our waiting key out of line; if an item was handed to us meanwhile, give it back uncounted."""
        queue, key, registered = self.queue, self.key, self.registered
        # Compared: our key still there means nobody handed us an item (a hand-off deletes it with the claim).
        if self.sub.revision < registered:
            self.sub.state[key] = KeyValue(key, b"", registered, registered, 1, queue.session.lease_id)
        result = await retry_call(
            lambda: queue.session.backend.txn([Compare.create(key, "==", registered)], [Delete(key)])
        )
        self.registered = 0
        if result.succeeded:
            return
        # Whoever took our key out of line (a hand-off, with its claim for us, or our lease's end) did it in the
        # queue: catch up until the view shows it. (Not up to the failed transaction's revision: that may be a
        # write anywhere in the store, which no change of the queue would ever bring.)
        while key in self.sub.state:
            self.apply(await self.sub.next())
        task = self.handed(self.view, anyio.current_time())
        if task is not None:
            await queue._settle(task, error=None)


@final
class Task:
    """A leased item, inside ``async with queue.lease() as task``.

    Attributes:
        id: the item id.
        payload: the item.
        attempt: which delivery this is (1 for the first).
        priority: the item's priority.
    """

    def __init__(self, queue: WorkQueue, item_id: str, item: _Item, claim_revision: int, visibility: int) -> None:
        self._queue = queue
        self.id = item_id
        self.payload = item.payload
        self.attempt = item.attempts
        self.priority = item.priority
        self._item = item
        self._claim_revision = claim_revision
        self._create_revision = 0  # the item key's
        self._visibility = visibility
        self._scope: anyio.CancelScope | None = None
        self._deadline = math.inf
        self._reply = b""

    @property
    def wants_reply(self) -> bool:
        """Whether the item is a request (`WorkQueue.request`): completing it writes the reply (`reply`)."""
        return self._item.reply is not None

    def reply(self, value: bytes) -> None:
        """Set the reply to a request (an item put with `WorkQueue.request`); the last call wins, default ``b""``.

        Nothing is written now: the reply is written when the block completes the item, in the same transaction
        that removes it, so a reply exists exactly when the request was completed. Ignored for an item put
        with `WorkQueue.put`.

        Raises:
            TypeError: ``value`` is not bytes.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"a reply is bytes, not {type(value).__name__}")
        self._reply = value

    @property
    def deadline(self) -> float:
        """Local time (``anyio.current_time()``) by which the consumer must finish or `extend`."""
        return self._deadline

    async def extend(self) -> None:
        """Restart the visibility timeout: rewrite the claim (fenced by it), then move the local deadline.

        Other consumers restart their count of the timeout when they see the rewritten claim.

        Raises:
            ClaimLostError: the claim already ended (the item was completed or given back, or taken back after
                its visibility timeout).
        """
        queue = self._queue
        claim = queue._claims + self.id.encode()
        sent = anyio.current_time()
        # Fenced by our claim's create revision: a claim that ended (taken back, removed) is not revived.
        result = await retry_call(
            lambda: queue.session.backend.txn(
                [Compare.create(claim, "==", self._claim_revision)],
                [Put(claim, queue._claim_value(self._visibility), queue.session.lease_id)],
            )
        )
        if not result.succeeded:
            raise ClaimLostError(
                f"item {self.id}: the claim already ended (completed, given back, or its visibility timeout passed)"
            )
        self._deadline = sent + self._visibility - _MARGIN
        if self._scope is not None:
            self._scope.deadline = self._deadline


@final
class PendingRequest:
    """A request put with `WorkQueue.request`: `result` waits for its reply.

    Attributes:
        id: the request's item id.
    """

    def __init__(self, queue: WorkQueue, item_id: str, revision: int) -> None:
        self._queue = queue
        self.id = item_id
        self._revision = revision  # of the put: a view older than it has not seen the item yet
        self._settled = False

    async def result(self) -> bytes:
        """Wait (by watch) for the reply the consumer set with `Task.reply`; read it and delete its key.

        If this wait ends any other way (cancelled, ``anyio.fail_after``, an error), the request is withdrawn
        (`withdraw`), shielded: it is never delivered again.

        Raises:
            RequestFailedError: the request was dead-lettered (failed ``max_attempts`` times, expired) or removed.
        """
        try:
            return await self._wait()
        except BaseException:
            if not self._settled:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._queue.session.ttl or 10):
                    await self.withdraw()
            raise

    async def withdraw(self) -> None:
        """Withdraw the request: one transaction deletes the item, its claim and its reply if any.

        A consumer holding it at that moment is fenced as by `WorkQueue.remove`: its completion is refused
        (`ClaimLostError`) and no reply is written.
        """
        queue, encoded = self._queue, self.id.encode()
        # One transaction, no compare: whatever state the request is in, nothing of it is left to deliver or read.
        await retry_call(
            lambda: queue.session.backend.txn(
                [], [Delete(queue._items + encoded), Delete(queue._claims + encoded), Delete(queue._replies + encoded)]
            )
        )
        self._settled = True

    async def _wait(self) -> bytes:
        queue, encoded = self._queue, self.id.encode()
        item_key, reply_key, dead_key = queue._items + encoded, queue._replies + encoded, queue._dead + encoded
        subscription = await subscribe(queue.session.backend, queue._prefix)
        try:
            while True:
                state = subscription.state
                reply = state.get(reply_key)
                if reply is not None:
                    # Cleaned when read (the reply was written with the completion: the item is gone too).
                    await retry_call(lambda: queue.session.backend.txn([], [Delete(reply_key)]))
                    self._settled = True
                    return reply.value
                if subscription.revision >= self._revision and item_key not in state:
                    self._settled = True
                    dead = state.get(dead_key)
                    if dead is None:
                        raise RequestFailedError(self.id, "removed")
                    try:
                        reason = _Item.decode(dead.value).error or "dead-lettered"
                    except _Undecodable:
                        reason = "dead-lettered"
                    raise RequestFailedError(self.id, reason)
                item = await subscription.next()
                subscription.state, subscription.revision = apply(subscription.state, item), item.revision
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.aclose()


@asynccontextmanager
async def _leased(queue: WorkQueue, visibility: int) -> AsyncIterator[Task]:
    """``async with queue.lease() as task``: wait for an item, claim it, run the body, settle the claim."""
    task = await queue._claim(visibility)
    entered = False
    try:
        async with queue.session.guarded(ClaimLostError, what=f"queue {queue.name!r}, item {task.id}"):
            entered = True
            with anyio.CancelScope(deadline=task.deadline) as scope:
                task._scope = scope
                yield task
    except ClaimLostError:
        # The session was lost during the body (or before it: then the delivery is not counted).
        await queue._settle(task, error="the consumer's session was lost" if entered else None)
        raise
    except Exception as exc:
        await queue._settle(task, error=error_text(exc))
        raise
    except BaseException:
        # Cancelled from outside: give the item back untouched, without counting it against the item.
        await queue._settle(task, error=None)
        raise
    if scope.cancelled_caught:
        await queue._settle(task, error="visibility timeout passed")
        raise ClaimLostError(f"item {task.id}: the visibility timeout passed before the consumer finished")
    await queue._complete(task)


@final
class WorkQueue:
    """A distributed work queue with leased items, visibility timeouts, retries and dead letters.

    Producers ``await queue.put(b"job")``; consumers ``async with queue.lease(visibility_timeout=30) as task:``
    (a consumer that leases in a loop should hold ``async with queue:`` around it: the queue then keeps one
    follower of its keys open, and a claim costs one round trip instead of opening a watch first);
    wait for an item and hold it exclusively. Leaving the block normally completes the item (it is removed);
    an exception re-offers it (counting the attempt) and propagates; after ``max_attempts`` deliveries the item
    goes to the dead letters with its last error. If the body runs past the visibility timeout without
    ``task.extend()``, or the session is lost, the body is cancelled and ``ClaimLostError`` raised, and the item
    is offered again. See the module docstring for the order guarantee.

    Args:
        session: the consumer's session: claims are bound to its lease, so a consumer that dies or is cut off
            loses its claims within the session's TTL.
        name: the queue's name; keys live under ``<name>/``.
        max_attempts: deliveries before an item is dead-lettered (>= 1).
        now: the wall clock, returning an aware datetime (default: the system clock). It decides only when a
            delayed item becomes due and when an item expires; tests pass a clock that follows virtual time.

    A consumer's failure is recorded with the item as ``"<type>: <message>"``, cut to 4096 characters.
    """

    def __init__(
        self, session: Session, name: str, *, max_attempts: int = 5, now: Callable[[], datetime] | None = None
    ) -> None:
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool):
            raise TypeError(f"max_attempts must be an int, not {type(max_attempts).__name__}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")
        self.session = require_session(session)
        self.name = name
        self.max_attempts = max_attempts
        self._now = now or (lambda: datetime.now(UTC))
        self._prefix = name_prefix(name)
        self._items = self._prefix + b"items/"
        self._claims = self._prefix + b"claims/"
        self._dead = self._prefix + b"dead/"
        self._tail = self._prefix + b"tail"
        self._replies = self._prefix + b"replies/"
        self._waiting = self._prefix + b"waiting/"
        self._gate = self._prefix + b"gate"
        self._subscription: Subscription | None = None
        self._subscription_busy = False
        self._line: _Line | None = None  # a place in line our last completion took for the next lease
        # claim key -> (mod revision, local time this consumer first saw that revision of the claim)
        self._claims_seen: dict[bytes, tuple[int, float]] = {}
        # claim key -> (mod revision, the visibility timeout it declares)
        self._claim_visibilities: dict[bytes, tuple[int, int | None]] = {}

    async def __aenter__(self) -> WorkQueue:
        """Optional: keep one follower of the queue open across leases, so a claim does not open a watch."""
        if self._subscription is not None:
            raise RuntimeError(f"WorkQueue {self.name!r} is already entered")
        self._subscription = await self._follow()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        subscription, self._subscription = self._subscription, None
        line, self._line = self._line, None
        if subscription is not None:
            if line is not None:
                # The place in line our last completion took: leave it (an item handed to us goes back).
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.session.ttl or 10):
                    await _Claimer(self, subscription, line.visibility, line).leave_line()
            await subscription.aclose()

    async def put(
        self,
        payload: bytes,
        *,
        priority: int = 0,
        not_before: float | datetime | None = None,
        expires_in: float | None = None,
        after: Iterable[str] = (),
    ) -> str:
        """Add an item; return its id. Higher ``priority`` is offered first; equal ones in creation order.

        One write: the item and the queue's ``tail`` in one transaction.

        Args:
            payload: the item.
            priority: higher is offered first.
            not_before: do not offer the item before this time: seconds from now, or an aware datetime. Stored
                as a UTC wall-clock time; each consumer's clock (``now``) decides when it is due. Until then it is
                not free: items behind it are offered first.
            expires_in: seconds from now (by this producer's clock); an item not completed by then is never
                delivered again and goes to the dead letters with the error "expired".
            after: ids of items in the queue (at most 100) that must all be completed before this one is
                offered. If one of them is dead-lettered or removed instead, this item goes to the dead letters
                ("dependency <id> was dead-lettered: ..." / "... was removed"). The put compares that each is in
                the queue, in its own transaction.

        Raises:
            TypeError: ``payload`` is not bytes, ``priority`` not an int, ``not_before`` neither a number nor a
                datetime, ``expires_in`` not a number, or ``after`` not a collection of str.
            ValueError: ``priority`` does not fit a signed 64-bit integer, ``not_before`` is a naive datetime or
                not finite, ``expires_in`` is not above 0, or ``after`` names more than 100 ids.
            UnknownDependencyError: an id in ``after`` is not in the queue; nothing was written.
            RequestTooLargeError: the item is larger than the server accepts. It is stored base64-encoded, so the
                payload limit is about 1.1 MiB with etcd's default 1.5 MiB request limit.
        """
        (item_id,), _ = await self._put_items(
            [payload], _Item(b"", priority, reply=None), not_before, expires_in, after
        )
        return item_id

    async def request(
        self,
        payload: bytes,
        *,
        priority: int = 0,
        not_before: float | datetime | None = None,
        expires_in: float | None = None,
        after: Iterable[str] = (),
    ) -> PendingRequest:
        """Put an item that expects a reply; ``await (await queue.request(b"...")).result()`` waits for it.

        The item is delivered like any other (arguments and errors as `put`); the consumer sets the reply with
        `Task.reply`, and completing the item writes it under ``replies/<id>`` in the completion's transaction,
        bound to this session's lease if the session is open (so a producer that is gone leaks nothing).
        """
        lease = self.session.lease_id if self.session._open and not self.session.lost else 0
        template = _Item(b"", priority, reply=lease)
        (item_id,), revision = await self._put_items([payload], template, not_before, expires_in, after)
        return PendingRequest(self, item_id, revision)

    async def put_many(
        self,
        payloads: Iterable[bytes],
        *,
        priority: int = 0,
        not_before: float | datetime | None = None,
        expires_in: float | None = None,
        after: Iterable[str] = (),
    ) -> list[str]:
        """Add several items, in order, in one transaction per 100 items; return their ids.

        Items of one transaction share a create revision; their ids sort in the order given, and items of one
        revision are offered in id order, so they are offered in the order given. Arguments and errors as `put`
        (``after`` applies to every item; with more than 100 items, a dependency completed between two batches
        raises `UnknownDependencyError` for the rest, after the earlier batches were written).
        """
        ids, _ = await self._put_items(payloads, _Item(b"", priority), not_before, expires_in, after)
        return ids

    async def _put_items(
        self,
        payloads: Iterable[bytes],
        template: _Item,
        not_before: float | datetime | None,
        expires_in: float | None,
        after: Iterable[str],
    ) -> tuple[list[str], int]:
        items = list(payloads)
        for payload in items:
            if not isinstance(payload, bytes):
                raise TypeError(f"payloads are bytes, not {type(payload).__name__}")
        priority = template.priority
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        if not -MAX_INT64 - 1 <= priority <= MAX_INT64:
            raise ValueError(f"priority must fit a signed 64-bit integer, not {priority}")
        due, expires = self._times(not_before, expires_in)
        template = replace(template, not_before=due, expires=expires, after=self._dependencies(after))
        # Ids of one call share a random stem and end in a counter: items of one transaction share a create
        # revision, and are offered in key order within it, which is then the order given.
        stem = uuid.uuid4().hex[:24]
        ids = [f"{stem}{i:08x}" for i in range(len(items))] if len(items) > 1 else [uuid.uuid4().hex]
        revision = 0
        for start in range(0, len(items), _PUT_BATCH):
            batch = zip(ids[start : start + _PUT_BATCH], items[start : start + _PUT_BATCH], strict=True)
            ops: list[Op] = [Put(self._items + i.encode(), replace(template, payload=p).encode()) for i, p in batch]
            # The tail moves with every put: a claim that saw the tail unchanged saw every item. Each dependency
            # must be in the queue (a completed one could never be waited for): else nothing is written.
            needed = [Compare.create(self._items + dep.encode(), ">", 0) for dep in template.after]
            result = await self.session.backend.txn(needed, [*ops, Put(self._tail, b"")])
            if not result.succeeded:
                raise UnknownDependencyError(await self._missing(template.after))
            revision = result.revision
        return ids, revision

    def _times(self, not_before: float | datetime | None, expires_in: float | None) -> tuple[float | None, ...]:
        """``not_before`` and ``expires_in`` as UTC wall-clock timestamps (None: not given), checked."""
        wall = self._now().timestamp()
        due: float | None = None
        if isinstance(not_before, datetime):
            if not_before.tzinfo is None:
                raise ValueError("not_before must be an aware datetime (with a time zone), not a naive one")
            due = not_before.timestamp()
        elif not_before is not None:
            if not isinstance(not_before, int | float) or isinstance(not_before, bool):
                raise TypeError(f"not_before is seconds or a datetime, not {type(not_before).__name__}")
            if not math.isfinite(not_before):
                raise ValueError(f"not_before must be finite, not {not_before}")
            due = wall + not_before
        expires: float | None = None
        if expires_in is not None:
            if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
                raise TypeError(f"expires_in is seconds, not {type(expires_in).__name__}")
            if not 0 < expires_in < math.inf:
                raise ValueError(f"expires_in must be above 0 and finite, not {expires_in}")
            expires = wall + expires_in
        return due, expires

    @staticmethod
    def _dependencies(after: Iterable[str]) -> tuple[str, ...]:
        if isinstance(after, str | bytes):
            raise TypeError("after is a collection of item ids, not a single " + type(after).__name__)
        ids = tuple(dict.fromkeys(after))
        for dep in ids:
            _encode_id(dep)
            if not dep:
                raise ValueError("an item id in after is empty")
        if len(ids) > _MAX_AFTER:
            raise ValueError(f"an item may depend on at most {_MAX_AFTER} items, not {len(ids)}")
        return ids

    async def _missing(self, ids: tuple[str, ...]) -> list[str]:
        """Which of ``ids`` are not in the queue (one read)."""
        result = await self.session.backend.txn([], [Range(self._items + i.encode(), keys_only=True) for i in ids])
        return [i for i, r in zip(ids, result.responses, strict=True) if not getattr(r, "kvs", ())]

    async def pause(self) -> None:
        """Close the gate: from now on no consumer claims an item until `resume` (one write).

        Every claim compares the gate in its own transaction, so no claim commits after the pause's revision.
        Items already held stay held and are completed as usual; waiting consumers keep waiting, by watch.
        """
        # Rewritten, not deleted: a claim compares the gate's mod revision, so any flip refuses a racing claim.
        await retry_call(lambda: self.session.backend.txn([], [Put(self._gate, _PAUSED)]))

    async def resume(self) -> None:
        """Open the gate again (one write); waiting consumers see it by watch and claim."""
        # Why a write and not a delete: as in pause, so the gate's mod revision moves with every flip.
        await retry_call(lambda: self.session.backend.txn([], [Put(self._gate, b"")]))

    async def paused(self) -> bool:
        """Whether the gate is closed now (one read): `pause` was called and `resume` not since."""
        result = await self.session.backend.range(Range(self._gate))
        return bool(result.kvs) and result.kvs[0].value == _PAUSED

    def lease(self, *, visibility_timeout: int = 30) -> AbstractAsyncContextManager[Task]:
        """Wait for an item and hold it (``async with``); see the class docstring. Bound with ``anyio.fail_after``."""
        check_ttl(visibility_timeout)
        return _leased(self, visibility_timeout)

    async def depth(self) -> QueueDepth:
        """Items waiting, held, and dead-lettered now (one consistent read)."""
        # One transaction of three counts: the numbers are of one revision.
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
        """Every dead-lettered item, oldest first. A dead letter written by another program in a format this
        library cannot read is shown with its raw bytes as the payload and the reason as the error."""
        result = await self.session.backend.range(Range(self._dead, prefix=True, sort_by="create"))
        letters = []
        for kv in result.kvs:
            item_id = kv.key[len(self._dead) :].decode("utf-8", "surrogateescape")
            try:
                item = _Item.decode(kv.value)
            except _Undecodable as exc:
                letters.append(DeadLetter(item_id, kv.value, 0, f"undecodable dead letter: {exc}"))
                continue
            letters.append(DeadLetter(item_id, item.payload, item.attempts, item.error or ""))
        return letters

    async def requeue(self, item_id: str) -> bool:
        """Put a dead letter back in the queue with its attempts reset. False if there is no such dead letter.

        A dead letter that cannot be decoded (a foreign record) is requeued as an item whose payload is its raw
        bytes, the same bytes `dead_letters` shows.

        Raises:
            TypeError: ``item_id`` is not a str.
            ValueError: ``item_id`` is not UTF-8 (a dead letter whose key is not UTF-8 cannot be requeued).
        """
        encoded = _encode_id(item_id)
        dead_key = self._dead + encoded
        current = await self.session.backend.range(Range(dead_key))
        if not current.kvs:
            return False
        try:
            decoded = _Item.decode(current.kvs[0].value)
            fresh = replace(decoded, attempts=0, error=None, not_before=None, expires=None, held=False, after=())
        except _Undecodable:
            fresh = _Item(current.kvs[0].value)
        # Fenced by the dead letter as read (requeued once); the tail moves: the item is new to every view.
        moved = await self.session.backend.txn(
            [Compare.mod(dead_key, "==", current.kvs[0].mod_revision)],
            [Delete(dead_key), Put(self._items + encoded, fresh.encode()), Put(self._tail, b"")],
        )
        return moved.succeeded

    async def items(self) -> list[QueuedItem]:
        """Every item in the queue, pending and leased, in the order they are offered (one consistent read).

        A record that cannot be decoded is not listed (the next consumer that looks moves it to the dead letters).
        """
        # Items and claims read in one transaction: one revision, so a claim never points at a missing item.
        result = await self.session.backend.txn([], [Range(self._items, prefix=True), Range(self._claims, prefix=True)])
        item_kvs: tuple[KeyValue, ...] = getattr(result.responses[0], "kvs", ())
        claims = {kv.key[len(self._claims) :]: kv for kv in getattr(result.responses[1], "kvs", ())}
        listed = []
        for kv in item_kvs:
            raw_id = kv.key[len(self._items) :]
            try:
                item_id = raw_id.decode()
                item = _Item.decode(kv.value)
            except (UnicodeDecodeError, _Undecodable):
                continue
            if not item_id:
                continue
            claim = claims.get(raw_id)
            entry = QueuedItem(
                item_id,
                item.priority,
                item.attempts,
                claim is not None,
                not_before=_utc(item.not_before),
                expires=_utc(item.expires),
            )
            if claim is not None:
                entry = replace(
                    entry,
                    holder=_claim_text(claim.value, "holder"),
                    visibility_timeout=_claim_visibility(claim.value),
                    claim_revision=claim.create_revision,
                )
            listed.append((-item.priority, kv.create_revision, raw_id, entry))
        listed.sort(key=lambda row: row[:3])
        return [row[3] for row in listed]

    async def remove(self, item_id: str) -> bool:
        """Remove an item, pending or leased, in one transaction; False if there is no such item.

        A leased item is removed with its claim: the holder's body is not interrupted, but its completion (or
        give-back, or `Task.extend`) is refused, fenced by the claim, so leaving its block raises
        `ClaimLostError`, and the item is never offered again. Items waiting for it (``after``) go to the dead
        letters in the same transaction, with the error "dependency <id> was removed".

        Raises:
            TypeError: ``item_id`` is not a str.
            ValueError: ``item_id`` is not UTF-8.
        """
        encoded = _encode_id(item_id)
        key = self._items + encoded
        while True:
            # One read of the queue: the items that wait for this one, and the tail as it was then.
            read = await self.session.backend.txn([], [Range(self._items, prefix=True), Range(self._tail)])
            kvs: tuple[KeyValue, ...] = getattr(read.responses[0], "kvs", ())
            tail = getattr(read.responses[1], "kvs", ())
            ops: list[Op] = [Delete(key), Delete(self._claims + encoded)]
            compares = [Compare.create(key, ">", 0), Compare.mod(self._tail, "==", tail[0].mod_revision if tail else 0)]
            for kv in kvs:
                decoded = self._decode(kv.key, kv)
                if isinstance(decoded, _Item) and item_id in decoded.after and len(ops) < _MAX_TXN - 2:
                    # A dependent could never be offered: dead-letter it with the item, unchanged since read.
                    compares.append(Compare.mod(kv.key, "==", kv.mod_revision))
                    reason = replace(decoded, error=f"dependency {item_id} was removed").encode()
                    ops += [Delete(kv.key), Put(self._dead + kv.key[len(self._items) :], reason)]
            # Why the tail: no dependent was put since the read (a put moves the tail); else read again.
            result = await self.session.backend.txn(compares, ops, [Range(key, keys_only=True)])
            if result.succeeded:
                self._forget(key, self._claims + encoded)
                return True
            if not getattr(result.responses[0], "kvs", ()):
                return False

    async def trim_dead_letters(self, *, keep: int = 0) -> int:
        """Delete all but the ``keep`` newest dead letters; return how many were deleted.

        Each deletion is fenced by the dead letter's mod revision, so a dead letter requeued (or rewritten)
        meanwhile is not deleted. One read, then one transaction per 100 deletions.

        Raises:
            TypeError: ``keep`` is not an int.
            ValueError: ``keep`` is negative.
        """
        if not isinstance(keep, int) or isinstance(keep, bool):
            raise TypeError(f"keep must be an int, not {type(keep).__name__}")
        if keep < 0:
            raise ValueError(f"keep must be at least 0, not {keep}")
        # Dead letters and items in one read: which letters are still waited for, as of one revision.
        read = await self.session.backend.txn(
            [], [Range(self._dead, prefix=True, sort_by="create", keys_only=True), Range(self._items, prefix=True)]
        )
        letters: tuple[KeyValue, ...] = getattr(read.responses[0], "kvs", ())
        # A dead letter an item waits for (``after``) is kept: the first consumer that sees both dead-letters the
        # dependent with the reason; deleting it first would make the dependency look completed.
        needed = {
            dep.encode()
            for kv in getattr(read.responses[1], "kvs", ())
            if isinstance(decoded := self._decode(kv.key, kv), _Item)
            for dep in decoded.after
        }
        doomed = [kv for kv in letters[: max(0, len(letters) - keep)] if kv.key[len(self._dead) :] not in needed]
        deleted = 0
        for start in range(0, len(doomed), _PUT_BATCH):
            # One transaction compares every letter of the batch (etcd allows 128 compares); refused (one of them
            # changed), it falls back to one transaction per letter.
            batch = doomed[start : start + _PUT_BATCH]
            done = await self.session.backend.txn(
                [Compare.mod(kv.key, "==", kv.mod_revision) for kv in batch], [Delete(kv.key) for kv in batch]
            )
            if done.succeeded:
                deleted += len(batch)
                continue
            for kv in batch:
                one = await self.session.backend.txn([Compare.mod(kv.key, "==", kv.mod_revision)], [Delete(kv.key)])
                deleted += one.succeeded
        return deleted

    # -- claiming --------------------------------------------------------------------------------------

    def _waiting_key(self, visibility: int, token: str) -> bytes:
        return self._waiting + f"{self.session.lease_id:x}/{visibility}/{token}".encode()

    def _claim_value(self, visibility: int, lease: int | None = None, waiter: str | None = None) -> bytes:
        holder = self.session.lease_id if lease is None else lease
        record: dict[str, Any] = {"holder": f"{holder:x}", "visibility": visibility}
        if waiter is not None:
            record["waiter"] = waiter
        return json.dumps(record, separators=(",", ":")).encode()

    def _visibility_of(self, claim: bytes, held: KeyValue) -> int | None:
        cached = self._claim_visibilities.get(claim)
        if cached is None or cached[0] != held.mod_revision:
            cached = self._claim_visibilities[claim] = (held.mod_revision, _claim_visibility(held.value))
            if len(self._claim_visibilities) > 4 * len(self._claims_seen) + 64:
                self._claim_visibilities = {claim: cached}
        return cached[1]

    def _decode(self, key: bytes, kv: KeyValue, subscription: Subscription | None = None) -> _Item | str:
        """The item record ``kv`` of ``key``, or why it cannot be decoded; decoded once for every follower of
        ``subscription``'s feed when given."""
        try:
            if not key[len(self._items) :].decode():
                return "the item id (the key after items/) is empty"
        except UnicodeDecodeError:
            return "the item key is not UTF-8"
        if subscription is None:
            try:
                return _Item.decode(kv.value)
            except _Undecodable as exc:
                return str(exc)
        item, error = subscription.decoded(_RECORDS, kv)
        if error is None:
            return item  # type: ignore[no-any-return]
        if isinstance(error, _Undecodable):
            return str(error)
        raise error

    async def _claim(self, visibility: int) -> Task:
        # Guarded: a session that is closed, or lost while we wait, claims nothing.
        async with self.session.guarded(ClaimLostError, what=f"queue {self.name!r}"):
            return await self._wait_and_claim(visibility)

    async def _follow(self) -> Subscription:
        """Follow the queue's keys (the process's shared watch), with a view of them that keeps the queue's order:
        the whole queue is read once here."""
        subscription = await subscribe(self.session.backend, self._prefix)
        subscription.state = _View(self, subscription, subscription.state)
        return subscription

    async def _wait_and_claim(self, visibility: int) -> Task:
        # Inside ``async with queue`` the queue's own subscription is reused (no new watch per lease), when no
        # other task of this object is using it.
        own = self._subscription if self._subscription is not None and not self._subscription_busy else None
        subscription: Subscription = own or await self._follow()
        self._subscription_busy |= own is not None
        line, self._line = (self._line, None) if own is not None else (None, self._line)
        try:
            if line is not None and line.visibility != visibility:
                # Our place in line was taken for another visibility timeout: leave it, then wait afresh.
                await _Claimer(self, subscription, line.visibility, line).leave_line()
                line = None
            return await _Claimer(self, subscription, visibility, line).run()
        finally:
            if own is None:
                await subscription.aclose()
            else:
                self._subscription_busy = False

    def _scan(self, view: _View, now: float) -> _Scan:
        """One look at the queue: the first free items in order, the waiting consumers, what a hand-off must
        compare, and the first chore (a bad record, an expired item, a claim to take back) if any."""
        for key, why in view.bad.items():
            # Nobody can ever process it: out of the way, into the dead letters, with the reason.
            kv = view[key]
            return _Scan(chore=partial(self._bury, key, kv, _Item(kv.value, error=f"undecodable item record: {why}")))
        if len(self._claims_seen) > 2 * len(view.order) + 64:
            self._claims_seen = {claim: value for claim, value in self._claims_seen.items() if claim in view}
        gate, tail = view.get(self._gate), view.get(self._tail)
        scan = _Scan(
            gate=Compare.mod(self._gate, "==", gate.mod_revision if gate is not None else 0),
            paused=gate is not None and gate.value == _PAUSED,
            tail=Compare.mod(self._tail, "==", tail.mod_revision if tail is not None else 0),
            waiters=sorted(view.waiters.values(), key=lambda waiter: waiter.revision),
        )
        wall, wanted = self._now().timestamp(), min(_HAND_OFF, len(scan.waiters) + 1)  # (+1: us, if not in line)
        for _, _, key in view.order:
            self._place(scan, view, key, view[key], view.decoded[key], now, wall)
            if scan.chore is not None or len(scan.free) >= wanted:
                break
        return scan

    def _place(
        self, scan: _Scan, state: dict[bytes, KeyValue], key: bytes, kv: KeyValue, item: _Item, now: float, wall: float
    ) -> None:
        """Classify one item, in order: held, to give back, to dead-letter, not due, blocked, or free."""
        claim = self._claims + key[len(self._items) :]
        held = state.get(claim)
        if held is not None:
            takeover = self._takeover_time(claim, held, now)
            if takeover > now:
                scan.wake = min(scan.wake, takeover)
            else:  # the holder's visibility timeout passed by our clock since we saw its claim: take it back
                fence = Compare.mod(claim, "==", held.mod_revision)
                reason = "visibility timeout passed (taken back from a consumer that neither finished nor extended)"
                scan.chore = partial(self._give_back, key, kv, item, fence, reason)
        elif item.held:
            # Its claim went with its holder's session lease (no write says so): offer it again, counted.
            fence = Compare.create(claim, "==", 0)
            scan.chore = partial(self._give_back, key, kv, item, fence, "the consumer's session ended")
        elif item.expires is not None and item.expires <= wall:
            # Expired by our clock and free: never delivered again (fenced by its mod revision).
            scan.chore = partial(self._bury, key, kv, replace(item, error="expired"))
        elif item.not_before is not None and item.not_before > wall:
            # Not due yet by our clock, so not free: skip it, and wake when it is due (a timer, no polling).
            scan.wake = min(scan.wake, now + max(item.not_before - wall, 0.001))
        elif isinstance(blocking := self._blocking(item, state), str):
            scan.chore = partial(self._bury, key, kv, replace(item, error=blocking))
        elif blocking is not None:
            scan.ahead.append(blocking)
        elif item.attempts >= self.max_attempts:
            # Delivered max_attempts times and no consumer finished (crashes, timeouts): give it up.
            reason = item.error or "max attempts exceeded (no consumer finished)"
            scan.chore = partial(self._bury, key, kv, replace(item, error=reason))
        else:
            delivered = replace(item, attempts=item.attempts + 1, held=True)
            scan.free.append((key, kv, delivered, len(scan.ahead)))

    def _takeover_time(self, claim: bytes, held: KeyValue, now: float) -> float:
        """When (local time) we may take ``claim`` back: its visibility timeout plus a grace, counted from when
        we first saw this revision of it; never for a foreign claim that declares no visibility timeout."""
        first_seen = self._claims_seen.get(claim)
        if first_seen is None or first_seen[0] != held.mod_revision:
            first_seen = (held.mod_revision, now)
        self._claims_seen[claim] = first_seen
        visibility = self._visibility_of(claim, held)
        return math.inf if visibility is None else first_seen[1] + visibility + _TAKEOVER_GRACE

    def _blocking(self, item: _Item, state: dict[bytes, KeyValue]) -> Compare | str | None:
        """None if every dependency of ``item`` completed; else a compare that holds while the first one still
        waits (it is in the queue), or why the item can never be offered (a dependency was dead-lettered)."""
        for dep in item.after:
            encoded = dep.encode()
            waiting = state.get(self._items + encoded)
            if waiting is not None:
                return Compare.create(waiting.key, "==", waiting.create_revision)
            dead = state.get(self._dead + encoded)
            if dead is not None:
                try:
                    why = _Item.decode(dead.value).error or "dead-lettered"
                except _Undecodable:
                    why = "dead-lettered"
                return f"dependency {dep} was dead-lettered: {why}"
        return None

    async def _give_back(self, key: bytes, kv: KeyValue, item: _Item, fence: Compare, reason: str) -> int:
        """Offer an item again whose claim ended without a give-back (timed out, or gone with its lease), or
        dead-letter it after ``max_attempts``; fenced by the claim and the item as we saw them."""
        claim = self._claims + key[len(self._items) :]
        ops: list[Op]
        if item.attempts >= self.max_attempts:
            ops = [
                Delete(key),
                Delete(claim),
                Put(self._dead + key[len(self._items) :], replace(item, error=reason).encode()),
            ]
        else:
            # The tail moves: an item free again must refuse any claim that did not see it free.
            ops = [Put(key, replace(item, error=reason, held=False).encode()), Delete(claim), Put(self._tail, b"")]
        return await self._chore([fence, Compare.mod(key, "==", kv.mod_revision)], ops)

    async def _bury(self, key: bytes, kv: KeyValue, item: _Item) -> int:
        """Move an item to the dead letters, if it is still as we saw it (another consumer may have done it)."""
        dead = self._dead + key[len(self._items) :]
        # Fenced by the record's mod revision: a record rewritten meanwhile (claimed, requeued) is left alone.
        return await self._chore(
            [Compare.mod(key, "==", kv.mod_revision)], [Delete(key), Put(dead, replace(item, held=False).encode())]
        )

    async def _chore(self, compares: list[Compare], ops: list[Op]) -> int:
        """A fenced chore: the revision to catch up to before looking again. Its own, done; refused (another
        consumer did it first), the newest revision of the keys it compared (0: they are gone; the next change)."""
        result = await self.session.backend.txn(compares, ops, _read_back(compares))
        return result.revision if result.succeeded else _newest(result)

    def _forget(self, *keys: bytes) -> None:
        """Our own deletion, known now: drop the keys from the kept view so the next claim does not compare
        against them (the watch brings the same deletion later; a view that is wrong only makes a claim fail)."""
        if self._subscription is not None:
            for key in keys:
                self._subscription.state.pop(key, None)

    # -- settling --------------------------------------------------------------------------------------

    async def _complete(self, task: Task) -> None:
        """Remove the item, fenced by our claim: only while the claim is the one we created."""
        claim, item_key = self._claims + task.id.encode(), self._items + task.id.encode()
        attempts = 0
        ops: list[Op] = [Delete(item_key), Delete(claim)]
        line = None
        if self._subscription is not None and self._line is None and not self.session.lost:
            # A consumer that leases in a loop leases again: take our place in line in this same transaction
            # (no write of its own), so the next item can be handed to us (left on `__aexit__` if not).
            line = _Line(uuid.uuid4().hex[:16], task._visibility, 0, anyio.current_time())
            ops.append(Put(self._waiting_key(line.visibility, line.token), b"", self.session.lease_id))
        lease = task._item.reply
        if lease is not None:
            # A request: its reply is written in the completion's transaction, so it exists exactly when the
            # item was completed. Bound to the producer's session lease, so a producer that is gone leaks nothing.
            ops.append(Put(self._replies + task.id.encode(), task._reply, lease))

        async def complete() -> TxnResult:
            nonlocal attempts
            attempts += 1
            # Fenced by our claim: a consumer whose claim ended cannot remove an item someone else now holds.
            return await self.session.backend.txn(
                [Compare.create(claim, "==", task._claim_revision)], ops, [Range(item_key, keys_only=True)]
            )

        try:
            result = await retry_call(complete)
        except LeaseExpiredError:
            # The producer's session lease is gone: write the reply without a lease (a producer still waiting
            # reads and deletes it; one that is gone leaves it, to be cleaned by `withdraw` or by hand).
            ops[-1] = Put(self._replies + task.id.encode(), task._reply)
            attempts = 0  # that attempt wrote nothing: a refusal now means the claim ended
            result = await retry_call(complete)
        if result.succeeded:
            self._forget(item_key, claim)
            if line is not None and self._subscription is not None:
                # Our place in line, known now (the next claim need not wait for the watch to bring it).
                self._line = replace(line, revision=result.revision)
                key, lease = self._waiting_key(line.visibility, line.token), self.session.lease_id
                self._subscription.state[key] = KeyValue(key, b"", result.revision, result.revision, 1, lease)
            return
        # Retried after an ambiguous failure and the item is gone: the earlier attempt (whose reply was lost)
        # removed it. On the first attempt, a failure means the claim ended before we finished.
        if attempts == 1 or getattr(result.responses[0], "kvs", True):
            raise ClaimLostError(f"item {task.id}: the claim ended before completion; the item was not removed")

    async def _settle(self, task: Task, *, error: str | None) -> None:
        """Give the item back after a failure (or dead-letter it); shielded, bounded, fenced by our claim.

        ``error`` None means the consumer was cancelled from outside: the delivery is not counted. If the store
        cannot be reached, the claim ends with the session's lease (or is taken back after its visibility timeout).
        """
        item_key, claim = self._items + task.id.encode(), self._claims + task.id.encode()
        item = replace(task._item, held=False)
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
        if isinstance(ops[0], Put):
            # The tail moves: the item is free again, so a claim that did not see it free must be refused.
            ops.append(Put(self._tail, b""))
        mine = Compare.create(claim, "==", task._claim_revision)
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.session.ttl):
            # Fenced by our claim, as the completion; the record and the claim change together.
            result = await retry_call(lambda: self.session.backend.txn([mine], ops))
            if result.succeeded and self._subscription is not None:
                # Our own write, known now. Never hide an item that is still there: the view would skip it.
                state = self._subscription.state
                state.pop(claim, None)
                if isinstance(ops[0], Put):
                    state[item_key] = KeyValue(item_key, ops[0].value, task._create_revision, result.revision, 0)
                    tail = state.get(self._tail)
                    if tail is not None and self._subscription.revision == result.revision - 1:
                        # Nothing was written between our view and this write: the view with it is exact.
                        state[self._tail] = tail._replace(mod_revision=result.revision)
