"""Test support: the backend conformance suite, harnesses, fault injection and a real etcd server for tests.

Third-party backends prove they keep the protocol by running `CONFORMANCE_CHECKS` against a
`Harness` of their own, exactly as coordkit runs them against its memory and etcd backends.
"""

from __future__ import annotations

from ._conformance import CONFORMANCE_CHECKS as CONFORMANCE_CHECKS, run_conformance as run_conformance
from ._etcd_server import EtcdServer as EtcdServer
from ._harness import (
    EtcdHarness as EtcdHarness,
    FaultyBackend as FaultyBackend,
    Harness as Harness,
    MemoryHarness as MemoryHarness,
)

__all__ = (
    "CONFORMANCE_CHECKS",
    "EtcdHarness",
    "EtcdServer",
    "FaultyBackend",
    "Harness",
    "MemoryHarness",
    "run_conformance",
)
