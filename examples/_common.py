"""Shared by the examples: pick the backend from the command line (memory by default, --etcd URL, --postgres DSN)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from coordkit import Backend, EtcdBackend, MemoryBackend, PostgresBackend


def backend_factory(description: str) -> Callable[[], Backend]:
    """Parse ``--etcd URL[,URL...]`` or ``--postgres DSN`` and return a function that makes one client per simulated
    process.

    With memory (the default) every client shares one in-process store, like processes sharing one cluster.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--etcd", metavar="URL[,URL...]", help="use a real etcd instead of the in-memory backend")
    parser.add_argument("--postgres", metavar="DSN", help="use a PostgreSQL database instead (coordkit[postgres])")
    args = parser.parse_args()
    if args.postgres:
        return lambda: PostgresBackend(args.postgres)
    if args.etcd:
        endpoints = args.etcd.split(",")
        return lambda: EtcdBackend(endpoints)
    shared = MemoryBackend()
    return shared.connect
