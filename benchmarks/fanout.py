"""One config change to 1,000 ConfigViews in one process, on a real etcd 3.5.1 and on MemoryBackend.

    python benchmarks/fanout.py [--views 1000] [--changes 20]

For each of ``--changes`` publishes: the time from the publish call to each view having the new value; the
table gives p50/p99 over all (view, change) pairs and the time until the last view had it, p50/p99 over changes;
and the number of backend watch streams the views used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.abc
from _measure import percentile

from coordkit import Backend, ConfigView, EtcdBackend, MemoryBackend, publish
from coordkit.testing import EtcdServer


async def fanout(
    admin: Backend, service: Backend, views_count: int, changes: int
) -> tuple[list[float], list[float], int]:
    prefix = "bench/fanout/"
    await publish(admin, prefix + "value", 0, expected_revision=None)
    per_view: list[float] = []
    last: list[float] = []
    views: list[ConfigView[Any]] = []
    done = anyio.Event()

    async def hold(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Each view held by a task of its own, as the components of a service would hold theirs (1,000 views
        # entered in one task would nest 1,000 cancel scopes, and anyio walks that chain at every task exit).
        async with ConfigView(service, prefix) as view:
            views.append(view)
            task_status.started()
            await done.wait()

    async with anyio.create_task_group() as holders:
        for _ in range(views_count):
            await holders.start(hold)
        for change in range(1, changes + 1):
            arrived: list[float] = []

            async def wait(view: ConfigView[Any], change: int = change, arrived: list[float] = arrived) -> None:
                await view.wait_for(lambda s: s.get("value") == change)
                arrived.append(time.perf_counter())

            async with anyio.create_task_group() as tg:
                for view in views:
                    tg.start_soon(wait, view)
                await anyio.sleep(0.01)  # let every waiter check the current state and block
                sent = time.perf_counter()
                await publish(admin, prefix + "value", change, expected_revision=None)
            per_view += [t - sent for t in arrived]
            last.append(max(arrived) - sent)
        assert all(view.statistics().followers == views_count for view in views)
        streams = views[0].statistics().watch_streams
        done.set()
    return per_view, last, streams


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with EtcdServer() as server:
        makers: list[tuple[str, Callable[[], AbstractAsyncContextManager[Backend]]]] = [
            ("etcd 3.5.1", lambda: EtcdBackend(server.endpoint)),
        ]
        memory = MemoryBackend()
        makers.append(("memory", memory.connect))
        for label, make in makers:
            async with make() as admin, make() as service:
                per_view, last, streams = await fanout(admin, service, args.views, args.changes)
            rows.append((label, per_view, last, streams))
    print(f"One change -> {args.views} ConfigViews in one process, {args.changes} changes, ms")
    print(f"{'backend':<12} {'per view p50':>13} {'p99':>8} {'last view p50':>14} {'p99':>8} {'watch streams':>14}")
    for label, per_view, last, streams in rows:
        print(
            f"{label:<12} {percentile(per_view, 0.5) * 1e3:>13.2f} {percentile(per_view, 0.99) * 1e3:>8.2f}"
            f" {percentile(last, 0.5) * 1e3:>14.2f} {percentile(last, 0.99) * 1e3:>8.2f} {streams:>14}"
        )
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    anyio.run(main)
