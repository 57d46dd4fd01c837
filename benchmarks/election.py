"""Election failover and once() fan-out on a real etcd 3.5.1, in one run, printing a table.

    python benchmarks/election.py [--rounds 200] [--callers 100]

- graceful failover: candidates on separate sessions take turns leading; the time from a leader leaving its
  campaign block (resigning) to the next leader's body running, p50/p99; against the floor measured in the
  same run: one watch delivery (put sent -> event received) + one transaction, p50s added.
- once(): ``--callers`` callers on 10 sessions ask for the same result; the computation sleeps 200 ms; the time
  from the computation returning to the last caller returning (publish + every waiter's wake-up and read).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import AsyncExitStack

import aiohttp
import anyio
from _measure import percentile

from coordkit import Election, EtcdBackend, Put, Range, Session, once
from coordkit.testing import EtcdServer


async def failover(server: EtcdServer, rounds: int, candidates: int = 3) -> list[float]:
    name = "bench/election"
    samples: list[float] = []
    resigned_at = [0.0]
    terms = [0]

    async def candidate(i: int) -> None:
        async with EtcdBackend(server.endpoint) as backend, Session(backend, ttl=30) as session:
            election = Election(session, name)
            while terms[0] < rounds:
                async with election.campaign(str(i).encode()) as leadership:
                    entered = time.perf_counter()
                    if resigned_at[0]:
                        samples.append(entered - resigned_at[0])
                    assert leadership.term > terms[0]
                    terms[0] += 1
                    await anyio.sleep(0.002)  # let the others queue up behind
                    resigned_at[0] = time.perf_counter()

    async with anyio.create_task_group() as tg:
        for i in range(candidates):
            tg.start_soon(candidate, i)
    return samples


async def floor(server: EtcdServer, rounds: int) -> tuple[list[float], list[float]]:
    """One watch delivery (from sending a put to receiving its event) and one transaction, measured alike."""
    deliveries, txns = [], []
    async with EtcdBackend(server.endpoint) as backend:
        async with backend.watch(b"bench/floor/", prefix=True, start_revision=0) as batches:
            await anext(batches)
            for i in range(rounds):
                sent = time.perf_counter()
                await backend.txn([], [Put(b"bench/floor/%d" % i, b"")])
                await anext(batches)
                deliveries.append(time.perf_counter() - sent)
                sent = time.perf_counter()
                await backend.txn([], [Range(b"bench/floor/0")])
                txns.append(time.perf_counter() - sent)
    return deliveries, txns


async def once_fanout(server: EtcdServer, callers: int) -> tuple[float, int]:
    name = "bench/once"
    returned: list[float] = []
    computed_at = [0.0]
    calls = [0]

    async def build() -> bytes:
        calls[0] += 1
        await anyio.sleep(0.2)
        computed_at[0] = time.perf_counter()
        return b"result"

    async with AsyncExitStack() as stack:
        sessions = []
        for _ in range(10):
            backend = await stack.enter_async_context(EtcdBackend(server.endpoint))
            sessions.append(await stack.enter_async_context(Session(backend, ttl=30)))

        async def caller(session: Session) -> None:
            assert await once(session, name, build) == b"result"
            returned.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, sessions[i % 10])
    return max(returned) - computed_at[0], calls[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--callers", type=int, default=100)
    args = parser.parse_args()
    with EtcdServer() as server:
        handovers = await failover(server, args.rounds)
        deliveries, txns = await floor(server, args.rounds)
        fanout, calls = await once_fanout(server, args.callers)
    floor50 = percentile(deliveries, 0.5) + percentile(txns, 0.5)
    floor99 = percentile(deliveries, 0.99) + percentile(txns, 0.99)
    print(f"Graceful failover on etcd 3.5.1, {len(handovers)} hand-overs, ms")
    print(f"{'':<34} {'p50':>8} {'p99':>8}")
    h50, h99 = percentile(handovers, 0.5), percentile(handovers, 0.99)
    print(f"{'resign -> next leader body':<34} {h50 * 1e3:>8.3f} {h99 * 1e3:>8.3f}")
    print(f"{'floor: watch delivery + one txn':<34} {floor50 * 1e3:>8.3f} {floor99 * 1e3:>8.3f}")
    print(f"ratio (p50): {h50 / floor50:.2f}x")
    print()
    print(
        f"once() with {args.callers} callers on 10 sessions: fn ran {calls} time(s); "
        f"computation returned -> last caller returned: {fanout * 1e3:.1f} ms"
    )
    print(f"\nPython {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {os.cpu_count()} cores")


if __name__ == "__main__":
    anyio.run(main)
