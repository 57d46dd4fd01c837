"""Misuse, on both backends: each mistake gets a clear typed error naming what it is about, never a hang, and
leaves the store as it was.

Covered: release twice; use before a session is entered and after it exited; recipes on a lost session; a
campaign while already leading; proclaiming after resigning or after losing; a candidate giving up before it
leads; one Lock object entered by two tasks at once, or twice by one, or released by another task under its
block; once() with a result its codec cannot encode; WorkQueue: extending a claim after completing it or after its
timeout, entering the queue twice; joining a group twice with one id; views and workers entered twice; failures
whose message is too large to record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from coordkit import (
    JSON,
    ClaimLostError,
    ComputationLostError,
    ConfigView,
    Election,
    Group,
    JobSpec,
    LeadershipLostError,
    Lock,
    LockLostError,
    MemberExistsError,
    MembershipLostError,
    NotOwnerError,
    OwnershipLostError,
    PermitLostError,
    Range,
    RunContext,
    Scheduler,
    Semaphore,
    Session,
    SessionClosedError,
    Watch,
    WorkQueue,
    once,
)
from coordkit.testing import Harness

from .helpers import sessions

pytestmark = pytest.mark.anyio

#: a bound for every wait: generous on a loaded machine, yet never a hang
BOUND = 15


async def keys(harness: Harness, client: Any) -> list[bytes]:
    return [kv.key for kv in (await client.range(Range(harness.namespace, prefix=True, keys_only=True))).kvs]


async def fails(error: type[Exception], call: Awaitable[object], *says: str) -> Exception:
    """Await ``call`` (bounded): it raises ``error`` with a message containing each of ``says``."""
    with pytest.raises(error) as info, anyio.fail_after(BOUND):
        await call
    for text in says:
        assert text in str(info.value), f"{text!r} not in the message: {info.value}"
    return info.value


async def enter(make: Callable[[], Any]) -> None:
    async with make():
        pass


async def result() -> bytes:
    return b"done"


async def test_release_twice_and_release_unheld(harness: Harness) -> None:
    name = harness.namespace.decode() + "twice"
    async with sessions(harness, 1) as (session,):
        for contender in (Lock(session, name), Semaphore(session, name + "-sem", limit=2)):
            await fails(RuntimeError, contender.release(), "not held", repr(contender.name))
            await contender.acquire()
            await contender.release()
            await fails(RuntimeError, contender.release(), "not held", repr(contender.name))
            assert await contender.try_acquire(), "still usable"
            await contender.release()
        assert await keys(harness, session.backend) == []


async def refuses_every_recipe(session: Session, ns: str, state: str) -> None:
    await fails(SessionClosedError, Lock(session, ns + "lock").acquire(), state, f"lock {ns + 'lock'!r}")
    await fails(SessionClosedError, Lock(session, ns + "lock").try_acquire(), state)
    await fails(SessionClosedError, enter(lambda: Lock(session, ns + "lock")), state)
    await fails(SessionClosedError, Semaphore(session, ns + "sem", limit=2).acquire(), state, "semaphore")
    await fails(SessionClosedError, enter(lambda: Election(session, ns + "e").campaign()), state, "election")
    await fails(SessionClosedError, enter(lambda: Group(session, ns + "g").join("m")), state, "'m'")
    await fails(SessionClosedError, once(session, ns + "once", result), state, f"once({ns + 'once'!r})")
    await fails(SessionClosedError, enter(lambda: WorkQueue(session, ns + "q").lease()), state, "queue")
    await fails(SessionClosedError, enter(lambda: Scheduler(session, ns + "cron")), state, "scheduler")
    await fails(SessionClosedError, enter(session.guarded), state)
    await fails(SessionClosedError, session.wait_lost())  # it would never return: refused instead


async def test_a_session_not_entered_or_exited_refuses_every_recipe(harness: Harness) -> None:
    ns = harness.namespace.decode()
    async with harness.client() as client:
        await refuses_every_recipe(Session(client, ttl=5), ns, "not been entered")
        async with Session(client, ttl=5) as exited:
            pass
        await refuses_every_recipe(exited, ns, "exited")
        assert not exited.lost, "a session that exited normally was not lost"
        await fails(RuntimeError, enter(lambda: exited), "entered once")
        assert await keys(harness, client) == []


async def test_wait_lost_ends_when_the_session_exits(harness: Harness) -> None:
    outcome: list[BaseException] = []
    done = anyio.Event()
    async with harness.client() as client, anyio.create_task_group() as tg:
        async with Session(client, ttl=5) as session:

            async def waiter() -> None:
                try:
                    await session.wait_lost()
                except SessionClosedError as exc:
                    outcome.append(exc)
                done.set()

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(BOUND):
            await done.wait()
    assert len(outcome) == 1 and "exited" in str(outcome[0]), "waiting for a loss that cannot come any more ends"


async def test_recipes_on_a_lost_session_raise_their_lost_error_and_write_nothing(harness: Harness) -> None:
    ns = harness.namespace.decode()
    async with harness.client() as client, Session(client, ttl=2) as session:
        await harness.expire_lease(session.lease_id)
        with anyio.fail_after(BOUND):
            await session.wait_lost()
        calls: list[tuple[type[Exception], Callable[[], Awaitable[object]], str]] = [
            (LockLostError, lambda: Lock(session, ns + "lock").acquire(), f"lock {ns + 'lock'!r}"),
            (LockLostError, lambda: Lock(session, ns + "lock").try_acquire(), "lock"),
            (PermitLostError, lambda: Semaphore(session, ns + "sem", limit=3).acquire(), "semaphore"),
            (LeadershipLostError, lambda: enter(lambda: Election(session, ns + "e").campaign()), "election"),
            (MembershipLostError, lambda: enter(lambda: Group(session, ns + "g").join("m")), "'m' of group"),
            (ComputationLostError, lambda: once(session, ns + "once", result), "once("),
            (ClaimLostError, lambda: enter(lambda: WorkQueue(session, ns + "q").lease()), "queue"),
            (OwnershipLostError, lambda: enter(lambda: Scheduler(session, ns + "cron")), "scheduler"),
        ]
        for error, call, says in calls:
            await fails(error, call(), says, "session lost")
        assert await keys(harness, client) == []


async def test_campaigning_again_while_leading_is_refused(harness: Harness) -> None:
    name = harness.namespace.decode() + "leader"
    async with sessions(harness, 1) as (session,):
        election = Election(session, name)
        async with election.campaign(b"a") as leadership:
            await fails(RuntimeError, enter(lambda: election.campaign(b"again")), repr(name), "re-entrant")
            leader = await election.leader()
            assert leader is not None and (leader.term, leader.value) == (leadership.term, b"a"), "still leading"
            await leadership.proclaim(b"a2")
        assert await election.leader() is None, "resigned on exit"
        assert await keys(harness, session.backend) == []


async def test_proclaim_after_resigning_or_losing_is_refused(harness: Harness) -> None:
    name = harness.namespace.decode() + "proclaim"
    async with harness.client() as stale_client, harness.client() as other_client:
        async with Session(other_client, ttl=5) as other:
            election = Election(other, name)
            async with election.campaign(b"first") as resigned:
                pass
            await fails(NotOwnerError, resigned.proclaim(b"late"), repr(name), "not the leader")
            assert await election.leader() is None, "a refused proclaim writes nothing"
            # a leader whose lease expired: its successor leads, and the stale proclaim cannot touch it
            async with Session(stale_client, ttl=2) as stale:
                with pytest.raises(LeadershipLostError, match=repr(name)):
                    async with Election(stale, name).campaign(b"stale") as lost:
                        await harness.expire_lease(stale.lease_id)
                        await anyio.sleep_forever()
            async with election.campaign(b"successor"):
                await fails(NotOwnerError, lost.proclaim(b"stale again"), repr(name))
                leader = await election.leader()
                assert leader is not None and leader.value == b"successor"


async def test_a_candidate_that_gives_up_leaves_no_key(harness: Harness) -> None:
    """Resigning before leading: a cancelled campaign removes its key; the leader is not disturbed."""
    name = harness.namespace.decode() + "give-up"
    async with sessions(harness, 2) as (leader_session, waiting):
        election = Election(leader_session, name)
        async with election.campaign(b"leader") as leadership:
            with anyio.move_on_after(0.5) as scope:
                await enter(lambda: Election(waiting, name).campaign(b"waiter"))
            assert scope.cancelled_caught
            assert [kv.key for kv in (await waiting.backend.range(Range(f"{name}/".encode(), prefix=True))).kvs] == [
                leadership.key
            ]
            leader = await election.leader()
            assert leader is not None and leader.term == leadership.term


async def test_one_lock_object_shared_by_tasks_and_entered_twice_by_one(harness: Harness) -> None:
    """Tasks sharing one Lock object take turns (never both inside); one task entering it twice gets an error."""
    name = harness.namespace.decode() + "shared"
    async with sessions(harness, 1) as (session,):
        lock = Lock(session, name)
        inside, entries = 0, 0

        async def use() -> None:
            nonlocal inside, entries
            async with lock:
                inside += 1
                entries += 1
                assert inside == 1, "two tasks inside one Lock object at once"
                await anyio.sleep(0.1)
                inside -= 1

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(use)
        assert entries == 3
        async with lock:
            await fails(RuntimeError, enter(lambda: lock), repr(name), "re-entrant")
            await fails(RuntimeError, lock.acquire(), repr(name))
            await fails(RuntimeError, lock.try_acquire(), repr(name))
            await fails(RuntimeError, Lock(session, name).acquire(), repr(name), "deadlock")
        assert await keys(harness, session.backend) == []


async def test_a_block_whose_lock_another_task_released_leaves_the_next_holder_alone(harness: Harness) -> None:
    """A released the shared Lock object from another task, B then entered it: A's exit raises, B keeps it."""
    name = harness.namespace.decode() + "handed-on"
    async with sessions(harness, 1) as (session,):
        lock = Lock(session, name)
        b_inside, a_done = anyio.Event(), anyio.Event()
        b_held: list[bool] = []

        async def b() -> None:
            async with lock as held:
                b_inside.set()
                await a_done.wait()
                b_held.append(lock.held == held)
                assert [kv.key for kv in (await session.backend.range(Range(held.key))).kvs] == [held.key]

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                with pytest.raises(RuntimeError, match="not held"):
                    async with lock:
                        tg.start_soon(lock.release)  # another task gives the name back: the turn ends early
                        tg.start_soon(b)
                        await b_inside.wait()
                a_done.set()
        assert b_held == [True], "the first block's exit must not release (or leave the guard of) the next holder"
        assert await keys(harness, session.backend) == []


async def test_once_with_a_result_its_codec_cannot_encode(harness: Harness) -> None:
    name = harness.namespace.decode() + "unserialisable"

    async def compute() -> Any:
        return {"when": datetime.now(UTC)}  # JSON cannot encode a datetime

    async def serialisable() -> Any:
        return {"when": "now"}

    async with sessions(harness, 1) as (session,):
        error = await fails(TypeError, once(session, name, compute, codec=JSON), "datetime")
        assert any(repr(name) in note for note in error.__notes__), "a note names the once() call"
        assert await keys(harness, session.backend) == [], "nothing published, the claim released"
        assert await once(session, name, serialisable, codec=JSON) == {"when": "now"}, "not poisoned"


async def test_extending_a_claim_after_it_ended(harness: Harness) -> None:
    name = harness.namespace.decode() + "claims"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name)
        await queue.put(b"job")
        with anyio.fail_after(BOUND):
            async with queue.lease() as completed:
                pass
        await fails(ClaimLostError, completed.extend(), completed.id, "already ended")
        assert (await queue.depth()).pending == 0, "completed: a late extend does not bring it back"
        await queue.put(b"slow")
        with pytest.raises(ClaimLostError, match="visibility timeout"), anyio.fail_after(BOUND):
            async with queue.lease(visibility_timeout=2) as timed_out:
                await anyio.sleep(10)  # past its visibility timeout: cancelled, then ClaimLostError
        await fails(ClaimLostError, timed_out.extend(), timed_out.id)
        depth = await queue.depth()
        assert (depth.pending, depth.leased) == (1, 0), "given back, not completed"
        with anyio.fail_after(BOUND):
            async with queue.lease() as again:
                assert again.id == timed_out.id and again.attempt == 2


async def test_entering_a_queue_view_watch_or_worker_twice(harness: Harness) -> None:
    ns = harness.namespace.decode()
    async with sessions(harness, 1) as (session,), anyio.create_task_group():
        client = session.backend
        queue = WorkQueue(session, ns + "q")
        async with queue:
            await fails(RuntimeError, enter(lambda: queue), repr(ns + "q"), "already entered")
        async with queue:  # entering again after leaving is fine
            await queue.put(b"x")
        view = ConfigView(client, ns + "cfg/")
        async with view:
            await fails(RuntimeError, enter(lambda: view), repr(ns + "cfg/"))
        watch = Watch(client, harness.namespace, prefix=True)
        async with watch:
            await fails(RuntimeError, enter(lambda: watch), "once")


async def test_a_scheduler_restarts_and_refuses_to_run_twice_at_once(harness: Harness) -> None:
    """Regression: a Scheduler entered again after leaving never ticked again (stale tickers)."""
    prefix = harness.namespace.decode() + "cron"
    base = datetime(2026, 1, 1, tzinfo=UTC)
    runs: list[datetime] = []

    ran = anyio.Event()

    async def job(context: RunContext) -> None:
        runs.append(context.tick)
        ran.set()

    async with sessions(harness, 1) as (session,):
        scheduler = Scheduler(session, prefix, now=lambda: base + timedelta(seconds=anyio.current_time()))
        scheduler.register("job", job)
        await scheduler.put_job(JobSpec("job", "job", interval=1))
        for _ in range(2):
            ran = anyio.Event()
            with anyio.fail_after(BOUND):
                async with scheduler:
                    await fails(RuntimeError, enter(lambda: scheduler), repr(prefix), "already running")
                    await ran.wait()  # it ticks, the second time too
        assert len(set(runs)) == len(runs) >= 2


async def test_joining_a_group_twice_with_one_id(harness: Harness) -> None:
    name = harness.namespace.decode() + "members"
    async with sessions(harness, 2) as (first, second):
        group = Group(first, name)
        async with group.join("worker-1", metadata=b"a") as member:
            await fails(MemberExistsError, enter(lambda: group.join("worker-1")), repr(name), "'worker-1'")
            await fails(MemberExistsError, enter(lambda: Group(second, name).join("worker-1")), repr(name))
            await fails(MemberExistsError, enter(lambda: member), "already joined")
            assert dict((await group.members()).members) == {"worker-1": b"a"}, "the member is intact"
        await fails(NotOwnerError, member.update(b"b"), "'worker-1'", repr(name))
        assert await keys(harness, first.backend) == []


async def test_failures_with_huge_messages_are_recorded_cut_short(harness: Harness) -> None:
    """A consumer or a job failing with a message larger than a request: the failure is recorded (cut short), the
    caller sees its own error, and the worker goes on."""
    ns = harness.namespace.decode()
    huge = "e" * (2 * 2**20)
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, ns + "q", max_attempts=1)
        item = await queue.put(b"job")
        with pytest.raises(ValueError, match=r"^e+$"), anyio.fail_after(BOUND):
            async with queue.lease():
                raise ValueError(huge)
        (letter,) = await queue.dead_letters()
        assert letter.id == item and letter.error.startswith("ValueError: eee") and len(letter.error) <= 4096

        base = datetime(2026, 1, 1, tzinfo=UTC)
        scheduler = Scheduler(session, ns + "cron", now=lambda: base + timedelta(seconds=anyio.current_time()))
        attempts = 0
        failed_twice = anyio.Event()

        async def failing(context: RunContext) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 2:
                failed_twice.set()
            raise RuntimeError(huge)

        scheduler.register("fail", failing)
        await scheduler.put_job(JobSpec("fail", "fail", interval=1))
        with anyio.fail_after(BOUND):
            async with scheduler:
                await failed_twice.wait()  # the worker went on after recording the first failure
        # leaving the worker lets the runs it started record their outcome (shielded)
        errors = [r for r in await scheduler.history("fail") if r.outcome == "error"]
        assert len(errors) >= 2 and all(r.error is not None and len(r.error) <= 4096 for r in errors)
        assert all(r.error.startswith("RuntimeError: eee") for r in errors if r.error)
