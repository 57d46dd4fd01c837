"""A coordkit Lock and ``etcdctl lock`` (etcd's Go concurrency.Mutex) exclude each other, both ways.

This is about etcd's own tooling, so it runs against the real etcd only.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from coordkit import EtcdBackend, Lock, Range, Session
from coordkit.testing import EtcdServer

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("kind", ["etcd"])]


@asynccontextmanager
async def etcdctl_lock(server: EtcdServer, name: str) -> AsyncIterator[anyio.abc.Process]:
    """``etcdctl lock NAME``: it prints its key once it holds the lock and holds it until interrupted."""
    process = await anyio.open_process([server.etcdctl, f"--endpoints={server.endpoint}", "lock", name])
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # etcdctl releases (revokes its session) on SIGINT
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        await process.aclose()


async def first_line(process: anyio.abc.Process) -> str:
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        data += await process.stdout.receive()
    return data.decode().strip()


async def test_etcdctl_holder_excludes_coordkit(etcd_server: EtcdServer) -> None:
    name = "interop-etcdctl-first"
    async with EtcdBackend(etcd_server.endpoint) as backend, Session(backend, ttl=5) as session:
        async with etcdctl_lock(etcd_server, name) as etcdctl:
            with anyio.fail_after(15):
                key = await first_line(etcdctl)
            assert key.startswith(name + "/"), key  # Go's layout: <name>/<lease id hex>
            lock = Lock(session, name)
            assert not await lock.try_acquire()
            async with anyio.create_task_group() as tg:
                acquired = anyio.Event()

                async def wait() -> None:
                    async with lock:
                        acquired.set()

                tg.start_soon(wait)
                with anyio.move_on_after(1):
                    await acquired.wait()
                assert not acquired.is_set(), "coordkit entered while etcdctl held the lock"
                etcdctl.send_signal(signal.SIGINT)
                with anyio.fail_after(15):
                    await acquired.wait()


async def test_coordkit_holder_excludes_etcdctl(etcd_server: EtcdServer) -> None:
    name = "interop-coordkit-first"
    async with EtcdBackend(etcd_server.endpoint) as backend, Session(backend, ttl=5) as session:
        lock = Lock(session, name)
        held = await lock.acquire()
        assert held.key == f"{name}/{session.lease_id:x}".encode(), "Go's key layout"
        async with etcdctl_lock(etcd_server, name) as etcdctl:
            assert etcdctl.stdout is not None
            with anyio.move_on_after(1) as waited:
                await etcdctl.stdout.receive()
            assert waited.cancelled_caught, "etcdctl got the lock while coordkit held it"
            queue = await backend.range(Range(name.encode() + b"/", prefix=True))
            assert queue.count == 2 and queue.kvs[0].key == held.key
            await lock.release()
            with anyio.fail_after(15):
                key = await first_line(etcdctl)
            assert key.startswith(name + "/") and key.encode() != held.key
