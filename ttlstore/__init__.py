"""Bounded in-memory TTL+LRU store for service state: idempotency records, rate-limit buckets.

The ASGI middlewares live in :mod:`ttlstore.asgi` (extra ``asgi``) and the Redis backends in
:mod:`ttlstore.redis` (extra ``redis``); neither is imported here, so the core needs nothing
beyond the standard library.
"""

from ttlstore.idempotency import (
    Busy,
    BusyError,
    IdempotencyError,
    IdempotencyStats,
    IdempotencyStore,
    InProgress,
    InProgressError,
    Mismatch,
    MismatchError,
    Replay,
    Started,
    idempotent,
)
from ttlstore.store import RemovalCause, StoreStats, TTLStore
from ttlstore.sweeper import AsyncSweeper, Sweeper, SweeperStats

__all__ = [
    "AsyncSweeper",
    "Busy",
    "BusyError",
    "IdempotencyError",
    "IdempotencyStats",
    "IdempotencyStore",
    "InProgress",
    "InProgressError",
    "Mismatch",
    "MismatchError",
    "RemovalCause",
    "Replay",
    "Started",
    "StoreStats",
    "Sweeper",
    "SweeperStats",
    "TTLStore",
    "idempotent",
]
__version__ = "0.1.0"
