"""thread_store: durable conversation threads with a background-projected metadata index."""

from .aio import AsyncThreadStore
from .derive import CodexRules, ProjectionRules
from .errors import (
    BarrierError,
    DiscardTimeout,
    FlushTimeout,
    InvalidArgument,
    InvalidCursor,
    InvalidItem,
    NotAThreadStore,
    OutcomeUnknown,
    ProjectionFailed,
    ReadOnlyStore,
    SchemaTooNew,
    StorageError,
    StoreClosed,
    StoreLocked,
    ThreadDiscarded,
    ThreadExists,
    ThreadNotFound,
    ThreadStoreError,
    TransientProjectionError,
    TransientStorageError,
)
from .model import BehindThread, FailedThread, Page, StoreReport, StoredItem, ThreadMetadata, ThreadStatus
from .model import ProjectorStats, RetryPolicy
from .store import ThreadStore

__version__ = "0.1.0"

__all__ = [
    "AsyncThreadStore",
    "BarrierError",
    "BehindThread",
    "CodexRules",
    "DiscardTimeout",
    "FailedThread",
    "FlushTimeout",
    "InvalidArgument",
    "InvalidCursor",
    "InvalidItem",
    "NotAThreadStore",
    "OutcomeUnknown",
    "Page",
    "ProjectionFailed",
    "ProjectionRules",
    "ProjectorStats",
    "ReadOnlyStore",
    "RetryPolicy",
    "SchemaTooNew",
    "StorageError",
    "StoreClosed",
    "StoreLocked",
    "StoreReport",
    "StoredItem",
    "ThreadDiscarded",
    "ThreadExists",
    "ThreadMetadata",
    "ThreadNotFound",
    "ThreadStatus",
    "ThreadStore",
    "ThreadStoreError",
    "TransientProjectionError",
    "TransientStorageError",
]
