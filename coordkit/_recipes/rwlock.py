"""ReadWriteLock: many readers or one writer, fair, with the key layout of etcd's Go ``recipes.RWMutex``.

A reader puts ``<name>/read/<lease id hex>``, a writer ``<name>/write/<lease id hex>``, both bound to the
session's lease and ordered by create revision. A reader holds once no *writer* key older than its own is left;
a writer holds once no key at all older than its own is left. So a writer waiting behind readers is not starved:
a reader that arrives after it queues behind it. Each waiter watches only the deletion of its nearest blocking
predecessor (the newest older writer for a reader, the newest older key for a writer), as the Go recipe does, so a
release wakes only the waiters it unblocks. Go clients using ``recipes.NewRWMutex(session, name)`` queue in the
same line (their keys end in a timestamp instead of a lease id; only the order of creation counts).

Guarantees, fencing tokens and lease-loss cancellation are those of `Lock`: the token is the key's create
revision; a holder's block is cancelled, then raises ``ReadWriteLockLostError``, when its session is lost.
"""

from __future__ import annotations

from typing import final

from .._backends.types import Range, RangeResult
from .._errors import OwnershipLostError
from .._keys import name_prefix
from .._session import Session, require_session
from .contenders import Held, Mutex, contends


class ReadWriteLockLostError(OwnershipLostError):
    """The session under a held read or write lock was lost: the block was cancelled; a writer may hold it now."""


class _Side(Mutex):
    """One acquisition of a read/write lock, as a reader or as a writer."""

    _lost_error = ReadWriteLockLostError

    def __init__(self, session: Session, name: str, *, write: bool) -> None:
        super().__init__(session, name)
        self._write = write
        self._span = "coordkit.rwlock.write" if write else "coordkit.rwlock.read"

    @property
    def _recipe(self) -> str:
        return "rwlock"

    @property
    def _what(self) -> str:
        return f"{'write' if self._write else 'read'} lock {self.name!r}"

    @property
    def _key_prefix(self) -> bytes:
        return self._prefix + (b"write/" if self._write else b"read/")

    @property
    def _blockers(self) -> bytes:
        # A writer waits for every older key; a reader only for older writers (Go's waitOnLastRev prefixes).
        return self._prefix if self._write else self._prefix + b"write/"

    def _owners_range(self) -> Range:
        if self._write:
            return super()._owners_range()  # the oldest key of all: ours, or we wait
        # The oldest writer: read in the transaction that creates our key, it is older than ours unless an earlier
        # attempt of this acquire (whose reply was lost) created our key before it.
        return Range(self._prefix + b"write/", prefix=True, sort_by="create", limit=1, keys_only=True)

    def _owns(self, revision: int, owners: RangeResult) -> bool:
        if self._write:
            return super()._owns(revision, owners)
        return all(kv.create_revision > revision for kv in owners.kvs)

    def _value(self) -> bytes:
        return b""

    async def acquire(self) -> Held:
        # Holding one side while asking for the other in the same session would wait for ourselves forever
        # (an upgrade, or a read inside a write): refuse it, as Lock refuses re-entry.
        other = self._prefix + (b"read/" if self._write else b"write/")
        if contends(self.session, other):
            raise RuntimeError(
                f"this task already holds or waits for the {'read' if self._write else 'write'} side of "
                f"{self.name!r} in this session; a read/write lock cannot be upgraded or re-entered"
            )
        return await super().acquire()


@final
class ReadWriteLock:
    """A distributed read/write lock named ``name``: many readers at once, or one writer.

    ``async with rw.read() as held:`` shares the lock with other readers; ``async with rw.write() as held:`` holds
    it alone. Waiters are served in order of arrival: a writer waits for the readers and the writer ahead of it,
    and readers arriving after a waiting writer wait for it (no writer starvation). Each ``read()`` / ``write()``
    call is one acquisition, usable from any number of tasks at once; ``held.token`` is its fencing token and
    ``held.guard()`` the compare that makes a write conditional on still holding it.

    The body is guarded by the session: if it is lost, the body is cancelled and ``ReadWriteLockLostError`` is
    raised, before the server can expire the lease and admit a writer. Not re-entrant and not upgradable: a task
    asking for a side while it holds (or waits for) either side of the same name in the same session gets
    ``RuntimeError`` instead of a deadlock. Do not use one name for a ReadWriteLock and a Lock.

    Args:
        session: the session whose lease the keys are bound to.
        name: the lock's name; keys live under ``<name>/read/`` and ``<name>/write/``.
    """

    def __init__(self, session: Session, name: str) -> None:
        self.session = require_session(session)
        name_prefix(name)  # refuse a bad name now, not at the first acquisition
        self.name = name

    def read(self) -> _Side:
        """One shared acquisition (``async with``; also ``acquire``/``try_acquire``/``release``)."""
        return _Side(self.session, self.name, write=False)

    def write(self) -> _Side:
        """One exclusive acquisition (``async with``; also ``acquire``/``try_acquire``/``release``)."""
        return _Side(self.session, self.name, write=True)
