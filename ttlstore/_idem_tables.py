"""The two tables inside an :class:`~ttlstore.idempotency.IdempotencyStore`, and their views.

Completed records live in a :class:`~ttlstore.TTLStore`; running claims in a
:class:`ClaimTable` of their own. Neither is locked: the store's one lock guards both, and
:class:`TableView` is how a sweeper or a dashboard reads them under that lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

from ttlstore.store import StoreStats, TTLStore

__all__ = ["ABSENT", "ClaimTable", "Record", "TableView"]

# A record is ``(fingerprint, result)``, or ``(fingerprint, status, headers, body)`` for a
# StoredResponse; a claim is ``(fingerprint, token)``. Exact tuples of strings, bytes and ints
# are untracked by CPython's cyclic GC, so a full store costs a full collection one object per
# entry (the store's own), not three.
Record: TypeAlias = tuple[Any, ...]

ABSENT: Any = object()
"""What no table holds: a lookup's "not found", and the store's "release, store nothing"."""


class ClaimTable:
    """An idempotency store's running claims: key -> (fingerprint, token, deadline).

    Every claim gets the same lease, so on a monotonic clock the order claims are made in is
    the order they fall due: an ``OrderedDict`` in claim order finds due claims at its front,
    O(1) each, and a claim costs three dict operations over its life. A claim is never evicted
    (the store answers ``Busy`` at the bound instead). Unlocked: the store's lock guards it,
    and the store reads and writes :attr:`data` itself on its hot paths. Reads offer what a
    swept, inspected table needs (as :class:`~ttlstore.TTLStore` does).
    """

    __slots__ = ("_clock", "_expirations", "data", "lease", "maxsize")

    def __init__(self, maxsize: int, lease: float, clock: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self.lease = lease
        self._clock = clock
        self.data: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._expirations = 0

    def drop(self, key: str) -> None:
        """Reclaim the claim on ``key``, found past its deadline."""
        del self.data[key]
        self._expirations += 1

    def full(self, now: float) -> bool:
        """Whether ``maxsize`` live claims are held, after reclaiming due ones. O(1) amortized."""
        if len(self.data) < self.maxsize:
            return False
        self._expire(None, now)
        return len(self.data) >= self.maxsize

    def _expire(self, limit: int | None, now: float) -> int:
        data = self.data
        done = 0
        while data and (limit is None or done < limit):
            key, claim = next(iter(data.items()))
            if claim[2] > now:
                break
            del data[key]
            done += 1
        self._expirations += done
        return done

    # ------------------------------------------------------------ reads, for the view

    def expire(self, limit: int | None = None) -> int:
        """Reclaim up to ``limit`` due claims (all if None); return how many. O(k)."""
        return self._expire(limit, self._clock())

    def ttl(self, key: str) -> float:
        """Seconds left of the claim on ``key``; ``KeyError`` if there is none."""
        now = self._clock()
        claim = self.data.get(key)
        if claim is None or claim[2] <= now:
            raise KeyError(key)
        return claim[2] - now

    def peek(self, key: str, default: Any = None) -> Any:
        """``(fingerprint, token)`` of the live claim on ``key``, else ``default``."""
        claim = self.data.get(key)
        return claim[:2] if claim is not None and claim[2] > self._clock() else default

    def live_count(self) -> int:
        """Live claims, counted without reclaiming due ones. O(k) for k due claims."""
        now = self._clock()
        due = 0
        for claim in self.data.values():  # in deadline order: the due ones come first
            if claim[2] > now:
                break
            due += 1
        return len(self.data) - due

    def stats(self) -> StoreStats:
        """Claims reclaimed after their lease ran out (``expirations``) and live claims
        (``size``) as a :class:`~ttlstore.StoreStats`; the store's own ``stats()`` counts the
        rest. Reclaims nothing."""
        return StoreStats(
            hits=0,
            misses=0,
            writes=0,
            expirations=self._expirations,
            evictions=0,
            deletions=0,
            replacements=0,
            size=self.live_count(),
            weight=0,
        )

    @property
    def default_ttl(self) -> float:
        return self.lease

    def __contains__(self, key: object) -> bool:
        claim = self.data.get(key)  # type: ignore[call-overload]
        return claim is not None and claim[2] > self._clock()

    def __len__(self) -> int:
        self._expire(None, self._clock())
        return len(self.data)

    def __iter__(self) -> Iterator[str]:
        self._expire(None, self._clock())
        return iter(list(self.data))

    def __repr__(self) -> str:
        # Counts what is held, due claims included: repr must not reclaim.
        return f"<claims stored={len(self.data)} maxsize={self.maxsize} lease={self.lease:g}>"


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
