"""Test support: the backend conformance suite, harnesses, fault injection, a linearizability checker and a real
etcd server for tests.

Third-party backends prove they keep the protocol by running the conformance suite (`conformance_tests` in
their pytest, or `run_conformance`) against a `Harness` of their own (subclass `HarnessBase`), exactly as
coordkit runs it against its memory and etcd backends. What a backend needs to write is here too: the request
validators (`check_txn`, `check_range`, `check_ttl`, `check_lease_id`, `check_watch_key`,
`check_start_revision`) and the key range helpers (`prefix_end`, `in_range`). The watch validators
(``check_watch`` and friends) judge what a watch delivered against the store's history, and `check_linearizable`
judges concurrent histories recorded with `KvRecorder` against `KvModel`.
"""

from __future__ import annotations

from .._backends.types import (
    check_lease_id as check_lease_id,
    check_range as check_range,
    check_start_revision as check_start_revision,
    check_ttl as check_ttl,
    check_txn as check_txn,
    check_watch_key as check_watch_key,
)
from .._keys import in_range as in_range, prefix_end as prefix_end
from ._conformance import (
    CONFORMANCE_CHECKS as CONFORMANCE_CHECKS,
    conformance_tests as conformance_tests,
    run_conformance as run_conformance,
)
from ._etcd_server import EtcdServer as EtcdServer
from ._harness import (
    EtcdHarness as EtcdHarness,
    FaultyBackend as FaultyBackend,
    Harness as Harness,
    HarnessBase as HarnessBase,
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
    "HarnessBase",
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
    "check_lease_id",
    "check_range",
    "check_start_revision",
    "check_ttl",
    "check_txn",
    "check_watch_key",
    "conformance_tests",
    "in_range",
    "prefix_end",
    "run_conformance",
)
