"""The coordkit error tree.

Every error coordkit raises on purpose is a `CoordkitError`. Misuse (bad names, bad TTLs, wrong types)
raises the built-in ``ValueError`` / ``TypeError`` instead, and cancellation is never turned into an error.

```text

    CoordkitError
    ├── BackendError                 the store failed or refused a call
    │   ├── UnavailableError         no answer: connection refused/reset, timeout, stream broken (retryable)
    │   ├── CompactedError           the revision asked for was compacted away (.compact_revision)
    │   ├── LeaseExpiredError        the lease is gone on the server (.lease_id)
    │   ├── AuthenticationError      bad credentials or permission denied
    │   └── RequestTooLargeError     the server refused the request size
    ├── SessionClosedError           the session is not open (not entered yet, or already exited)
    ├── OwnershipLostError           a guarded block ended because its session was lost (.session)
    │   (recipes subclass it: LockLostError, LeadershipLostError, ...)
    ├── NotOwnerError                an operation needs ownership the caller does not have
    ├── TooManyParticipantsError     a double barrier already has its count of participants inside
    └── CounterValueError            a counter's key holds no decimal integer (written by something else)
```

Native errors of a backend's transport are mapped into this tree at one boundary per backend, and the native
exception is kept as ``__cause__``.

Background tasks (a session's keepalive, a view's follower, a scheduler's workers) sort every failure with
`is_permanent`: a permanent one (the lease is gone, the credentials or the permission were refused) ends what the
task serves at once; anything else (unavailable, a timeout, a malformed reply, an error of another type) is
retried, for a session until its validity deadline.
"""

from __future__ import annotations

from typing import Any


class CoordkitError(Exception):
    """Base class of every error coordkit raises on purpose."""


class BackendError(CoordkitError):
    """The backend failed or refused an operation."""


class UnavailableError(BackendError):
    """The backend could not be reached, timed out, or a stream broke. Safe to retry idempotent calls."""


class CompactedError(BackendError):
    """A revision that was asked for has been compacted.

    Attributes:
        compact_revision: the oldest revision still available.
    """

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        self.compact_revision = compact_revision
        super().__init__(message or f"revision compacted (compact revision {compact_revision})")


class LeaseExpiredError(BackendError):
    """The lease no longer exists on the server (expired or revoked).

    Attributes:
        lease_id: the lease that is gone.
    """

    def __init__(self, lease_id: int, message: str | None = None) -> None:
        self.lease_id = lease_id
        super().__init__(message or f"lease {lease_id:x} not found (expired or revoked)")


class AuthenticationError(BackendError):
    """The credentials were rejected or the user lacks permission."""


class RequestTooLargeError(BackendError):
    """The server refused a request because it is larger than it allows."""


class SessionClosedError(CoordkitError):
    """The session is not open: it was not entered yet, or it has exited."""


class OwnershipLostError(CoordkitError):
    """A guarded block was cancelled because the session it ran under was lost.

    Raised from the ``async with`` of the guarded block after its body has been cancelled. Recipes raise
    subclasses that name what was lost (a lock, a leadership).

    Attributes:
        session: the lost session.
    """

    def __init__(self, message: str = "session lost", *, session: Any = None) -> None:
        self.session = session
        super().__init__(message)


class NotOwnerError(CoordkitError):
    """The operation needs ownership (of a lock, a claim, a leadership) that the caller does not have."""


def error_text(exc: BaseException, *, limit: int = 4096) -> str:
    """``Type: message`` of an exception, for records kept in the store, cut to ``limit`` characters.

    Bounded, because an exception message can be arbitrarily large and the store refuses requests over 1.5 MiB:
    recording a failure must not fail itself.
    """
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 14] + " ... (cut off)"


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: the lease is gone, or the store refused the credentials or the permission.

    Everything else a background task meets (unavailability, timeouts, 5xx answers, malformed replies, errors of
    other types from a third-party backend) may pass, so it is retried: for a session, until its deadline.
    """
    return isinstance(exc, LeaseExpiredError | AuthenticationError)
