"""Watch validators: check what a watch delivered against etcd's watch guarantees.

Modelled on the watch validation of etcd's robustness tests. A *stream* is the sequence of `WatchBatch`es one
consumer received (a raw `Backend.watch` resumed after breaks, concatenated); a *reference* is the ground truth
for the same key or prefix: every batch of the store that touched it, in order, for example collected by a
second watch with no faults from the same start revision. Empty batches (the notice of a watch "from now") carry
no event and are ignored by every check.

- ordered: batch revisions strictly increase; each event's ``mod_revision`` is its batch's revision.
- unique: no event (key, revision) is delivered twice.
- atomic: the events of one revision arrive in one batch, all of them.
- reliable: no revision of the reference is skipped between the first and the last delivered one, and every
  delivered batch is exactly the store's (no event missing, changed or invented).
- resumable: a watch from revision ``r`` starts with the reference's first batch at or after ``r``.
- announced (`check_watch_items`, for the reliable `Watch` and the feeds built on it): a revision may be skipped
  only by an explicit ``Snapshot(resync=True)`` showing the store's state at its revision, never silently.

Each ``check_*`` function returns None when the stream holds, and raises `WatchViolation` naming the first
violation (by position in the stream) otherwise.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, final

from .._backends.types import EventType, KeyValue, WatchBatch
from .._watch import Snapshot

WatchCheck = Literal["ordered", "unique", "atomic", "reliable", "resumable", "announced"]


@final
class WatchViolation(AssertionError):
    """A watch stream broke one of the guarantees.

    Attributes:
        check: which guarantee: ``"ordered"``, ``"unique"``, ``"atomic"``, ``"reliable"``, ``"resumable"`` or
            ``"announced"``.
        index: position in the stream of the first item that breaks it.
        revision: the revision concerned.
        detail: what was wrong, readable.
    """

    def __init__(self, check: WatchCheck, detail: str, *, index: int, revision: int) -> None:
        super().__init__(f"watch not {check}: item #{index} (revision {revision}): {detail}")
        self.check: WatchCheck = check
        self.index = index
        self.revision = revision
        self.detail = detail


def check_ordered(stream: Sequence[WatchBatch]) -> None:
    """Batch revisions strictly increase, and every event of a batch has the batch's revision.

    Raises:
        WatchViolation: ``check="ordered"``.
    """
    _raise_first(_ordered(stream))


def check_unique(stream: Sequence[WatchBatch]) -> None:
    """No event (the change of one key at one revision) is delivered twice, in one batch or in two.

    Raises:
        WatchViolation: ``check="unique"``.
    """
    _raise_first(_unique(stream))


def check_atomic(stream: Sequence[WatchBatch], reference: Sequence[WatchBatch] | None = None) -> None:
    """The events of one revision (a transaction touching several keys) arrive in one batch.

    Without a reference, a revision split over two batches is caught; with one, a batch that carries only some
    of its revision's events too.

    Raises:
        WatchViolation: ``check="atomic"``.
    """
    _raise_first(_atomic(stream, _Reference(reference) if reference is not None else None))


def check_reliable(stream: Sequence[WatchBatch], reference: Sequence[WatchBatch]) -> None:
    """Nothing is skipped, nothing is made up: the stream is the store's history between its ends.

    Every reference batch between the first and the last delivered revision was delivered, each delivered batch
    has only the store's events of its revision, and no delivered revision is unknown to the store.

    Args:
        reference: every batch of the store that touched the watched key or prefix, covering at least the
            revisions from the stream's first to its last.

    Raises:
        WatchViolation: ``check="reliable"``.
        ValueError: the reference's revisions do not strictly increase (so every ``check_*`` taking one).
    """
    _raise_first(_reliable(stream, _Reference(reference)))


def check_resumable(stream: Sequence[WatchBatch], reference: Sequence[WatchBatch], *, start_revision: int) -> None:
    """A watch (re)started from ``start_revision`` begins with the reference's first batch at or after it.

    An empty stream passes (a watch broken before its first batch delivered nothing wrong).

    Raises:
        WatchViolation: ``check="resumable"``.
    """
    _raise_first(_resumable(stream, _Reference(reference), start_revision))


def check_watch(stream: Sequence[WatchBatch], reference: Sequence[WatchBatch], *, start_revision: int) -> None:
    """Every check on a raw watch stream: ordered, unique, atomic, reliable, resumable from ``start_revision``.

    The violation reported is the one earliest in the stream, whichever check finds it.

    Raises:
        WatchViolation: the first violation.
    """
    ref = _Reference(reference)
    _raise_first(
        _ordered(stream),
        _unique(stream),
        _atomic(stream, ref),
        _resumable(stream, ref, start_revision),
        _reliable(stream, ref),
    )


def check_watch_items(
    items: Sequence[Snapshot | WatchBatch],
    reference: Sequence[WatchBatch],
    *,
    initial: Snapshot,
    start_revision: int | None = None,
) -> None:
    """Check what a reliable `Watch` (or a feed built on it) delivered: snapshots and batches.

    Every batch must be the reference's next one after the previous item (ordered, unique, atomic, reliable);
    a revision may be skipped only by a ``Snapshot(resync=True)``, whose keys must be the store's state at its
    revision (announced). The first item is a snapshot with ``resync=False``, or, for a watch given
    ``start_revision``, batches from the reference's first one at or after it (resumable) or a resync snapshot.

    Args:
        reference: every batch of the store that touched the watched range after ``initial.revision``, up to at
            least the last delivered revision.
        initial: the state of the watched range at some revision no later than the watch's start: what the
            reference's batches apply to.

    Raises:
        WatchViolation: the first violation.
    """
    ref = _Reference(reference)
    position = initial.revision if start_revision is None else start_revision - 1
    seen: set[tuple[bytes, int]] = set()
    resumed = start_revision is not None  # until the first item, batches must start where the watch was asked to
    for index, item in enumerate(items):
        if isinstance(item, Snapshot):
            _check_snapshot(item, index, position, index == 0 and start_revision is None, initial, ref)
        elif item.events:
            _check_batch(item, index, position, resumed, seen, ref)
        else:
            continue
        position = item.revision
        resumed = False


def _check_snapshot(
    item: Snapshot, index: int, position: int, initial_snapshot: bool, initial: Snapshot, ref: _Reference
) -> None:
    """A snapshot after ``position``: announced as a resync unless it is the first one, and the store's state."""
    if item.revision < position:
        raise WatchViolation("ordered", f"snapshot goes back from revision {position}", index=index, **_r(item))
    if item.resync == initial_snapshot:  # the initial snapshot is the only one that is not a resync
        detail = "the first snapshot is marked" if initial_snapshot else "a later snapshot is not marked"
        raise WatchViolation("announced", f"{detail} as a resync", index=index, **_r(item))
    if item.revision < initial.revision:
        raise ValueError(f"the reference starts at {initial.revision}, after the snapshot at {item.revision}")
    expected = ref.state_at(initial, item.revision)
    got = {kv.key: kv for kv in item.kvs}
    if got != expected:
        raise WatchViolation(
            "announced", f"snapshot is not the store's state: {_diff(got, expected)}", index=index, **_r(item)
        )


def _check_batch(
    item: WatchBatch, index: int, position: int, resumed: bool, seen: set[tuple[bytes, int]], ref: _Reference
) -> None:
    """A batch after ``position``: the reference's next one, whole, never a repeat (``seen`` is updated)."""
    violation = _bad_events(item, index)
    if violation is not None:
        raise violation
    if item.revision <= position:
        # the very revision already delivered (or shown by the snapshot just before) is a repeat
        repeat = item.revision == position or any((e.kv.key, item.revision) in seen for e in item.events)
        check: WatchCheck = "unique" if repeat else "ordered"
        raise WatchViolation(check, f"after revision {position}", index=index, **_r(item))
    seen.update((e.kv.key, item.revision) for e in item.events)
    expected_batch = ref.next_after(position)
    if item.revision not in ref.by_revision:
        raise WatchViolation(
            "reliable", "the store has no change of the watched range at this revision", index=index, **_r(item)
        )
    if expected_batch is not None and expected_batch.revision < item.revision:
        raise WatchViolation(
            "resumable" if resumed else "announced",
            f"revision {expected_batch.revision} skipped without a resync snapshot",
            index=index,
            **_r(item),
        )
    stored = ref.by_revision[item.revision]
    if item.events != stored.events:
        partial = set(item.events) < set(stored.events)
        raise WatchViolation(
            "atomic" if partial else "reliable",
            f"events {_events(item)} but the store has {_events(stored)}",
            index=index,
            **_r(item),
        )


# -- the checks, each yielding its violations in stream order -------------------------------------------------


class _Reference:
    def __init__(self, batches: Sequence[WatchBatch]) -> None:
        self.batches = [b for b in batches if b.events]
        self.revisions = [b.revision for b in self.batches]
        if any(a >= b for a, b in zip(self.revisions, self.revisions[1:], strict=False)):
            raise ValueError("the reference's revisions must strictly increase")
        self.by_revision = {b.revision: b for b in self.batches}

    def next_after(self, revision: int) -> WatchBatch | None:
        i = bisect.bisect_right(self.revisions, revision)
        return self.batches[i] if i < len(self.batches) else None

    def between(self, low: int, high: int) -> list[WatchBatch]:
        """Batches with low < revision < high."""
        return self.batches[bisect.bisect_right(self.revisions, low) : bisect.bisect_left(self.revisions, high)]

    def state_at(self, initial: Snapshot, revision: int) -> dict[bytes, KeyValue]:
        state = {kv.key: kv for kv in initial.kvs}
        for batch in self.between(initial.revision, revision + 1):
            for event in batch.events:
                if event.type is EventType.PUT:
                    state[event.kv.key] = event.kv
                else:
                    state.pop(event.kv.key, None)
        return state


def _r(batch: WatchBatch | Snapshot) -> dict[str, int]:
    return {"revision": batch.revision}


def _events(batch: WatchBatch) -> str:
    return "[" + ", ".join(f"{e.type.value} {e.kv.key!r}" for e in batch.events) + "]"


def _diff(got: Mapping[bytes, KeyValue], expected: Mapping[bytes, KeyValue]) -> str:
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    changed = sorted(k for k in got.keys() & expected.keys() if got[k] != expected[k])
    return f"missing {missing}, not in the store {extra}, different {changed}"


def _bad_events(batch: WatchBatch, index: int) -> WatchViolation | None:
    for event in batch.events:
        if event.kv.mod_revision != batch.revision:
            return WatchViolation(
                "ordered",
                f"event on {event.kv.key!r} has revision {event.kv.mod_revision}, not its batch's",
                index=index,
                revision=batch.revision,
            )
    keys = [e.kv.key for e in batch.events]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        return WatchViolation("unique", f"{twice!r} changes twice in one batch", index=index, revision=batch.revision)
    return None


def _ordered(stream: Sequence[WatchBatch]) -> Iterator[WatchViolation]:
    previous = 0
    for index, batch in enumerate(stream):
        if not batch.events:
            continue
        if batch.revision <= previous:
            yield WatchViolation("ordered", f"after revision {previous}", index=index, revision=batch.revision)
        for event in batch.events:
            if event.kv.mod_revision != batch.revision:
                yield WatchViolation(
                    "ordered",
                    f"event on {event.kv.key!r} has revision {event.kv.mod_revision}, not its batch's",
                    index=index,
                    revision=batch.revision,
                )
        previous = max(previous, batch.revision)


def _unique(stream: Sequence[WatchBatch]) -> Iterator[WatchViolation]:
    seen: dict[tuple[bytes, int], int] = {}
    for index, batch in enumerate(stream):
        for event in batch.events:
            key = (event.kv.key, event.kv.mod_revision)
            if key in seen:
                yield WatchViolation(
                    "unique",
                    f"{event.type.value} of {event.kv.key!r} already delivered in item #{seen[key]}",
                    index=index,
                    revision=batch.revision,
                )
            seen.setdefault(key, index)


def _atomic(stream: Sequence[WatchBatch], reference: _Reference | None) -> Iterator[WatchViolation]:
    first_batch: dict[int, int] = {}
    for index, batch in enumerate(stream):
        if not batch.events:
            continue
        if batch.revision in first_batch:
            yield WatchViolation(
                "atomic",
                f"revision already delivered in part in item #{first_batch[batch.revision]}",
                index=index,
                revision=batch.revision,
            )
        first_batch.setdefault(batch.revision, index)
        expected = reference.by_revision.get(batch.revision) if reference is not None else None
        if expected is not None and set(batch.events) < set(expected.events):
            yield WatchViolation(
                "atomic",
                f"only {_events(batch)} of {_events(expected)}",
                index=index,
                revision=batch.revision,
            )


def _reliable(stream: Sequence[WatchBatch], reference: _Reference) -> Iterator[WatchViolation]:
    previous: int | None = None
    for index, batch in enumerate(stream):
        if not batch.events:
            continue
        if previous is not None and batch.revision > previous:
            skipped = reference.between(previous, batch.revision)
            if skipped:
                yield WatchViolation(
                    "reliable",
                    f"revision {skipped[0].revision} ({len(skipped)} in all) skipped after {previous}",
                    index=index,
                    revision=batch.revision,
                )
        expected = reference.by_revision.get(batch.revision)
        if expected is None:
            yield WatchViolation(
                "reliable",
                "the store has no change of the watched range at this revision",
                index=index,
                revision=batch.revision,
            )
        elif not set(batch.events) <= set(expected.events):
            yield WatchViolation(
                "reliable",
                f"events {_events(batch)} but the store has {_events(expected)}",
                index=index,
                revision=batch.revision,
            )
        previous = batch.revision if previous is None else max(previous, batch.revision)


def _resumable(stream: Sequence[WatchBatch], reference: _Reference, start_revision: int) -> Iterator[WatchViolation]:
    expected = reference.next_after(start_revision - 1)
    for index, batch in enumerate(stream):
        if not batch.events:
            continue
        if expected is None or batch.revision != expected.revision:
            want = "nothing" if expected is None else f"revision {expected.revision}"
            yield WatchViolation(
                "resumable",
                f"a watch from revision {start_revision} must start with {want}",
                index=index,
                revision=batch.revision,
            )
        return


def _raise_first(*violations: Iterator[WatchViolation]) -> None:
    firsts = [v for v in (next(gen, None) for gen in violations) if v is not None]
    if firsts:
        raise min(firsts, key=lambda v: v.index)
