"""A history of what chaos clients did and saw, and the checker of coordkit's guarantees over it.

Every entry is stamped with a `Stamp`: the virtual time and a sequence number. The event loop runs one task at a
time, so sequence numbers order everything exactly, more finely than the clock can: "two holders inside their
guarded blocks at the same virtual instant" is checked on that order, so a successor that enters at the very
instant its predecessor is cancelled (but before the predecessor's cancellation ran) is caught too.

What DESIGN.md promises, and so what is checked:

- A guarded block ends before the server can expire its lease. So at the instant a block ends, its lease must
  still be alive in the store, and at most one Lock holder (``limit`` Semaphore holders, one leader, one computer
  of a once(), one member per id) is inside at any point of the order.
- A lease expired by force (`MemoryFaults.expire_lease`, an operator's revoke) is the one exception: the client
  cannot know before its next keepalive, so from the revoke on its blocks no longer count as holding (only
  fenced writes keep the resource safe then). Nothing else is exempt.
- Fencing tokens and election terms strictly increase across successive holders; semaphore tokens are unique.
- A counter written with the holder's guard compare never loses or invents an update: the values the store
  applied go 1, 2, 3, ..., each applied write was reported as such, and the final value is the number of
  increments that reported success (plus ambiguous ones the store shows were applied).
- Election observers report leaders in the store's order: never a stale one after a newer one, never one the
  store did not have. Config and group views never go back in revision, show exactly the store's state at the
  revision they claim, and the views alive at the end show the store's final state.
- Releases release: once all work has stopped and the faults are healed, no lock, permit, candidate or claim key
  is left (a crashed client's go when its lease expires; a live client's never should).
- once(): all callers that got a result got the same one, the result was stored once and never overwritten,
  and nobody computed again after a result had been returned.

The store's true history comes from an `Oracle` that replays `MemoryStore.batches_from` (it must catch up
before every compaction).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import anyio

from coordkit import EventType, KeyValue, MemoryStore

#: Normalised state an observer reports: a leader ``(term, value)`` or None, or a key -> value mapping.
State = tuple[int, bytes] | None | Mapping[str, object]


@dataclass(frozen=True, order=True, slots=True)
class Stamp:
    """When something happened: ``seq`` orders every stamp of a run exactly; ``time`` is the virtual clock."""

    seq: int
    time: float

    def __str__(self) -> str:
        return f"t={self.time:.3f}#{self.seq}"


class Kind(Enum):
    """What a hold is of."""

    LOCK = "lock"
    SEMAPHORE = "semaphore"
    LEADER = "leader"
    COMPUTER = "once computer"
    MEMBER = "member"
    READ = "read lock"
    WRITE = "write lock"


#: Kinds whose successive holders must have strictly increasing tokens.
ORDERED_KINDS = frozenset({Kind.LOCK, Kind.LEADER, Kind.WRITE})
#: Shared holds: any number at once, but never beside a hold of the exclusive kind of the same resource.
SHARED_KINDS = {Kind.READ: Kind.WRITE}


@dataclass(slots=True)
class Hold:
    """One guarded block: a lock or permit held, a leadership, a once() computation, a membership.

    Attributes:
        lease_alive: whether the holder's lease was alive in the store at the instant the block ended.
    """

    kind: Kind
    resource: str
    holder: str
    lease: int
    token: int
    limit: int
    start: Stamp
    end: Stamp | None = None
    lease_alive: bool = True

    def __str__(self) -> str:
        return (
            f"{self.kind.value} {self.resource!r} held by {self.holder} (token {self.token}) {self.start}..{self.end}"
        )


class Outcome(Enum):
    """What a fenced write reported."""

    PENDING = "pending"
    APPLIED = "applied"
    REFUSED = "refused"
    AMBIGUOUS = "ambiguous"  # raised (or was cancelled): the caller cannot tell


@dataclass(slots=True)
class Increment:
    """One guarded read-modify-write of a counter; the value written is ``b"<n> <token> <op>"``."""

    counter: bytes
    op: str
    holder: str
    token: int
    outcome: Outcome = Outcome.PENDING


@dataclass(slots=True)
class Trace:
    """What one observer saw, in order: ``(stamp, revision, state)``; revision 0 when the API gives none."""

    observer: str
    kind: str  # "leader", "config" or "group"
    prefix: bytes
    seen: list[tuple[Stamp, int, State]] = field(default_factory=list)


@dataclass(slots=True)
class BarrierWait:
    """A `Barrier.wait()` that returned: it must have seen the barrier down at some revision in between."""

    key: bytes
    waiter: str
    first_revision: int  # the store's revision when the wait began
    last_revision: int  # ... and when it returned


@dataclass(frozen=True, slots=True)
class OnceResult:
    """A once() call that returned a value."""

    name: str
    caller: str
    stamp: Stamp
    value: bytes


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken guarantee; ``rule`` names it: exclusion, lease, token, counter, cas, leader, view, once, barrier,
    leak or liveness (the last is found by the schedule itself: work still running long after the faults healed)."""

    rule: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.detail}"


@dataclass(slots=True)
class Counts:
    """Outcomes of compare-and-swap publishes of one key."""

    succeeded: int = 0
    ambiguous: int = 0


class History:
    """Everything the clients of one schedule did and saw, stamped."""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self.holds: list[Hold] = []
        self.revoked: dict[int, Stamp] = {}  # lease -> when it was expired by force
        self.increments: list[Increment] = []
        self.publishes: dict[str, Counts] = defaultdict(Counts)  # CAS publishes per config key
        self.traces: list[Trace] = []
        self.once_results: list[OnceResult] = []
        self.barrier_waits: list[BarrierWait] = []
        self.survivors: set[str] = set()  # observers still following the store at the end
        self.released: list[bytes] = []  # key prefixes every owner must have left by the end
        self.final_revision = 0

    def stamp(self) -> Stamp:
        return Stamp(next(self._seq), anyio.current_time())

    def begin(self, kind: Kind, resource: str, holder: str, lease: int, token: int, *, limit: int = 1) -> Hold:
        hold = Hold(kind, resource, holder, lease, token, limit, self.stamp())
        self.holds.append(hold)
        return hold

    def end(self, hold: Hold, *, lease_alive: bool) -> None:
        hold.end = self.stamp()
        hold.lease_alive = lease_alive

    def revoke(self, lease: int) -> None:
        """Record that ``lease`` is expired by force now (call just before expiring it)."""
        self.revoked.setdefault(lease, self.stamp())

    def increment(self, counter: bytes, holder: str, token: int) -> Increment:
        increment = Increment(counter, f"op{len(self.increments)}", holder, token)
        self.increments.append(increment)
        return increment

    def trace(self, observer: str, kind: str, prefix: bytes) -> Trace:
        trace = Trace(observer, kind, prefix)
        self.traces.append(trace)
        return trace

    def saw(self, trace: Trace, revision: int, state: State) -> None:
        trace.seen.append((self.stamp(), revision, state))

    def once_returned(self, name: str, caller: str, value: bytes) -> None:
        self.once_results.append(OnceResult(name, caller, self.stamp(), value))

    def valid_until(self, hold: Hold) -> Stamp | None:
        """The end of ``hold`` as a holder: its end, or the forced expiry of its lease if that came first."""
        revoked = self.revoked.get(hold.lease)
        if revoked is None or (hold.end is not None and hold.end < revoked):
            return hold.end
        return revoked


class Oracle:
    """The store's true history for some prefixes, replayed from `MemoryStore.batches_from`.

    Call `catch_up` before every compaction (or the history it needs is gone) and before reading it.
    """

    def __init__(self, store: MemoryStore, prefixes: Iterable[bytes]) -> None:
        if store.revision != 1:
            raise ValueError("the oracle must see the store from its first revision")
        self.store = store
        self.revision = 1
        self._states: dict[bytes, dict[bytes, KeyValue]] = {prefix: {} for prefix in prefixes}
        self._timelines: dict[bytes, tuple[list[int], list[dict[bytes, KeyValue]]]] = {
            prefix: ([1], [{}]) for prefix in self._states
        }
        self.writes: dict[bytes, list[bytes | None]] = defaultdict(list)  # per key, every value put (None: deleted)

    def catch_up(self) -> None:
        """Replay what the store committed since the last call (expiring due leases first, as any call would)."""
        self.store.expire_due()
        for batch in self.store.batches_from(self.revision + 1):
            touched: set[bytes] = set()
            for event in batch.events:
                key, put = event.kv.key, event.type is EventType.PUT
                prefixes = [prefix for prefix in self._states if key.startswith(prefix)]
                for prefix in prefixes:
                    if put:
                        self._states[prefix][key] = event.kv
                    else:
                        self._states[prefix].pop(key, None)
                if prefixes:
                    touched.update(prefixes)
                    self.writes[key].append(event.kv.value if put else None)
            for prefix in touched:
                revisions, states = self._timelines[prefix]
                revisions.append(batch.revision)
                states.append(dict(self._states[prefix]))
        self.revision = self.store.revision

    def state_at(self, prefix: bytes, revision: int) -> dict[bytes, KeyValue]:
        """The keys under ``prefix`` at ``revision``."""
        revisions, states = self._timelines[prefix]
        return states[max(0, bisect.bisect_right(revisions, revision) - 1)]

    def puts(self, key: bytes) -> list[bytes]:
        """Every value the store put at ``key``, in order."""
        return [value for value in self.writes.get(key, []) if value is not None]

    def keys_at(self, key_prefix: bytes, revision: int) -> list[KeyValue]:
        """The keys starting with ``key_prefix`` at ``revision`` (it must lie under a prefix the oracle follows)."""
        (followed,) = (prefix for prefix in self._timelines if key_prefix.startswith(prefix))
        return [kv for key, kv in self.state_at(followed, revision).items() if key.startswith(key_prefix)]

    def revisions_touching(self, key_prefix: bytes, first: int, last: int) -> list[int]:
        """The revisions in ``first..last`` at which the followed prefix holding ``key_prefix`` changed."""
        (followed,) = (prefix for prefix in self._timelines if key_prefix.startswith(prefix))
        revisions = self._timelines[followed][0]
        return [revision for revision in revisions if first <= revision <= last]

    def states(self, prefix: bytes) -> list[dict[bytes, KeyValue]]:
        """Every state of ``prefix``, in revision order."""
        return self._timelines[prefix][1]


def normalise(kind: str, prefix: bytes, kvs: Mapping[bytes, KeyValue]) -> State:
    """The state an observer of ``kind`` should report for these keys."""
    if kind == "leader":
        first = min(kvs.values(), key=lambda kv: kv.create_revision, default=None)
        return None if first is None else (first.create_revision, first.value)
    if kind == "config":
        return {key[len(prefix) :].decode(): json.loads(kv.value) for key, kv in kvs.items()}
    return {key[len(prefix) :].decode(): kv.value for key, kv in kvs.items()}


def caught_up(trace: Trace, oracle: Oracle, revision: int) -> bool:
    """Whether the last thing ``trace`` saw is the store's state at ``revision``."""
    expected = normalise(trace.kind, trace.prefix, oracle.state_at(trace.prefix, revision))
    return bool(trace.seen) and trace.seen[-1][2] == expected


def leaked(history: History, oracle: Oracle, revision: int) -> list[KeyValue]:
    """Keys under ``history.released`` still there at ``revision``."""
    return [kv for prefix in history.released for kv in oracle.keys_at(prefix, revision)]


# -- the checker -----------------------------------------------------------------------------------------


def check(history: History, oracle: Oracle) -> list[Violation]:
    """Every broken guarantee in ``history``, given the store's true history (empty: all held)."""
    return [
        *check_holds(history),
        *check_tokens(history),
        *check_counters(history, oracle),
        *check_publishes(history, oracle),
        *check_traces(history, oracle),
        *check_once(history, oracle),
        *check_read_write(history),
        *check_barriers(history, oracle),
        *(
            Violation("leak", f"{kv.key!r} (lease {kv.lease:x}) is left after all work stopped and faults healed")
            for kv in leaked(history, oracle, history.final_revision)
        ),
    ]


def _by_resource(holds: Iterable[Hold]) -> dict[tuple[Kind, str], list[Hold]]:
    grouped: dict[tuple[Kind, str], list[Hold]] = defaultdict(list)
    for hold in holds:
        grouped[hold.kind, hold.resource].append(hold)
    return grouped


def check_holds(history: History) -> list[Violation]:
    """Each block ended while its lease lived; never more than ``limit`` valid holders at once."""
    found: list[Violation] = []
    for hold in history.holds:
        if hold.end is None:
            found.append(Violation("exclusion", f"never ended: {hold}"))
        elif not hold.lease_alive and history.valid_until(hold) == hold.end:
            found.append(Violation("lease", f"the block outlived its lease on the server: {hold}"))
    for holds in _by_resource(history.holds).values():
        found.extend(_overlaps(history, holds))
    return found


def _never_valid(history: History, hold: Hold) -> bool:
    until = history.valid_until(hold)
    return until is not None and until <= hold.start


def _entries(history: History, holds: Sequence[Hold]) -> Iterator[tuple[int, list[int]]]:
    """Walk the holds' valid intervals in the order things happened: each entering hold's index, with the indices
    of the holds inside at that moment."""
    points: list[tuple[int, bool, int]] = []  # (seq, entering, index)
    for index, hold in enumerate(holds):
        if _never_valid(history, hold):
            continue  # its lease was revoked before it entered
        until = history.valid_until(hold)
        points.append((hold.start.seq, True, index))
        points.append((until.seq if until is not None else 1 << 62, False, index))
    inside: list[int] = []
    for _, entering, index in sorted(points):
        if entering:
            yield index, list(inside)
            inside.append(index)
        else:
            inside.remove(index)


def _overlaps(history: History, holds: Sequence[Hold]) -> Iterator[Violation]:
    for index, inside in _entries(history, holds):
        hold = holds[index]
        if len(inside) + 1 > hold.limit:
            others = "; ".join(str(holds[other]) for other in inside)
            yield Violation("exclusion", f"{hold} entered while {len(inside)} held it: {others}")


def check_read_write(history: History) -> list[Violation]:
    """A shared hold (a read lock) never overlaps an exclusive one (a write lock) of the same resource."""
    found: list[Violation] = []
    for shared_kind, exclusive_kind in SHARED_KINDS.items():
        by_resource: dict[str, list[Hold]] = defaultdict(list)
        for hold in history.holds:
            if hold.kind in (shared_kind, exclusive_kind):
                by_resource[hold.resource].append(hold)
        for holds in by_resource.values():
            for index, inside in _entries(history, holds):
                hold = holds[index]
                clash = [holds[i] for i in inside if exclusive_kind in (hold.kind, holds[i].kind)]
                if clash:
                    found.append(Violation("exclusion", f"{hold} entered while {'; '.join(map(str, clash))}"))
    return found


def check_barriers(history: History, oracle: Oracle) -> list[Violation]:
    """A barrier wait returned only if the barrier was down at some revision while it waited."""
    found: list[Violation] = []
    for wait in history.barrier_waits:
        revisions = [wait.first_revision, *oracle.revisions_touching(wait.key, wait.first_revision, wait.last_revision)]
        if all(oracle.keys_at(wait.key, revision) for revision in revisions):
            found.append(
                Violation(
                    "barrier",
                    f"{wait.waiter} passed {wait.key!r}, held at every revision "
                    f"{wait.first_revision}..{wait.last_revision}",
                )
            )
    return found


def check_tokens(history: History) -> list[Violation]:
    """Tokens strictly increase across successive holders (locks, leaders) and never repeat (permits)."""
    found: list[Violation] = []
    for (kind, resource), holds in _by_resource(history.holds).items():
        # A block entered after its lease was revoked by force never validly held (a late reply told it it was
        # its turn): fencing refuses its writes; its token says nothing about the order of holders.
        holds = [hold for hold in holds if not _never_valid(history, hold)]
        if kind in ORDERED_KINDS:
            ordered = sorted(holds, key=lambda hold: hold.start)
            for before, after in itertools.pairwise(ordered):
                if after.token <= before.token:
                    found.append(Violation("token", f"{after} follows {before}: token did not increase"))
        elif kind is Kind.SEMAPHORE:
            tokens = [hold.token for hold in holds]
            repeated = sorted({token for token in tokens if tokens.count(token) > 1})
            if repeated:
                found.append(Violation("token", f"semaphore {resource!r}: permit tokens repeated: {repeated}"))
    return found


def check_counters(history: History, oracle: Oracle) -> list[Violation]:
    """Fenced counters: no lost update, no phantom one, final value = successful increments."""
    found: list[Violation] = []
    by_counter: dict[bytes, list[Increment]] = defaultdict(list)
    for increment in history.increments:
        by_counter[increment.counter].append(increment)
    for counter, increments in by_counter.items():
        found.extend(_check_counter(counter, increments, oracle.puts(counter)))
    return found


def _check_counter(counter: bytes, increments: Sequence[Increment], applied: Sequence[bytes]) -> Iterator[Violation]:
    name = counter.decode()
    writes = [value.decode().split() for value in applied]
    for index, (number, _, op) in enumerate(writes):
        if int(number) != index + 1:
            yield Violation("counter", f"{name}: write #{index + 1} ({op}) set {number}: an update was lost")
    for (_, before, _), (_, after, op) in itertools.pairwise(writes):
        if int(after) < int(before):
            yield Violation("counter", f"{name}: {op} with token {after} applied after token {before}")
    applied_ops = {op for _, _, op in writes}
    reported = {increment.op: increment for increment in increments}
    for increment in increments:
        if increment.outcome is Outcome.APPLIED and increment.op not in applied_ops:
            yield Violation("counter", f"{name}: {increment.op} reported success but the store never applied it")
        if increment.outcome in (Outcome.REFUSED, Outcome.PENDING) and increment.op in applied_ops:
            yield Violation("counter", f"{name}: {increment.op} was {increment.outcome.value} but the store applied it")
    for op in applied_ops - reported.keys():
        yield Violation("counter", f"{name}: the store applied {op}, which nobody wrote")
    final = int(writes[-1][0]) if writes else 0
    succeeded = sum(increment.outcome is Outcome.APPLIED for increment in increments)
    ambiguous = sum(reported[op].outcome is Outcome.AMBIGUOUS for op in applied_ops if op in reported)
    if final != succeeded + ambiguous:
        yield Violation(
            "counter",
            f"{name}: final value {final} != {succeeded} successful fenced increments + {ambiguous} ambiguous applied",
        )


def check_publishes(history: History, oracle: Oracle) -> list[Violation]:
    """Compare-and-swap publishes of ``value + 1`` (or deletes): the values applied since the last delete go 1, 2,
    3; none lost or invented."""
    found: list[Violation] = []
    for key, counts in history.publishes.items():
        values = [None if value is None else json.loads(value) for value in oracle.writes.get(key.encode(), [])]
        expected = list(itertools.accumulate(values, lambda last, value: None if value is None else (last or 0) + 1))
        if values and values[0] is not None:
            expected[0] = 1
        if values != expected:
            found.append(Violation("cas", f"{key}: applied values {values}: a compare-and-swap lost an update"))
        if not counts.succeeded <= len(values) <= counts.succeeded + counts.ambiguous:
            found.append(
                Violation(
                    "cas",
                    f"{key}: {len(values)} writes applied, {counts.succeeded} reported success, "
                    f"{counts.ambiguous} ambiguous",
                )
            )
    return found


def check_traces(history: History, oracle: Oracle) -> list[Violation]:
    """Observers report the store's states in its order; survivors end on its final state."""
    found: list[Violation] = []
    for trace in history.traces:
        if trace.kind == "leader":
            found.extend(_check_leader_trace(trace, oracle))
        else:
            found.extend(_check_view_trace(trace, oracle))
        if trace.observer in history.survivors and not caught_up(trace, oracle, history.final_revision):
            last = trace.seen[-1][2] if trace.seen else "nothing"
            expected = normalise(trace.kind, trace.prefix, oracle.state_at(trace.prefix, history.final_revision))
            found.append(
                Violation(
                    "leader" if trace.kind == "leader" else "view",
                    f"{trace.kind} observer {trace.observer} ends on {last!r}, the store on {expected!r}",
                )
            )
    return found


def _check_leader_trace(trace: Trace, oracle: Oracle) -> Iterator[Violation]:
    newest = 0
    previous: State = None
    for stamp, _, state in trace.seen:
        if isinstance(state, tuple):
            term = state[0]
            if term < newest or (term == newest and previous is None):
                yield Violation("leader", f"observer {trace.observer} saw stale leader {state!r} at {stamp}")
            newest = max(newest, term)
        previous = state
    # What it saw must be a subsequence of the leaders the store had, in order (it may skip some).
    truth = [normalise("leader", trace.prefix, kvs) for kvs in oracle.states(trace.prefix)]
    position = 0
    for stamp, _, state in trace.seen:
        while position < len(truth) and truth[position] != state:
            position += 1
        if position == len(truth):
            yield Violation("leader", f"observer {trace.observer} saw {state!r} at {stamp}, not in the store's order")
            return


def _check_view_trace(trace: Trace, oracle: Oracle) -> Iterator[Violation]:
    newest = 0
    for stamp, revision, state in trace.seen:
        if revision < newest:
            yield Violation("view", f"{trace.kind} view {trace.observer} went back from {newest} to {revision}")
        newest = max(newest, revision)
        expected = normalise(trace.kind, trace.prefix, oracle.state_at(trace.prefix, revision))
        if state != expected:
            yield Violation(
                "view",
                f"{trace.kind} view {trace.observer} at {stamp} shows {state!r} as revision {revision}; "
                f"the store had {expected!r}",
            )


def check_once(history: History, oracle: Oracle) -> list[Violation]:
    """One result per name, stored once, returned to everyone; no computation after a result was returned."""
    found: list[Violation] = []
    results: dict[str, list[OnceResult]] = defaultdict(list)
    for result in history.once_results:
        results[result.name].append(result)
    for name, returned in results.items():
        values = sorted({result.value for result in returned})
        stored = oracle.puts(name.encode() + b"/result")
        if len(values) > 1:
            found.append(Violation("once", f"{name}: callers got different results {values}"))
        if len(stored) > 1:
            found.append(Violation("once", f"{name}: the result was written {len(stored)} times: {stored}"))
        elif stored != values[:1]:
            found.append(Violation("once", f"{name}: callers got {values}, the store holds {stored}"))
        first = min(result.stamp for result in returned)
        for hold in history.holds:
            if hold.kind is Kind.COMPUTER and hold.resource == name and hold.start > first:
                found.append(Violation("once", f"{name}: {hold.holder} computed again after a result at {first}"))
    return found
