"""Lock: a distributed mutex with fencing tokens, etcd's Go ``concurrency.Mutex`` algorithm and key layout.

Guarantees: at most one holder per name while every holder's session is valid; holders in FIFO order of
arrival; the holder's block is cancelled (and ``LockLostError`` raised) as soon as its session is lost, before
the server can expire the lease and admit the next holder; tokens strictly increase across holders. An
uncontended acquire is one transaction; a waiter watches only its nearest predecessor, so a release wakes
exactly one waiter. ``etcdctl lock`` and Go clients using ``concurrency.Mutex`` take part in the same queue.
"""

from __future__ import annotations

from typing import final

from .._errors import OwnershipLostError
from .contenders import Mutex


class LockLostError(OwnershipLostError):
    """The session under a held lock was lost: the block was cancelled; someone else may hold the lock now."""


@final
class Lock(Mutex):
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
    _span = "coordkit.lock.acquire"

    def _value(self) -> bytes:
        return b""
