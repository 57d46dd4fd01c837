"""Lock latency, hand-off and wake-ups, in one run, printing a table.

    python benchmarks/lock.py [--iterations 1000] [--waiters 5]

Against one real etcd 3.5.1 on loopback:
- uncontended acquire + release, p50/p99: coordkit's Lock on EtcdBackend (``async with lock``), on each transport
  (the JSON gateway, gRPC); the floor, the
  same two transactions sent as raw gateway requests with aiohttp; etcd's server-side lock service through the
  gateway (``/v3/lock/lock`` + ``/v3/lock/unlock``); and the ``aetcd`` package's lock (gRPC), if installed in
  the benchmark environment (``pip install aetcd``; it is not a coordkit dependency). Rounds alternate.
- contended hand-off, on each transport: N waiters on N sessions take the lock in turn; the time from a holder's
  release to the next holder's entry, p50/p99, and the number of wake-ups per release (waits that ended in a read).
- MemoryBackend acquire + release per second (one core, asyncio).
- PostgresBackend (a real PostgreSQL on loopback, started by the benchmark): uncontended acquire + release, p50/p99
  and per second, one task.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import aiohttp
import anyio
from _measure import interleaved, percentile

from coordkit import Backend, EtcdBackend, Lock, MemoryBackend, PostgresBackend, Session, WatchBatch
from coordkit.testing import EtcdServer, PostgresServer

try:
    import aetcd
except ImportError:  # pragma: no cover - optional, benchmark only
    aetcd = None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def uncontended(server: EtcdServer, iterations: int) -> dict[str, list[float]]:
    async with (
        EtcdBackend(server.endpoint) as backend,
        Session(backend, ttl=30) as session,
        EtcdBackend(server.endpoint, transport="grpc") as grpc_backend,
        Session(grpc_backend, ttl=30) as grpc_session,
        aiohttp.ClientSession() as http,
    ):
        lock = Lock(session, "bench/uncontended")
        grpc_lock = Lock(grpc_session, "bench/uncontended-grpc")
        lease = format(session.lease_id, "x")
        key = f"bench/floor/{lease}".encode()
        prefix, end = b"bench/floor/", b"bench/floor0"

        async def post(path: str, body: dict[str, object]) -> dict[str, object]:
            async with http.post(server.endpoint + path, json=body) as response:
                reply: dict[str, object] = json.loads(await response.read())
                return reply

        async def coordkit_lock() -> None:
            async with lock:
                pass

        async def coordkit_grpc_lock() -> None:
            async with grpc_lock:
                pass

        owner = {"key": b64(prefix), "range_end": b64(end), "sort_target": "CREATE", "sort_order": "ASCEND", "limit": 1}

        async def floor() -> None:
            # Exactly coordkit's two transactions: put-if-absent + read the owner; then delete-if-ours.
            acquired = await post(
                "/v3/kv/txn",
                {
                    "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                    "success": [
                        {"request_put": {"key": b64(key), "value": "", "lease": str(session.lease_id)}},
                        {"request_range": owner},
                    ],
                    "failure": [{"request_range": {"key": b64(key)}}, {"request_range": owner}],
                },
            )
            header = acquired["header"]
            assert isinstance(header, dict)
            revision = header["revision"]
            await post(
                "/v3/kv/txn",
                {
                    "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": revision}],
                    "success": [{"request_delete_range": {"key": b64(key)}}],
                },
            )

        async def server_lock() -> None:
            held = await post("/v3/lock/lock", {"name": b64(b"bench/server"), "lease": str(session.lease_id)})
            await post("/v3/lock/unlock", {"key": held["key"]})

        ops: dict[str, Callable[[], Awaitable[None]]] = {
            "coordkit Lock": coordkit_lock,
            "coordkit Lock (gRPC)": coordkit_grpc_lock,
            "floor (2 raw txns)": floor,
            "etcd lock service": server_lock,
        }
        if aetcd is not None:
            host, port = server.endpoint.rsplit("//", 1)[1].split(":")
            client = aetcd.Client(host=host, port=int(port))
            await client.connect()

            async def aetcd_lock() -> None:
                async with client.lock(b"bench/aetcd", ttl=30):
                    pass

            ops["aetcd lock (gRPC)"] = aetcd_lock
        try:
            return await interleaved(ops, iterations)
        finally:
            if aetcd is not None:
                await client.close()


class CountingWaits:
    """A backend wrapper counting wake-ups: events delivered to the watches waiters open on their predecessor."""

    def __init__(self, inner: Backend, counter: list[int]) -> None:
        self.inner, self.name, self._counter = inner, inner.name, counter

    def __getattr__(self, attribute: str) -> object:
        return getattr(self.inner, attribute)

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchBatch]]:
        inner = self.inner.watch(key, prefix=prefix, start_revision=start_revision)
        counter = self._counter

        class Counted:
            async def __aenter__(self) -> AsyncIterator[WatchBatch]:
                batches = await inner.__aenter__()

                async def counted() -> AsyncIterator[WatchBatch]:
                    async for batch in batches:
                        if batch.events:  # not the empty notice of a watch from now
                            counter[0] += 1
                        yield batch

                return counted()

            async def __aexit__(self, *exc: object) -> bool | None:
                return await inner.__aexit__(*exc)  # type: ignore[arg-type]

        return Counted()


async def handoff(server: EtcdServer, waiters: int, rounds: int, transport: str) -> tuple[list[float], float]:
    name = f"bench/handoff-{transport}"
    wakeups = [0]
    handoffs: list[float] = []
    released_at = [0.0]
    acquisitions = [0]
    async with anyio.create_task_group() as tg:

        async def contender() -> None:
            client = EtcdBackend(server.endpoint, transport=transport)  # type: ignore[arg-type]
            async with client as backend, Session(CountingWaits(backend, wakeups), ttl=30) as s:  # type: ignore[arg-type]
                lock = Lock(s, name)
                for _ in range(rounds):
                    async with lock:
                        entered = time.perf_counter()
                        if released_at[0]:
                            handoffs.append(entered - released_at[0])
                        acquisitions[0] += 1
                        await anyio.sleep(0.002)  # let the others queue up behind
                        released_at[0] = time.perf_counter()

        for _ in range(waiters):
            tg.start_soon(contender)
    releases = acquisitions[0] - 1
    return handoffs, wakeups[0] / releases


async def memory_rate(seconds: float = 2.0) -> float:
    async with MemoryBackend() as backend, Session(backend, ttl=30) as session:
        lock = Lock(session, "bench/memory")
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(200):
                async with lock:
                    pass
            done += 200
        return done / (time.perf_counter() - started)


async def postgres_uncontended(iterations: int) -> tuple[list[float], float]:
    """Uncontended ``async with lock`` on PostgresBackend: every sample, and acquire + release per second."""
    with PostgresServer() as server:
        async with PostgresBackend(server.dsn) as backend, Session(backend, ttl=30) as session:
            lock = Lock(session, "bench/postgres")
            for _ in range(20):
                async with lock:
                    pass
            samples = []
            started = time.perf_counter()
            for _ in range(iterations):
                start = time.perf_counter()
                async with lock:
                    pass
                samples.append(time.perf_counter() - start)
            return samples, iterations / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--waiters", type=int, default=5)
    args = parser.parse_args()
    with EtcdServer() as server:
        samples = await uncontended(server, args.iterations)
        rounds = max(20, args.iterations // 20)
        handoffs = {
            transport: await handoff(server, args.waiters, rounds, transport) for transport in ("gateway", "grpc")
        }
    floor50 = percentile(samples["floor (2 raw txns)"], 0.5)
    print(f"Uncontended acquire + release on etcd 3.5.1, {args.iterations} samples each, ms")
    print(f"{'implementation':<22} {'p50':>8} {'p99':>8} {'vs floor':>9}")
    for name, values in samples.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(f"{name:<22} {p50 * 1e3:>8.3f} {p99 * 1e3:>8.3f} {p50 / floor50:>8.2f}x")
    if aetcd is None:
        print("(aetcd not installed: pip install aetcd to add its row)")
    print()
    for transport, (times, wakeups) in handoffs.items():
        sessions = f"{args.waiters} waiters on {args.waiters} sessions"
        print(f"Contended hand-off ({transport}), {sessions}, {len(times)} hand-offs")
        p50, p99 = percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3
        print(f"release -> next holder inside: p50 {p50:.3f} ms, p99 {p99:.3f} ms; wake-ups per release: {wakeups:.2f}")
    print()
    print(f"MemoryBackend Lock acquire + release: {await memory_rate():,.0f} per second (one core, asyncio)")
    pg, pg_rate = await postgres_uncontended(args.iterations)
    ck = samples["coordkit Lock"]
    print(
        f"PostgresBackend Lock acquire + release: p50 {percentile(pg, 0.5) * 1e3:.3f} ms, "
        f"p99 {percentile(pg, 0.99) * 1e3:.3f} ms, {pg_rate:,.0f} per second "
        f"(EtcdBackend in the same run: p50 {percentile(ck, 0.5) * 1e3:.3f} ms)"
    )
    print(f"\nPython {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {os.cpu_count()} cores")


if __name__ == "__main__":
    anyio.run(main)
