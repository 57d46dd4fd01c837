"""once(): the first caller to claim a name computes; everyone else waits and gets the published result.

The etcd pattern "everybody tries to create the node; the winner computes (a full index build) and
distributes the result". Guarantees: while a computation succeeds, ``fn`` runs once per name; every concurrent
and later caller gets its result (stored, so late arrivals do not recompute); the claim is bound to the
computer's lease, so when the computer dies its claim vanishes and one waiter takes over; the result write is
fenced by the claim's revision, so a computer that lost its claim (paused past its lease) cannot overwrite a
newer result; a failing ``fn`` raises in its caller and releases the claim, so another caller computes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload
from weakref import WeakKeyDictionary

import anyio

from .. import _telemetry
from .._backends.protocol import Backend
from .._backends.types import Compare, Delete, Op, Put, Range, RangeResult, TxnResult, check_ttl
from .._codec import Codec
from .._errors import OwnershipLostError, UnavailableError
from .._keys import name_prefix
from .._retry import retry_call
from .._session import Session, require_session, retry_while_valid
from .._watch import wait_deleted

T = TypeVar("T")


class ComputationLostError(OwnershipLostError):
    """The computer's claim was lost (its session was lost): ``fn`` was cancelled or its result discarded."""


@overload
async def once(
    session: Session, name: str, fn: Callable[[], Awaitable[bytes]], *, result_ttl: int | None = None
) -> bytes: ...


@overload
async def once(
    session: Session, name: str, fn: Callable[[], Awaitable[T]], *, codec: Codec[T], result_ttl: int | None = None
) -> T: ...


async def once(
    session: Session,
    name: str,
    fn: Callable[[], Awaitable[Any]],
    *,
    codec: Codec[Any] | None = None,
    result_ttl: int | None = None,
) -> Any:
    """Run ``fn`` once cluster-wide for ``name`` and return its result to every caller.

    The first caller to claim ``<name>/claim`` (bound to its session's lease) runs ``fn`` in a guarded block
    and publishes the result at ``<name>/result``; callers that find a claim wait for it to go, then read the
    result (or, if the computer failed or died, race to claim it themselves). Bound the wait with
    ``anyio.fail_after``. The callers of one name on one backend object in a process share one attempt: one of
    them goes to the store and the others take the result it read or published after they called.

    Args:
        session: the caller's session (the claim is bound to its lease).
        name: what is computed; keys live under ``<name>/``.
        fn: the computation. Without a codec it returns bytes.
        codec: turns the result into bytes and back (e.g. `JSON`).
        result_ttl: seconds the published result lives; then the next caller computes again. None: forever
            (until `invalidate_once`).

    Raises:
        ComputationLostError: the session was lost while computing or waiting; a result computed by a caller
            that lost its claim is discarded, never published.
        UnavailableError: the store could not be reached (reads and the claim are retried first).
        Exception: whatever ``fn`` raised (the claim is released first, so another caller computes).
        TypeError: ``fn`` returned something that is not bytes and no codec was given; ``session`` is not a
            Session or ``fn`` not callable (at once).
        ValueError: (at once) a bad name or ``result_ttl``.
        Exception: whatever the codec raised, encoding the result (nothing is published, the claim is released)
            or decoding a published one (e.g. ``ValueError`` for JSON that is not); a note names the call.
    """
    require_session(session)
    prefix = name_prefix(name)
    if not callable(fn):
        raise TypeError(f"once({name!r}): fn must be a coroutine function, not {type(fn).__name__}")
    if result_ttl is not None:
        check_ttl(result_ttl)
    async with session.guarded(ComputationLostError, what=f"once({name!r})"):
        return await _join_or_attempt(session, name, fn, codec, result_ttl, prefix)


async def _join_or_attempt(
    session: Session,
    name: str,
    fn: Callable[[], Awaitable[Any]],
    codec: Codec[Any] | None,
    result_ttl: int | None,
    prefix: bytes,
) -> Any:
    """Callers in this process share one attempt per name and backend: the others wait for it and take its
    result (one watch and one read for all of them, not one each), unless it found nothing they may use."""
    attempts = _attempts.setdefault(session.backend, {})
    while (leader := attempts.get(prefix)) is not None:
        joined = leader.reads
        await leader.done.wait()
        if leader.result is not None and leader.result[0] > joined:
            # Read (or published) after we joined: a result the store held during our call.
            data = leader.result[1]
            return data if codec is None else _decode(codec, data, name)
    attempt = attempts[prefix] = _Attempt()
    try:
        return await _once_in_store(session, name, fn, codec, result_ttl, prefix, attempt)
    finally:
        del attempts[prefix]
        attempt.done.set()


@dataclass(eq=False)
class _Attempt:
    """One caller's attempt at ``once(name)``, which the other callers of the process wait for."""

    done: anyio.Event = field(default_factory=anyio.Event)
    reads: int = 0  # store reads (and publishes) begun so far
    result: tuple[int, bytes] | None = None  # the number of the read that found the result, or published it; bytes


# backend -> name prefix -> the attempt in progress in this process (per backend, not per session: every
# session of a client shares its attempts)
_attempts: WeakKeyDictionary[Backend, dict[bytes, _Attempt]] = WeakKeyDictionary()


async def _once_in_store(
    session: Session,
    name: str,
    fn: Callable[[], Awaitable[Any]],
    codec: Codec[Any] | None,
    result_ttl: int | None,
    prefix: bytes,
    attempt: _Attempt,
) -> Any:
    """Take the published result, or compute it under our claim, or wait for another's claim to go; again."""
    while True:
        attempt.reads += 1
        read = attempt.reads
        found = await _claim_unless_published(session, prefix + b"claim", prefix + b"result")
        published, claim_revision = _found(session, found, prefix + b"claim")
        if published is not None:
            attempt.result = (read, published)
            return published if codec is None else _decode(codec, published, name)
        if claim_revision:
            return await _compute(session, name, fn, codec, result_ttl, prefix, claim_revision, attempt)
        # Claimed by someone else: when the claim goes (published, failed or died), look again.
        await wait_deleted(session.backend, prefix + b"claim", revision=found.revision)


async def _claim_unless_published(session: Session, claim: bytes, result_key: bytes) -> TxnResult:
    """One round trip: the result if there is one, else the claim if nobody holds it.

    Retried: a claim made by an attempt whose answer was lost shows up (in the failure branch's read of the claim)
    with our lease, and is adopted by `_found`.
    """
    backend = session.backend
    try:
        return await retry_call(
            lambda: backend.txn(
                # Claim only if nothing is published (else there is nothing to compute) and nobody claims (else
                # they compute); otherwise read both, to take the result or wait for the claim to go.
                [Compare.create(result_key, "==", 0), Compare.create(claim, "==", 0)],
                [Put(claim, b"", session.lease_id)],
                [Range(result_key), Range(claim)],
            )
        )
    except BaseException:
        # Cancelled (or failed) with the claim's write in flight: it may have been applied, unanswered. A claim of
        # ours that nobody here computes would block every other caller for as long as our session lives: drop it
        # (only ours: the lease compare).
        if claim not in session._in_use.computing:
            with anyio.CancelScope(shield=True):
                await _drop_stray_claim(session, claim)
        raise


def _found(session: Session, attempt: TxnResult, claim: bytes) -> tuple[bytes | None, int]:
    """What a claim attempt found: the published result (or None), and our claim's revision (or 0)."""
    if attempt.succeeded:
        return None, attempt.revision
    published, claimed = attempt.responses
    assert isinstance(published, RangeResult) and isinstance(claimed, RangeResult)
    if published.kvs:
        return published.kvs[0].value, 0
    mine = claimed.kvs[0] if claimed.kvs else None
    if mine is not None and mine.lease == session.lease_id and claim not in session._in_use.computing:
        return None, mine.create_revision  # ours, from an attempt whose reply was lost
    return None, 0


async def _drop_stray_claim(session: Session, claim: bytes) -> None:
    backend = session.backend
    # Only a claim bound to our lease: if our write never landed, the claim there is another caller's.
    await retry_while_valid(
        session, lambda: backend.txn([Compare.lease(claim, "==", session.lease_id)], [Delete(claim)])
    )


async def _compute(
    session: Session,
    name: str,
    fn: Callable[[], Awaitable[Any]],
    codec: Codec[Any] | None,
    result_ttl: int | None,
    prefix: bytes,
    claim_revision: int,
    attempt: _Attempt,
) -> Any:
    """Run ``fn`` under our claim (created at ``claim_revision``) and publish its result, fenced by the claim."""
    claim = prefix + b"claim"
    computing = session._in_use.computing  # a claim with our lease but not listed here is a lost reply's
    computing.add(claim)
    try:
        return await _compute_and_publish(session, name, fn, codec, result_ttl, prefix, claim_revision, attempt)
    except BaseException:
        # Release our claim (only ours: the create-revision compare: a successor's claim stays), so a waiter
        # computes instead; shielded, as cancellation must not leave the claim to block everyone until the lease
        # ends.
        with anyio.CancelScope(shield=True):
            await retry_while_valid(
                session,
                lambda: session.backend.txn([Compare.create(claim, "==", claim_revision)], [Delete(claim)]),
            )
        raise
    finally:
        computing.discard(claim)


async def _compute_and_publish(
    session: Session,
    name: str,
    fn: Callable[[], Awaitable[Any]],
    codec: Codec[Any] | None,
    result_ttl: int | None,
    prefix: bytes,
    claim_revision: int,
    attempt: _Attempt,
) -> Any:
    backend = session.backend
    attrs = _telemetry.attributes(backend=backend.name, lease_id=session.lease_id, name=name)
    attrs["coordkit.fencing_token"] = claim_revision
    with _telemetry.span("coordkit.once.compute", attrs):
        value = await fn()
        data = value if codec is None else _encode(codec, value, name)
        if not isinstance(data, bytes):
            raise TypeError(
                f"once({name!r}): fn returned {type(data).__name__}; give a codec or return bytes"
                if codec is None
                else f"once({name!r}): the codec encoded fn's result as {type(data).__name__}, not bytes"
            )
        lease = (await backend.grant(result_ttl)).id if result_ttl is not None else 0
        attempt.reads += 1
        publish = attempt.reads
        try:
            await _publish(session, name, prefix + b"claim", claim_revision, prefix + b"result", data, lease)
            attempt.result = (publish, data)
        except Exception:  # not published (e.g. too large, claim lost): the result's lease would linger unused
            if lease:
                with anyio.CancelScope(shield=True):
                    await retry_while_valid(session, lambda: backend.revoke(lease))
            raise
        return value


def _encode(codec: Codec[Any], value: Any, name: str) -> bytes:
    try:
        return codec.encode(value)
    except Exception as exc:  # the codec's own error, told which once() it is about
        exc.add_note(f"once({name!r}): the codec could not encode fn's result; nothing was published")
        raise


def _decode(codec: Codec[Any], data: bytes, name: str) -> Any:
    try:
        return codec.decode(data)
    except Exception as exc:
        exc.add_note(f"once({name!r}): the codec could not decode the published result")
        raise


async def _publish(
    session: Session, name: str, claim: bytes, claim_revision: int, result_key: bytes, data: bytes, lease: int
) -> None:
    """Write the result and drop the claim atomically, only while the claim is the one we created."""
    backend = session.backend
    # Fenced by our claim: a computer that lost it (paused past its lease) cannot overwrite a successor's result.
    fenced = [Compare.create(claim, "==", claim_revision)]
    ops: list[Op] = [Put(result_key, data, lease), Delete(claim)]
    try:
        published = await backend.txn(fenced, ops)
    except UnavailableError:
        # Ambiguous: it may have been applied. Try again; if the claim is gone, our bytes being there is success.
        published = await retry_call(lambda: backend.txn(fenced, ops, [Range(result_key)]))
        if not published.succeeded:
            current = published.responses[0]
            if isinstance(current, RangeResult) and [kv.value for kv in current.kvs] == [data]:
                return
    if not published.succeeded:
        raise ComputationLostError(
            f"once({name!r}): the claim was lost before the result was published", session=session
        )


async def invalidate_once(backend: Backend, name: str) -> bool:
    """Delete the published result of ``name``, so the next `once` computes again. True if there was one."""
    # No compare: whoever published it, the result goes (a computation in flight still publishes its own).
    result = await backend.txn([], [Delete(name_prefix(name) + b"result")])
    deleted = result.responses[0]
    return bool(getattr(deleted, "deleted", 0))
