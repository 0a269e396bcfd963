"""Bounded in-memory TTL+LRU store for service state: idempotency records, rate-limit buckets."""

from ttlstore.store import RemovalCause, StoreStats, TTLStore

__all__ = ["RemovalCause", "StoreStats", "TTLStore"]
__version__ = "0.1.0"
