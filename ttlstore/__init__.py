"""Bounded in-memory TTL+LRU store for service state: idempotency records, rate-limit buckets.

The ASGI middlewares live in :mod:`ttlstore.asgi` (extra ``asgi``) and the Redis backends in
:mod:`ttlstore.redis` (extra ``redis``); neither is imported here, so the core needs nothing
beyond the standard library.
"""

from ttlstore._errors import BackendUnavailable
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
from ttlstore.memo import aget_or_set, cached
from ttlstore.ratelimit import (
    Decision,
    Limit,
    LimiterStats,
    RateLimited,
    TokenBucketLimiter,
    rate_limited,
)
from ttlstore.store import RemovalCause, Slot, StoreStats, TTLStore
from ttlstore.sweeper import AsyncSweeper, Sweeper, SweeperStats

__all__ = [
    "AsyncSweeper",
    "BackendUnavailable",
    "Busy",
    "BusyError",
    "Decision",
    "IdempotencyError",
    "IdempotencyStats",
    "IdempotencyStore",
    "InProgress",
    "InProgressError",
    "Limit",
    "LimiterStats",
    "Mismatch",
    "MismatchError",
    "RateLimited",
    "RemovalCause",
    "Replay",
    "Slot",
    "Started",
    "StoreStats",
    "Sweeper",
    "SweeperStats",
    "TTLStore",
    "TokenBucketLimiter",
    "aget_or_set",
    "cached",
    "idempotent",
    "rate_limited",
]
__version__ = "0.1.0"
