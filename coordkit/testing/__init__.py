"""Test support: the backend conformance suite, harnesses, fault injection, a linearizability checker and a real
etcd server for tests.

Third-party backends prove they keep the protocol by running `CONFORMANCE_CHECKS` against a
`Harness` of their own, exactly as coordkit runs them against its memory and etcd backends, and by recording
concurrent histories (`KvRecorder`) that `check_linearizable` judges against `KvModel`.
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
    "Model",
    "Operation",
    "check_linearizable",
    "run_conformance",
)
