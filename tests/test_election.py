"""Election on both backends: one leader at a time, observation, hand-over, failover, loss, leader-only jobs."""

from __future__ import annotations

import math
from contextlib import aclosing, suppress

import anyio
import pytest

from coordkit import (
    Election,
    Leader,
    Leadership,
    LeadershipLostError,
    NotOwnerError,
    Put,
    Session,
    UnavailableError,
    run_while_leader,
)
from coordkit.testing import Harness

from .helpers import sessions, wait_queue

pytestmark = pytest.mark.anyio


class Candidate:
    """A candidate in its own task, steered by the test: it campaigns, then proclaims or resigns on request."""

    def __init__(self, session: Session, name: str, value: bytes) -> None:
        self.session, self.name, self.value = session, name, value
        self.elected = anyio.Event()
        self.resign = anyio.Event()
        self.leadership: Leadership | None = None

    async def run(self) -> None:
        async with Election(self.session, self.name).campaign(self.value) as leadership:
            self.leadership = leadership
            self.elected.set()
            await self.resign.wait()


async def test_one_leader_at_a_time_in_campaign_order(harness: Harness) -> None:
    name = harness.namespace.decode() + "one"
    inside = 0
    terms: list[int] = []
    order: list[int] = []
    async with sessions(harness, 4) as group:
        observer = Election(group[0], name)

        async def candidate(i: int) -> None:
            nonlocal inside
            async with Election(group[i], name).campaign(str(i).encode()) as leadership:
                inside += 1
                assert inside == 1, "two leaders at once"
                terms.append(leadership.term)
                order.append(i)
                leader = await observer.leader()
                assert leader is not None and leader.value == str(i).encode() and leader.term == leadership.term
                await anyio.sleep(0.01)
                inside -= 1

        async with anyio.create_task_group() as tg:
            first = Candidate(group[0], name, b"0")
            tg.start_soon(first.run)
            await first.elected.wait()
            for i in range(1, 4):
                tg.start_soon(candidate, i)
                await wait_queue(group[0].backend, name, i + 1)
            first.resign.set()
        assert await observer.leader() is None
    assert order == [1, 2, 3]
    assert terms == sorted(terms) and len(set(terms)) == 3


async def test_observe_reports_every_transition_including_no_leader(harness: Harness) -> None:
    name = harness.namespace.decode() + "observe"
    seen: list[tuple[bytes, int] | None] = []
    async with sessions(harness, 3) as (watcher, a, b):
        changed = anyio.Event()

        async def observe() -> None:
            nonlocal changed
            async with aclosing(Election(watcher, name).observe()) as leaders:
                async for leader in leaders:
                    seen.append(None if leader is None else (leader.value, leader.term))
                    changed.set()

        async def next_change() -> None:
            nonlocal changed
            with anyio.fail_after(10):
                await changed.wait()
            changed = anyio.Event()

        async with anyio.create_task_group() as tg:
            tg.start_soon(observe)
            await next_change()  # None: nobody campaigns
            first, second = Candidate(a, name, b"a"), Candidate(b, name, b"b")
            tg.start_soon(first.run)
            await next_change()
            tg.start_soon(second.run)
            await wait_queue(watcher.backend, name, 2)  # b queued behind a: no change of leader
            assert first.leadership is not None
            await first.leadership.proclaim(b"a2")
            await next_change()
            first.resign.set()  # b leads at once
            await second.elected.wait()
            await next_change()
            assert second.leadership is not None
            await second.leadership.proclaim(b"b2")
            await next_change()
            second.resign.set()
            await next_change()
            tg.cancel_scope.cancel()
        with pytest.raises(NotOwnerError):
            assert first.leadership is not None
            await first.leadership.proclaim(b"too late")
    terms = [entry[1] for entry in seen if entry is not None]
    assert [None if e is None else e[0] for e in seen] == [None, b"a", b"a2", b"b", b"b2", None]
    assert terms[0] == terms[1] < terms[2] == terms[3], "proclaim keeps the term; a new leader has a larger one"


async def test_leadership_loss_cancels_body_before_successor(harness: Harness) -> None:
    name = harness.namespace.decode() + "loss"
    async with harness.client() as stale_client, harness.client() as other_client:
        async with Session(stale_client, ttl=2) as stale, Session(other_client, ttl=5) as other:
            cancelled_at = math.inf
            elected_at = math.inf
            terms: list[int] = []

            async def successor() -> None:
                nonlocal elected_at
                async with Election(other, name).campaign(b"next") as leadership:
                    elected_at = anyio.current_time()
                    terms.append(leadership.term)

            async with anyio.create_task_group() as tg:
                with pytest.raises(LeadershipLostError) as lost:
                    async with Election(stale, name).campaign(b"stale") as leadership:
                        terms.append(leadership.term)
                        tg.start_soon(successor)
                        await wait_queue(other.backend, name, 2)
                        harness.suspend_keepalives(stale_client)
                        try:
                            await anyio.sleep_forever()
                        finally:
                            cancelled_at = anyio.current_time()
                assert lost.value.session is stale
            assert cancelled_at < elected_at < math.inf
            assert terms[0] < terms[1]
            harness.heal(stale_client)


async def test_crashed_leader_replaced_within_ttl(harness: Harness) -> None:
    name = harness.namespace.decode() + "crash"
    async with harness.client() as crashing, harness.client() as survivor_client:
        async with Session(survivor_client, ttl=5) as survivor:
            leading = anyio.Event()

            async def doomed() -> None:
                # Cut off, its own session soon counts itself lost; the test is about the survivor.
                with suppress(LeadershipLostError):
                    async with Session(crashing, ttl=2) as session, Election(session, name).campaign(b"doomed"):
                        leading.set()
                        await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(doomed)
                await leading.wait()
                harness.partition(crashing)
                started = anyio.current_time()
                with anyio.fail_after(2 + 1):
                    async with Election(survivor, name).campaign(b"survivor"):
                        waited = anyio.current_time() - started
                harness.heal(crashing)
                tg.cancel_scope.cancel()
            assert waited <= 3


async def test_run_while_leader_runs_one_job_and_fails_over(harness: Harness) -> None:
    """Three replicas; only the leader's job runs; when it is cut off, its job stops and another takes over."""
    name = harness.namespace.decode() + "cron"
    ticks: list[tuple[str, int, float]] = []
    running: set[str] = set()
    first_tick, handed_over = anyio.Event(), anyio.Event()
    async with harness.client() as a, harness.client() as b, harness.client() as c:
        clients = {"a": a, "b": b, "c": c}

        async def replica(replica_name: str) -> None:
            async def job(leadership: Leadership) -> None:
                running.add(replica_name)
                try:
                    while True:
                        assert running == {replica_name}, f"two leaders' jobs at once: {running}"
                        ticks.append((replica_name, leadership.term, anyio.current_time()))
                        first_tick.set()
                        if ticks[0][0] != replica_name:
                            handed_over.set()
                        await anyio.sleep(0.2)
                finally:
                    running.discard(replica_name)

            await run_while_leader(clients[replica_name], name, job, value=replica_name.encode(), ttl=2)

        async with anyio.create_task_group() as tg:
            for replica_name in clients:
                tg.start_soon(replica, replica_name)
            with anyio.fail_after(10):
                await first_tick.wait()
            first_leader = ticks[0][0]
            harness.partition(clients[first_leader])
            with anyio.fail_after(10):
                await handed_over.wait()
            harness.heal(clients[first_leader])
            await anyio.sleep(1)
            tg.cancel_scope.cancel()
    leaders = [t[0] for t in ticks]
    assert len(set(leaders)) >= 2
    terms = [t[1] for t in ticks]
    assert terms == sorted(terms), "terms never go back"
    handover = next(i for i, t in enumerate(ticks) if t[0] != first_leader)
    assert ticks[handover][2] - ticks[handover - 1][2] <= 2 + 1 + 0.5, "failover within the TTL"


async def test_leader_and_bad_input(harness: Harness) -> None:
    name = harness.namespace.decode() + "misc"
    async with sessions(harness, 1) as (session,):
        election = Election(session, name)
        assert await election.leader() is None
        async with election.campaign(b"me") as leadership:
            leader = await election.leader()
            assert leader == Leader(b"me", leadership.term, leadership.key, session.lease_id)
            assert leadership.key == f"{name}/{session.lease_id:x}".encode(), "Go's key layout"
            assert (await session.backend.txn([leadership.guard()], [Put(b"x" + leadership.key, b"")])).succeeded
        with pytest.raises(TypeError):
            election.campaign("text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            Election(session, "")


@pytest.mark.parametrize("kind", ["memory"])
async def test_run_while_leader_propagates_the_jobs_own_errors(harness: Harness) -> None:
    name = harness.namespace.decode() + "joberror"
    runs = 0

    async def job(leadership: Leadership) -> None:
        nonlocal runs
        runs += 1
        raise UnavailableError("the job's own database is down")

    async with harness.client() as client:
        with pytest.raises(UnavailableError, match="database"):
            await run_while_leader(client, name, job)
    assert runs == 1, "a job's own error is not a lost leadership: no re-campaign"


async def test_leader_latch_reports_becoming_and_stopping_leader(harness: Harness) -> None:
    name = harness.namespace.decode() + "latch"
    first_saw: list[bool] = []
    first_terms: list[int] = []
    resign = anyio.Event()

    async def first_candidate(session: Session, leading: anyio.Event) -> None:
        async with Election(session, name).latch(b"a") as first:
            with anyio.fail_after(10):
                await first.wait_leader()
            assert first.is_leader and first.term is not None
            first_terms.append(first.term)
            result = await session.backend.txn([first.guard()], [Put(harness.namespace + b"fenced", b"a")])
            assert result.succeeded, "the latch's guard fences writes like a leadership's"
            async with aclosing(first.changes()) as changes:
                first_saw.append(await anext(changes))
                leading.set()
                await resign.wait()
        first_saw.append(first.is_leader)  # resigned with its block

    async with sessions(harness, 2) as (a, b), anyio.create_task_group() as tg:
        leading = anyio.Event()
        tg.start_soon(first_candidate, a, leading)
        await leading.wait()
        async with Election(b, name).latch(b"b") as second, aclosing(second.changes()) as changes:
            assert await anext(changes) is False, "the current state first"
            assert not second.is_leader
            with pytest.raises(NotOwnerError):
                second.guard()
            resign.set()
            with anyio.fail_after(10):
                assert await anext(changes) is True, "the next candidate becomes leader once the first resigns"
            assert second.is_leader and second.term is not None and second.term > first_terms[0]
            leader = await Election(b, name).leader()
            assert leader is not None and leader.value == b"b"
    assert first_saw == [True, False]


async def test_leader_latch_ends_typed_when_its_session_is_lost(harness: Harness) -> None:
    name = harness.namespace.decode() + "latch-lost"
    async with harness.client() as client, Session(client, ttl=2) as session:
        seen: list[bool] = []
        with pytest.raises(LeadershipLostError):
            async with Election(session, name).latch() as latch:
                await latch.wait_leader()
                async with aclosing(latch.changes()) as changes:
                    seen.append(await anext(changes))
                    harness.suspend_keepalives(client)
                    seen.append(await anext(changes))  # False, then the block is cancelled
                    await anyio.sleep(60)
        assert seen == [True, False] and not latch.is_leader
        harness.heal(client)
