"""Group membership on both backends: join/leave/crash, metadata, watch transitions, duplicates, 1,000 members."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing, suppress

import anyio
import pytest

from coordkit import (
    Group,
    GroupView,
    MemberExistsError,
    MembershipLostError,
    NotOwnerError,
    Session,
)
from coordkit.testing import Harness

from .helpers import sessions

pytestmark = pytest.mark.anyio


class Monitor:
    """Follows a group in a task and lets the test wait for the next view."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.views: list[GroupView] = []
        self._seen = 0  # views handed to the test by next()
        self._arrived = anyio.Event()

    async def run(self) -> None:
        async with aclosing(self.group.watch()) as views:
            async for view in views:
                self.views.append(view)
                self._arrived.set()
                self._arrived = anyio.Event()

    async def next(self) -> GroupView:
        """The next view the test has not looked at yet."""
        with anyio.fail_after(15):
            while len(self.views) <= self._seen:
                await self._arrived.wait()
        self._seen += 1
        return self.views[self._seen - 1]

    async def until(self, predicate: Callable[[GroupView], bool]) -> GroupView:
        """The first view not looked at yet that satisfies ``predicate``."""
        while not predicate(view := await self.next()):
            pass
        return view


async def test_join_update_leave_and_watch_transitions(harness: Harness) -> None:
    name = harness.namespace.decode() + "workers"
    async with sessions(harness, 3) as (observer, a, b):
        monitor = Monitor(Group(observer, name))
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)
            first = await monitor.next()
            assert dict(first.members) == {} and not first.resync
            async with Group(a, name).join("a", metadata=b"10.0.0.1") as member_a:
                view = await monitor.next()
                assert view.joined == {"a"} and dict(view.members) == {"a": b"10.0.0.1"}
                async with Group(b, name).join("b", metadata=b"10.0.0.2"):
                    view = await monitor.next()
                    assert view.joined == {"b"} and set(view.members) == {"a", "b"}
                    await member_a.update(b"10.0.0.1;load=3")
                    view = await monitor.next()
                    assert view.updated == {"a"} and view.members["a"] == b"10.0.0.1;load=3"
                    members = await Group(observer, name).members()
                    assert dict(members.members) == {"a": b"10.0.0.1;load=3", "b": b"10.0.0.2"}
                    assert members.revision == view.revision
                view = await monitor.next()
                assert view.left == {"b"} and set(view.members) == {"a"}
            view = await monitor.next()
            assert view.left == {"a"} and dict(view.members) == {}
            with pytest.raises(NotOwnerError):
                await member_a.update(b"gone")
            tg.cancel_scope.cancel()
        revisions = [v.revision for v in monitor.views]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


async def test_duplicate_member_id_is_refused(harness: Harness) -> None:
    name = harness.namespace.decode() + "dupes"
    async with sessions(harness, 2) as (a, b):
        async with Group(a, name).join("same"):
            with pytest.raises(MemberExistsError):
                async with Group(b, name).join("same"):
                    pass
            with pytest.raises(MemberExistsError):
                async with Group(a, name).join("same"):
                    pass
            assert list((await Group(a, name).members()).members) == ["same"]
        for bad in ("", "a/b"):
            with pytest.raises(ValueError, match="member id"):
                Group(a, name).join(bad)


async def test_crashed_member_disappears_within_ttl(harness: Harness) -> None:
    name = harness.namespace.decode() + "crash"
    async with harness.client() as crashing, sessions(harness, 1) as (observer,):
        monitor = Monitor(Group(observer, name))
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)
            await monitor.next()
            joined = anyio.Event()

            async def doomed() -> None:
                with suppress(MembershipLostError):
                    async with Session(crashing, ttl=2) as session, Group(session, name).join("doomed"):
                        joined.set()
                        await anyio.sleep_forever()

            tg.start_soon(doomed)
            await joined.wait()
            await monitor.until(lambda v: "doomed" in v.members)
            harness.partition(crashing)
            crashed_at = anyio.current_time()
            view = await monitor.until(lambda v: "doomed" not in v.members)
            assert view.left == {"doomed"}
            assert anyio.current_time() - crashed_at <= 2 + 1
            harness.heal(crashing)
            tg.cancel_scope.cancel()


async def test_membership_lost_cancels_member_block(harness: Harness) -> None:
    name = harness.namespace.decode() + "lost"
    async with harness.client() as client, Session(client, ttl=2) as session:
        with pytest.raises(MembershipLostError):
            async with Group(session, name).join("m"):
                harness.suspend_keepalives(client)
                await anyio.sleep_forever()
        harness.heal(client)


async def test_watch_survives_broken_streams_and_resyncs_after_compaction(harness: Harness) -> None:
    name = harness.namespace.decode() + "reliable"
    async with harness.client() as observer_client, sessions(harness, 1) as (member_session,):
        async with Session(observer_client, ttl=10) as observer:
            monitor = Monitor(Group(observer, name))
            group = Group(member_session, name)
            async with anyio.create_task_group() as tg:
                tg.start_soon(monitor.run)
                await monitor.next()
                async with group.join("one"):
                    await monitor.until(lambda v: "one" in v.members)
                    harness.break_watches(observer_client)
                    async with group.join("two"):
                        await monitor.until(lambda v: "two" in v.members)
                    view = await monitor.until(lambda v: "two" not in v.members)
                    assert view.left == {"two"}
                joins = [m for v in monitor.views for m in v.joined]
                assert sorted(joins) == ["one", "two"], "no missed or repeated join across the broken stream"
                tg.cancel_scope.cancel()
            # After a compaction, a watch from old history resyncs with a full view.
            async with group.join("three"):
                current = (await group.members()).revision
                await harness.compact(current)
                async with aclosing(Group(observer, name).watch()) as views:
                    first = await anext(views)
                assert dict(first.members) == {"three": b""}


async def test_thousand_members(harness: Harness) -> None:
    name = harness.namespace.decode() + "fleet"
    async with sessions(harness, 10, ttl=30) as group_sessions:
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            joined = 0
            leave = anyio.Event()

            async def member(session: Session, i: int) -> None:
                nonlocal joined
                async with Group(session, name).join(f"m{i:04d}", metadata=str(i).encode()):
                    joined += 1
                    if joined == 1000:
                        ready.set()
                    await leave.wait()

            for i in range(1000):
                tg.start_soon(member, group_sessions[i % 10], i)
            with anyio.fail_after(60):
                await ready.wait()
            view = await Group(group_sessions[0], name).members()
            assert len(view.members) == 1000 and view.members["m0999"] == b"999"
            leave.set()
        assert len((await Group(group_sessions[0], name).members()).members) == 0


async def test_join_needs_an_open_session_and_writes_nothing_otherwise(harness: Harness) -> None:
    from coordkit import SessionClosedError

    name = harness.namespace.decode() + "closed"
    async with harness.client() as client:
        never_entered = Session(client, ttl=5)
        with pytest.raises(SessionClosedError):
            async with Group(never_entered, name).join("ghost"):
                pass
        async with Session(client, ttl=5) as session:
            membership = Group(session, name).join("early")
            with pytest.raises(NotOwnerError):
                await membership.update(b"before joining")
            assert (await Group(session, name).members()).members == {}
        with pytest.raises(SessionClosedError):
            async with Group(session, name).join("late"):
                pass


async def test_leave_stuck_past_the_deadline_still_deletes_while_the_session_lives(harness: Harness) -> None:
    """Regression: leaving gave up at the session's deadline as it was when the leave began, although
    keepalives had moved it on: the member stayed listed for as long as the session lived (found on a
    3-member etcd cluster, where a write caught by a leader's death waits for etcd's request timeout)."""
    from .helpers import StuckWrites

    name = harness.namespace.decode() + "stuck-leave"
    async with harness.client() as inner, Session(StuckWrites(inner), ttl=3) as session:
        writes = session.backend
        assert isinstance(writes, StuckWrites)
        left = anyio.Event()

        async def member(joined: anyio.Event) -> None:
            async with Group(session, name).join("m"):
                joined.set()
                writes.stick()  # the leave's delete hangs
            left.set()

        async with anyio.create_task_group() as tg:
            joined = anyio.Event()
            tg.start_soon(member, joined)
            await joined.wait()
            deadline_at_leave = session.deadline
            await anyio.sleep(deadline_at_leave - anyio.current_time() + 1)
            assert not session.lost, "keepalives go through: the session is valid"
            assert not left.is_set(), "the member key is still there: leaving must not have given up"
            writes.unstick()
        assert (await Group(session, name).members()).members == {}
