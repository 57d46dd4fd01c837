"""A key-value model of coordkit's store for the linearizability checker, and a recorder of real histories.

The model is per key (get, put, compare-and-swap on the value or the mod revision, delete), with etcd's
revisions checked as far as one key can see them: the writes of a key get strictly increasing revisions, a read
never shows a store revision older than the last write or read before it, a key's mod revision is the revision of
its last write and its version counts the puts since it was created. (Cross-key order of revisions is not
checked: partitioning per key gives that up, as porcupine's etcd model does.)
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, final

import anyio

from .._backends.protocol import Backend
from .._backends.types import Compare, Delete, DeleteResult, Put, Range
from .._errors import BackendError
from ._linearizability import UNKNOWN, Operation

__all__ = ("KvCas", "KvClient", "KvDelete", "KvGet", "KvModel", "KvPut", "KvRecorder", "KvReply")


@dataclass(frozen=True, slots=True)
class KvGet:
    """Read ``key`` (output: `KvReply` with ``value``, ``mod_revision``, ``version``; ``value`` None if absent)."""

    key: bytes


@dataclass(frozen=True, slots=True)
class KvPut:
    """Write ``value`` at ``key`` unconditionally (output: `KvReply` with the write's ``revision``)."""

    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class KvCas:
    """Write ``value`` at ``key`` if the key's value is ``expect_value``, or (exactly one of the two) if its mod
    revision is ``expect_mod_revision`` (0: the key must not exist). Output: `KvReply` with ``succeeded``.

    As in etcd, a value compare on a missing key fails.
    """

    key: bytes
    value: bytes
    expect_value: bytes | None = None
    expect_mod_revision: int | None = None

    def __post_init__(self) -> None:
        if (self.expect_value is None) == (self.expect_mod_revision is None):
            raise ValueError("give exactly one of expect_value and expect_mod_revision")


@dataclass(frozen=True, slots=True)
class KvDelete:
    """Delete ``key`` (output: `KvReply` with ``deleted``, 0 or 1)."""

    key: bytes


KvInput = KvGet | KvPut | KvCas | KvDelete


@dataclass(frozen=True, slots=True)
class KvReply:
    """What a key-value operation returned. None in a field means "not recorded": that part is not checked.

    Attributes:
        revision: the store revision of the reply's header (for a write that changed something, its own revision).
        succeeded: for `KvCas`: whether the compare held.
        value: for `KvGet`: the value read, None when the key is absent.
        mod_revision: for `KvGet` of a present key: its mod revision.
        version: for `KvGet`: its version (0 when absent).
        deleted: for `KvDelete`: how many keys it deleted.
    """

    revision: int | None = None
    succeeded: bool = True
    value: bytes | None = None
    mod_revision: int | None = None
    version: int | None = None
    deleted: int = 0


class KvState(NamedTuple):
    """One key, as the model knows it at one point of a linearization."""

    value: bytes | None
    version: int
    #: the mod revision when ``mod_known``; else an exclusive lower bound (an ambiguous write set it)
    mod_revision: int
    mod_known: bool
    #: the newest store revision seen so far in the key's linearization (0 at first)
    revision: int


_ABSENT = KvState(None, 0, 0, True, 0)


@final
class KvModel:
    """The `Model` of coordkit's store for `KvGet`, `KvPut`, `KvCas` and `KvDelete`, partitioned per key.

    Keys start absent: record the history in a fresh namespace. Ambiguous reads are left out (they cannot
    change anything).
    """

    def init(self) -> KvState:
        """An absent key."""
        return _ABSENT

    def partition(self, history: Sequence[Operation]) -> list[list[Operation]]:
        """One sub-history per key, without ambiguous reads."""
        keys: defaultdict[bytes, list[Operation]] = defaultdict(list)
        for op in history:
            if not isinstance(op.input, KvGet | KvPut | KvCas | KvDelete):
                raise TypeError(f"KvModel checks KvGet, KvPut, KvCas and KvDelete, not {type(op.input).__name__}")
            if op.ambiguous and isinstance(op.input, KvGet):
                continue
            keys[op.input.key].append(op)
        return list(keys.values())

    def step(self, state: KvState, input: Any, output: Any) -> Iterable[KvState]:
        """The states after ``input`` returned ``output`` (`UNKNOWN`: it took effect, its reply unknown)."""
        known = output is not UNKNOWN
        revision: int | None = output.revision if known else None
        if isinstance(input, KvGet):
            return self._get(state, output) if known else (state,)
        if isinstance(input, KvPut):
            return _write(state, input.value, revision)
        if isinstance(input, KvDelete):
            if state.value is None:
                return (state,) if not known else _read(state, revision) if output.deleted == 0 else ()
            if known and output.deleted != 1:
                return ()
            return _delete(state, revision)
        assert isinstance(input, KvCas), input
        return self._cas(state, input, output if known else None)

    def _get(self, state: KvState, output: KvReply) -> Iterable[KvState]:
        if output.value != state.value:
            return ()
        if output.version is not None and output.version != state.version:
            return ()
        mod = output.mod_revision
        if state.value is not None and mod is not None:
            if state.mod_known and mod != state.mod_revision:
                return ()
            if not state.mod_known and mod <= state.mod_revision:
                return ()
            if output.revision is not None and mod > output.revision:
                return ()
            state = state._replace(mod_revision=mod, mod_known=True)
        return _read(state, output.revision)

    def _cas(self, state: KvState, input: KvCas, output: KvReply | None) -> Iterable[KvState]:
        holds: tuple[bool, ...]
        if input.expect_value is not None:
            holds = (state.value == input.expect_value,)  # a value compare on a missing key is false
        elif state.value is None:
            holds = (input.expect_mod_revision == 0,)
        elif state.mod_known:
            holds = (state.mod_revision == input.expect_mod_revision,)
        else:  # written by an ambiguous write: its revision is only known to be above the bound
            expected = input.expect_mod_revision
            holds = (True, False) if expected is not None and expected > state.mod_revision else (False,)
        after: list[KvState] = []
        for held in holds:
            if output is None:  # ambiguous: it took effect here, as the compare decided
                after += _write(state, input.value, None) if held else (state,)
            elif output.succeeded == held:
                after += _write(state, input.value, output.revision) if held else _read(state, output.revision)
        return after

    def check_revisions(self, history: Sequence[Operation]) -> list[str]:
        """The cross-key part of etcd's revision order, which checking per key gives up.

        An operation that starts after another returned sees a store revision at least as new, and a newer one if
        it writes; two writes never share a revision (each operation here is its own transaction). Ambiguous
        operations and replies without a revision are not checked. Returns the violations, one line each (empty:
        none). Linear in the history's size, after sorting.
        """
        known = [op for op in history if not op.ambiguous and op.output.revision is not None]
        problems: list[str] = []
        writers: dict[int, Operation] = {}
        for op in known:
            if _writes(op):
                other = writers.setdefault(op.output.revision, op)
                if other is not op:
                    problems.append(
                        f"two writes at revision {op.output.revision}: {self._line(other)} and {self._line(op)}"
                    )
        events = sorted(
            [(op._call_key(), 1, i) for i, op in enumerate(known)]
            + [(op._ret_key(), 0, i) for i, op in enumerate(known)]
        )
        newest: Operation | None = None  # the returned operation with the highest revision so far
        before: dict[int, Operation | None] = {}
        for _, is_call, i in events:
            op = known[i]
            if is_call:
                before[i] = newest
            elif newest is None or op.output.revision > newest.output.revision:
                newest = op
        for i, op in enumerate(known):
            earlier = before[i]
            if earlier is None:
                continue
            floor = earlier.output.revision
            if op.output.revision < floor or (_writes(op) and op.output.revision == floor):
                problems.append(f"{self._line(op)} started after {self._line(earlier)} had returned")
        return problems

    def _line(self, op: Operation) -> str:
        return f"[{op.call:.3f}, {op.ret:.3f}] {op.client}: {self.describe_operation(op.input, op.output)}"

    def describe_operation(self, input: Any, output: Any) -> str:
        """``put(b'k', b'v') -> revision 7`` and the like."""
        if isinstance(input, KvGet):
            what = f"get({input.key!r})"
        elif isinstance(input, KvPut):
            what = f"put({input.key!r}, {input.value!r})"
        elif isinstance(input, KvDelete):
            what = f"delete({input.key!r})"
        else:
            expect = (
                f"value == {input.expect_value!r}"
                if input.expect_value is not None
                else f"mod_revision == {input.expect_mod_revision}"
            )
            what = f"cas({input.key!r}, if {expect}: {input.value!r})"
        if output is UNKNOWN:
            return f"{what} -> ? (ambiguous)"
        assert isinstance(output, KvReply), output
        at = f"revision {output.revision}"
        if isinstance(input, KvGet):
            if output.value is None:
                return f"{what} -> absent, {at}"
            return f"{what} -> {output.value!r} (mod_revision {output.mod_revision}, version {output.version}), {at}"
        if isinstance(input, KvDelete):
            return f"{what} -> {output.deleted} deleted, {at}"
        if isinstance(input, KvCas):
            return f"{what} -> {'succeeded' if output.succeeded else 'failed'}, {at}"
        return f"{what} -> {at}"

    def describe_state(self, state: KvState) -> str:
        """``b'v' (version 2, mod_revision 7; store revision >= 9)`` or ``absent``."""
        seen = f"store revision >= {state.revision}"
        if state.value is None:
            return f"absent ({seen})"
        mod = f"{state.mod_revision}" if state.mod_known else f"> {state.mod_revision} (ambiguous write)"
        return f"{state.value!r} (version {state.version}, mod_revision {mod}; {seen})"


def _writes(op: Operation) -> bool:
    """Whether a (definite) operation changed the store: then its reply's revision is its own."""
    if isinstance(op.input, KvPut):
        return True
    if isinstance(op.input, KvCas):
        return bool(op.output.succeeded)
    return isinstance(op.input, KvDelete) and op.output.deleted > 0


def _read(state: KvState, revision: int | None) -> tuple[KvState, ...]:
    """A read at ``revision``: the store's revision never goes back."""
    if revision is None:
        return (state,)
    if revision < state.revision:
        return ()
    return (state._replace(revision=revision),)


def _write(state: KvState, value: bytes, revision: int | None) -> tuple[KvState, ...]:
    """A put at ``revision`` (None: unknown, above everything seen so far)."""
    version = state.version + 1
    if revision is None:
        return (KvState(value, version, state.revision, False, state.revision),)
    if revision <= state.revision:
        return ()
    return (KvState(value, version, revision, True, revision),)


def _delete(state: KvState, revision: int | None) -> tuple[KvState, ...]:
    if revision is None:
        return (_ABSENT._replace(revision=state.revision),)
    if revision <= state.revision:
        return ()
    return (_ABSENT._replace(revision=revision),)


# -- recording -------------------------------------------------------------------------------------------------


@final
class KvRecorder:
    """Records the get/put/compare-and-swap/delete calls of several clients as a history for `KvModel`.

    ``recorder.client(backend, "c1")`` gives a `KvClient`: its calls go to ``backend`` and are recorded with
    ``anyio.current_time()`` at call and at return, plus an event counter that orders events of equal time (all
    clients must run in this process's event loop). A call that fails with a `BackendError` (``UnavailableError``:
    a lost reply, a timeout) or is cancelled (``anyio.fail_after``) is recorded as ambiguous: it may have taken
    effect. Then ``check_linearizable(KvModel(), recorder.history)``.

    Attributes:
        history: the operations recorded so far.
    """

    def __init__(self) -> None:
        self.history: list[Operation] = []
        self._events = itertools.count()

    def client(self, backend: Backend, name: Hashable) -> KvClient:
        """A recording client named ``name`` (shown in explanations) that calls ``backend``."""
        return KvClient(self, backend, name)

    @property
    def ambiguous(self) -> int:
        """How many recorded operations have an unknown outcome."""
        return sum(op.ambiguous for op in self.history)

    async def _record(self, client: Hashable, input: KvInput, call: Callable[[], Awaitable[KvReply]]) -> KvReply:
        called, call_order = anyio.current_time(), next(self._events)
        try:
            output = await call()
        except BaseException as exc:
            if isinstance(exc, BackendError | anyio.get_cancelled_exc_class()):
                self.history.append(Operation(client, input, UNKNOWN, called, math.inf, call_order))
            raise
        self.history.append(
            Operation(client, input, output, called, anyio.current_time(), call_order, next(self._events))
        )
        return output


@final
class KvClient:
    """One recording client of a `KvRecorder` (see there). Calls raise what the backend raises."""

    def __init__(self, recorder: KvRecorder, backend: Backend, name: Hashable) -> None:
        self.recorder = recorder
        self.backend = backend
        self.name = name

    async def get(self, key: bytes) -> KvReply:
        """Read ``key``."""

        async def call() -> KvReply:
            result = await self.backend.range(Range(key))
            if not result.kvs:
                return KvReply(result.revision, version=0)
            kv = result.kvs[0]
            return KvReply(result.revision, value=kv.value, mod_revision=kv.mod_revision, version=kv.version)

        return await self.recorder._record(self.name, KvGet(key), call)

    async def put(self, key: bytes, value: bytes) -> KvReply:
        """Write ``value`` at ``key``."""

        async def call() -> KvReply:
            return KvReply((await self.backend.txn([], [Put(key, value)])).revision)

        return await self.recorder._record(self.name, KvPut(key, value), call)

    async def cas(
        self, key: bytes, value: bytes, *, expect_value: bytes | None = None, expect_mod_revision: int | None = None
    ) -> KvReply:
        """Write ``value`` at ``key`` if its value (or mod revision) is as expected; ``succeeded`` says if it did."""
        input = KvCas(key, value, expect_value, expect_mod_revision)
        if expect_value is not None:
            compare = Compare.value(key, "==", expect_value)
        else:
            assert expect_mod_revision is not None
            compare = Compare.mod(key, "==", expect_mod_revision)

        async def call() -> KvReply:
            result = await self.backend.txn([compare], [Put(key, value)])
            return KvReply(result.revision, succeeded=result.succeeded)

        return await self.recorder._record(self.name, input, call)

    async def delete(self, key: bytes) -> KvReply:
        """Delete ``key``."""

        async def call() -> KvReply:
            result = await self.backend.txn([], [Delete(key)])
            (deleted,) = result.responses
            assert isinstance(deleted, DeleteResult)
            return KvReply(result.revision, deleted=deleted.deleted)

        return await self.recorder._record(self.name, KvDelete(key), call)
