"""Helpers shared by the recipe tests."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.abc

from coordkit import Backend, EventType, Range, Session, Snapshot, Watch
from coordkit.testing import EtcdServer, Harness


@asynccontextmanager
async def sessions(harness: Harness, count: int, *, ttl: int = 5) -> AsyncIterator[list[Session]]:
    """``count`` sessions, each on its own client (a separate simulated process)."""
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(count):
            client = await stack.enter_async_context(harness.client())
            out.append(await stack.enter_async_context(Session(client, ttl=ttl)))
        yield out


async def queue_length(backend: Backend, name: str) -> int:
    return (await backend.range(Range(name.encode() + b"/", prefix=True, count_only=True))).count


async def wait_queue(backend: Backend, name: str, length: int) -> None:
    """Wait until exactly ``length`` contenders have their key in the queue, following it with a Watch."""
    keys: set[bytes] = set()
    with anyio.fail_after(30):
        async with Watch(backend, name.encode() + b"/", prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    keys = {kv.key for kv in item.kvs}
                else:
                    for event in item.events:
                        (keys.add if event.type is EventType.PUT else keys.discard)(event.kv.key)
                if len(keys) == length:
                    return


@asynccontextmanager
async def etcdctl(server: EtcdServer, *args: str) -> AsyncIterator[anyio.abc.Process]:
    """Run ``etcdctl ARGS`` against ``server``; interrupt it (it then releases what it holds) on exit."""
    process = await anyio.open_process([server.etcdctl, f"--endpoints={server.endpoint}", *args])
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # etcdctl releases / resigns (revokes its session) on SIGINT
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        await process.aclose()
