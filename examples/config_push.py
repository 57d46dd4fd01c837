"""Config push: one admin publishes a change; ten services print the new value as they see it.

Every service holds a ConfigView of "examples/config/app/" (the ten views share one watch of the store). The admin
changes the rate limit with a compare-and-swap publish; a second admin working from the same stale revision is
refused instead of overwriting it. A malformed value is then published by mistake: the services report it and
keep the last good value.

    python examples/config_push.py                 # in-memory backend (the default)
    python examples/config_push.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

from contextlib import aclosing

import anyio
from _common import backend_factory

from coordkit import Backend, ConfigView, Put, publish, publish_many

PREFIX = "examples/config/app/"


async def service(name: str, client: Backend, ready: anyio.Event, seen: list[str]) -> None:
    async with client, ConfigView(client, PREFIX) as view, aclosing(view.changes()) as changes:
        print(f"{name}: starts with rate_limit={view.get('rate_limit')}")
        ready.set()
        async for change in changes:
            if change.error is not None:
                print(f"{name}: bad value for {change.key} ({type(change.error).__name__}); keeping {change.value}")
                seen.append(name)
                return
            print(f"{name}: {change.key} {change.previous} -> {change.value} (revision {change.revision})")


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    async with connect() as admin:
        await publish_many(admin, {PREFIX + "rate_limit": 100, PREFIX + "feature_x": False}, expected=None)
        seen: list[str] = []
        async with anyio.create_task_group() as tg:
            services = connect()  # one client for the ten services, as in one process
            for i in range(1, 11):
                ready = anyio.Event()
                tg.start_soon(service, f"service-{i:02d}", services, ready, seen)
                await ready.wait()
            async with ConfigView(admin, PREFIX) as mine:
                based_on = mine.key_revision("rate_limit")
            first = await publish(admin, PREFIX + "rate_limit", 250, expected_revision=based_on)
            print(f"admin: rate_limit=250 published at revision {first}")
            second = await publish(admin, PREFIX + "rate_limit", 50, expected_revision=based_on)
            print(f"second admin, from the same stale revision: {'refused' if second is None else 'ACCEPTED (bug)'}")
            await admin.txn([], [Put((PREFIX + "rate_limit").encode(), b"{oops")])  # not JSON
        print(f"{len(seen)} services saw the bad value and kept rate_limit=250")


if __name__ == "__main__":
    anyio.run(main)
