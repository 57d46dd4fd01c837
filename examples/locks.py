"""Locks with fencing tokens: four simulated processes share a counter; one loses its lease mid-hold.

Each worker takes the lock, reads the counter and writes it back + 1 *fenced*: the write is a transaction that
succeeds only while the worker's lock key still exists (``held.guard()``). Worker "d" then loses its lease while
holding the lock (its keepalives stop): its block is cancelled with LockLostError before anyone else can get
the lock, and a write it tries afterwards with its old token is refused. Finally a Semaphore lets at most two
workers into a section at once.

    python examples/locks.py                 # in-memory backend (the default)
    python examples/locks.py --etcd http://127.0.0.1:2379
"""

from __future__ import annotations

import anyio
from _common import backend_factory

from coordkit import Backend, Held, Lock, LockLostError, Put, Range, Semaphore, Session, wait_deleted
from coordkit.testing import FaultyBackend

COUNTER = b"examples/locks/counter"


async def fenced_increment(backend: Backend, held: Held) -> bool:
    current = await backend.range(Range(COUNTER))
    value = int(current.kvs[0].value) if current.kvs else 0
    result = await backend.txn([held.guard()], [Put(COUNTER, str(value + 1).encode())])
    return result.succeeded


async def worker(name: str, client: Backend, rounds: int) -> None:
    async with client, Session(client, ttl=2) as session:
        lock = Lock(session, "examples/locks/counter")
        for _ in range(rounds):
            async with lock as held:
                ok = await fenced_increment(client, held)
                print(f"{name}: holds the lock with token {held.token}, fenced increment {'ok' if ok else 'REFUSED'}")
                await anyio.sleep(0.05)


async def doomed(client: FaultyBackend) -> None:
    async with client, Session(client, ttl=2) as session:
        stale: Held | None = None
        try:
            async with Lock(session, "examples/locks/counter") as held:
                stale = held
                print(f"d: holds the lock with token {held.token}; now its keepalives stop")
                client.suspend_keepalives()
                await anyio.sleep_forever()
        except LockLostError as exc:
            print(f"d: {exc!r}: the block was cancelled before the lease could expire on the server")
        assert stale is not None
        client.heal()  # the process comes back to life, still believing what it believed
        await wait_deleted(client, stale.key, revision=stale.token)  # meanwhile its lease expired on the server
        refused = not await fenced_increment(client, stale)
        print(f"d: a late write with the stale token {stale.token} is {'refused' if refused else 'ACCEPTED (bug)'}")


async def limited(name: str, client: Backend, inside: list[str]) -> None:
    async with client, Session(client, ttl=5) as session:
        async with Semaphore(session, "examples/locks/pool", limit=2) as permit:
            inside.append(name)
            print(f"{name}: in the pool (permit token {permit.token}), inside now: {sorted(inside)}")
            assert len(inside) <= 2
            await anyio.sleep(0.1)
            inside.remove(name)


async def main() -> None:
    connect = backend_factory(__doc__ or "")
    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(worker, name, connect(), 3)
        tg.start_soon(doomed, FaultyBackend(connect()))
    async with connect() as backend:
        total = int((await backend.range(Range(COUNTER))).kvs[0].value)
        await backend.txn([], [Put(COUNTER, b"0")])
    print(f"counter = {total}: 9 fenced increments by a, b, c; none lost, none from the stale holder")
    inside: list[str] = []
    async with anyio.create_task_group() as tg:
        for name in ("p", "q", "r", "s", "t"):
            tg.start_soon(limited, name, connect(), inside)
    print("semaphore: never more than 2 inside")


if __name__ == "__main__":
    anyio.run(main)
