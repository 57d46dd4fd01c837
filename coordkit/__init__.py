"""coordkit: distributed coordination for asyncio, written once above a small backend protocol."""

from __future__ import annotations

from ._backends.etcd import EtcdBackend as EtcdBackend
from ._backends.memory import MemoryBackend as MemoryBackend, MemoryFaults as MemoryFaults, MemoryStore as MemoryStore
from ._backends.postgres import PostgresBackend as PostgresBackend
from ._backends.protocol import Backend as Backend
from ._backends.types import (
    Compare as Compare,
    CompareTarget as CompareTarget,
    Delete as Delete,
    DeleteResult as DeleteResult,
    Event as Event,
    EventType as EventType,
    KeyValue as KeyValue,
    Lease as Lease,
    Op as Op,
    OpResult as OpResult,
    Put as Put,
    PutResult as PutResult,
    Range as Range,
    RangeResult as RangeResult,
    TxnResult as TxnResult,
    WatchBatch as WatchBatch,
)
from ._codec import JSON as JSON, Codec as Codec, JsonCodec as JsonCodec
from ._errors import (
    AuthenticationError as AuthenticationError,
    BackendError as BackendError,
    CompactedError as CompactedError,
    CoordkitError as CoordkitError,
    LeaseExpiredError as LeaseExpiredError,
    NotOwnerError as NotOwnerError,
    OwnershipLostError as OwnershipLostError,
    RequestTooLargeError as RequestTooLargeError,
    SessionClosedError as SessionClosedError,
    UnavailableError as UnavailableError,
)
from ._keys import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES, check_name as check_name
from ._recipes.barrier import (
    Barrier as Barrier,
    BarrierLostError as BarrierLostError,
    DoubleBarrier as DoubleBarrier,
    TooManyParticipantsError as TooManyParticipantsError,
)
from ._recipes.command import (
    kill_deadline as kill_deadline,
    open_process_group as open_process_group,
    stop_process_group as stop_process_group,
)
from ._recipes.config import (
    ConfigChange as ConfigChange,
    ConfigStatistics as ConfigStatistics,
    ConfigView as ConfigView,
    publish as publish,
    publish_many as publish_many,
)
from ._recipes.contenders import Held as Held, LockStatistics as LockStatistics
from ._recipes.counter import Counter as Counter, CounterValue as CounterValue, CounterValueError as CounterValueError
from ._recipes.election import (
    Election as Election,
    Leader as Leader,
    LeaderLatch as LeaderLatch,
    Leadership as Leadership,
    LeadershipLostError as LeadershipLostError,
    observe_leader as observe_leader,
    run_while_leader as run_while_leader,
)
from ._recipes.group import (
    Group as Group,
    GroupView as GroupView,
    MemberExistsError as MemberExistsError,
    Membership as Membership,
    MembershipLostError as MembershipLostError,
)
from ._recipes.lock import Lock as Lock, LockLostError as LockLostError
from ._recipes.once import (
    ComputationLostError as ComputationLostError,
    invalidate_once as invalidate_once,
    once as once,
)
from ._recipes.rwlock import ReadWriteLock as ReadWriteLock, ReadWriteLockLostError as ReadWriteLockLostError
from ._recipes.scheduler import (
    JobSpec as JobSpec,
    RunContext as RunContext,
    RunRecord as RunRecord,
    Scheduler as Scheduler,
    WorkerInfo as WorkerInfo,
    check_job_name as check_job_name,
)
from ._recipes.semaphore import PermitLostError as PermitLostError, Semaphore as Semaphore
from ._recipes.workqueue import (
    ClaimLostError as ClaimLostError,
    DeadLetter as DeadLetter,
    PendingRequest as PendingRequest,
    QueueDepth as QueueDepth,
    QueuedItem as QueuedItem,
    RequestFailedError as RequestFailedError,
    Task as Task,
    UnknownDependencyError as UnknownDependencyError,
    WorkQueue as WorkQueue,
)
from ._session import Session as Session, SessionStatistics as SessionStatistics
from ._version import __version__ as __version__
from ._watch import (
    Snapshot as Snapshot,
    Watch as Watch,
    WatchStatistics as WatchStatistics,
    wait_deleted as wait_deleted,
)

__all__ = (
    "AuthenticationError",
    "Backend",
    "BackendError",
    "Barrier",
    "BarrierLostError",
    "check_job_name",
    "check_name",
    "ClaimLostError",
    "Codec",
    "CompactedError",
    "Compare",
    "CompareTarget",
    "ComputationLostError",
    "ConfigChange",
    "ConfigStatistics",
    "ConfigView",
    "CoordkitError",
    "Counter",
    "CounterValue",
    "CounterValueError",
    "DeadLetter",
    "Delete",
    "DeleteResult",
    "DoubleBarrier",
    "Election",
    "EtcdBackend",
    "Event",
    "EventType",
    "Group",
    "GroupView",
    "Held",
    "invalidate_once",
    "JobSpec",
    "JSON",
    "JsonCodec",
    "KeyValue",
    "kill_deadline",
    "Leader",
    "LeaderLatch",
    "Leadership",
    "LeadershipLostError",
    "Lease",
    "LeaseExpiredError",
    "Lock",
    "LockLostError",
    "LockStatistics",
    "MAX_REQUEST_BYTES",
    "MemberExistsError",
    "Membership",
    "MembershipLostError",
    "MemoryBackend",
    "MemoryFaults",
    "MemoryStore",
    "PostgresBackend",
    "NotOwnerError",
    "observe_leader",
    "once",
    "open_process_group",
    "Op",
    "OpResult",
    "OwnershipLostError",
    "PendingRequest",
    "PermitLostError",
    "publish",
    "publish_many",
    "Put",
    "PutResult",
    "QueueDepth",
    "QueuedItem",
    "Range",
    "RangeResult",
    "ReadWriteLock",
    "ReadWriteLockLostError",
    "RequestFailedError",
    "RequestTooLargeError",
    "run_while_leader",
    "RunContext",
    "RunRecord",
    "Scheduler",
    "Semaphore",
    "Session",
    "SessionClosedError",
    "SessionStatistics",
    "Snapshot",
    "stop_process_group",
    "Task",
    "TooManyParticipantsError",
    "TxnResult",
    "UnavailableError",
    "UnknownDependencyError",
    "wait_deleted",
    "Watch",
    "WatchBatch",
    "WatchStatistics",
    "WorkerInfo",
    "WorkQueue",
    "__version__",
)
