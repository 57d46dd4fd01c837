"""Lock: a distributed mutex with fencing tokens, etcd's Go ``concurrency.Mutex`` algorithm and key layout.

Guarantees: at most one holder per name while every holder's session is valid; holders in FIFO order of
arrival; the holder's block is cancelled (and ``LockLostError`` raised) as soon as its session is lost, before
the server can expire the lease and admit the next holder; tokens strictly increase across holders. An
uncontended acquire is one transaction; a waiter watches only its nearest predecessor, so a release wakes
exactly one waiter. ``etcdctl lock`` and Go clients using ``concurrency.Mutex`` take part in the same queue.
"""

from __future__ import annotations

from typing import final

from ._errors import OwnershipLostError
from ._queue import Contender
from ._types import Range, RangeResult
from ._watch import wait_deleted


class LockLostError(OwnershipLostError):
    """The session under a held lock was lost: the block was cancelled; someone else may hold the lock now."""


@final
class Lock(Contender):
    """A distributed lock named ``name``, held through ``session``'s lease.

    ``async with Lock(session, "jobs/nightly") as held:`` waits until this contender holds the lock, runs the
    body in a guarded block (cancelled if the session is lost, then ``LockLostError``), and releases on exit,
    whatever the body did. ``held.token`` is the fencing token; ``held.guard()`` the compare that makes a
    write conditional on still holding the lock. Bound the wait with ``anyio.fail_after``: a waiter that gives
    up leaves no key behind.

    Names nest as in etcd: keys of ``jobs/nightly`` live under ``jobs/``, so a lock named ``jobs`` also queues
    behind them. Do not use one name for a Lock and a Semaphore.

    Re-entrancy: a lock is not re-entrant. Tasks contend like processes do, whether they share a session or
    not; a task that asks again for a lock it holds (or waits for) in the same session gets ``RuntimeError``
    instead of a deadlock. Tasks sharing one ``Lock`` object take turns on it in FIFO order.

    Args:
        session: the session whose lease the lock key is bound to.
        name: the lock's name; keys live under ``<name>/``.
    """

    _lost_error = LockLostError

    @property
    def _owners(self) -> int:
        return 1

    def _value(self) -> bytes:
        return b""

    def _check_queue(self, owners: RangeResult) -> None:
        pass

    async def _wait_turn(self, key: bytes, revision: int) -> None:
        backend = self.session.backend
        # Our nearest predecessor is the newest key created before ours (Go's waitDeletes). Read it together with
        # our own key, so that learning "it is our turn" and "our key still exists" costs one round trip.
        predecessor = Range(
            self._prefix, prefix=True, sort_by="create", descending=True, limit=1, max_create_revision=revision - 1
        )
        while True:
            result = await backend.txn([], [predecessor, Range(key)])
            ahead, mine = result.responses
            assert isinstance(ahead, RangeResult) and isinstance(mine, RangeResult)
            if [kv.create_revision for kv in mine.kvs] != [revision]:
                raise LockLostError(
                    f"lock {self.name!r}: the waiter's key vanished (its lease was lost)", session=self.session
                )
            if not ahead.kvs:
                return
            await wait_deleted(backend, ahead.kvs[0].key, revision=result.revision)
