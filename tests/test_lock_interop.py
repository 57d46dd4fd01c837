"""A coordkit Lock and ``etcdctl lock`` (etcd's Go concurrency.Mutex) exclude each other, both ways.

This is about etcd's own tooling, so it runs against the real etcd only.
"""

from __future__ import annotations

import signal
from typing import Literal

import anyio
import anyio.abc
import pytest

from coordkit import EtcdBackend, Lock, Range, Session
from coordkit.testing import EtcdServer

from .helpers import etcdctl

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("kind", ["etcd"])]


async def first_line(process: anyio.abc.Process) -> str:
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        data += await process.stdout.receive()
    return data.decode().strip()


@pytest.mark.parametrize("transport", ["gateway", "grpc"])
async def test_etcdctl_holder_excludes_coordkit(etcd_server: EtcdServer, transport: Literal["gateway", "grpc"]) -> None:
    name = "interop-etcdctl-first"
    async with EtcdBackend(etcd_server.endpoint, transport=transport) as backend, Session(backend, ttl=5) as session:
        async with etcdctl(etcd_server, "lock", name) as holder:
            with anyio.fail_after(15):
                key = await first_line(holder)
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
                holder.send_signal(signal.SIGINT)
                with anyio.fail_after(15):
                    await acquired.wait()


@pytest.mark.parametrize("transport", ["gateway", "grpc"])
async def test_coordkit_holder_excludes_etcdctl(etcd_server: EtcdServer, transport: Literal["gateway", "grpc"]) -> None:
    name = "interop-coordkit-first"
    async with EtcdBackend(etcd_server.endpoint, transport=transport) as backend, Session(backend, ttl=5) as session:
        lock = Lock(session, name)
        held = await lock.acquire()
        assert held.key == f"{name}/{session.lease_id:x}".encode(), "Go's key layout"
        async with etcdctl(etcd_server, "lock", name) as holder:
            assert holder.stdout is not None
            with anyio.move_on_after(1) as waited:
                await holder.stdout.receive()
            assert waited.cancelled_caught, "etcdctl got the lock while coordkit held it"
            queue = await backend.range(Range(name.encode() + b"/", prefix=True))
            assert queue.count == 2 and queue.kvs[0].key == held.key
            await lock.release()
            with anyio.fail_after(15):
                key = await first_line(holder)
            assert key.startswith(name + "/") and key.encode() != held.key
