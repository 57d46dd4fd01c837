"""The linearizability checker (coordkit.testing.check_linearizable) on known histories, against a brute-force
oracle, on generated histories (hypothesis), and on histories recorded from both backends under faults.

Recorded histories print their size and the checker's time (``pytest -s``); nothing about time is asserted.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import assume, given, settings, strategies as st

from coordkit import (
    Backend,
    Compare,
    CompareTarget,
    EtcdBackend,
    MemoryBackend,
    Op,
    Range,
    RangeResult,
    TxnResult,
    UnavailableError,
)
from coordkit.testing import (
    UNKNOWN,
    EtcdServer,
    Harness,
    KvCas,
    KvDelete,
    KvGet,
    KvModel,
    KvPut,
    KvRecorder,
    KvReply,
    LinearizabilityResult,
    MemoryHarness,
    Operation,
    check_linearizable,
)

from .cluster import EtcdCluster
from .helpers import reply_faults
from .proxy import TcpProxy

K = b"k"
MODEL = KvModel()


def op(client: str, input: Any, output: Any, call: float, ret: float = math.inf) -> Operation:
    return Operation(client, input, UNKNOWN if ret == math.inf else output, call, ret)


def put(key: bytes, value: bytes, revision: int | None = None) -> tuple[KvPut, KvReply]:
    return KvPut(key, value), KvReply(revision)


def get(key: bytes, value: bytes | None, mod: int | None = None, revision: int | None = None) -> tuple[KvGet, KvReply]:
    return KvGet(key), KvReply(revision, value=value, mod_revision=mod if value is not None else None)


def cas(key: bytes, value: bytes, succeeded: bool, *, expect: bytes | None = None, mod: int | None = None) -> Any:
    return KvCas(key, value, expect, mod), KvReply(None, succeeded=succeeded)


def history(*ops: tuple[str, tuple[Any, Any], float, float]) -> list[Operation]:
    return [op(client, io[0], io[1], call, ret) for client, io, call, ret in ops]


# -- known histories -------------------------------------------------------------------------------------------

ILLEGAL = {
    "stale read after a completed write": history(
        ("a", put(K, b"1"), 0, 1),
        ("b", get(K, None), 2, 3),
    ),
    "lost update: two CAS from the same value both succeed": history(
        ("a", put(K, b"0"), 0, 1),
        ("b", cas(K, b"b", True, expect=b"0"), 2, 5),
        ("c", cas(K, b"c", True, expect=b"0"), 3, 6),
    ),
    "read of a value never written": history(
        ("a", put(K, b"1"), 0, 1),
        ("b", get(K, b"2"), 0.5, 3),
    ),
    "read going back in time across clients": history(
        ("a", put(K, b"1"), 0, 1),
        ("a", put(K, b"2"), 2, 10),
        ("b", get(K, b"2"), 3, 4),
        ("c", get(K, b"1"), 5, 6),
    ),
    "an ambiguous write seen, then unseen": history(
        ("a", put(K, b"1"), 0, math.inf),
        ("b", get(K, b"1"), 5, 6),
        ("b", get(K, None), 7, 8),
    ),
    "revisions going back": history(
        ("a", put(K, b"1", revision=5), 0, 1),
        ("b", put(K, b"2", revision=4), 2, 3),
    ),
    "a read at a store revision older than a completed write": history(
        ("a", put(K, b"1", revision=5), 0, 1),
        ("b", get(b"other", None, revision=3), 1.5, 1.8),  # another key: no constraint across keys
        ("b", get(K, b"1", mod=5, revision=4), 2, 3),
    ),
    "a mod revision that no write produced": history(
        ("a", put(K, b"1", revision=5), 0, 1),
        ("b", get(K, b"1", mod=6, revision=6), 2, 3),
    ),
    "a CAS on a mod revision that the key no longer has": history(
        ("a", put(K, b"1", revision=5), 0, 1),
        ("a", put(K, b"2", revision=6), 2, 3),
        ("b", cas(K, b"3", True, mod=5), 4, 5),
    ),
    "a delete of an absent key that reports a deletion": history(
        ("a", (KvDelete(K), KvReply(None, deleted=1)), 0, 1),
    ),
}

LINEARIZABLE = {
    "sequential": history(
        ("a", put(K, b"1", revision=2), 0, 1),
        ("b", get(K, b"1", mod=2, revision=2), 2, 3),
        ("a", cas(K, b"2", True, expect=b"1"), 4, 5),
        ("b", (KvDelete(K), KvReply(None, deleted=1)), 6, 7),
        ("a", get(K, None), 8, 9),
    ),
    "overlapping write seen by one read and not by an earlier-starting one": history(
        ("a", put(K, b"1"), 0, 10),
        ("b", get(K, None), 0.5, 1.5),
        ("c", get(K, b"1"), 1, 2),
    ),
    "two concurrent CAS from the same value: one wins": history(
        ("a", put(K, b"0"), 0, 1),
        ("b", cas(K, b"b", True, expect=b"0"), 2, 5),
        ("c", cas(K, b"c", False, expect=b"0"), 3, 6),
        ("a", get(K, b"b"), 7, 8),
    ),
    "an ambiguous write that took effect": history(
        ("a", put(K, b"1"), 0, math.inf),
        ("b", get(K, b"1"), 5, 6),
        ("b", get(K, b"1"), 7, 8),
    ),
    "an ambiguous write that never took effect": history(
        ("a", put(K, b"1"), 0, math.inf),
        ("b", get(K, None), 5, 6),
        ("b", get(K, None), 7, 8),
    ),
    "an ambiguous write that took effect late": history(
        ("a", put(K, b"1"), 0, math.inf),
        ("b", get(K, None), 5, 6),
        ("b", get(K, b"1"), 7, 8),
    ),
    "an ambiguous write whose revision a later read reveals, then a CAS on it": history(
        ("a", put(K, b"1", revision=4), 0, 1),
        ("a", put(K, b"2"), 2, math.inf),
        ("b", get(K, b"2", mod=9, revision=9), 5, 6),
        ("b", cas(K, b"3", True, mod=9), 7, 8),
    ),
    "an ambiguous CAS on the revision of an ambiguous write": history(
        ("a", put(K, b"1"), 0, math.inf),
        ("a", cas(K, b"2", True, mod=7), 1, math.inf),
        ("b", get(K, b"2"), 5, 6),
    ),
    "two concurrent writes, the one called last taking effect first": history(
        ("a", put(K, b"1"), 0, 4),
        ("b", put(K, b"2"), 1, 3),
        ("c", get(K, b"1"), 5, 6),
    ),
    "two ambiguous writes that both took effect, the later-called one first": history(
        ("a", cas(K, b"b", True, expect=b"a"), 0, math.inf),
        ("b", put(K, b"a"), 1, math.inf),
        ("c", get(K, b"b"), 0, 1),
    ),
    "ties at the same instant count as concurrent": history(
        ("a", put(K, b"1"), 1, 1),
        ("b", get(K, None), 1, 1),
    ),
}


@pytest.mark.parametrize("name", ILLEGAL)
def test_known_illegal_histories_are_rejected(name: str) -> None:
    result = check_linearizable(MODEL, ILLEGAL[name])
    assert result.outcome == "illegal" and not result, result
    assert result.fragment and result.stuck, result
    assert "not linearizable" in str(result) and "none of these can come next" in str(result)


@pytest.mark.parametrize("name", LINEARIZABLE)
def test_known_linearizable_histories_are_accepted(name: str) -> None:
    result = check_linearizable(MODEL, LINEARIZABLE[name])
    assert result.outcome == "ok" and result.linearizable, result


def test_explanation_names_the_failing_fragment() -> None:
    """The fragment is the shortest failing prefix of the failing key: later operations and other keys are out."""
    ops = history(
        ("a", put(b"other", b"x"), 0, 1),
        ("a", put(K, b"1"), 0, 1),
        ("b", get(K, None), 2, 3),  # stale: the history fails here
        ("a", put(K, b"2"), 4, 5),
        ("b", get(K, b"2"), 6, 7),
    )
    result = check_linearizable(MODEL, ops)
    assert result.outcome == "illegal"
    assert [o.input for o in result.fragment] == [KvPut(K, b"1"), KvGet(K)], result
    assert [o.input for o in result.stuck] == [KvGet(K)], result
    assert "get(b'k') -> absent" in result.explanation, result.explanation
    assert result.partitions == 2 and result.operations == 5


def test_time_budget_gives_unknown() -> None:
    ops = [op("a", KvPut(K, str(i).encode()), KvReply(None), 2 * i, 2 * i + 1) for i in range(2000)]
    assert check_linearizable(MODEL, ops, timeout=0).outcome == "unknown"
    assert check_linearizable(MODEL, ops).outcome == "ok"


def test_operations_must_return_after_their_call() -> None:
    with pytest.raises(ValueError, match="returns after its call"):
        Operation("a", KvGet(K), KvReply(), 2, 1)
    with pytest.raises(ValueError, match="exactly one"):
        KvCas(K, b"v")
    with pytest.raises(TypeError, match="KvModel checks"):
        check_linearizable(MODEL, [Operation("a", "get", None, 0, 1)])


def test_revision_order_across_keys() -> None:
    """What per-key checking cannot see: revisions across keys follow real time, and writes never share one."""
    fine = history(
        ("a", put(b"x", b"1", revision=2), 0, 1),
        ("b", put(b"y", b"1", revision=3), 2, 3),
        ("c", get(b"x", b"1", mod=2, revision=3), 2.5, 4),  # concurrent with the write of y: may see either
        ("a", get(b"y", None, revision=2), 0.5, 1.5),  # concurrent with the write of x
    )
    assert MODEL.check_revisions(fine) == []
    backwards = history(
        ("a", put(b"x", b"1", revision=5), 0, 1),
        ("b", put(b"y", b"1", revision=4), 2, 3),
        ("c", get(b"y", b"1", mod=4, revision=4), 4, 5),
    )
    problems = MODEL.check_revisions(backwards)
    assert len(problems) == 2 and "put(b'y', b'1') -> revision 4 started after" in problems[0], problems
    assert "get(b'y') -> b'1' (mod_revision 4, version None), revision 4 started after" in problems[1], problems
    assert check_linearizable(MODEL, backwards).linearizable, "each key on its own is fine"
    shared = history(("a", put(b"x", b"1", revision=5), 0, 1), ("b", put(b"y", b"1", revision=5), 0, 1))
    assert ["two writes at revision 5" in p for p in MODEL.check_revisions(shared)] == [True]
    same_revision_read = history(("a", put(b"x", b"1", revision=5), 0, 1), ("b", get(b"y", None, revision=5), 2, 3))
    assert MODEL.check_revisions(same_revision_read) == []
    ambiguous = history(("a", put(b"x", b"1"), 0, math.inf), ("b", get(b"y", None, revision=1), 2, 3))
    assert MODEL.check_revisions(ambiguous) == []


# -- a brute-force oracle on small random histories ------------------------------------------------------------


def brute_force(ops: Sequence[Operation]) -> bool:
    """Every subset of the ambiguous operations, every order consistent with real time."""
    definite = [o for o in ops if not o.ambiguous]
    ambiguous = [o for o in ops if o.ambiguous]
    for size in range(len(ambiguous) + 1):
        for chosen in itertools.combinations(ambiguous, size):
            for order in itertools.permutations([*definite, *chosen]):
                if any(
                    later._ret_key() < earlier._call_key()
                    for i, earlier in enumerate(order)
                    for later in order[i + 1 :]
                ):
                    continue
                states = {MODEL.init()}
                for o in order:
                    output = UNKNOWN if o.ambiguous else o.output
                    states = {s for before in states for s in MODEL.step(before, o.input, output)}
                    if not states:
                        break
                if states:
                    return True
    return False


values = st.sampled_from([None, b"a", b"b"])
revisions = st.one_of(st.none(), st.integers(1, 4))
small_op = st.tuples(
    st.sampled_from(["get", "put", "cas", "casmod", "delete"]),
    st.sampled_from([b"a", b"b"]),  # written or expected value
    values,  # read value
    revisions,  # reply revision
    revisions,  # read mod revision / expected mod revision
    st.booleans(),  # succeeded / deleted
    st.integers(0, 8),  # call
    st.one_of(st.integers(0, 4), st.none()),  # duration (None: ambiguous)
)


def build(raw: tuple[Any, ...]) -> Operation:
    kind, value, read, revision, mod, flag, call, duration = raw
    ret = math.inf if duration is None else call + duration
    input: Any
    if kind == "get":
        input, output = KvGet(K), KvReply(revision, value=read, mod_revision=mod if read is not None else None)
    elif kind == "put":
        input, output = KvPut(K, value), KvReply(revision)
    elif kind == "cas":
        input, output = KvCas(K, value, expect_value=b"b" if value == b"a" else b"a"), KvReply(revision, flag)
    elif kind == "casmod":
        input, output = KvCas(K, value, expect_mod_revision=mod or 0), KvReply(revision, flag)
    else:
        input, output = KvDelete(K), KvReply(revision, deleted=int(flag))
    return op("c", input, output, call, ret)


@settings(max_examples=200, deadline=None)
@given(st.lists(small_op, min_size=1, max_size=5))
def test_checker_agrees_with_brute_force(raw: list[tuple[Any, ...]]) -> None:
    ops = [build(r) for r in raw]
    assert check_linearizable(MODEL, ops).linearizable == brute_force(ops)


# -- generated histories: linearizable by construction, and mutated --------------------------------------------


class Reference:
    """A plain sequential store with etcd's revisions, to generate histories from."""

    def __init__(self) -> None:
        self.revision = 1
        self.kvs: dict[bytes, tuple[bytes, int, int]] = {}  # key -> (value, mod_revision, version)

    def apply(self, input: Any) -> KvReply:
        kv = self.kvs.get(input.key)
        if isinstance(input, KvGet):
            if kv is None:
                return KvReply(self.revision, version=0)
            return KvReply(self.revision, value=kv[0], mod_revision=kv[1], version=kv[2])
        if isinstance(input, KvDelete):
            if kv is None:
                return KvReply(self.revision, deleted=0)
            del self.kvs[input.key]
            self.revision += 1
            return KvReply(self.revision, deleted=1)
        if isinstance(input, KvCas):
            if input.expect_value is not None:
                held = kv is not None and kv[0] == input.expect_value
            else:
                held = (kv[1] if kv else 0) == input.expect_mod_revision
            if not held:
                return KvReply(self.revision, succeeded=False)
        self.revision += 1
        self.kvs[input.key] = (input.value, self.revision, kv[2] + 1 if kv else 1)
        return KvReply(self.revision)


generated_step = st.tuples(
    st.sampled_from(["get", "put", "cas", "casmod", "delete"]),
    st.sampled_from([b"x", b"y", b"z"]),
    st.sampled_from([b"1", b"2", b"3"]),
    st.integers(0, 12),  # expected mod revision for casmod
    st.floats(0, 3),  # how far the call starts before the linearization point
    st.floats(0, 3),  # how far the return ends after it
    st.sampled_from(["done", "done", "done", "done", "applied?", "lost?"]),
)


def generate(steps: list[tuple[Any, ...]], *, overlap: bool) -> list[Operation]:
    """Operation i takes effect at time 10 i, inside its interval; some lose their reply (applied or not)."""
    store = Reference()
    ops = []
    for i, (kind, key, value, mod, before, after, fate) in enumerate(steps):
        input: Any = {
            "get": KvGet(key),
            "put": KvPut(key, value),
            "cas": KvCas(key, value, expect_value=value),
            "casmod": KvCas(key, value, expect_mod_revision=mod),
            "delete": KvDelete(key),
        }[kind]
        at = 10.0 * i
        call, ret = (at - 4 * before, at + 4 * after) if overlap else (at, at + 1)
        if fate == "lost?":  # the request never reached the store; the caller cannot tell
            ops.append(Operation(f"c{i % 4}", input, UNKNOWN, call))
            continue
        output = store.apply(input)
        if fate == "applied?":
            ops.append(Operation(f"c{i % 4}", input, UNKNOWN, call))
        else:
            ops.append(Operation(f"c{i % 4}", input, output, call, ret))
    return ops


@settings(max_examples=150, deadline=None)
@given(st.lists(generated_step, max_size=60), st.booleans())
def test_generated_histories_are_linearizable(steps: list[tuple[Any, ...]], overlap: bool) -> None:
    result = check_linearizable(MODEL, generate(steps, overlap=overlap))
    assert result.outcome == "ok", result


def mutate(output: KvReply, input: Any, rng: random.Random) -> KvReply:
    """A different reply, changed in a field one key's history can refute (a read's store revision alone cannot be:
    the other keys' writes move it)."""
    choices: list[KvReply] = []
    if isinstance(input, KvGet):
        choices.append(KvReply(output.revision, value=b"never written", mod_revision=output.mod_revision or 1))
        if output.value is not None:
            assert output.mod_revision is not None and output.version is not None
            value, mod, version = output.value, output.mod_revision, output.version
            choices.append(KvReply(output.revision, value=value, mod_revision=mod - 1, version=version))
            choices.append(KvReply(output.revision, value=value, mod_revision=mod, version=version + 1))
    if isinstance(input, KvCas):
        choices.append(KvReply(output.revision, not output.succeeded))
    if isinstance(input, KvDelete):
        choices.append(KvReply(output.revision, deleted=1 - output.deleted))
    return rng.choice(choices)


@settings(max_examples=100, deadline=None)
@given(st.lists(generated_step, min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_mutated_sequential_histories_are_rejected(steps: list[tuple[Any, ...]], rng: random.Random) -> None:
    """Without overlap and without ambiguous operations the only linearization is the real-time order: any
    changed reply makes the history illegal."""
    ops = generate([(*s[:6], "done") for s in steps], overlap=False)
    refutable = [i for i, o in enumerate(ops) if not isinstance(o.input, KvPut)]  # a put's reply is its revision
    assume(refutable)
    i = rng.choice(refutable)
    ops[i] = Operation(ops[i].client, ops[i].input, mutate(ops[i].output, ops[i].input, rng), ops[i].call, ops[i].ret)
    result = check_linearizable(MODEL, ops)
    assert result.outcome == "illegal", (ops[i], result)
    assert ops[i] in result.fragment, result


# -- recorded histories ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Clients doing get/put/CAS/delete on a few keys; every value is unique, so a read names the write it saw."""

    clients: int = 5
    operations: int = 60  # per client
    keys: int = 3
    timeout: float = 1.0  # per operation: a call still running then is cancelled (recorded as ambiguous)
    pause: float = 0.02  # mean think time between a client's operations
    seed: int = 0


async def run_workload(
    recorder: KvRecorder,
    backends: Sequence[Backend],
    namespace: bytes,
    work: Workload,
    until: anyio.Event | None = None,
) -> None:
    """Run ``work.operations`` per client (or, with ``until``, until it is set)."""
    keys = [namespace + f"key{i}".encode() for i in range(work.keys)]

    async def client(index: int, backend: Backend) -> None:
        rng = random.Random(f"{work.seed}/{index}")
        kv = recorder.client(backend, f"c{index}")
        seen: dict[bytes, KvReply] = {}
        for n in itertools.count() if until else range(work.operations):
            if until is not None and until.is_set():
                return
            key = rng.choice(keys)
            value = f"c{index}-{n}".encode()
            kind = rng.choices(["get", "put", "cas", "casmod", "delete"], weights=[4, 2, 2, 2, 1])[0]
            last = seen.get(key)
            try:
                with anyio.fail_after(work.timeout):
                    if kind == "get" or last is None:
                        seen[key] = await kv.get(key)
                    elif kind == "put":
                        await kv.put(key, value)
                    elif kind == "cas" and last.value is not None:
                        await kv.cas(key, value, expect_value=last.value)
                    elif kind in ("cas", "casmod"):
                        await kv.cas(key, value, expect_mod_revision=last.mod_revision or 0)
                    else:
                        await kv.delete(key)
            except (UnavailableError, TimeoutError):
                pass
            await anyio.sleep(rng.expovariate(1 / work.pause))

    async with anyio.create_task_group() as tg:
        for index, backend in enumerate(backends):
            tg.start_soon(client, index, backend)


async def inject_faults(harness: Harness, clients: Sequence[Backend], rng: random.Random, stop: anyio.Event) -> int:
    """Lost and delayed replies, partitions and (memory) request latency on random clients until ``stop``."""
    injected = 0
    async with anyio.create_task_group() as later:
        while not stop.is_set():
            with anyio.move_on_after(rng.uniform(0.05, 0.3)):
                await stop.wait()
            client = rng.choice(clients)
            fault = rng.choice(["lose", "delay", "partition", "latency"])
            injected += 1
            if fault == "lose":
                reply_faults(client).lose_replies(rng.randint(1, 3))
            elif fault == "delay":
                reply_faults(client).delay_replies(rng.uniform(0.01, 0.3))
                later.start_soon(_after, rng.uniform(0.1, 1), reply_faults(client).delay_replies, 0)
            elif fault == "partition":
                harness.partition(client)
                later.start_soon(_after, rng.uniform(0.1, 1.5), harness.heal, client)
            elif isinstance(client, MemoryBackend):
                client.faults.set_latency(rng.uniform(0.01, 0.3))
                later.start_soon(_after, rng.uniform(0.1, 1), client.faults.set_latency, 0)
        later.cancel_scope.cancel()
    for client in clients:
        harness.heal(client)
        reply_faults(client).lose_replies(0)
        reply_faults(client).delay_replies(0)
        if isinstance(client, MemoryBackend):
            client.faults.set_latency(0)
    return injected


async def _after(delay: float, action: Callable[..., object], *args: object) -> None:
    await anyio.sleep(delay)
    action(*args)


def report(what: str, recorder: KvRecorder, result: LinearizabilityResult, **extra: object) -> None:
    history = recorder.history
    clients = len({op.client for op in history})
    read = {op.output.value for op in history if isinstance(op.input, KvGet) and not op.ambiguous}
    applied = sum(op.ambiguous and getattr(op.input, "value", None) in read for op in history)
    more = "".join(f", {k} {v}" for k, v in extra.items())
    print(
        f"\n{what}: {len(history)} operations, {clients} clients, {recorder.ambiguous} ambiguous ({applied} of them "
        f"seen applied by a read){more}; checker: {result.outcome} in {result.elapsed:.3f} s"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1])
async def test_recorded_history_under_faults_is_linearizable(harness: Harness, seed: int) -> None:
    """Concurrent clients under lost and delayed replies, partitions and latency: the store stays linearizable."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(harness.client()) for _ in range(5)]
        recorder = KvRecorder()
        stop = anyio.Event()
        work = Workload(seed=seed, timeout=0.5)
        injected = 0

        async def faults() -> None:
            nonlocal injected
            injected = await inject_faults(harness, clients, random.Random(seed), stop)

        async with anyio.create_task_group() as tg:
            tg.start_soon(faults)
            await run_workload(recorder, clients, harness.namespace, work)
            stop.set()
    result = check_linearizable(MODEL, recorder.history, timeout=60)
    report(f"{type(harness).__name__} seed {seed}", recorder, result, faults=injected)
    assert result.outcome == "ok", result
    assert MODEL.check_revisions(recorder.history) == []
    assert recorder.ambiguous > 0, "the faults must produce ambiguous operations"
    assert len(recorder.history) == work.clients * work.operations


class StaleReads:
    """A broken client: serves a key's reads from what it read first (a cache never invalidated by others' writes)."""

    def __init__(self, inner: MemoryBackend) -> None:
        self.inner = inner
        self.cache: dict[bytes, RangeResult] = {}

    async def range(self, request: Range) -> RangeResult:
        if request.key not in self.cache:
            self.cache[request.key] = await self.inner.range(request)
        return self.cache[request.key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RacyCas:
    """A broken client: a compare-and-swap read, then written, in two round trips (a lost update waiting to happen)."""

    def __init__(self, inner: MemoryBackend) -> None:
        self.inner = inner

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        if not compare:
            return await self.inner.txn(compare, success, failure)
        (c,) = compare
        observed = await self.inner.txn([], [Range(c.key)])
        await anyio.sleep(0.01)
        (current,) = observed.responses
        assert isinstance(current, RangeResult)
        kv = current.kvs[0] if current.kvs else None
        actual = (kv.value if kv else None) if c.target is CompareTarget.VALUE else (kv.mod_revision if kv else 0)
        if actual != c.operand:
            return TxnResult(False, (), observed.revision)
        return await self.inner.txn([], success)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory"])
@pytest.mark.parametrize("broken", [StaleReads, RacyCas])
async def test_recorded_history_of_a_broken_client_is_rejected(harness: Harness, broken: type[Any]) -> None:
    """The whole pipeline can fail: recorded through a client that breaks linearizability, the check fails."""
    assert isinstance(harness, MemoryHarness)
    recorder = KvRecorder()
    clients = [broken(MemoryBackend(store=harness.store)) for _ in range(4)]
    await run_workload(recorder, clients, harness.namespace, Workload(clients=4, operations=40))
    result = check_linearizable(MODEL, recorder.history, timeout=60)
    report(broken.__name__, recorder, result)
    assert result.outcome == "illegal", result
    if broken is StaleReads:
        assert MODEL.check_revisions(recorder.history), "a stale read's revision is out of real-time order too"
    print(result)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory"])
@pytest.mark.parametrize("seed", range(2, 11))
async def test_more_recorded_histories_on_memory(harness: Harness, seed: int) -> None:
    """More fault schedules on the virtual clock, where they are cheap."""
    await test_recorded_history_under_faults_is_linearizable(harness, seed)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory"])
async def test_many_long_recorded_histories_on_memory(harness: Harness) -> None:
    """``COORDKIT_LIN_SCHEDULES`` (default 100) fault schedules of 8 clients x 200 operations on the virtual clock."""
    for seed in range(100, 100 + int(os.environ.get("COORDKIT_LIN_SCHEDULES", "100"))):
        assert isinstance(harness, MemoryHarness)
        harness = MemoryHarness(seed=seed)
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(harness.client()) for _ in range(8)]
            recorder = KvRecorder()
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(inject_faults, harness, clients, random.Random(seed), stop)
                await run_workload(recorder, clients, harness.namespace, Workload(8, 200, 4, 0.5, 0.02, seed))
                stop.set()
        result = check_linearizable(MODEL, recorder.history, timeout=120)
        if seed % 20 == 0:
            report(f"memory seed {seed}", recorder, result)
        assert result.outcome == "ok", (seed, result)
        assert MODEL.check_revisions(recorder.history) == [], seed


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["etcd"])
async def test_history_through_a_blackholing_proxy_is_linearizable(etcd_server: EtcdServer) -> None:
    """Clients reach a real etcd through a TCP proxy that now and then swallows everything: requests already
    forwarded are applied while their replies vanish, and the clients' request timeout makes them ambiguous."""
    recorder = KvRecorder()
    namespace = f"ck-lin-proxy-{random.randrange(1 << 30)}/".encode()
    rng = random.Random(7)
    blackholes = 0
    async with AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(TcpProxy("127.0.0.1", etcd_server.client_port)) for _ in range(2)]
        clients = [
            await stack.enter_async_context(EtcdBackend(proxies[i % 2].endpoint, request_timeout=0.3)) for i in range(4)
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_workload, recorder, clients, namespace, Workload(clients=4, operations=40, pause=0.03))
            with anyio.move_on_after(20):
                while len(recorder.history) < 4 * 40:
                    await anyio.sleep(rng.uniform(0.1, 0.3))
                    proxy = rng.choice(proxies)
                    proxy.blackhole()
                    blackholes += 1
                    await anyio.sleep(rng.uniform(0.05, 0.5))
                    proxy.pass_through()
    result = check_linearizable(MODEL, recorder.history, timeout=60)
    report("etcd through a blackholing proxy", recorder, result, blackholes=blackholes)
    assert result.outcome == "ok", result
    assert MODEL.check_revisions(recorder.history) == []
    assert recorder.ambiguous > 0, "the blackholes must produce ambiguous operations"


# -- a real 3-member cluster: kill -9 and SIGSTOP/SIGCONT while clients run --------------------------------------


async def cluster_history(cluster: EtcdCluster, faults: Sequence[str], *, seed: int) -> None:
    """Five clients (each starting at another member) run while ``faults`` happen one after the other:
    ``"stop leader"`` (SIGSTOP for 1.5 s, then SIGCONT), ``"kill leader"`` / ``"kill follower"`` (kill -9, restart).
    The history must be linearizable; a run in which etcd's members diverged is an explicit xfail."""
    await anyio.to_thread.run_sync(cluster.restore)
    recorder = KvRecorder()
    namespace = f"ck-lin-cluster-{seed}-{random.randrange(1 << 30)}/".encode()
    rng = random.Random(seed)
    done = anyio.Event()
    log: list[str] = []
    started = anyio.current_time()
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(EtcdBackend(cluster.endpoints_from(i), request_timeout=1.0))
            for i in range(5)
        ]
        work = Workload(clients=5, timeout=3.0, pause=0.02, seed=seed)
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_workload, recorder, clients, namespace, work, done)
            try:
                for fault in faults:
                    await anyio.sleep(rng.uniform(0.3, 0.8))
                    leader = await anyio.to_thread.run_sync(cluster.wait_leader)
                    if fault == "stop leader":
                        cluster.pause(leader)
                        log.append(f"{anyio.current_time() - started:.1f}s SIGSTOP m{leader}")
                        try:
                            await anyio.sleep(1.5)
                        finally:
                            cluster.resume(leader)
                        log.append(f"{anyio.current_time() - started:.1f}s SIGCONT m{leader}")
                    else:
                        victim = leader if fault == "kill leader" else rng.choice(cluster.followers() or [leader])
                        cluster.kill(victim)
                        log.append(f"{anyio.current_time() - started:.1f}s kill -9 m{victim} (leader m{leader})")
                        await anyio.sleep(rng.uniform(0.5, 1.5))
                        await anyio.to_thread.run_sync(cluster.start_member, victim)
                        log.append(f"{anyio.current_time() - started:.1f}s m{victim} restarted")
                await anyio.sleep(0.5)
            finally:
                for member in cluster.members:
                    cluster.resume(member.index)
                done.set()
    revision, hashes = await anyio.to_thread.run_sync(cluster.kv_hashes)
    result = check_linearizable(MODEL, recorder.history, timeout=120)
    report(f"3-member cluster ({', '.join(faults)})", recorder, result, seconds=f"{anyio.current_time() - started:.1f}")
    print("  " + "; ".join(log))
    if len(set(hashes.values())) > 1:
        pytest.xfail(f"etcd {cluster.version} members diverged (hashkv at revision {revision}: {hashes}): not judged")
    assert result.outcome == "ok", result
    assert MODEL.check_revisions(recorder.history) == []
    assert len(recorder.history) > 100


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["etcd"])
async def test_cluster_history_with_a_stopped_leader_and_a_killed_member(cluster: EtcdCluster) -> None:
    await cluster_history(cluster, ["stop leader", "kill follower"], seed=1)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["etcd"])
@pytest.mark.parametrize("seed", range(2, 2 + int(os.environ.get("COORDKIT_LIN_CLUSTER_RUNS", "3"))))
async def test_cluster_histories_under_rounds_of_faults(cluster: EtcdCluster, seed: int) -> None:
    faults = ["stop leader", "kill leader", "kill follower", "stop leader", "kill leader", "stop leader"]
    await cluster_history(cluster, faults, seed=seed)
