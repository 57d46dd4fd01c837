"""MemoryBackend against a plain model, on random histories (hypothesis), and on asyncio as well as trio."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings, strategies as st

from coordkit import Compare, Delete, EventType, KeyValue, MemoryBackend, Put, Range
from coordkit.testing import CONFORMANCE_CHECKS, MemoryHarness
from coordkit.testing._conformance import Check

KEYS = [b"a", b"a/1", b"a/2", b"b", b"\xff"]

step = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=3), st.booleans()),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("cas"), st.sampled_from(KEYS), st.integers(0, 6)),
    st.tuples(st.just("revoke")),
    st.tuples(st.just("compact")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=40))
def test_random_history_matches_model_and_watch_replay(steps: list[tuple[object, ...]]) -> None:
    """Revisions, versions and lease deletions follow the model; replaying the watch rebuilds the final state."""

    async def run() -> None:
        backend = MemoryBackend(seed=1)
        model: dict[bytes, KeyValue] = {}
        revision = 1
        lease = (await backend.grant(60)).id
        for s in steps:
            if s[0] == "put":
                _, key, value, leased = s
                assert isinstance(key, bytes) and isinstance(value, bytes)
                result = await backend.txn([], [Put(key, value, lease if leased else 0)])
                revision += 1
                old = model.get(key)
                model[key] = KeyValue(
                    key,
                    value,
                    old.create_revision if old else revision,
                    revision,
                    old.version + 1 if old else 1,
                    lease if leased else 0,
                )
            elif s[0] == "delete":
                _, key, prefix = s
                assert isinstance(key, bytes)
                result = await backend.txn([], [Delete(key, prefix=bool(prefix))])
                gone = [k for k in model if (k.startswith(key) if prefix else k == key)]
                if gone:
                    revision += 1
                for k in gone:
                    del model[k]
            elif s[0] == "cas":
                _, key, version = s
                assert isinstance(key, bytes) and isinstance(version, int)
                result = await backend.txn([Compare.version(key, "==", version)], [Put(key, b"cas")])
                old = model.get(key)
                assert result.succeeded == ((old.version if old else 0) == version)
                if result.succeeded:
                    revision += 1
                    model[key] = KeyValue(
                        key, b"cas", old.create_revision if old else revision, revision, version + 1, 0
                    )
            elif s[0] == "revoke":
                await backend.revoke(lease)
                if any(kv.lease == lease for kv in model.values()):
                    revision += 1
                model = {k: kv for k, kv in model.items() if kv.lease != lease}
                lease = (await backend.grant(60)).id
                continue
            else:
                if backend.store.compact_revision < backend.store.revision:
                    backend.faults.compact()
                continue
            assert result.revision == revision
        state = await backend.range(Range(b"", prefix=True))
        assert state.revision == revision
        assert {kv.key: kv for kv in state.kvs} == model
        # Replay everything still in history on top of the state at the compact revision.
        start = max(backend.store.compact_revision, 1)
        replayed: dict[bytes, bytes] = {}
        if start == 1 and revision > 1:
            async with backend.watch(b"", prefix=True, start_revision=1) as batches:
                last = 0
                async for batch in batches:
                    assert batch.revision > last
                    last = batch.revision
                    for event in batch.events:
                        if event.type is EventType.PUT:
                            replayed[event.kv.key] = event.kv.value
                        else:
                            replayed.pop(event.kv.key, None)
                    if last == revision:
                        break
            assert replayed == {k: kv.value for k, kv in model.items()}

    anyio.run(run, backend="trio")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "check", [c for name, c in CONFORMANCE_CHECKS.items() if name != "lease_expiry"], ids=lambda c: c.__name__
)
async def test_memory_backend_on_asyncio(check: Check) -> None:
    """The same store semantics on asyncio (real time: the TTL-expiry check is the one left to virtual time)."""
    await check(MemoryHarness())
