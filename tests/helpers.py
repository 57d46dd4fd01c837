"""Helpers shared by the recipe tests."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from coordkit import (
    Backend,
    Compare,
    EventType,
    Lease,
    Op,
    Range,
    RangeResult,
    Session,
    Snapshot,
    TxnResult,
    Watch,
    WatchBatch,
)
from coordkit._backends.faults import ClientFaults
from coordkit.testing import EtcdServer, Harness
from coordkit.testing._etcd_process import free_ports
from coordkit.testing._harness import client_faults


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


class PassThrough:
    """A client that passes every call to ``inner`` unchanged: subclass it and override the calls to change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    async def range(self, request: Range) -> RangeResult:
        return await self.inner.range(request)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        return await self.inner.txn(compare, success, failure)

    async def grant(self, ttl: int) -> Lease:
        return await self.inner.grant(ttl)

    async def refresh(self, lease_id: int) -> int:
        return await self.inner.refresh(lease_id)

    async def revoke(self, lease_id: int) -> None:
        await self.inner.revoke(lease_id)

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        return self.inner.watch(key, prefix=prefix, start_revision=start_revision)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class StuckWrites(PassThrough):
    """A client whose transactions hang while `stuck` (until `unstick`) and whose other calls go through.

    What a client sees when its write was forwarded to an etcd leader that just died: the write waits for the
    server's request timeout, while its lease keepalives reach the new leader and keep the session valid.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.stuck = False
        self._unstuck = anyio.Event()

    def stick(self) -> None:
        self.stuck = True

    def unstick(self) -> None:
        self.stuck = False
        self._unstuck.set()
        self._unstuck = anyio.Event()

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        while self.stuck:
            await self._unstuck.wait()
        return await self.inner.txn(compare, success, failure)


def reply_faults(client: Backend) -> ClientFaults:
    """Where a harness client's reply faults are: MemoryBackend.faults, or the FaultyBackend around an etcd client."""
    return client_faults(client)


class Counted(PassThrough):
    """A client that counts the store requests made through it (and keeps the txns), and can hold txn replies."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.txns = self.watches = 0
        self.writes: list[Sequence[Op]] = []  # the success branch of every txn
        self.reads: list[Range] = []
        self.hold_replies: anyio.Event | None = None  # while set up, txn replies wait for it (the txn is applied)
        self.held = anyio.Event()
        self.watched = anyio.Event()  # set by the first watch

    async def range(self, request: Range) -> RangeResult:
        self.reads.append(request)
        return await self.inner.range(request)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        self.txns += 1
        self.writes.append(success)
        result = await self.inner.txn(compare, success, failure)
        if self.hold_replies is not None:
            self.held.set()
            await self.hold_replies.wait()
        return result

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        self.watches += 1
        self.watched.set()
        return self.inner.watch(key, prefix=prefix, start_revision=start_revision)


def closed_endpoint() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"
