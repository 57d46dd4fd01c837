"""Semaphore: up to ``limit`` holders of a name at once, in FIFO order, each with a fencing token.

Same queue as Lock (one key per contender under ``<name>/``, ordered by create revision); the first ``limit``
keys hold permits. Each key carries the limit its contender was created with, so contenders that disagree on it
are refused instead of over-admitting.
"""

from __future__ import annotations

from typing import final

from .._backends.types import MAX_INT64, EventType, RangeResult
from .._errors import OwnershipLostError
from .._session import Session
from .._watch import Snapshot, Watch
from .contenders import Contender


class PermitLostError(OwnershipLostError):
    """The session under a held permit was lost: the block was cancelled; the permit may be someone else's now."""


@final
class Semaphore(Contender):
    """A distributed semaphore: at most ``limit`` holders of ``name`` at once.

    ``async with Semaphore(session, "gpu", limit=4) as permit:`` waits for a permit, runs the body in a guarded
    block (cancelled if the session is lost, then ``PermitLostError``) and gives the permit back on exit.
    ``permit.token`` is its fencing token (create revisions strictly increase across successive permits).
    Waiters are admitted in FIFO order; each follows the queue through one watch and counts the contenders ahead
    of it down as their keys are deleted, with no extra reads.

    Every contender of a name must use the same ``limit``: one that disagrees with the current holders gets
    ``ValueError`` and leaves no key behind (the check covers the current holders). Do not use one name for a
    Semaphore and a Lock. A task may hold one permit of a name per session at a time.

    Attributes:
        limit: how many holders the name admits at once.

    Args:
        session: the session whose lease the permit key is bound to.
        name: the semaphore's name; keys live under ``<name>/``.
        limit: how many holders at once (>= 1).
    """

    _lost_error = PermitLostError
    _span = "coordkit.semaphore.acquire"

    def __init__(self, session: Session, name: str, *, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if not 1 <= limit <= MAX_INT64:
            raise ValueError(f"limit must be from 1 to 2**63 - 1, not {limit}")
        super().__init__(session, name)
        self.limit = limit

    @property
    def _owners(self) -> int:
        return self.limit

    def _value(self) -> bytes:
        return str(self.limit).encode()

    def _check_queue(self, owners: RangeResult) -> None:
        for kv in owners.kvs:
            if kv.value != self._value():
                raise ValueError(
                    f"semaphore {self.name!r}: this contender has limit {self.limit}, but a holder was created with "
                    f"limit {kv.value.decode(errors='replace') or '(none: a Lock?)'}"
                )

    async def _wait_turn(self, key: bytes, revision: int) -> None:
        backend = self.session.backend
        # Count the contenders ahead of us down as they leave; keys created after ours never matter.
        async with Watch(backend, self._prefix, prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    if all(kv.create_revision != revision for kv in item.kvs):
                        raise PermitLostError(
                            f"semaphore {self.name!r}: the waiter's key vanished (lease lost)", session=self.session
                        )
                    ahead = {kv.key for kv in item.kvs if kv.create_revision < revision}
                else:
                    for event in item.events:
                        if event.type is EventType.DELETE:
                            if event.kv.key == key:
                                raise PermitLostError(
                                    f"semaphore {self.name!r}: the waiter's key was deleted", session=self.session
                                )
                            ahead.discard(event.kv.key)
                if len(ahead) < self.limit:
                    return
