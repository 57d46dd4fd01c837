"""coordkit candidates and ``etcdctl elect`` (etcd's Go concurrency.Election) take part in one election.

This is about etcd's own tooling, so it runs against the real etcd only.
"""

from __future__ import annotations

import signal
from typing import Literal

import anyio
import anyio.abc
import pytest

from coordkit import Election, EtcdBackend, Session
from coordkit.testing import EtcdServer

from .helpers import etcdctl, wait_queue

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("kind", ["etcd"])]


async def read_lines(process: anyio.abc.Process, count: int) -> list[str]:
    assert process.stdout is not None
    data = b""
    while data.count(b"\n") < count:
        data += await process.stdout.receive()
    return data.decode().splitlines()[:count]


@pytest.mark.parametrize("transport", ["gateway", "grpc"])
async def test_etcdctl_leader_is_seen_and_hands_over(
    etcd_server: EtcdServer, transport: Literal["gateway", "grpc"]
) -> None:
    name = "interop-elect-etcdctl-first"
    async with EtcdBackend(etcd_server.endpoint, transport=transport) as backend, Session(backend, ttl=5) as session:
        election = Election(session, name)
        async with etcdctl(etcd_server, "elect", name, "from-etcdctl") as campaigner:
            with anyio.fail_after(15):
                key, value = await read_lines(campaigner, 2)  # printed once elected
            assert key.startswith(name + "/") and value == "from-etcdctl"
            leader = await election.leader()
            assert leader is not None and leader.value == b"from-etcdctl" and leader.key == key.encode()
            async with anyio.create_task_group() as tg:
                elected = anyio.Event()

                async def campaign() -> None:
                    async with election.campaign(b"from-coordkit"):
                        elected.set()

                tg.start_soon(campaign)
                await wait_queue(backend, name, 2)
                assert not elected.is_set(), "coordkit led while etcdctl did"
                campaigner.send_signal(signal.SIGINT)
                with anyio.fail_after(15):
                    await elected.wait()


@pytest.mark.parametrize("transport", ["gateway", "grpc"])
async def test_coordkit_leader_seen_by_etcdctl_and_handed_over(
    etcd_server: EtcdServer, transport: Literal["gateway", "grpc"]
) -> None:
    name = "interop-elect-coordkit-first"
    async with EtcdBackend(etcd_server.endpoint, transport=transport) as backend, Session(backend, ttl=5) as session:
        elected, proclaim, resign = anyio.Event(), anyio.Event(), anyio.Event()
        keys: list[bytes] = []

        async def coordkit_candidate() -> None:
            async with Election(session, name).campaign(b"from-coordkit") as leadership:
                keys.append(leadership.key)
                elected.set()
                await proclaim.wait()
                await leadership.proclaim(b"proclaimed")
                await resign.wait()  # leaving the block resigns

        async with etcdctl(etcd_server, "elect", "--listen", name) as listener, anyio.create_task_group() as tg:
            tg.start_soon(coordkit_candidate)
            await elected.wait()
            with anyio.fail_after(15):
                key, value = await read_lines(listener, 2)
            assert key.encode() == keys[0] and value == "from-coordkit"
            async with etcdctl(etcd_server, "elect", name, "from-etcdctl") as campaigner:
                await wait_queue(backend, name, 2)
                assert campaigner.stdout is not None
                with anyio.move_on_after(0.5) as waited:
                    await campaigner.stdout.receive()
                assert waited.cancelled_caught, "etcdctl was elected while coordkit led"
                proclaim.set()
                with anyio.fail_after(15):
                    assert (await read_lines(listener, 2))[1] == "proclaimed"
                resign.set()
                with anyio.fail_after(15):
                    key, value = await read_lines(campaigner, 2)
                assert value == "from-etcdctl" and key.encode() != keys[0]
