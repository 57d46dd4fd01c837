"""The client-side faults of tests, written once: `MemoryFaults` (a `MemoryBackend` client's hooks) and
``coordkit.testing.FaultyBackend`` (a wrapper of any backend) both inherit them from `ClientFaults`.

A fault here is what one client sees of a network that fails it: a partition, keepalives that hang, broken watch
streams, replies lost or late. The store's own faults (a lease expired now, a compaction) are not here: only an
in-process store has them (`MemoryFaults.expire_lease`, `MemoryFaults.compact`).
"""

from __future__ import annotations

import math

import anyio

from .._errors import UnavailableError


class ClientFaults:
    """The faults one client sees, each with one code path; the client calls `_wait_connected` before a request
    goes out, `_reply` before it hands back a reply (or an error reply), and `_watch_broken` on its open streams
    (with the `_watch_epoch` they were opened in).

    Calls held by a fault wait, cancellably, until `heal`.
    """

    #: names the fault hook in error messages
    _hook = "ClientFaults"
    #: what a lost reply means for the request (in its error message)
    _lost_reply = "the request was sent"

    def __init__(self) -> None:
        self._partitioned = False
        self._keepalives_suspended = False
        self._healed: anyio.Event | None = None
        self._watch_epoch = 0  # streams opened before the latest break_watches() are broken
        self._lose_replies = 0
        self._reply_delay = 0.0

    def partition(self) -> None:
        """Cut this client off: its calls hang (cancellably) until `heal`; its watch streams break."""
        self._partitioned = True
        self.break_watches()

    def suspend_keepalives(self) -> None:
        """Make this client's lease refreshes hang (a lost keepalive stream) until `heal`."""
        self._keepalives_suspended = True

    def break_watches(self) -> None:
        """Break every watch stream this client has open: each raises UnavailableError (at once if it is waiting,
        else at its next read)."""
        self._watch_epoch += 1
        self._wake_watches()

    def heal(self) -> None:
        """End a partition and resume suspended keepalives; the calls they held go on."""
        self._partitioned = False
        self._keepalives_suspended = False
        if self._healed is not None:
            self._healed.set()
            self._healed = None

    def lose_replies(self, count: int) -> None:
        """The next ``count`` calls reach the store, then raise UnavailableError: their replies are lost.

        The ambiguous failure of a real network (the connection drops after the request was sent): the store
        changed, the caller cannot know it. Counts unary calls (range, txn, grant, refresh, revoke) that reach the
        store. ``lose_replies(0)`` ends it.
        """
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, not {count!r}")
        self._lose_replies = count

    def delay_replies(self, seconds: float) -> None:
        """Make the reply of every call arrive ``seconds`` after the store gave it (0 ends it).

        The store changes at once; the caller waits (cancellably: a caller cancelled meanwhile cannot know its
        write happened) on the event loop's clock. While the client is partitioned, replies wait for `heal` too.
        Unary calls only (range, txn, grant, refresh, revoke).
        """
        if not seconds >= 0 or seconds == math.inf:
            raise ValueError(f"reply delay must be a finite number of seconds >= 0, not {seconds!r}")
        self._reply_delay = seconds

    # -- used by the client -----------------------------------------------------------------------------

    def _wake_watches(self) -> None:
        """Wake this client's waiting watch streams, so that they see `_watch_broken` (the client's mechanism)."""

    async def _wait_connected(self, *, keepalive: bool = False) -> None:
        """Wait while the client is partitioned (or, for a lease refresh, while keepalives are suspended)."""
        while self._partitioned or (keepalive and self._keepalives_suspended):
            if self._healed is None:
                self._healed = anyio.Event()
            await self._healed.wait()

    async def _reply(self) -> None:
        """Deliver a reply (or an error reply) through the reply faults: late, then perhaps lost."""
        if self._reply_delay:
            await anyio.sleep(self._reply_delay)
            await self._wait_connected()  # a reply cannot reach a client that is cut off
        if self._lose_replies:
            self._lose_replies -= 1
            raise UnavailableError(f"reply lost ({self._hook}.lose_replies): {self._lost_reply}")

    def _watch_broken(self, epoch: int) -> bool:
        """Whether a stream opened at ``epoch`` has been broken by `break_watches` (or a partition) since."""
        return epoch != self._watch_epoch
