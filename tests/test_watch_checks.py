"""The watch validators themselves: each accepts correct streams and rejects a crafted bad one."""

from __future__ import annotations

import pytest

from coordkit import Event, EventType, KeyValue, Snapshot, WatchBatch
from coordkit.testing import (
    WatchViolation,
    check_atomic,
    check_ordered,
    check_reliable,
    check_resumable,
    check_unique,
    check_watch,
    check_watch_items,
)


def put(key: bytes, revision: int, value: bytes = b"v", *, created: int | None = None, version: int = 1) -> Event:
    return Event(EventType.PUT, KeyValue(key, value, created or revision, revision, version))


def delete(key: bytes, revision: int) -> Event:
    return Event(EventType.DELETE, KeyValue(key, b"", 0, revision, 0))


def batch(revision: int, *events: Event) -> WatchBatch:
    return WatchBatch(revision, events)


# The store's history of the watched prefix: revisions 4 and 6 touched other keys.
R2 = batch(2, put(b"a", 2))
R3 = batch(3, put(b"a", 3, b"w", created=2, version=2), put(b"b", 3))  # one txn, two keys
R5 = batch(5, delete(b"a", 5))
R7 = batch(7, put(b"c", 7))
REFERENCE = [R2, R3, R5, R7]
INITIAL = Snapshot((KeyValue(b"z", b"old", 1, 1, 1),), 1)  # the prefix's state at revision 1


def state(revision: int) -> tuple[KeyValue, ...]:
    kvs = {b"z": INITIAL.kvs[0]}
    for b in REFERENCE:
        if b.revision <= revision:
            for e in b.events:
                if e.type is EventType.PUT:
                    kvs[e.kv.key] = e.kv
                else:
                    kvs.pop(e.kv.key)
    return tuple(kvs[k] for k in sorted(kvs))


def violation(check: object, *args: object, **kwargs: object) -> WatchViolation:
    with pytest.raises(WatchViolation) as caught:
        check(*args, **kwargs)  # type: ignore[operator]
    return caught.value


@pytest.mark.parametrize(
    ("stream", "start"),
    [
        (REFERENCE, 1),
        ([batch(1), *REFERENCE], 2),  # the notice of a watch from now carries no event: ignored
        ([R5, R7], 4),  # resumed from 4: begins at the next change
        ([R5, R7], 5),
        ([R3], 3),  # a prefix of the suffix: the consumer stopped early
        ([], 8),
        ([], 3),  # broken before its first batch
    ],
)
def test_correct_streams_pass_every_check(stream: list[WatchBatch], start: int) -> None:
    check_ordered(stream)
    check_unique(stream)
    check_atomic(stream)
    check_atomic(stream, REFERENCE)
    check_reliable(stream, REFERENCE)
    check_resumable(stream, REFERENCE, start_revision=start)
    check_watch(stream, REFERENCE, start_revision=start)


def test_ordered_rejects_going_back_and_events_of_another_revision() -> None:
    v = violation(check_ordered, [R2, R5, R3])
    assert (v.check, v.index, v.revision) == ("ordered", 2, 3)
    assert "item #2 (revision 3)" in str(v) and "after revision 5" in str(v)
    v = violation(check_ordered, [R2, batch(3, put(b"a", 3), put(b"b", 4))])
    assert (v.check, v.index) == ("ordered", 1) and "b'b' has revision 4" in v.detail


def test_unique_rejects_an_event_delivered_twice() -> None:
    v = violation(check_unique, [R2, R3, R5, batch(3, put(b"b", 3))])
    assert (v.check, v.index, v.revision) == ("unique", 3, 3) and "item #1" in v.detail
    v = violation(check_unique, [batch(2, put(b"a", 2), put(b"a", 2))])
    assert (v.check, v.index) == ("unique", 0)


def test_atomic_rejects_a_revision_split_or_cut() -> None:
    a, b = R3.events
    v = violation(check_atomic, [R2, batch(3, a), batch(3, b)])
    assert (v.check, v.index, v.revision) == ("atomic", 2, 3)
    check_atomic([R2, batch(3, a)])  # without a reference a cut revision cannot be seen ...
    v = violation(check_atomic, [R2, batch(3, a), R5], REFERENCE)  # ... with one it can
    assert (v.check, v.index) == ("atomic", 1) and "only [PUT b'a'] of [PUT b'a', PUT b'b']" in v.detail


def test_reliable_rejects_gaps_and_events_the_store_never_had() -> None:
    v = violation(check_reliable, [R2, R5, R7], REFERENCE)
    assert (v.check, v.index, v.revision) == ("reliable", 1, 5) and "revision 3 (1 in all) skipped" in v.detail
    v = violation(check_reliable, [R2, R3, batch(4, put(b"x", 4)), R5], REFERENCE)
    assert (v.check, v.index) == ("reliable", 2) and "no change" in v.detail
    v = violation(
        check_reliable, [R2, batch(3, put(b"a", 3, b"forged", created=2, version=2), R3.events[1])], REFERENCE
    )
    assert (v.check, v.index) == ("reliable", 1)
    v = violation(check_reliable, [R2, R3, R5, R7, batch(9, put(b"c", 9))], REFERENCE)
    assert (v.check, v.index) == ("reliable", 4), "beyond the reference is unknown to the store"


def test_resumable_rejects_a_wrong_first_batch() -> None:
    v = violation(check_resumable, [R5, R7], REFERENCE, start_revision=3)
    assert (v.check, v.index, v.revision) == ("resumable", 0, 5) and "must start with revision 3" in v.detail
    v = violation(check_resumable, [R2, R3], REFERENCE, start_revision=3)
    assert (v.check, v.index) == ("resumable", 0)
    v = violation(check_resumable, [R7], REFERENCE, start_revision=8)
    assert "must start with nothing" in v.detail


def test_check_watch_reports_the_earliest_violation() -> None:
    v = violation(check_watch, [R2, R5, R5, R7], REFERENCE, start_revision=2)  # a gap at #1, a repeat at #2
    assert (v.check, v.index) == ("reliable", 1)
    v = violation(check_watch, [R2, R3, R3, R5, R7], REFERENCE, start_revision=2)
    assert v.index == 2 and v.check in ("ordered", "unique", "atomic")
    v = violation(check_watch, [R3, R5], REFERENCE, start_revision=2)
    assert (v.check, v.index) == ("resumable", 0)


def test_watch_items_accept_a_snapshot_then_changes_and_announced_resyncs() -> None:
    first = Snapshot(state(1), 1)
    check_watch_items([first, R2, R3, R5, R7], REFERENCE, initial=INITIAL)
    check_watch_items([Snapshot(state(3), 4), batch(5), R5, R7], REFERENCE, initial=INITIAL)
    # revisions 3 and 5 were compacted away while the watch was cut off: a resync replaces them
    check_watch_items([first, R2, Snapshot(state(6), 6, resync=True), R7], REFERENCE, initial=INITIAL)
    check_watch_items([R3, R5], REFERENCE, initial=INITIAL, start_revision=3)
    check_watch_items([Snapshot(state(5), 5, resync=True), R7], REFERENCE, initial=INITIAL, start_revision=2)


@pytest.mark.parametrize(
    ("items", "start", "check", "index"),
    [
        ([Snapshot(state(1), 1), R2, R5, R7], None, "announced", 2),  # revision 3 skipped silently
        ([Snapshot(state(1), 1), R2, Snapshot(state(6), 6), R7], None, "announced", 2),  # resync not flagged
        ([Snapshot(state(1), 1, resync=True), R2], None, "announced", 0),
        ([Snapshot(state(1), 1), R2, Snapshot(state(3), 6, resync=True)], None, "announced", 2),  # stale state
        ([Snapshot(state(1), 1), R2, R3, R3], None, "unique", 3),
        ([Snapshot(state(3), 3), R3], None, "unique", 1),  # a change the snapshot already showed
        ([Snapshot(state(5), 5), R2, R3], None, "ordered", 1),
        ([Snapshot(state(1), 1), R2, R5, Snapshot(state(3), 3, resync=True)], None, "announced", 2),
        ([Snapshot(state(1), 1), R2, batch(3, R3.events[0])], None, "atomic", 2),
        ([Snapshot(state(1), 1), batch(2, put(b"a", 2, b"forged"))], None, "reliable", 1),
        ([Snapshot(state(1), 1), batch(4, put(b"x", 4))], None, "reliable", 1),
        ([R5, R7], 3, "resumable", 0),
        ([Snapshot(state(1), 1), R2], 2, "announced", 0),  # a watch from a revision starts with no plain snapshot
    ],
)
def test_watch_items_reject_silent_skips_and_wrong_snapshots(
    items: list[Snapshot | WatchBatch], start: int | None, check: str, index: int
) -> None:
    v = violation(check_watch_items, items, REFERENCE, initial=INITIAL, start_revision=start)
    assert (v.check, v.index) == (check, index), v


def test_reference_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="strictly increase"):
        check_reliable([R2], [R3, R2])
