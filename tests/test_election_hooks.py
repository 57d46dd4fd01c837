"""run_while_leader's hooks (what ``coordkit elect`` reports with) and observe_leader, on both backends."""

from __future__ import annotations

from contextlib import aclosing

import anyio
import pytest

from coordkit import Leader, Leadership, LeadershipLostError, Session, observe_leader, run_while_leader
from coordkit.testing import Harness

pytestmark = pytest.mark.anyio


async def test_hooks_report_each_campaign_and_each_loss(harness: Harness) -> None:
    name = harness.namespace.decode() + "hooks"
    events: list[str] = []
    sessions: list[Session] = []
    terms: list[int] = []
    seen: list[Leader | None] = []
    resigned = anyio.Event()
    async with harness.client() as client, harness.client() as observer:

        def campaigning(session: Session) -> None:
            sessions.append(session)
            events.append("campaign")

        def lost(exc: Exception) -> None:
            assert isinstance(exc, LeadershipLostError), exc
            events.append("lost")
            harness.heal(client)  # the next campaign's session keeps its lease

        async def job(leadership: Leadership) -> int:
            terms.append(leadership.term)
            events.append("lead")
            if len(terms) == 1:
                harness.suspend_keepalives(client)  # the session is lost at its deadline: the job is cancelled
                await anyio.sleep_forever()
            return 42

        async def observe() -> None:
            async with aclosing(observe_leader(observer, name)) as leaders:
                async for leader in leaders:
                    seen.append(leader)
                    if leader is None and len(terms) == 2:
                        resigned.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(observe)
            with anyio.fail_after(30):
                result = await run_while_leader(
                    client, name, job, value=b"me", ttl=2, on_campaign=campaigning, on_lost=lost
                )
            with anyio.fail_after(10):
                await resigned.wait()  # the second leader resigned when its job returned
            tg.cancel_scope.cancel()
    assert result == 42, "run_while_leader returns what the job returned"
    assert events == ["campaign", "lead", "lost", "campaign", "lead"]
    assert len({session.lease_id for session in sessions}) == 2, "each campaign on a new session"
    assert terms[0] < terms[1]
    leaders = [leader.term if leader is not None else None for leader in seen]
    # (the observer may start before or after the first leader is elected)
    assert leaders in ([None, terms[0], None, terms[1], None], [terms[0], None, terms[1], None]), leaders
    assert {leader.value for leader in seen if leader is not None} == {b"me"}


async def test_a_hook_that_raises_stops_campaigning(harness: Harness) -> None:
    name = harness.namespace.decode() + "giveup"
    campaigns = 0
    async with harness.client() as client:

        def lost(exc: Exception) -> None:
            raise RuntimeError("giving up") from exc

        def campaigning(session: Session) -> None:
            nonlocal campaigns
            campaigns += 1

        async def job(leadership: Leadership) -> None:
            harness.suspend_keepalives(client)
            await anyio.sleep_forever()

        with anyio.fail_after(30), pytest.raises(RuntimeError, match="giving up"):
            await run_while_leader(client, name, job, ttl=2, on_campaign=campaigning, on_lost=lost)
        harness.heal(client)
    assert campaigns == 1
    with pytest.raises(ValueError, match="empty"):
        observe_leader(client, "")
