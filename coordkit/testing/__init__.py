"""Test support: the backend conformance suite, harnesses, fault injection, a linearizability checker and a real
etcd server for tests.

Third-party backends prove they keep the protocol by running `CONFORMANCE_CHECKS` against a
`Harness` of their own, exactly as coordkit runs them against its memory and etcd backends; the watch
validators (``check_watch`` and friends) judge what a watch delivered against the store's history, and
`check_linearizable` judges concurrent histories recorded with `KvRecorder` against `KvModel`.
"""

from __future__ import annotations

from ._conformance import CONFORMANCE_CHECKS as CONFORMANCE_CHECKS, run_conformance as run_conformance
from ._etcd_server import EtcdServer as EtcdServer
from ._harness import (
    EtcdHarness as EtcdHarness,
    FaultyBackend as FaultyBackend,
    Harness as Harness,
    MemoryHarness as MemoryHarness,
    PostgresHarness as PostgresHarness,
)
from ._kv_history import (
    KvCas as KvCas,
    KvClient as KvClient,
    KvDelete as KvDelete,
    KvGet as KvGet,
    KvModel as KvModel,
    KvPut as KvPut,
    KvRecorder as KvRecorder,
    KvReply as KvReply,
)
from ._linearizability import (
    UNKNOWN as UNKNOWN,
    LinearizabilityResult as LinearizabilityResult,
    Model as Model,
    Operation as Operation,
    check_linearizable as check_linearizable,
)
from ._postgres_server import PostgresServer as PostgresServer
from ._watch_checks import (
    WatchViolation as WatchViolation,
    check_atomic as check_atomic,
    check_ordered as check_ordered,
    check_reliable as check_reliable,
    check_resumable as check_resumable,
    check_unique as check_unique,
    check_watch as check_watch,
    check_watch_items as check_watch_items,
)

__all__ = (
    "CONFORMANCE_CHECKS",
    "UNKNOWN",
    "EtcdHarness",
    "EtcdServer",
    "FaultyBackend",
    "Harness",
    "KvCas",
    "KvClient",
    "KvDelete",
    "KvGet",
    "KvModel",
    "KvPut",
    "KvRecorder",
    "KvReply",
    "LinearizabilityResult",
    "MemoryHarness",
    "PostgresHarness",
    "PostgresServer",
    "WatchViolation",
    "check_atomic",
    "check_ordered",
    "check_reliable",
    "check_resumable",
    "check_unique",
    "check_watch",
    "check_watch_items",
    "Model",
    "Operation",
    "check_linearizable",
    "run_conformance",
)
