"""WorkQueue on both backends: exclusive leases, FIFO and priority, crash and timeout re-delivery, dead letters."""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from coordkit import ClaimLostError, Session, WorkQueue
from coordkit.testing import Harness

from .helpers import sessions

pytestmark = pytest.mark.anyio


async def test_producers_and_consumers_each_item_done_once(harness: Harness) -> None:
    name = harness.namespace.decode() + "jobs"
    done: list[bytes] = []
    in_hand: set[bytes] = set()
    async with sessions(harness, 6) as group:
        producers, consumers = group[:2], group[2:]

        async def produce(session: Session, tag: str) -> None:
            queue = WorkQueue(session, name)
            for i in range(15):
                await queue.put(f"{tag}-{i}".encode())

        async def consume(session: Session) -> None:
            queue = WorkQueue(session, name)
            while len(done) < 30:
                with anyio.move_on_after(2):
                    async with queue.lease(visibility_timeout=10) as task:
                        assert task.payload not in in_hand, "two consumers hold one item"
                        in_hand.add(task.payload)
                        await anyio.sleep(0.01)
                        in_hand.discard(task.payload)
                        done.append(task.payload)

        async with anyio.create_task_group() as tg:
            for session in consumers:
                tg.start_soon(consume, session)
            for session, tag in zip(producers, ("p", "q"), strict=True):
                tg.start_soon(produce, session, tag)
        assert sorted(done) == sorted([f"{t}-{i}".encode() for t in "pq" for i in range(15)])
        depth = await WorkQueue(group[0], name).depth()
        assert (depth.pending, depth.leased, depth.dead) == (0, 0, 0)


async def test_fifo_and_priority(harness: Harness) -> None:
    name = harness.namespace.decode() + "order"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name)
        for i in range(5):
            await queue.put(str(i).encode())
        await queue.put(b"urgent", priority=10)
        order = []
        for _ in range(6):
            async with queue.lease() as task:
                order.append(task.payload)
        assert order == [b"urgent", b"0", b"1", b"2", b"3", b"4"]


async def test_crashed_consumer_item_is_redelivered(harness: Harness) -> None:
    name = harness.namespace.decode() + "crash"
    async with harness.client() as crashing, sessions(harness, 2) as (producer, survivor):
        await WorkQueue(producer, name).put(b"index shard 7")
        holding = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def doomed() -> None:
                with suppress(ClaimLostError):
                    async with Session(crashing, ttl=2) as session:
                        async with WorkQueue(session, name).lease(visibility_timeout=3):
                            holding.set()
                            await anyio.sleep_forever()

            tg.start_soon(doomed)
            await holding.wait()
            harness.partition(crashing)  # no completion, no release, no more heartbeats
            started = anyio.current_time()
            with anyio.fail_after(3 + 2):
                async with WorkQueue(survivor, name).lease() as task:
                    assert task.payload == b"index shard 7" and task.attempt == 2
            assert anyio.current_time() - started <= 3 + 1
            harness.heal(crashing)
            tg.cancel_scope.cancel()
        assert (await WorkQueue(producer, name).depth()).pending == 0


async def test_visibility_timeout_cancels_late_consumer_and_fences_it(harness: Harness) -> None:
    name = harness.namespace.decode() + "slow"
    async with sessions(harness, 2) as (slow, fast):
        await WorkQueue(slow, name).put(b"job")
        with pytest.raises(ClaimLostError, match="visibility"):
            async with WorkQueue(slow, name).lease(visibility_timeout=2) as task:
                await anyio.sleep(10)  # never extends
        assert task.attempt == 1
        async with WorkQueue(fast, name).lease(visibility_timeout=2) as again:
            assert again.id == task.id and again.attempt == 2
            await anyio.sleep(1.2)
            await again.extend()  # extending keeps it past the original timeout
            await anyio.sleep(1.2)
        depth = await WorkQueue(fast, name).depth()
        assert (depth.pending, depth.leased) == (0, 0)


async def test_failures_retry_then_dead_letter_and_requeue(harness: Harness) -> None:
    name = harness.namespace.decode() + "poison"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name, max_attempts=3)
        item_id = await queue.put(b"poison")
        attempts = []
        for _ in range(3):
            with pytest.raises(ValueError, match="bad input"):
                async with queue.lease() as task:
                    attempts.append(task.attempt)
                    raise ValueError("bad input")
        assert attempts == [1, 2, 3]
        depth = await queue.depth()
        assert (depth.pending, depth.leased, depth.dead) == (0, 0, 1)
        (letter,) = await queue.dead_letters()
        assert (letter.id, letter.payload, letter.attempts) == (item_id, b"poison", 3)
        assert "ValueError: bad input" in letter.error
        assert await queue.requeue(item_id)
        assert not await queue.requeue(item_id)
        async with queue.lease() as task:
            assert task.payload == b"poison" and task.attempt == 1
        assert await queue.depth() == type(depth)(0, 0, 0)


async def test_cancelled_consumer_gives_item_back_uncounted(harness: Harness) -> None:
    name = harness.namespace.decode() + "cancelled"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name)
        await queue.put(b"job")
        with anyio.move_on_after(0.5):
            async with queue.lease() as task:
                await anyio.sleep_forever()
        async with queue.lease() as again:
            assert again.id == task.id and again.attempt == 1


async def test_lease_needs_an_open_session_and_timeouts_are_recorded(harness: Harness) -> None:
    from coordkit import SessionClosedError

    name = harness.namespace.decode() + "closed"
    async with harness.client() as client:
        async with Session(client, ttl=5) as session:
            queue = WorkQueue(session, name, max_attempts=1)
            await queue.put(b"job")
        with pytest.raises(SessionClosedError):
            async with WorkQueue(Session(client, ttl=5), name).lease():
                pass
        async with Session(client, ttl=5) as session:
            queue = WorkQueue(session, name, max_attempts=1)
            assert (await queue.depth()).pending == 1, "the closed session claimed nothing"
            with pytest.raises(ClaimLostError):
                async with queue.lease(visibility_timeout=2):
                    await anyio.sleep(10)
            (letter,) = await queue.dead_letters()
            assert "visibility timeout" in letter.error


async def test_bad_records_are_dead_lettered_and_the_rest_flows(harness: Harness) -> None:
    import base64

    from coordkit import Delete, Put

    name = harness.namespace.decode() + "foreign"
    items = name.encode() + b"/items/"
    async with sessions(harness, 2) as (session, other), harness.client() as raw:
        queue = WorkQueue(session, name)
        first = await queue.put(b"first")
        # What producers in other languages might write (etcdctl put, a typo, another format):
        bad = {
            b"banana": b"banana",
            b"no-payload": b'{"priority": 1}',
            b"bad-base64": b'{"payload": "!!not base64!!"}',
            b"wrong-type": b'{"payload": "aGk=", "priority": "high"}',
            b"negative": b'{"payload": "aGk=", "attempts": -1}',
            b"list": b'["payload"]',
            b"\xff\xfe": b'{"payload": "aGk="}',
        }
        for key, value in bad.items():
            await raw.txn([], [Put(items + key, value)])
        # A well-formed foreign item, written as a plain put (only "payload" is required).
        await raw.txn([], [Put(items + b"from-go", b'{"payload": "' + base64.b64encode(b"go job") + b'"}')])
        last = await queue.put(b"last")
        got = []
        async with WorkQueue(other, name) as consumer:
            for _ in range(3):
                with anyio.fail_after(5):
                    async with consumer.lease() as task:
                        got.append((task.id, task.payload, task.attempt))
        assert got == [(first, b"first", 1), ("from-go", b"go job", 1), (last, b"last", 1)]
        letters = {letter.id: letter for letter in await queue.dead_letters()}
        expected_ids = {key.decode("utf-8", "surrogateescape") for key in bad}
        assert set(letters) == expected_ids
        for key, value in bad.items():
            letter = letters[key.decode("utf-8", "surrogateescape")]
            assert letter.payload == value and letter.attempts == 0
            assert letter.error.startswith("undecodable item record: ")
        assert "not a JSON document" in letters["banana"].error
        assert "'payload'" in letters["no-payload"].error and "base64" in letters["bad-base64"].error
        assert "'priority'" in letters["wrong-type"].error and "'attempts'" in letters["negative"].error
        assert "not UTF-8" in letters["\udcff\udcfe"].error
        assert await queue.depth() == type(await queue.depth())(0, 0, len(bad))
        # A foreign dead letter is shown, not fatal; requeue offers the raw record as the payload.
        await raw.txn([], [Put(name.encode() + b"/dead/odd", b"\x00garbage")])
        odd = [letter for letter in await queue.dead_letters() if letter.id == "odd"]
        assert odd[0].payload == b"\x00garbage" and "undecodable dead letter" in odd[0].error
        assert await queue.requeue("banana") and await queue.requeue("odd")
        with pytest.raises(ValueError, match="not UTF-8"):
            await queue.requeue("\udcff\udcfe")
        requeued = set()
        for _ in range(2):
            with anyio.fail_after(5):
                async with queue.lease() as task:
                    requeued.add(task.payload)
        assert requeued == {b"banana", b"\x00garbage"}
        await raw.txn([], [Delete(name.encode() + b"/", prefix=True)])


async def test_put_many_and_foreign_priorities(harness: Harness) -> None:
    import base64

    from coordkit import Put

    name = harness.namespace.decode() + "many"
    async with sessions(harness, 1) as (session,), harness.client() as raw:
        queue = WorkQueue(session, name)
        ids = await queue.put_many([b"a%d" % i for i in range(130)])  # two transactions
        assert len(set(ids)) == 130
        # etcdctl-style: a foreign urgent item, written with the tail in one transaction.
        record = b'{"payload": "' + base64.b64encode(b"urgent") + b'", "priority": 7}'
        await raw.txn([], [Put(name.encode() + b"/items/u1", record), Put(name.encode() + b"/tail", b"")])
        order = []
        async with queue:
            for _ in range(131):
                async with queue.lease() as task:
                    order.append(task.payload)
        assert order[0] == b"urgent" and order[1:] == [b"a%d" % i for i in range(130)]


async def test_records_rewritten_while_a_consumer_follows_take_their_new_place(harness: Harness) -> None:
    """A consumer inside ``async with queue`` keeps the queue's order in its view, change by change (it does not
    read the whole queue again per claim): a record another program rewrites with a higher priority moves ahead,
    one rewritten to garbage is dead-lettered, a deleted one is gone, and one put back is offered in its place."""
    import base64

    from coordkit import Delete, Put

    def record(payload: bytes, priority: int = 0) -> bytes:
        return b'{"payload": "%s", "priority": %d}' % (base64.b64encode(payload), priority)

    name = harness.namespace.decode() + "rewritten"
    items, tail = name.encode() + b"/items/", name.encode() + b"/tail"
    async with sessions(harness, 1) as (session,), harness.client() as raw:
        queue = WorkQueue(session, name)
        _, _, c, d, e = (item.encode() for item in await queue.put_many([b"a", b"b", b"c", b"d", b"e"]))
        got = []
        async with queue:
            async with queue.lease() as task:  # the consumer's view of the queue is built here
                got.append(task.payload)
            # Another program, while the view is live (the tail rewritten, as every write that frees an item does):
            await raw.txn(
                [], [Put(items + d, record(b"d", 5)), Put(items + c, b"garbage"), Delete(items + e), Put(tail, b"")]
            )
            for _ in range(2):
                with anyio.fail_after(5):
                    async with queue.lease() as task:
                        got.append(task.payload)
            await raw.txn([], [Put(items + e, record(b"e again")), Put(tail, b"")])
            with anyio.fail_after(5):
                async with queue.lease() as task:
                    got.append(task.payload)
        assert got == [b"a", b"d", b"b", b"e again"]
        assert [letter.id.encode() for letter in await queue.dead_letters()] == [c]
        assert await queue.depth() == type(await queue.depth())(0, 0, 1)


async def test_a_chore_another_consumer_did_first_does_not_stall_a_consumer_in_a_shared_store(
    harness: Harness,
) -> None:
    """A consumer's view shows a bad record that another consumer has already moved away, and the store's newest
    write is outside the queue (the store has other users). Its own move is refused; it catches up with the
    queue and takes the next item (it waited for the refused transaction's revision, which no change of the
    queue would bring: stalled until the queue changed again)."""
    from coordkit import Delete, Put

    name = harness.namespace.decode() + "chore"
    async with sessions(harness, 1) as (session,), harness.client() as raw:
        queue = WorkQueue(session, name)
        await raw.txn([], [Put(name.encode() + b"/items/bad", b"banana")])
        good = await queue.put(b"good")
        async with queue:  # the consumer's view shows the bad record
            await raw.txn([], [Delete(name.encode() + b"/items/bad")])  # (another consumer moved it away)
            await raw.txn([], [Put(harness.namespace + b"elsewhere", b"x")])
            with anyio.fail_after(5):
                async with queue.lease() as task:
                    assert task.id == good


async def test_sixteen_consumers_always_take_the_head(harness: Harness) -> None:
    """Replays the queue's history: at the revision of every claim, the item claimed was the head of the free
    items (no free item of higher priority, none older of the same priority), while 16 consumers compete,
    a producer adds items of random priority, and some deliveries fail and are re-offered."""
    import json
    import random

    from coordkit import EventType, Put, Range, Watch, WatchBatch

    name = harness.namespace.decode() + "order16"
    prefix = name.encode() + b"/"
    rng = random.Random(18)
    total = 60
    done: list[bytes] = []
    all_done = anyio.Event()
    history: list[WatchBatch] = []
    async with sessions(harness, 17) as group, harness.client() as observer:
        start = (await observer.range(Range(prefix, prefix=True))).revision + 1
        producer = WorkQueue(group[0], name)
        for i in range(30):
            await producer.put(b"%d" % i, priority=rng.randrange(3))

        async def record(watch: Watch) -> None:
            async for batch in watch:
                assert isinstance(batch, WatchBatch)
                history.append(batch)
                if any(event.kv.key == prefix + b"end" for event in batch.events):
                    return

        async def produce() -> None:
            for i in range(30, total):
                await producer.put(b"%d" % i, priority=rng.randrange(3))
                await anyio.sleep(0.01)

        async def consume(session: Session, index: int) -> None:
            async with WorkQueue(session, name) as queue:
                while True:
                    with suppress(RuntimeError):
                        async with queue.lease() as task:
                            await anyio.sleep(0.005 * (index % 4))
                            if task.attempt == 1 and int(task.payload) % 7 == 0:
                                raise RuntimeError("fails once")
                        done.append(task.payload)
                        if len(done) == total:
                            all_done.set()

        async with Watch(observer, prefix, prefix=True, start_revision=start) as watch:
            async with anyio.create_task_group() as tg:
                tg.start_soon(record, watch)
                async with anyio.create_task_group() as workers:
                    workers.start_soon(produce)
                    for index, session in enumerate(group[1:]):
                        workers.start_soon(consume, session, index)
                    with anyio.fail_after(60):
                        await all_done.wait()
                    workers.cancel_scope.cancel()
                await observer.txn([], [Put(prefix + b"end", b"")])  # the recorder stops there
    assert sorted(done) == sorted(b"%d" % i for i in range(total))
    # Replay: state before each revision, then check the claims created at that revision: they are the first
    # free items, in order, and the oldest consumer in line got the first (the one handing out, not in line, last).
    items: dict[bytes, tuple[int, int]] = {}  # id -> (priority, create revision)
    claimed: set[bytes] = set()
    line: dict[str, int] = {}  # waiter token -> its place in line (create revision of its waiting key)
    claims_checked = 0
    for batch in history:
        handed = []
        for event in batch.events:
            key = event.kv.key[len(prefix) :]
            if key.startswith(b"claims/") and event.type is EventType.PUT and event.kv.version == 1:
                token = json.loads(event.kv.value).get("waiter", "")
                handed.append((line.get(token, batch.revision), key[len(b"claims/") :]))
        if handed:
            free = sorted((-p, c, i) for i, (p, c) in items.items() if i not in claimed)
            head = [i for _, _, i in free[: len(handed)]]
            got = [item_id for _, item_id in sorted(handed)]
            assert got == head, f"at {batch.revision} handed {got} (by place in line), the free head was {head}"
            claims_checked += len(handed)
        for event in batch.events:
            key = event.kv.key[len(prefix) :]
            kind, _, item_id = key.partition(b"/")
            if kind == b"items" and event.type is EventType.PUT:
                priority = json.loads(event.kv.value)["priority"]
                items[item_id] = (priority, event.kv.create_revision)
            elif kind == b"items":
                items.pop(item_id, None)
            elif kind == b"claims":
                (claimed.add if event.type is EventType.PUT else claimed.discard)(item_id)
            elif kind == b"waiting" and event.type is EventType.PUT:
                line[item_id.decode().rpartition("/")[2]] = event.kv.create_revision
    assert claims_checked >= total + total // 7


async def test_a_claim_past_its_visibility_timeout_is_taken_back_by_another_consumer(harness: Harness) -> None:
    """The holder's session stays alive but its body ignores the deadline (shielded): another consumer takes the
    item back once the visibility timeout passed by its own clock, and the late holder cannot complete it."""
    name = harness.namespace.decode() + "takeover"
    async with sessions(harness, 2) as (stuck, other):
        item_id = await WorkQueue(stuck, name).put(b"job")
        holding = anyio.Event()
        late: list[BaseException] = []

        async def hold() -> None:
            try:
                async with WorkQueue(stuck, name).lease(visibility_timeout=2):
                    holding.set()
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(6)
            except ClaimLostError as exc:
                late.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await holding.wait()
            started = anyio.current_time()
            with anyio.fail_after(6):
                async with WorkQueue(other, name).lease() as task:
                    taken_after = anyio.current_time() - started
                    assert task.id == item_id and task.attempt == 2
                    assert "visibility timeout passed" in str(task._item.error)
        assert taken_after >= 2, "taken back before the holder's visibility timeout"
        assert len(late) == 1 and "before completion" in str(late[0])
        depth = await WorkQueue(other, name).depth()
        assert (depth.pending, depth.leased, depth.dead) == (0, 0, 0)


async def test_items_lists_pending_and_leased_in_order_and_remove_fences_the_holder(harness: Harness) -> None:
    name = harness.namespace.decode() + "control"
    async with sessions(harness, 2) as (producer, consumer):
        queue = WorkQueue(producer, name)
        first, second, third = await queue.put_many([b"a", b"b", b"c"])
        urgent = await queue.put(b"u", priority=5)
        assert [(i.id, i.leased) for i in await queue.items()] == [
            (urgent, False),
            (first, False),
            (second, False),
            (third, False),
        ]
        assert await queue.remove(second)
        assert not await queue.remove(second), "already removed"
        with pytest.raises(ClaimLostError, match="before completion"):
            async with WorkQueue(consumer, name).lease(visibility_timeout=7) as task:
                assert task.id == urgent
                (held, *rest) = await queue.items()
                assert (held.id, held.leased, held.attempts, held.visibility_timeout) == (urgent, True, 1, 7)
                assert held.holder == f"{consumer.lease_id:x}" and held.claim_revision > 0
                assert [(i.id, i.leased, i.holder) for i in rest] == [(first, False, None), (third, False, None)]
                assert await queue.remove(urgent)  # removed while leased: the holder's completion is refused
        async with WorkQueue(consumer, name).lease() as task:
            assert task.id == first, "the removed items are never offered"
        assert [i.id for i in await queue.items()] == [third]
        with pytest.raises(TypeError):
            await queue.remove(b"x")  # type: ignore[arg-type]


async def test_trim_dead_letters_keeps_the_newest(harness: Harness) -> None:
    name = harness.namespace.decode() + "trim"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name, max_attempts=1)
        for i in range(5):
            await queue.put(str(i).encode())
            with pytest.raises(ValueError, match="bad"):
                async with queue.lease():
                    raise ValueError("bad")
        assert [d.payload for d in await queue.dead_letters()] == [b"0", b"1", b"2", b"3", b"4"]
        assert await queue.trim_dead_letters(keep=2) == 3
        assert [d.payload for d in await queue.dead_letters()] == [b"3", b"4"]
        assert await queue.trim_dead_letters(keep=2) == 0
        assert await queue.trim_dead_letters() == 2
        assert await queue.dead_letters() == []
        with pytest.raises(ValueError, match="at least 0"):
            await queue.trim_dead_letters(keep=-1)


_BASE = datetime(2030, 1, 1, tzinfo=UTC)


def _loop_clock() -> datetime:
    """A wall clock that follows the event loop's (virtual, for the memory backend) time."""
    return _BASE + timedelta(seconds=anyio.current_time())


async def test_delayed_items_are_not_free_until_due_and_wake_waiting_consumers(harness: Harness) -> None:
    name = harness.namespace.decode() + "delayed"
    async with sessions(harness, 2) as (producer, consumer):
        queue = WorkQueue(producer, name, now=_loop_clock)
        start = anyio.current_time()
        later = await queue.put(b"later", not_before=2)
        dated = await queue.put(b"dated", priority=5, not_before=_loop_clock() + timedelta(seconds=3))
        await queue.put(b"now")
        (first, second, third) = await queue.items()
        assert (first.id, second.id, third.not_before) == (dated, later, None)
        assert first.not_before is not None and first.not_before >= _BASE + timedelta(seconds=start + 3)
        assert second.not_before is not None and second.not_before >= _BASE + timedelta(seconds=start + 2)
        consumers = WorkQueue(consumer, name, now=_loop_clock)
        order = []
        with anyio.fail_after(10):
            for _ in range(3):
                # The first lease gets the item that is due although two are ahead of it; the next ones wait
                # (by a timer: nothing is written meanwhile) until each delayed item is due.
                async with consumers.lease() as task:
                    due = {b"now": 0, b"later": 2, b"dated": 3}[task.payload]
                    order.append((task.payload, anyio.current_time() - start >= due))
        assert order == [(b"now", True), (b"later", True), (b"dated", True)]
        with pytest.raises(ValueError, match="aware"):
            await queue.put(b"x", not_before=datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="above 0"):
            await queue.put(b"x", expires_in=0)
        with pytest.raises(TypeError, match="seconds"):
            await queue.put(b"x", not_before="soon")  # type: ignore[arg-type]


async def test_expired_items_are_dead_lettered_not_delivered(harness: Harness) -> None:
    name = harness.namespace.decode() + "expiring"
    async with sessions(harness, 1) as (session,):
        queue = WorkQueue(session, name, now=_loop_clock)
        stale = await queue.put(b"stale", expires_in=1)
        held = await queue.put(b"held", expires_in=1, priority=1)
        async with queue.lease() as task:
            assert task.id == held
            await anyio.sleep(1.5)  # expires while held: the holder may still complete it
        fresh = await queue.put(b"fresh")
        with anyio.fail_after(5):
            async with queue.lease() as task:
                assert task.id == fresh, "the expired item is never delivered"
        (letter,) = await queue.dead_letters()
        assert (letter.id, letter.error, letter.attempts) == (stale, "expired", 0)
        assert await queue.depth() == type(await queue.depth())(0, 0, 1)
        assert await queue.requeue(stale)  # requeued: a fresh item, no longer expiring
        async with queue.lease() as task:
            assert task.id == stale


async def test_request_reply_written_with_the_completion_and_cleaned_when_read(harness: Harness) -> None:
    from coordkit import Range, RequestFailedError

    name = harness.namespace.decode() + "rpc"
    replies = (name + "/replies/").encode()
    async with sessions(harness, 2) as (producer, consumer):
        queue, worker = WorkQueue(producer, name, max_attempts=1), WorkQueue(consumer, name, max_attempts=1)
        pending = await queue.request(b"2+2")
        async with worker.lease() as task:
            assert task.wants_reply and task.id == pending.id
            task.reply(b"4")
        (kv,) = (await producer.backend.range(Range(replies, prefix=True))).kvs
        assert (kv.value, kv.lease) == (b"4", producer.lease_id), "the reply is bound to the producer's session"
        assert await pending.result() == b"4"
        assert (await producer.backend.range(Range(replies, prefix=True, count_only=True))).count == 0
        # A request that fails on its last attempt is answered by an error, not by waiting forever.
        doomed = await queue.request(b"1/0")
        with pytest.raises(ZeroDivisionError):
            async with worker.lease():
                raise ZeroDivisionError("division by zero")
        with pytest.raises(RequestFailedError, match="ZeroDivisionError") as failed:
            await doomed.result()
        assert failed.value.item_id == doomed.id
        # A plain item: a reply set by the body is ignored.
        await queue.put(b"plain")
        async with worker.lease() as task:
            assert not task.wants_reply
            task.reply(b"ignored")
        assert (await producer.backend.range(Range(replies, prefix=True, count_only=True))).count == 0


async def test_a_producer_that_gives_up_withdraws_its_request(harness: Harness) -> None:
    from coordkit import Range

    name = harness.namespace.decode() + "rpc-withdraw"
    replies = (name + "/replies/").encode()
    async with sessions(harness, 2) as (producer, consumer):
        queue, worker = WorkQueue(producer, name), WorkQueue(consumer, name)
        pending = await queue.request(b"nobody answers in time")
        with anyio.move_on_after(1):
            await pending.result()
        assert await queue.items() == [], "withdrawn while pending: never delivered"
        # Withdrawn while a consumer holds it: the holder's completion is fenced, and no reply is written.
        pending = await queue.request(b"slow")
        holding = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def give_up() -> None:
                await holding.wait()
                with anyio.move_on_after(0.5):
                    await pending.result()

            tg.start_soon(give_up)
            with pytest.raises(ClaimLostError, match="before completion"):
                async with worker.lease() as task:
                    task.reply(b"too late")
                    holding.set()
                    await anyio.sleep(2)
        assert await queue.items() == []
        assert (await producer.backend.range(Range(replies, prefix=True, count_only=True))).count == 0


async def test_a_reply_outlives_a_producer_lease_that_is_gone(harness: Harness) -> None:
    from coordkit import Range

    name = harness.namespace.decode() + "rpc-orphan"
    replies = (name + "/replies/").encode()
    async with harness.client() as client, sessions(harness, 1) as (consumer,):
        async with Session(client, ttl=5) as producer:
            pending = await WorkQueue(producer, name).request(b"job")
        # The producer's session ended (its lease revoked): completing still works, the reply has no lease.
        async with WorkQueue(consumer, name).lease() as task:
            task.reply(b"done")
        (kv,) = (await consumer.backend.range(Range(replies, prefix=True))).kvs
        assert (kv.value, kv.lease) == (b"done", 0)
        assert await pending.result() == b"done"
        assert (await consumer.backend.range(Range(replies, prefix=True, count_only=True))).count == 0


async def test_consumers_racing_for_expired_items_dead_letter_each_once(harness: Harness) -> None:
    name = harness.namespace.decode() + "expiring-race"
    async with sessions(harness, 4) as group:
        queue = WorkQueue(group[0], name, now=_loop_clock)
        doomed = await queue.put_many([f"old-{i}".encode() for i in range(6)], expires_in=1)
        await anyio.sleep(1.5)
        fresh = await queue.put_many([f"new-{i}".encode() for i in range(6)])
        done: list[str] = []

        async def consume(session: Session) -> None:
            consumer = WorkQueue(session, name, now=_loop_clock)
            while len(done) < len(fresh):
                with anyio.move_on_after(0.5):
                    async with consumer.lease() as task:
                        done.append(task.id)

        async with anyio.create_task_group() as tg:
            for session in group:
                tg.start_soon(consume, session)
        assert sorted(done) == sorted(fresh), "each live item done once, no expired item delivered"
        letters = await queue.dead_letters()
        assert sorted(d.id for d in letters) == sorted(doomed)
        assert {d.error for d in letters} == {"expired"}


async def test_pause_holds_every_consumer_until_resume(harness: Harness) -> None:
    """While the gate is closed nothing is claimed and waiting consumers write nothing; resume lets them go; an
    item already held when the queue is paused is completed as usual."""
    from coordkit import Range

    name = harness.namespace.decode() + "gate"
    got: list[bytes] = []
    async with sessions(harness, 3) as (control, first, second):
        controller = WorkQueue(control, name)
        assert not await controller.paused()
        await controller.put_many([b"1", b"2", b"3"])
        holding, release = anyio.Event(), anyio.Event()

        async def consume(session: Session, count: int) -> None:
            async with WorkQueue(session, name) as queue:
                for _ in range(count):
                    async with queue.lease() as task:
                        holding.set()
                        if task.payload == b"1":
                            await release.wait()
                        got.append(task.payload)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, first, 1)
            await holding.wait()  # "1" is held
            await controller.pause()
            assert await controller.paused()
            tg.start_soon(consume, second, 2)
            await anyio.sleep(0.2)
            revision = (await control.backend.range(Range(name.encode() + b"/gate"))).revision
            await anyio.sleep(0.5)
            # Nothing claimed, nothing written while paused: the consumer waits by watch, without polling.
            assert (await control.backend.range(Range(name.encode() + b"/gate"))).revision == revision
            release.set()  # the held item completes while paused
            await anyio.sleep(0.3)
            assert got == [b"1"] and (await controller.depth()).pending == 2
            await controller.resume()
            assert not await controller.paused()
        assert got == [b"1", b"2", b"3"]


async def test_dependencies_wait_for_completion_and_fail_with_their_dependency(harness: Harness) -> None:
    """``after``: an item is offered only once its dependencies completed, even ahead of a higher priority; an
    unknown id refuses the put; a dependency dead-lettered or removed dead-letters its dependents with why."""
    from coordkit import UnknownDependencyError

    name = harness.namespace.decode() + "deps"
    async with sessions(harness, 2) as (producer_session, consumer_session):
        producer = WorkQueue(producer_session, name)
        consumer = WorkQueue(consumer_session, name, max_attempts=1)
        first = await producer.put(b"first")
        await producer.put(b"second", priority=5, after=[first])
        await producer.put(b"other")
        with pytest.raises(UnknownDependencyError) as refused:
            await producer.put(b"orphan", after=[first, "never-put"])
        assert refused.value.ids == ["never-put"] and len(await producer.items()) == 3
        order = []
        for _ in range(3):
            async with consumer.lease() as task:
                order.append(task.payload)
        assert order == [b"first", b"second", b"other"]
        # A dependency that fails for good: its dependent follows it to the dead letters.
        doomed = await producer.put(b"doomed")
        waiting = await producer.put(b"waits for doomed", after=[doomed])
        with pytest.raises(RuntimeError):
            async with consumer.lease():
                raise RuntimeError("boom")
        assert await producer.trim_dead_letters() == 0  # kept: an item still waits for it
        with anyio.move_on_after(1):
            async with consumer.lease():
                pytest.fail("an item whose dependency was dead-lettered was offered")
        letters = {letter.id: letter.error for letter in await producer.dead_letters()}
        assert letters[waiting] == f"dependency {doomed} was dead-lettered: RuntimeError: boom"
        # A dependency removed: its dependent is dead-lettered in the same transaction.
        removed = await producer.put(b"removed")
        dependent = await producer.put(b"dependent", after=[removed])
        assert await producer.remove(removed)
        letters = {letter.id: letter.error for letter in await producer.dead_letters()}
        assert letters[dependent] == f"dependency {removed} was removed"
        assert await producer.items() == []


async def test_an_item_handed_to_a_consumer_in_line_goes_back_when_it_leaves(harness: Harness) -> None:
    """A completion inside ``async with queue`` puts the consumer in line; the next claimer hands it the next item,
    under its session lease; leaving ``async with queue`` without leasing gives that item back, uncounted.

    The store has other users: a write outside the queue comes last before the consumer leaves (leaving waited
    for the queue's view to reach the store's newest revision, which no change of the queue would bring: it gave
    up, and the item came back only when taken back after its visibility timeout, counted)."""
    from coordkit import Put

    name = harness.namespace.decode() + "line"
    async with sessions(harness, 3) as (producer_session, first_session, second_session):
        producer = WorkQueue(producer_session, name)
        await producer.put(b"a")
        got: list[tuple[bytes, int]] = []
        async with anyio.create_task_group() as tg:
            async with WorkQueue(first_session, name) as first:
                async with first.lease() as task:
                    assert task.payload == b"a"
                await producer.put(b"b")  # the first consumer is in line now: "b" is handed to it

                async def second() -> None:
                    async with WorkQueue(second_session, name).lease() as task:
                        got.append((task.payload, task.attempt))

                tg.start_soon(second)
                await anyio.sleep(0.5)
                (listed,) = await producer.items()
                assert listed.leased and listed.holder == f"{first_session.lease_id:x}"
                assert got == []
                await producer_session.backend.txn([], [Put(harness.namespace + b"elsewhere", b"x")])
            # Left without leasing again: "b" goes back, and the consumer waiting gets it, first attempt.
        assert got == [(b"b", 1)]
