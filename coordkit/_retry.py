"""Retry policies, declared once. Every retry in coordkit goes through here.

Policies never stop on elapsed time: callers bound them with cancel scopes (``anyio.fail_after``), which also
follow virtual clocks in tests. They sleep through `sleep` so they work on asyncio and trio.
"""

from __future__ import annotations

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from ._errors import UnavailableError

#: Jittered exponential backoff between reconnect attempts: 50 ms, 100 ms, ... up to 2 s.
RECONNECT_WAIT = wait_random_exponential(multiplier=0.05, max=2.0)


def retry_unavailable(*, attempts: int | None = None) -> AsyncRetrying:
    """Retry on `UnavailableError` with `RECONNECT_WAIT`; other errors propagate at once.

    Args:
        attempts: give up (re-raising the last error) after this many attempts; None retries until cancelled.
    """
    stop: stop_base = stop_never if attempts is None else stop_after_attempt(attempts)
    return AsyncRetrying(
        sleep=anyio.sleep,
        wait=RECONNECT_WAIT,
        retry=retry_if_exception_type(UnavailableError),
        stop=stop,
        reraise=True,
    )


class Backoff:
    """Delays between consecutive failures of a long-lived loop (reconnects, keepalives), reset by a success.

    Uses `RECONNECT_WAIT`, so every retry in coordkit follows the same policy.
    """

    def __init__(self) -> None:
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        self.failures += 1
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self.failures
        return float(RECONNECT_WAIT(state))
