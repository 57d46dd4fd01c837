"""Events delivered until someone replies: request/reply, re-delivery, dependencies, pause, inspection, removal.

The seed's event bus on a work queue: an event is a request; it is delivered (again, after a failure) until a
handler completes it with a reply, which the sender gets back. Here:

- "deploy" must not start before "build" completed: it is put ``after=[build]``;
- the first handler to take "resize" fails on it, and the event is delivered again, to whichever handler is free;
- "audit" is removed by an operator before anyone handled it: its sender learns it failed, instead of waiting;
- a control program pauses the queue while the events are put and inspects it (``items()``), then resumes it.

    python examples/events.py                 # in-memory backend (the default)
    python examples/events.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import Backend, PendingRequest, RequestFailedError, Session, WorkQueue

NAME = "examples/events"


async def handler(name: str, client: Backend, failed_once: set[str]) -> None:
    async with client, Session(client, ttl=5) as session, WorkQueue(session, NAME, max_attempts=3) as queue:
        while True:
            try:
                async with queue.lease(visibility_timeout=10) as task:
                    event = task.payload.decode()
                    if event == "resize" and not failed_once:
                        failed_once.add(event)
                        raise RuntimeError("out of memory")
                    await anyio.sleep(0.05)
                    task.reply(f"{event} handled by {name} (attempt {task.attempt})".encode())
            except RuntimeError as exc:
                print(f"{name}: failed on {event} ({exc}); it will be delivered again")


async def wait_reply(event: str, pending: PendingRequest, replies: list[str]) -> None:
    try:
        with anyio.fail_after(20):
            reply = (await pending.result()).decode()
    except RequestFailedError as exc:
        reply = f"{event} failed: {exc.reason}"
    print(f"sender: {reply}")
    replies.append(reply)


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    replies: list[str] = []
    async with connect() as client, Session(client, ttl=5) as session:
        queue = WorkQueue(session, NAME)
        await queue.pause()  # the control program holds the handlers back while the events go in
        build = await queue.request(b"build")
        deploy = await queue.request(b"deploy", after=[build.id])
        resize = await queue.request(b"resize")
        audit = await queue.request(b"audit")
        listed = [(item.id, item.attempts) for item in await queue.items()]
        print(f"control: {len(listed)} events queued while paused, none delivered: {all(a == 0 for _, a in listed)}")
        await queue.remove(audit.id)
        async with anyio.create_task_group() as tg:
            failed_once: set[str] = set()
            for name in ("handler-1", "handler-2"):
                tg.start_soon(handler, name, connect(), failed_once)
            await queue.resume()
            async with anyio.create_task_group() as senders:
                for event, pending in (("build", build), ("deploy", deploy), ("resize", resize), ("audit", audit)):
                    senders.start_soon(wait_reply, event, pending, replies)
            tg.cancel_scope.cancel()
    order = [reply.split()[0] for reply in replies]
    print(f"deploy after build: {order.index('deploy') > order.index('build')}")
    print(f"resize handled on attempt 2: {any(r.startswith('resize') and 'attempt 2' in r for r in replies)}")


if __name__ == "__main__":
    anyio.run(main)
