"""Background tasks of a recipe object, with one failure path.

An object that follows the store from tasks of its own (a `ConfigView`, a `Scheduler`) runs them under
`supervised`. A follower restarts itself after a transient failure (`keep_following`); a permanent one (or a
follower that stops for any other reason) cancels the body of the object's ``async with``, which then raises that
failure, typed: never an ``ExceptionGroup``, never a native exception of a backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, final

import anyio
import anyio.abc

from . import _telemetry
from ._errors import BackendError, CoordkitError, error_text, is_permanent
from ._retry import Backoff


@final
class Supervisor:
    """Starts an object's background tasks; the first one to fail stops them all and the object's body."""

    def __init__(self, task_group: anyio.abc.TaskGroup, what: str) -> None:
        self._task_group = task_group
        self._what = what
        self.failure: CoordkitError | None = None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background until the object exits; if it raises, the object fails."""
        self._task_group.start_soon(self._supervise, fn, args)

    async def _supervise(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """Stop everything; the object's ``async with`` raises ``exc`` (typed: other errors are wrapped)."""
        if self.failure is None:
            if isinstance(exc, CoordkitError):
                self.failure = exc
            else:  # e.g. a third-party backend's own error type: typed, with the original as the cause
                self.failure = BackendError(f"{self._what} stopped: {error_text(exc)}")
                self.failure.__cause__ = exc
        self._task_group.cancel_scope.cancel()


@asynccontextmanager
async def supervised(what: str) -> AsyncIterator[Supervisor]:
    """A task group for an object's background tasks whose failure surfaces typed from the object's exit.

    The body runs inside the group's cancel scope, so a failing task cancels it. An error the body raises itself
    leaves unchanged (not wrapped in a group); cancellation from outside passes through.
    """
    body_error: BaseException | None = None
    async with anyio.create_task_group() as task_group:
        supervisor = Supervisor(task_group, what)
        try:
            yield supervisor
        except anyio.get_cancelled_exc_class():
            raise  # the group absorbs its own cancellation (a failed task); an outer one goes on
        except BaseException as exc:
            body_error = exc  # raised after the group, so that it is not wrapped in an ExceptionGroup
        finally:
            task_group.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
    if supervisor.failure is not None:
        raise supervisor.failure


async def keep_following(follow: Callable[[], Awaitable[object]], *, span: str, backend: str) -> None:
    """Run a follower loop, starting it again with backoff after a transient failure.

    A permanent failure (`is_permanent`) propagates. A follower resumes where it was (the watch layers below
    resume from their last revision), so a restart loses nothing.
    """
    backoff = Backoff()
    while True:
        try:
            await follow()
            return
        except Exception as exc:
            if is_permanent(exc):
                raise
            _telemetry.record_failure(span, _telemetry.attributes(backend=backend), exc)
            await anyio.sleep(backoff.next_delay())
