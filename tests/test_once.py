"""once() on both backends: one computation, shared result, takeover after a crash, fencing, failures, TTL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress

import anyio
import pytest

from coordkit import (
    JSON,
    Backend,
    Compare,
    ComputationLostError,
    Op,
    Put,
    Range,
    Session,
    TxnResult,
    UnavailableError,
    invalidate_once,
    once,
)
from coordkit.testing import Harness

from .helpers import Counted, sessions

pytestmark = pytest.mark.anyio


async def test_hundred_callers_one_computation(harness: Harness) -> None:
    name = harness.namespace.decode() + "index"
    calls = 0
    results: list[bytes] = []

    async def build_index() -> bytes:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.2)  # long enough for every caller to arrive while it runs
        return b"index-v1"

    async with sessions(harness, 10) as group:
        async with anyio.create_task_group() as tg:
            for i in range(100):

                async def caller(session: Session = group[i % 10]) -> None:
                    results.append(await once(session, name, build_index))

                tg.start_soon(caller)
        assert calls == 1
        assert results == [b"index-v1"] * 100
        # A late arrival reads the stored result without computing.
        assert await once(group[0], name, build_index) == b"index-v1"
        assert calls == 1


async def test_crashed_computer_is_replaced(harness: Harness) -> None:
    name = harness.namespace.decode() + "crash"
    computers: list[str] = []
    started = anyio.Event()

    def computation(who: str) -> Callable[[], Awaitable[bytes]]:
        async def fn() -> bytes:
            computers.append(who)
            started.set()
            if who == "doomed":
                await anyio.sleep_forever()
            return who.encode()

        return fn

    async with harness.client() as crashing, harness.client() as other:
        async with Session(other, ttl=5) as survivor, anyio.create_task_group() as tg:

            async def doomed() -> None:
                with suppress(ComputationLostError):
                    async with Session(crashing, ttl=2) as session:
                        await once(session, name, computation("doomed"))

            tg.start_soon(doomed)
            await started.wait()
            harness.partition(crashing)
            with anyio.fail_after(2 + 1 + 2):
                assert await once(survivor, name, computation("survivor")) == b"survivor"
            harness.heal(crashing)
            tg.cancel_scope.cancel()
    assert computers == ["doomed", "survivor"]


async def test_stale_computer_cannot_overwrite_newer_result(harness: Harness) -> None:
    """A computer frozen past its lease (its fn ignores cancellation) finds its publish refused."""
    name = harness.namespace.decode() + "stale"
    resume = anyio.Event()
    async with harness.client() as stale_client, harness.client() as other:
        async with Session(other, ttl=5) as fresh, anyio.create_task_group() as tg:
            outcome: list[BaseException] = []
            computing = anyio.Event()

            async def frozen() -> bytes:
                computing.set()
                with anyio.CancelScope(shield=True):  # a paused process: nothing interrupts it
                    await resume.wait()
                return b"stale"

            async def stale_caller() -> None:
                async with Session(stale_client, ttl=2) as session:
                    try:
                        await once(session, name, frozen)
                    except ComputationLostError as exc:
                        outcome.append(exc)

            tg.start_soon(stale_caller)
            await computing.wait()
            harness.suspend_keepalives(stale_client)  # its lease expires; the claim goes with it

            async def fresh_fn() -> bytes:
                return b"fresh"

            with anyio.fail_after(2 + 1 + 2):
                assert await once(fresh, name, fresh_fn) == b"fresh"
            harness.heal(stale_client)
            resume.set()
        assert len(outcome) == 1
        result = await other.range(Range(name.encode() + b"/result"))
        assert result.kvs[0].value == b"fresh", "the stale computer's late result was not published"


async def test_failure_releases_claim_and_another_caller_computes(harness: Harness) -> None:
    name = harness.namespace.decode() + "fails"
    attempts: list[str] = []
    async with sessions(harness, 2) as (a, b):
        first_running = anyio.Event()
        fail = anyio.Event()

        async def failing() -> bytes:
            attempts.append("a")
            first_running.set()
            await fail.wait()
            raise RuntimeError("index build failed")

        async def working() -> bytes:
            attempts.append("b")
            return b"built by b"

        async with anyio.create_task_group() as tg:
            errors: list[BaseException] = []

            async def first() -> None:
                try:
                    await once(a, name, failing)
                except RuntimeError as exc:
                    errors.append(exc)

            tg.start_soon(first)
            await first_running.wait()
            results: list[bytes] = []

            async def second() -> None:
                results.append(await once(b, name, working))

            tg.start_soon(second)
            fail.set()
        assert [str(e) for e in errors] == ["index build failed"]
        assert results == [b"built by b"] and attempts == ["a", "b"]


async def test_result_ttl_invalidation_and_codec(harness: Harness) -> None:
    name = harness.namespace.decode() + "ttl"
    calls = 0

    async def compute() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"version": calls}

    async with sessions(harness, 1) as (session,):
        assert await once(session, name, compute, codec=JSON, result_ttl=2) == {"version": 1}
        assert await once(session, name, compute, codec=JSON, result_ttl=2) == {"version": 1}
        await anyio.sleep(3.5)  # the result's lease expires
        assert await once(session, name, compute, codec=JSON, result_ttl=2) == {"version": 2}
        assert await invalidate_once(session.backend, name)
        assert not await invalidate_once(session.backend, name)
        assert await once(session, name, compute, codec=JSON) == {"version": 3}
        assert calls == 3


async def test_bad_result_releases_claim(harness: Harness) -> None:
    name = harness.namespace.decode() + "badresult"

    async def text() -> str:
        return "not bytes"

    async def good() -> bytes:
        return b"ok"

    async with sessions(harness, 1) as (session,):
        with pytest.raises(TypeError, match="codec"):
            await once(session, name, text)  # type: ignore[arg-type]
        assert await once(session, name, good) == b"ok"
        with pytest.raises(ValueError, match="ttl"):
            await once(session, name, good, result_ttl=0)


@pytest.mark.parametrize("kind", ["memory"])
async def test_claim_applied_but_reply_lost_is_adopted(harness: Harness) -> None:
    """An ambiguous claim (applied, reply lost) must not block the name until the session ends."""
    name = harness.namespace.decode() + "ambiguous"

    class LosesFirstReply:
        def __init__(self, inner: Backend) -> None:
            self.inner, self.name, self.lost = inner, inner.name, False

        def __getattr__(self, attribute: str) -> object:
            return getattr(self.inner, attribute)

        async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
            result = await self.inner.txn(compare, success, failure)
            if not self.lost and any(isinstance(op, Put) for op in success):
                self.lost = True
                raise UnavailableError("connection reset after the request was applied")
            return result

    calls = 0

    async def build() -> bytes:
        nonlocal calls
        calls += 1
        return b"built"

    async with harness.client() as client, Session(LosesFirstReply(client), ttl=5) as session:  # type: ignore[arg-type]
        with anyio.fail_after(3):
            assert await once(session, name, build) == b"built"
    assert calls == 1


async def test_callers_in_one_process_share_one_attempt(harness: Harness) -> None:
    """Sixty callers on one client (five sessions) while another client computes: one watch and a handful of
    txns between them, not one each; fn runs once."""
    name = harness.namespace.decode() + "shared"
    computing, release = anyio.Event(), anyio.Event()

    async def build() -> bytes:
        computing.set()
        await release.wait()
        return b"built"

    async with harness.client() as other, harness.client() as inner, Session(other, ttl=10) as computer:
        client = Counted(inner)
        results: list[bytes] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(once, computer, name, build)
            await computing.wait()
            async with AsyncExitStack() as stack:
                group = [await stack.enter_async_context(Session(client, ttl=10)) for _ in range(5)]

                async def caller(session: Session) -> None:
                    results.append(await once(session, name, build))

                async with anyio.create_task_group() as callers:
                    for i in range(60):
                        callers.start_soon(caller, group[i % 5])
                    with anyio.fail_after(10):  # one of them found the claim and waits for it to go
                        await client.watched.wait()
                    await anyio.wait_all_tasks_blocked()
                    release.set()
        assert results == [b"built"] * 60
        assert client.watches == 1, "one caller watched the claim for all of them"
        assert client.txns <= 3, f"{client.txns} txns: the callers shared one attempt"


async def test_a_caller_never_takes_a_result_read_before_it_called(harness: Harness) -> None:
    """A caller that joins another's attempt while that attempt's read is in flight does not take what the read
    found (the result may have been replaced before the caller called): it reads for itself."""
    name = harness.namespace.decode() + "fresh"
    result_key = name.encode() + b"/result"

    async def never() -> bytes:
        raise AssertionError("the result exists: nobody computes")

    async with harness.client() as writer, harness.client() as inner:
        await writer.txn([], [Put(result_key, b"old")])
        client = Counted(inner)
        async with Session(client, ttl=10) as session, anyio.create_task_group() as tg:
            client.hold_replies = release = anyio.Event()
            first: list[bytes] = []

            async def first_caller() -> None:
                first.append(await once(session, name, never))

            tg.start_soon(first_caller)
            await client.held.wait()  # its read found "old"; the reply is held
            client.hold_replies = None
            later = anyio.Event()
            second: list[bytes] = []

            async def second_caller() -> None:
                later.set()
                second.append(await once(session, name, never))

            tg.start_soon(second_caller)
            await later.wait()
            await anyio.wait_all_tasks_blocked()
            await writer.txn([], [Put(result_key, b"new")])  # replaced after the second caller called
            release.set()
        assert first == [b"old"] and second == [b"new"]
