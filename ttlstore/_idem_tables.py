"""The read-only views of the two tables inside an :class:`~ttlstore.idempotency.IdempotencyStore`.

Completed records live in a :class:`~ttlstore.TTLStore`; running claims in a
:class:`~ttlstore._idem_core.ClaimTable` of their own. Neither is locked: the store's one lock
guards both, and :class:`TableView` is how a sweeper or a dashboard reads them under that lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

from ttlstore._idem_core import ABSENT, ClaimTable
from ttlstore.store import StoreStats, TTLStore

__all__ = ["TableView"]

_Table: TypeAlias = "TTLStore[str, Any] | ClaimTable"


class TableView(Mapping[str, Any]):
    """One of an idempotency store's two tables, every method under the store's lock.

    What :attr:`IdempotencyStore.stores <ttlstore.idempotency.IdempotencyStore.stores>` hands
    out: a read-only mapping with ``expire`` (for a ``Sweeper`` or ``AsyncSweeper``), ``ttl``,
    ``peek`` and ``stats``, so the tables can be swept and inspected without ever being
    changed behind the store's back.
    """

    __slots__ = ("__weakref__", "_lock", "_store")

    def __init__(self, store: _Table, lock: threading.Lock | None) -> None:
        self._store = store
        self._lock = lock

    def expire(self, limit: int | None = None) -> int:
        """Reclaim up to ``limit`` due entries now (all if ``None``); return how many."""
        with self._locked():
            return self._store.expire(limit)

    def ttl(self, key: str) -> float | None:
        """Seconds left before ``key`` expires; ``KeyError`` if it is absent or expired."""
        with self._locked():
            return self._store.ttl(key)

    def peek(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` without touching recency, or ``default``."""
        with self._locked():
            return self._store.peek(key, default)

    def stats(self) -> StoreStats:
        """The table's counters; reclaims nothing."""
        with self._locked():
            return self._store.stats()

    def live_count(self) -> int:
        """Live entries, counted without reclaiming due ones."""
        with self._locked():
            return self._store.live_count()

    @property
    def maxsize(self) -> int:
        """The most entries the table holds."""
        return self._store.maxsize

    @property
    def default_ttl(self) -> float | None:
        """The table's TTL: ``ttl`` for records, ``lease`` for claims."""
        return self._store.default_ttl

    @property
    def threadsafe(self) -> bool:
        """Whether every method runs under the store's lock."""
        return self._lock is not None

    def __getitem__(self, key: str) -> Any:
        with self._locked():
            value = self._store.peek(key, ABSENT)
        if value is ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        with self._locked():
            return key in self._store

    def __len__(self) -> int:
        with self._locked():
            return len(self._store)

    def __iter__(self) -> Iterator[str]:
        with self._locked():
            return iter(list(self._store))

    def _locked(self) -> threading.Lock | contextlib.nullcontext[None]:
        return contextlib.nullcontext() if self._lock is None else self._lock

    def __repr__(self) -> str:
        with self._locked():
            return repr(self._store)
