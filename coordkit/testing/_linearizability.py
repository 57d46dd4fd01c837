"""A linearizability checker: is there one order of a concurrent history's operations, consistent with real time,
in which a sequential model explains every result?

The search is Wing and Gong's, with the optimisations of Lowe's and of porcupine (Athalye): the history is cut into
independent partitions (P-compositionality: per key for a key-value store), each partition is searched on its own,
and every reached configuration (the set of operations linearized so far, as a bitset, and the model state) is
remembered, so no configuration is explored twice. One more pruning for ambiguous operations: a configuration is
skipped when one with the same state, the same definite operations and a subset of its ambiguous ones was seen.
Operations are call and return events in one time-ordered list;
an operation whose outcome is unknown (a lost reply, a timeout) returns at +infinity and may or may not have taken
effect: the search may place it anywhere after its call, or nowhere.

Guarantees: ``"ok"`` means a linearization exists (the checker is exact, not sampled); ``"illegal"`` means none
does, and the result carries a witness (the shortest prefix of one partition that already admits none) with the
longest partial linearization found in it; ``"unknown"`` means the time budget ran out first. The search is
exponential in the worst case (many concurrent operations with the same effect), linear-ish on real histories.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol, TypeVar, final

__all__ = ("UNKNOWN", "LinearizabilityResult", "Model", "Operation", "check_linearizable")

S = TypeVar("S", bound=Hashable)

#: how many operations of a partial linearization and of the stuck set an explanation shows
_SHOWN = 8
#: how many of the ambiguous-operation sets seen with one configuration a step compares its own with
_DOMINANCE_SCAN = 8
#: check the clock every this many search steps
_CLOCK_EVERY = 512


@final
class _Unknown:
    """The type of `UNKNOWN`."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


#: The output of an operation whose outcome is unknown (ambiguous failure): what a model's ``step`` receives for it.
UNKNOWN: Final = _Unknown()


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of a history: who called what, what came back, and when.

    Two operations are concurrent when their ``[call, ret]`` intervals overlap; equal times count as overlapping
    unless ``call_order``/``ret_order`` (a counter over every call and return event of the recording process, as
    `KvRecorder` keeps) say which came first.

    Attributes:
        client: who called (any hashable label; only shown in explanations).
        input: what was asked (the model's input type).
        output: what came back (the model's output type), or `UNKNOWN` for an ambiguous operation.
        call: when it was called.
        ret: when it returned; ``math.inf`` for an ambiguous operation (a lost reply, a timeout, a cancellation):
            it may or may not have taken effect, at any time after its call.
        call_order: tie-breaker for equal times (-1: none).
        ret_order: tie-breaker for equal times (-1: none).
    """

    client: Hashable
    input: Any
    output: Any
    call: float
    ret: float = math.inf
    call_order: int = -1
    ret_order: int = -1

    def __post_init__(self) -> None:
        if not self.call <= self.ret:
            raise ValueError(f"an operation returns after its call, not before: call {self.call}, ret {self.ret}")

    @property
    def ambiguous(self) -> bool:
        """Whether the outcome is unknown (it returned at +infinity)."""
        return self.ret == math.inf

    def _call_key(self) -> tuple[float, int]:
        return (self.call, self.call_order)

    def _ret_key(self) -> tuple[float, int]:
        # Without an order, calls sort before returns at the same time: such operations count as concurrent.
        return (self.ret, self.ret_order if self.ret_order >= 0 else 1 << 62)


class Model(Protocol[S]):
    """A sequential specification: what one object does when operations run one at a time.

    States must be immutable and hashable (equal states compare and hash equal): the checker remembers them.
    """

    def init(self) -> S:
        """The state before any operation."""
        ...

    def step(self, state: S, input: Any, output: Any) -> Iterable[S]:
        """The states the object can be in after ``input`` ran in ``state`` and returned ``output``.

        Return nothing when ``output`` is impossible from ``state``. ``output`` is `UNKNOWN` for an ambiguous
        operation: then return every state it could lead to if it took effect here (the checker takes care of
        "it never took effect"). A deterministic model returns at most one state; several are allowed.
        """
        ...

    def partition(self, history: Sequence[Operation]) -> Sequence[Sequence[Operation]]:
        """Cut the history into independent sub-histories (one per key of a key-value store); each is checked on
        its own. Return ``[history]`` when it cannot be cut. Operations that cannot affect any result (an
        ambiguous read) may be left out."""
        ...

    def describe_operation(self, input: Any, output: Any) -> str:
        """One line for an explanation, e.g. ``put('x', 1) -> ok``."""
        ...

    def describe_state(self, state: S) -> str:
        """A state, for an explanation."""
        ...


Outcome = Literal["ok", "illegal", "unknown"]


@final
@dataclass(frozen=True, slots=True)
class LinearizabilityResult:
    """What `check_linearizable` found. True in a boolean context only when the history is linearizable.

    ``assert result, result`` fails a test with the explanation.

    Attributes:
        outcome: ``"ok"`` (linearizable), ``"illegal"`` (not), ``"unknown"`` (the time budget ran out).
        operations: operations in the history.
        ambiguous: how many of them have an unknown outcome.
        partitions: independent sub-histories the model cut it into.
        elapsed: seconds the check took.
        fragment: for ``"illegal"``: the shortest prefix of the failing partition that admits no linearization
            (operations still running at its end count as ambiguous): a complete witness on its own.
        linearized: for ``"illegal"``: the longest partial linearization of ``fragment`` the search found, in order.
        stuck: for ``"illegal"``: the operations of ``fragment`` (with a known outcome) left out of ``linearized``:
            none of them can come next.
        explanation: readable text for a test failure.
    """

    outcome: Outcome
    operations: int
    ambiguous: int
    partitions: int
    elapsed: float
    fragment: tuple[Operation, ...] = ()
    linearized: tuple[Operation, ...] = ()
    stuck: tuple[Operation, ...] = ()
    explanation: str = ""

    @property
    def linearizable(self) -> bool:
        """Whether a linearization was found."""
        return self.outcome == "ok"

    def __bool__(self) -> bool:
        return self.outcome == "ok"

    def __str__(self) -> str:
        head = (
            f"{self.outcome}: {self.operations} operations ({self.ambiguous} ambiguous) in {self.partitions} "
            f"partitions, checked in {self.elapsed:.3f} s"
        )
        return f"{head}\n{self.explanation}" if self.explanation else head


def check_linearizable(
    model: Model[S], history: Sequence[Operation], *, timeout: float | None = None
) -> LinearizabilityResult:
    """Decide whether ``history`` is linearizable with respect to ``model``.

    Args:
        model: the sequential specification (and how to partition the history).
        history: the operations, in any order.
        timeout: budget in seconds of real (CPU) time, not of the event loop's clock: the search is synchronous.
            When it runs out the outcome is ``"unknown"``. None: no limit.

    Returns:
        The outcome; for a history that is not linearizable, a witness and a readable explanation.
    """
    started = time.monotonic()
    deadline = math.inf if timeout is None else started + timeout
    ambiguous = sum(op.ambiguous for op in history)
    partitions = [list(p) for p in model.partition(history)]
    # Small partitions first: a violation in any partition decides the whole history.
    partitions.sort(key=len)
    outcome: Outcome = "ok"
    for ops in partitions:
        found = _search(model, ops, deadline)
        if found is None:
            outcome = "unknown"
            continue
        if not found.ok:
            fragment, search = _shortest_illegal_prefix(model, ops, found, deadline)
            linearized = tuple(fragment[i] for i in search.longest)
            placed = set(search.longest)
            stuck = tuple(op for i, op in enumerate(fragment) if i not in placed and not op.ambiguous)
            return LinearizabilityResult(
                "illegal",
                len(history),
                ambiguous,
                len(partitions),
                time.monotonic() - started,
                tuple(fragment),
                linearized,
                stuck,
                _explain(model, fragment, linearized, stuck, search.longest_state),
            )
    return LinearizabilityResult(outcome, len(history), ambiguous, len(partitions), time.monotonic() - started)


# -- the search ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Search:
    ok: bool
    #: indexes (into the partition) of the longest partial linearization found, in order
    longest: list[int]
    longest_state: frozenset[Any]


def _search(model: Model[Any], ops: Sequence[Operation], deadline: float) -> _Search | None:
    """Wing-Gong search with memoization over one partition. None when the deadline passed."""
    n = len(ops)
    events = sorted(
        [(op._call_key(), 0, i) for i, op in enumerate(ops)] + [(op._ret_key(), 1, i) for i, op in enumerate(ops)]
    )
    # A doubly linked list of the events (index 2n is the head), from which linearized operations are lifted.
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    node_op = [0] * (2 * n)
    is_call = [False] * (2 * n)
    match = [-1] * (2 * n)
    call_node = [0] * n
    previous = head
    for node, (_, kind, i) in enumerate(events):
        node_op[node] = i
        is_call[node] = kind == 0
        if kind == 0:
            call_node[i] = node
        else:
            match[call_node[i]] = node
        nxt[previous] = node
        prv[node] = previous
        previous = node

    def unlink(x: int) -> None:
        nxt[prv[x]] = nxt[x]
        if nxt[x] != -1:
            prv[nxt[x]] = prv[x]

    def relink(x: int) -> None:
        nxt[prv[x]] = x
        if nxt[x] != -1:
            prv[nxt[x]] = x

    definite = [not op.ambiguous for op in ops]
    remaining = sum(definite)
    optional = sum(1 << i for i, op in enumerate(ops) if op.ambiguous)
    state: frozenset[Any] = frozenset((model.init(),))
    linearized = 0
    # (definite operations linearized, state) -> the sets of ambiguous operations linearized with them so far.
    # A configuration is explored only if no configuration seen had the same definite part and state with a subset
    # of its ambiguous operations: whatever can follow this one can follow that one too (an ambiguous operation
    # may always be left out, and never has to come before anything), so this one cannot succeed where that failed.
    seen: dict[tuple[int, frozenset[Any]], tuple[set[int], list[int]]] = {}
    stack: list[tuple[int, frozenset[Any], int]] = []
    longest: list[int] = []
    longest_count = -1
    longest_state = state
    steps = 0
    # Each scan for the next operation to linearize goes over the calls before the first return twice: the definite
    # operations first (phase 0), then the ambiguous ones (phase 1). Leaving ambiguous operations out as long as
    # possible reaches the configurations with fewer of them first, which then dominate the others.
    entry, phase = nxt[head], 0
    while remaining:
        steps += 1
        if steps % _CLOCK_EVERY == 0 and time.monotonic() > deadline:
            return None
        if not is_call[entry]:
            if phase == 0:
                entry, phase = nxt[head], 1
                continue
            # A return reached before its call was linearized: this prefix of choices fails. Undo the last one.
            if not stack:
                return _Search(False, longest, longest_state)
            entry, state, phase = stack.pop()
            i = node_op[entry]
            linearized &= ~(1 << i)
            relink(match[entry])
            relink(entry)
            if definite[i]:
                remaining += 1
            entry = nxt[entry]
            continue
        i = node_op[entry]
        if definite[i] == (phase == 1):  # not this phase's kind
            entry = nxt[entry]
            continue
        op = ops[i]
        output = UNKNOWN if op.ambiguous else op.output
        after = frozenset(s for before in state for s in model.step(before, op.input, output))
        if after:
            bits = linearized | (1 << i)
            chosen = bits & optional
            exact, first = seen.setdefault((bits & ~optional, after), (set(), []))
            # Dominated: seen with the same ambiguous operations, or with a subset of them (looked for among the
            # first few seen, which come with the fewest: a bounded look keeps each step cheap).
            if chosen not in exact and all(earlier & ~chosen for earlier in first):
                exact.add(chosen)
                if len(first) < _DOMINANCE_SCAN:
                    first.append(chosen)
                stack.append((entry, state, phase))
                state, linearized = after, bits
                unlink(entry)
                unlink(match[entry])
                if definite[i]:
                    remaining -= 1
                if len(stack) > longest_count:
                    longest_count = len(stack)
                    longest = [node_op[node] for node, _, _ in stack]
                    longest_state = state
                entry, phase = nxt[head], 0
                continue
        entry = nxt[entry]
    order = [node_op[node] for node, _, _ in stack]
    return _Search(True, order, state)


def _prefix(ops: Sequence[Operation], cut: tuple[float, int]) -> list[Operation]:
    """The history up to the return event ``cut``: operations called before it; those still running, ambiguous."""
    kept = []
    for op in ops:
        if op._call_key() < cut:
            kept.append(op if op._ret_key() <= cut else replace(op, output=UNKNOWN, ret=math.inf, ret_order=-1))
    return kept


def _shortest_illegal_prefix(
    model: Model[Any], ops: list[Operation], whole: _Search, deadline: float
) -> tuple[list[Operation], _Search]:
    """Binary search over the return events for the shortest prefix that admits no linearization.

    Sound because linearizability is prefix-closed: a prefix of a linearizable history (running operations made
    ambiguous) is linearizable. Returns the whole partition when the budget runs out.
    """
    cuts = sorted(op._ret_key() for op in ops if not op.ambiguous)
    best, best_search = ops, whole
    lo, hi = 0, len(cuts) - 1  # the prefix at cuts[hi] (the whole partition's definite part) is illegal
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = _prefix(ops, cuts[mid])
        found = _search(model, prefix, deadline)
        if found is None:
            break
        if found.ok:
            lo = mid + 1
        else:
            hi = mid
            best, best_search = prefix, found
    if best is ops and lo == hi and cuts:
        prefix = _prefix(ops, cuts[lo])
        found = _search(model, prefix, deadline)
        if found is not None and not found.ok:
            best, best_search = prefix, found
    return best, best_search


# -- explanations ----------------------------------------------------------------------------------------------


def _describe(model: Model[Any], op: Operation) -> str:
    ret = "      ?" if op.ambiguous else f"{op.ret:7.3f}"
    output = UNKNOWN if op.ambiguous else op.output
    return f"[{op.call:7.3f}, {ret}] {op.client}: {model.describe_operation(op.input, output)}"


def _explain(
    model: Model[Any],
    fragment: Sequence[Operation],
    linearized: Sequence[Operation],
    stuck: Sequence[Operation],
    state: frozenset[Any],
) -> str:
    lines = [f"not linearizable: the shortest failing prefix of one partition has {len(fragment)} operations."]
    shown = linearized[-_SHOWN:]
    skipped = len(linearized) - len(shown)
    lines.append(
        f"Longest linearization found ({len(linearized)} operations"
        + (f", the first {skipped} not shown" if skipped else "")
        + "):"
    )
    lines += [f"  {_describe(model, op)}" for op in shown]
    states = sorted(model.describe_state(s) for s in state)
    lines.append("state after it: " + " | ".join(states))
    lines.append(f"none of these can come next ({len(stuck)}):")
    lines += [f"  {_describe(model, op)}" for op in sorted(stuck, key=lambda op: op._call_key())[:_SHOWN]]
    if len(stuck) > _SHOWN:
        lines.append(f"  ... and {len(stuck) - _SHOWN} more")
    return "\n".join(lines)
