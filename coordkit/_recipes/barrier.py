"""Barriers: hold everyone until released (`Barrier`), or until N have arrived and again until all have left
(`DoubleBarrier`), with the key layouts of etcd's Go ``recipes`` package.

A `Barrier` is the key ``<name>`` itself: present means held. Waiters watch for its deletion.

A `DoubleBarrier` keeps one key per participant, ``<name>/waiters/<lease id hex>``, bound to the participant's
session lease, and ``<name>/ready``. The participant whose key makes the count reach ``count`` puts ``ready``;
the others wait for that put (one made after their own key: a ``ready`` left from an earlier round releases
nobody). A participant leaves by deleting its key and waits until the keys of everyone who was inside are gone;
then it deletes ``ready``. A participant that crashes drops out with its lease: before the barrier
opens it no longer counts towards ``count``; inside, the others stop waiting for it to leave.
"""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from types import TracebackType
from typing import final

import anyio

from .._backends.protocol import Backend
from .._backends.types import Compare, Delete, EventType, Put, Range, RangeResult
from .._errors import CoordkitError, OwnershipLostError
from .._keys import name_key, name_prefix
from .._retry import retry_call
from .._session import Session, require_session, retry_while_valid
from .._watch import Snapshot, Watch, wait_deleted

#: how long a cancelled hold keeps trying to take back the write it may have made
_CLEANUP_SECONDS = 10


@final
class Barrier:
    """A barrier that holds every waiter until it is released.

    ``await barrier.hold()`` raises it, ``await barrier.release()`` lowers it, and ``await barrier.wait()``
    returns once it is down (at once if it is not held). A barrier held without a session stays up until someone
    releases it, whatever happens to the process that raised it; ``hold(session=...)`` binds it to a session's
    lease instead, so that it falls when that session ends (or is lost).

    Args:
        backend: the store.
        name: the barrier's name: the key itself.
    """

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self._key = name_key(name)

    async def hold(self, *, session: Session | None = None) -> bool:
        """Raise the barrier; False if it was already held (by anyone).

        Retried through transient failures: an attempt whose reply was lost is recognised by the token it wrote.
        Cancelled with a write in flight, it lowers the barrier again if that write raised it.

        Raises:
            TypeError: ``session`` is not a Session.
        """
        lease = 0 if session is None else require_session(session).lease_id
        token = uuid.uuid4().hex.encode()  # tells this call's write from anyone else's
        try:
            # Create-only: two holders do not stack, and a release by either lowers it.
            result = await retry_call(
                lambda: self.backend.txn(
                    [Compare.create(self._key, "==", 0)], [Put(self._key, token, lease)], [Range(self._key)]
                )
            )
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_SECONDS):
                # Only if it holds this call's token: the write may have landed unanswered; another holder's stays.
                await retry_call(lambda: self.backend.txn([Compare.value(self._key, "==", token)], [Delete(self._key)]))
            raise
        if result.succeeded:
            return True
        current = result.responses[0]
        assert isinstance(current, RangeResult)
        return [kv.value for kv in current.kvs] == [token]  # raised by an earlier attempt whose reply was lost

    async def release(self) -> bool:
        """Lower the barrier, releasing every waiter; False if it was not held."""
        # The compare only tells whether it was held (deleting a missing key succeeds too).
        result = await self.backend.txn([Compare.create(self._key, ">", 0)], [Delete(self._key)])
        return result.succeeded

    async def held(self) -> bool:
        """Whether the barrier is up now."""
        return (await self.backend.range(Range(self._key, count_only=True))).count > 0

    async def wait(self) -> None:
        """Return once the barrier is down (at once if it is not held). Bound it with ``anyio.fail_after``."""
        current = await self.backend.range(Range(self._key))
        if current.kvs:
            await wait_deleted(self.backend, self._key, revision=current.revision)


class TooManyParticipantsError(CoordkitError):
    """More participants entered a double barrier than its ``count`` (they arrived after it opened)."""


class BarrierLostError(OwnershipLostError):
    """The session of a participant inside a double barrier was lost: its block was cancelled; it left."""


@final
class DoubleBarrier:
    """Enter once ``count`` participants have arrived; leave once all of them have left.

    ``async with DoubleBarrier(session, "phase-2", count=5):`` waits until 5 participants (processes, or tasks)
    are inside, runs the body, then waits until all 5 have finished their bodies. The body is guarded by the
    session: if it is lost, the body is cancelled and ``BarrierLostError`` is raised; the participant's key goes
    with its lease, so the others neither count it nor wait for it any more. `enter` and `leave` are the two
    halves, for code that cannot use ``async with``. A barrier can be used again once everyone has left. One
    participant per session and barrier name.

    Args:
        session: the participant's session; its key is bound to the session's lease.
        name: the barrier's name; keys live under ``<name>/``.
        count: how many participants the barrier waits for (>= 1).

    Raises:
        TypeError, ValueError: (at once) a bad argument.
    """

    def __init__(self, session: Session, name: str, *, count: int) -> None:
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"count is an int, not {type(count).__name__}")
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self.session = require_session(session)
        self.name = name
        self.count = count
        prefix = name_prefix(name)
        self._waiters = prefix + b"waiters/"
        self._ready = prefix + b"ready"
        self._key = self._waiters + format(session.lease_id, "x").encode()
        self._revision = 0  # our key's create revision while we are inside
        self._stack: AsyncExitStack | None = None

    async def enter(self) -> None:
        """Arrive and wait until ``count`` participants are inside.

        Raises:
            TooManyParticipantsError: the barrier already has ``count`` participants inside (nothing is left
                behind).
            RuntimeError: this participant is inside already.
            SessionClosedError: the session is not open.
        """
        if self._revision:
            raise RuntimeError(f"double barrier {self.name!r}: this participant is inside already")
        backend, session = self.session.backend, self.session
        self._key = self._waiters + format(session.lease_id, "x").encode()
        async with session.guarded(BarrierLostError, what=f"double barrier {self.name!r}"):
            # Our key, and who is inside at its revision: the arrival that makes the count is the one that opens.
            # Not retried: the count must be read at our key's revision. Create-only: a session enters once.
            try:
                result = await backend.txn(
                    [Compare.create(self._key, "==", 0)],
                    [Put(self._key, b"", session.lease_id), Range(self._waiters, prefix=True, count_only=True)],
                )
            except BaseException:  # the key may have been written, unanswered: take it back
                await self._drop_key()
                raise
            if not result.succeeded:
                raise RuntimeError(f"double barrier {self.name!r}: this session is inside already")
            self._revision = result.revision
            inside = result.responses[1]
            assert isinstance(inside, RangeResult)
            try:
                if inside.count > self.count:
                    raise TooManyParticipantsError(
                        f"double barrier {self.name!r} already has its {self.count} participants inside"
                    )
                if inside.count == self.count:  # no compare: whoever completes the count opens (a put is idempotent)
                    await backend.txn([], [Put(self._ready, b"")])
                else:
                    await self._wait_ready()
            except BaseException:
                await self._drop_key()
                raise

    async def _wait_ready(self) -> None:
        """Wait for a put of ``ready`` made after our key (an older one is from an earlier round)."""
        async with Watch(self.session.backend, self._ready, start_revision=self._revision + 1) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):  # after a compaction: look at the key itself
                    if any(kv.mod_revision > self._revision for kv in item.kvs):
                        return
                elif any(event.type is EventType.PUT for event in item.events):
                    return

    async def leave(self) -> None:
        """Leave, and wait until everyone who was inside has left (or dropped out with their lease).

        Raises:
            RuntimeError: this participant is not inside.
        """
        if not self._revision:
            raise RuntimeError(f"double barrier {self.name!r}: this participant is not inside")
        backend = self.session.backend
        # Our key goes, and we learn at the same revision who is still inside.
        result = await backend.txn([], [Delete(self._key), Range(self._waiters, prefix=True, keys_only=True)])
        self._revision = 0
        inside = result.responses[1]
        assert isinstance(inside, RangeResult)
        remaining = {kv.key for kv in inside.kvs}
        if remaining:
            async with Watch(backend, self._waiters, prefix=True, start_revision=result.revision + 1) as watch:
                async for item in watch:
                    if isinstance(item, Snapshot):  # after a compaction: whoever is still there
                        remaining &= {kv.key for kv in item.kvs}
                    else:
                        remaining -= {e.kv.key for e in item.events if e.type is EventType.DELETE}
                    if not remaining:
                        break
        # Everyone is out: the next round starts closed. (Whoever sees it deletes; a ready key put since, by a
        # next round that filled up meanwhile, has released its participants already: they saw the put.)
        await backend.txn([], [Delete(self._ready)])

    async def _drop_key(self) -> None:
        """Delete our key, shielded, while the session is valid (then it goes with the lease anyway)."""
        with anyio.CancelScope(shield=True):
            key, self._revision = self._key, 0
            session = self.session
            # The key's name holds our lease id: the lease compare makes sure it is this session's participant's.
            mine = Compare.lease(key, "==", session.lease_id)
            await retry_while_valid(session, lambda: session.backend.txn([mine], [Delete(key)]))

    async def __aenter__(self) -> DoubleBarrier:
        await self.enter()
        async with AsyncExitStack() as stack:
            stack.push_async_exit(self._depart)  # after the guarded block; at once if it cannot be entered
            await stack.enter_async_context(
                self.session.guarded(BarrierLostError, what=f"double barrier {self.name!r}")
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _depart(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave after the body: with ``exc`` (the body failed or was cancelled, or the guard raised
        BarrierLostError because the session was lost) at once, without waiting; else wait for the others."""
        if exc is None:
            await self.leave()
        else:
            await self._drop_key()
