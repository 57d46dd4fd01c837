"""'coordkit queue': put items in a work queue (`WorkQueue`), look at it, steer it, and consume it with a command.

``consume NAME -- COMMAND`` runs COMMAND once per item, with the payload on its stdin, inside the item's lease:
exit 0 completes the item (its stdout is the reply to a request), another status fails it (the stderr tail is the
recorded error). The command runs in its own process group, stopped whole when the claim is lost, as under
``coordkit lock``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import click

from .. import (
    MAX_REQUEST_BYTES,
    Backend,
    ClaimLostError,
    OwnershipLostError,
    QueuedItem,
    Session,
    Task,
    UnknownDependencyError,
    WorkQueue,
    kill_deadline,
)
from ._app import (
    EXIT_LOST,
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    Connection,
    Failure,
    check_name,
    cli,
    connection_options,
    grace_option,
    json_option,
    run,
    stoppable,
    ttl_option,
)
from ._child import check_runnable, run_command
from ._output import Output, note, text

#: What a consumer keeps of a command's stdout as the reply: within etcd's default request limit, with room.
REPLY_LIMIT = MAX_REQUEST_BYTES // 2


@cli.group()
def queue() -> None:
    """Put items in a work queue NAME, list and steer them, and consume them with a command.

    The queue is the library's WorkQueue: programs that use it and these commands share it.
    """


def _queue(connection: Connection, name: str) -> WorkQueue:
    # A session that is never entered: these requests need no lease.
    return WorkQueue(Session(connection.backend()), name)


def _payload(value: str) -> bytes:
    return sys.stdin.buffer.read() if value == "-" else value.encode()


# -- put --------------------------------------------------------------------------------------------------------


@queue.command("put")
@click.argument("name", callback=check_name)
@click.argument("payload")
@click.option("--priority", type=int, default=0, show_default=True, help="higher is offered first")
@click.option(
    "--delay", type=click.FloatRange(min=0), help="offer the item only this many seconds from now (not_before)"
)
@click.option(
    "--expires-in",
    type=click.FloatRange(min=0, min_open=True),
    help="dead-letter the item if it is not completed within this many seconds",
)
@click.option(
    "--after",
    "after",
    multiple=True,
    metavar="ID",
    help="offer the item only once item ID has completed (repeat it for several); exit 4 if ID is not in the queue",
)
@click.option("--wait", is_flag=True, help="a request: wait for the consumer's reply and print it")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="with --wait: give up (exit 124) after this many seconds; the request is withdrawn",
)
@json_option
@connection_options
def queue_put(
    connection: Connection,
    name: str,
    payload: str,
    priority: int,
    delay: float | None,
    expires_in: float | None,
    after: tuple[str, ...],
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Add PAYLOAD ('-': read it from stdin) to the queue NAME; print the item's id.

    With --wait the item is a request: coordkit waits for a consumer to complete it and prints the reply (for
    'queue consume', its command's stdout); if the item is dead-lettered or removed instead, it exits with 1.
    A request given up (--timeout, a signal) is withdrawn: it is never delivered after that.
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout is for --wait")
    data = _payload(payload)
    backend = connection.backend()
    output = Output(as_json=as_json)
    options: dict[str, Any] = {"priority": priority, "not_before": delay, "expires_in": expires_in, "after": after}

    async def work() -> int:
        try:
            return await _put(backend, name, data, options, output, wait=wait, timeout=timeout)
        except UnknownDependencyError as exc:
            raise Failure(f"{exc}; nothing was put", EXIT_NOT_FOUND) from None

    run(work)


async def _put(
    backend: Backend,
    name: str,
    data: bytes,
    options: dict[str, Any],
    output: Output,
    *,
    wait: bool,
    timeout: float | None,
) -> int:
    """`queue put`: the item, or (``wait``) a request whose reply is printed."""
    async with backend:
        if not wait:
            item_id = await WorkQueue(Session(backend), name).put(data, **options)
            if output.as_json:
                output.json({"id": item_id})
            else:
                output.line(item_id)
            return 0
        # The reply is bound to this session's lease: a producer that is gone leaks nothing.
        async with Session(backend) as session:
            request = await WorkQueue(session, name).request(data, **options)
            note(f"put {request.id}; waiting for its reply")
            with anyio.move_on_after(timeout if timeout is not None else float("inf")) as waiting:
                reply = await request.result()  # withdraws the request if this wait ends any other way
            if waiting.cancelled_caught:
                raise Failure(f"no reply to {request.id} within {timeout} s; it was withdrawn", EXIT_TIMEOUT)
    if output.as_json:
        output.json({"id": request.id, "reply": text(reply)})
    else:
        sys.stdout.buffer.write(reply)
        sys.stdout.buffer.flush()
    return 0


# -- list, depth, dead ------------------------------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat(timespec="seconds")


def _item(item: QueuedItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "priority": item.priority,
        "attempts": item.attempts,
        "leased": item.leased,
        "holder": item.holder,
        "visibility_timeout": item.visibility_timeout,
        "claim_revision": item.claim_revision,
        "not_before": None if item.not_before is None else item.not_before.isoformat(),
        "expires": None if item.expires is None else item.expires.isoformat(),
    }


@queue.command("list")
@click.argument("name", callback=check_name)
@json_option
@connection_options
def queue_list(connection: Connection, name: str, as_json: bool) -> None:
    """List the items of the queue NAME, pending and leased, in the order consumers are offered them."""
    work_queue = _queue(connection, name)
    output = Output(as_json=as_json)

    async def work() -> int:
        async with work_queue.session.backend:
            items = await work_queue.items()
        if as_json:
            output.json({"items": [_item(item) for item in items]})
        else:
            rows = [
                (
                    item.id,
                    str(item.priority),
                    str(item.attempts),
                    f"leased by {item.holder}" if item.leased else "pending",
                    _when(item.not_before),
                    _when(item.expires),
                )
                for item in items
            ]
            output.table(("id", "priority", "attempts", "state", "not before", "expires"), rows)
        return 0

    run(work)


@queue.command("depth")
@click.argument("name", callback=check_name)
@json_option
@connection_options
def queue_depth(connection: Connection, name: str, as_json: bool) -> None:
    """Count the items of the queue NAME: pending, leased (held by a consumer) and dead-lettered."""
    work_queue = _queue(connection, name)
    output = Output(as_json=as_json)

    async def work() -> int:
        async with work_queue.session.backend:
            depth = await work_queue.depth()
        if as_json:
            output.json({"pending": depth.pending, "leased": depth.leased, "dead": depth.dead})
        else:
            output.table(("pending", "leased", "dead"), [(str(depth.pending), str(depth.leased), str(depth.dead))])
        return 0

    run(work)


@queue.command("dead")
@click.argument("name", callback=check_name)
@json_option
@connection_options
def queue_dead(connection: Connection, name: str, as_json: bool) -> None:
    """List the dead letters of the queue NAME, oldest first: items that failed too often, expired or were
    undecodable, with the last error."""
    work_queue = _queue(connection, name)
    output = Output(as_json=as_json)

    async def work() -> int:
        async with work_queue.session.backend:
            letters = await work_queue.dead_letters()
        if as_json:
            documents = [
                {"id": dead.id, "attempts": dead.attempts, "error": dead.error, "payload": text(dead.payload)}
                for dead in letters
            ]
            output.json({"dead": documents})
        else:
            rows = [(dead.id, str(dead.attempts), _line(dead.error), _line(text(dead.payload))) for dead in letters]
            output.table(("id", "attempts", "error", "payload"), rows)
        return 0

    run(work)


def _line(value: str, limit: int = 60) -> str:
    """A value on one line of a table, cut to ``limit`` characters (--json shows it whole)."""
    flat = " ".join(value.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- requeue, remove --------------------------------------------------------------------------------------------


@queue.command("requeue")
@click.argument("name", callback=check_name)
@click.argument("item_id", metavar="ID")
@connection_options
def queue_requeue(connection: Connection, name: str, item_id: str) -> None:
    """Put the dead letter ID back in the queue NAME, its attempts reset. Exit 4 if there is no such dead letter."""
    work_queue = _queue(connection, name)

    async def work() -> int:
        async with work_queue.session.backend:
            if not await work_queue.requeue(item_id):
                raise Failure(f"no dead letter {item_id!r} in {name!r}", EXIT_NOT_FOUND)
        return 0

    run(work)


@queue.command("remove")
@click.argument("name", callback=check_name)
@click.argument("item_id", metavar="ID")
@connection_options
def queue_remove(connection: Connection, name: str, item_id: str) -> None:
    """Remove the item ID, pending or leased, from the queue NAME. Exit 4 if there is no such item.

    A consumer holding it is not interrupted, but its completion is refused: the item is gone for good.
    """
    work_queue = _queue(connection, name)

    async def work() -> int:
        async with work_queue.session.backend:
            if not await work_queue.remove(item_id):
                raise Failure(f"no item {item_id!r} in {name!r}", EXIT_NOT_FOUND)
        return 0

    run(work)


# -- pause, resume ----------------------------------------------------------------------------------------------


@queue.command("pause")
@click.argument("name", callback=check_name)
@connection_options
def queue_pause(connection: Connection, name: str) -> None:
    """Stop the queue NAME handing out items until 'queue resume' (items held now are completed as usual)."""
    work_queue = _queue(connection, name)

    async def work() -> int:
        async with work_queue.session.backend:
            await work_queue.pause()
        return 0

    run(work)


@queue.command("resume")
@click.argument("name", callback=check_name)
@connection_options
def queue_resume(connection: Connection, name: str) -> None:
    """Let the queue NAME hand out items again after 'queue pause'."""
    work_queue = _queue(connection, name)

    async def work() -> int:
        async with work_queue.session.backend:
            await work_queue.resume()
        return 0

    run(work)


# -- consume ----------------------------------------------------------------------------------------------------


class CommandFailed(Exception):
    """The command exited with a status other than 0: the item's attempt failed."""

    def __init__(self, status: int, stderr: bytes) -> None:
        tail = text(stderr).strip()
        super().__init__(f"exit status {status}" + (f"; stderr: {tail}" if tail else ""))
        self.status = status


@queue.command("consume")
@click.argument("name", callback=check_name)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND...")
@click.option(
    "--visibility-timeout",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="seconds COMMAND may run on one item; then it is killed and the item offered again",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="deliveries of an item before it is dead-lettered (as the consumers that fail it say)",
)
@click.option(
    "--max-items", type=click.IntRange(min=1), help="exit 0 after this many items (default: run until stopped)"
)
@grace_option
@ttl_option
@json_option
@connection_options
def queue_consume(
    connection: Connection,
    name: str,
    command: tuple[str, ...],
    visibility_timeout: int,
    max_attempts: int,
    max_items: int | None,
    grace: float,
    ttl: int,
    as_json: bool,
) -> None:
    """Run COMMAND for each item of the queue NAME, one at a time, with the payload on its stdin.

    Exit 0 completes the item, and COMMAND's stdout is the reply to a request ('queue put --wait'); another
    status fails it: it is offered again, with the tail of COMMAND's stderr as its error, and dead-lettered after
    --max-attempts. COMMAND finds the item in COORDKIT_ITEM_ID and COORDKIT_ATTEMPT (1 for the first delivery).
    Prints one line per item (--json: one document).

    COMMAND runs in its own process group. When the claim is lost (the visibility timeout passed, the item was
    taken back), the group is killed and the next item comes; when this consumer's session is lost, the group is
    killed by the time the lease may end on the server, and coordkit exits with 75.

    \b
        coordkit queue consume thumbnails -- ./make-thumbnail.sh
    """
    backend = connection.backend()
    consumer = _Consumer(command, visibility_timeout, grace, Output(as_json=as_json))

    async def work() -> int:
        check_runnable(command[0])  # exit 127 or 126 before taking an item it could only fail
        handled = 0
        try:
            async with backend, Session(backend, ttl=ttl) as session:
                # Waiting for an item too stops when the session is lost: a lost session cannot claim any more.
                async with session.guarded(what=f"consumer of {name!r}"):
                    async with WorkQueue(session, name, max_attempts=max_attempts) as work_queue:
                        while max_items is None or handled < max_items:
                            await consumer.consume_one(work_queue, session)
                            handled += 1
        except OwnershipLostError as exc:
            raise Failure(f"the session was lost ({exc}); the command, if any, was stopped", EXIT_LOST) from None
        return 0

    run(work)


@dataclass(frozen=True)
class _Consumer:
    """What `queue consume` does with each item: run the command on it, and say how it ended."""

    command: tuple[str, ...]
    visibility_timeout: int
    grace: float
    output: Output

    async def consume_one(self, work_queue: WorkQueue, session: Session) -> None:
        leased: Task | None = None
        status: int | None = None
        try:
            with stoppable():
                async with work_queue.lease(visibility_timeout=self.visibility_timeout) as task:
                    leased = task
                    status = await self.run(task, session)
        except CommandFailed as exc:
            _report(self.output, leased, "failed", exc.status, str(exc))
        except ClaimLostError as exc:
            if session.lost:
                raise  # exit 75, said by work()
            _report(self.output, leased, "lost", None, str(exc))
        else:
            _report(self.output, leased, "completed", status, "")

    async def run(self, task: Task, session: Session) -> int:
        stdout, stderr = bytearray(), bytearray()
        session_kill_by = kill_deadline(session)
        status = await run_command(
            self.command,
            grace=self.grace,
            # By the lease's end, and at once when the claim's own visibility timeout has passed: another
            # consumer may take the item back soon after.
            kill_by=lambda: min(session_kill_by(), task.deadline),
            env={"COORDKIT_ITEM_ID": task.id, "COORDKIT_ATTEMPT": str(task.attempt)},
            stdin=task.payload,
            capture=stdout,
            capture_limit=REPLY_LIMIT + 1,  # one more: enough to know it was cut
            echo=False,
            stderr_tail=stderr,
            reap=True,
        )
        if status != 0:
            raise CommandFailed(status, bytes(stderr))
        if len(stdout) > REPLY_LIMIT and task.wants_reply:
            note(f"the reply to item {task.id} was cut at {REPLY_LIMIT} bytes")
        task.reply(bytes(stdout[:REPLY_LIMIT]))
        return status


def _report(output: Output, task: Task | None, outcome: str, status: int | None, error: str) -> None:
    item_id, attempt = (task.id, task.attempt) if task is not None else ("?", 0)
    if output.as_json:
        output.json({"id": item_id, "attempt": attempt, "outcome": outcome, "status": status, "error": error or None})
    else:
        output.line(f"{item_id} attempt {attempt}: {outcome}" + (f" ({_line(error, 200)})" if error else ""))
