"""Retry policies, declared once. Every retry in coordkit goes through here.

Policies never stop on elapsed time: callers bound them with cancel scopes (``anyio.fail_after``), which also
follow virtual clocks in tests. They sleep through `sleep` so they work on asyncio and trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_random_exponential,
)

from ._errors import UnavailableError

T = TypeVar("T")

#: Jittered exponential backoff between reconnect attempts: 50 ms, 100 ms, ... up to 2 s.
RECONNECT_WAIT = wait_random_exponential(multiplier=0.05, max=2.0)


async def retry_call(
    operation: Callable[[], Awaitable[T]],
    *,
    attempts: int | None = None,
    retryable: Callable[[UnavailableError], bool] | None = None,
) -> T:
    """Await ``operation()``; when it raises UnavailableError, try again with `RECONNECT_WAIT` backoff.

    Other errors propagate at once. The first attempt runs bare, so the common case pays nothing for the retry
    machinery; tenacity takes over only after a failure (its first retry is immediate: a failover to the next
    endpoint should not wait).

    Args:
        attempts: give up (re-raising the last error) after this many attempts in all; None: until cancelled.
        retryable: decides whether a given UnavailableError may be retried (e.g. only if a write surely was not
            sent); None retries every one.
    """
    try:
        return await operation()
    except UnavailableError as exc:
        if attempts == 1 or (retryable is not None and not retryable(exc)):
            raise

    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, UnavailableError) and (retryable is None or retryable(exc))

    retrying = AsyncRetrying(
        sleep=anyio.sleep,
        wait=RECONNECT_WAIT,
        retry=retry_if_exception(should_retry),
        stop=stop_never if attempts is None else stop_after_attempt(attempts - 1),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await operation()
    raise AssertionError("unreachable: tenacity re-raises the last error")


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
