"""IdempotencyStore: idempotency records in a TTLStore and running claims in a table of their own.

Re-exported by :mod:`ttlstore.idempotency`, where the semantics are documented.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ttlstore._checks import positive_int, positive_seconds, ttl_or_none
from ttlstore._idem_api import Outcome
from ttlstore._idem_core import ClaimTable, IdempotencyCore, Record
from ttlstore._idem_tables import TableView
from ttlstore.store import TTLStore

__all__ = ["IdempotencyStats", "IdempotencyStore"]


@dataclass(frozen=True, slots=True)
class IdempotencyStats:
    """An immutable snapshot of an :class:`IdempotencyStore`'s counters."""

    claims: int
    """``begin`` calls answered ``Started``."""
    replays: int
    """``begin`` calls answered ``Replay``."""
    conflicts: int
    """``begin`` calls answered ``InProgress``."""
    mismatches: int
    """``begin`` calls answered ``Mismatch``."""
    busy: int
    """``begin`` calls answered ``Busy`` (the in-flight table was full)."""
    completions: int
    """Claims ended by ``complete``: results stored."""
    releases: int
    """Claims ended by ``release``: nothing stored."""
    stale: int
    """``complete``/``release`` calls refused because the token no longer owned the key."""
    lease_expiries: int
    """Claims ended because their lease ran out before the owner finished."""
    evictions: int
    """Records dropped by the ``maxsize`` bound before their TTL ran out."""
    records: int
    """Live records now."""
    inflight: int
    """Live claims now."""


class IdempotencyStore(IdempotencyCore):
    """In-memory idempotency records (a :class:`~ttlstore.TTLStore`) and running claims.

    :param ttl: seconds a completed result is kept (``None``: until evicted).
    :param maxsize: the most completed results kept; the least recently used goes first.
    :param lease: seconds a claim lasts if its owner never completes or releases it. Pick it
        longer than the slowest execution: past it the key is presumed abandoned and may run
        again.
    :param max_inflight: the most claims held at once (default: ``maxsize``). When reached,
        ``begin`` answers :class:`Busy`; a running claim is never evicted.
    :param clock: monotonic seconds; inject a fake one in tests.
    :param threadsafe: each method is atomic under one lock; ``False`` for one thread or one
        event loop only (then sweep with an ``AsyncSweeper`` on that loop, not a ``Sweeper``).

    Every method is O(1) amortized and takes the store's lock once: the two tables inside are
    unlocked, and only this one lock guards them. Memory is bounded by ``maxsize`` records
    plus ``max_inflight`` claims; each record holds whatever result its owner stored.
    """

    # The weak reference slot lives here, not in the compiled core (see ttlstore._idem_core).
    __slots__ = ("__weakref__", "_views")

    def __init__(
        self,
        ttl: float | None = 3600,
        maxsize: int = 5000,
        lease: float = 60,
        *,
        max_inflight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        threadsafe: bool = True,
    ) -> None:
        ttl_or_none("ttl", ttl)
        positive_seconds("lease", lease)
        positive_int("maxsize", maxsize)
        inflight = maxsize if max_inflight is None else max_inflight
        positive_int("max_inflight", inflight)
        if not isinstance(threadsafe, bool):
            raise TypeError(f"threadsafe must be a bool, got {threadsafe!r}")
        # Unlocked tables: begin() and complete() read one and write the other, so this
        # store's one lock must guard both anyway, and theirs would only be taken in vain.
        records: TTLStore[str, Record] = TTLStore(maxsize, ttl, clock=clock, threadsafe=False)
        claims = ClaimTable(inflight, positive_seconds("lease", lease), clock)
        lock = threading.Lock() if threadsafe else None
        super().__init__(records, claims, clock, lock)
        self._views = (TableView(records, lock), TableView(claims, lock))

    if TYPE_CHECKING:
        # The typed API, for type checkers only: the compiled core takes Any and checks it.

        def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
            """Claim ``key`` for a request with ``fingerprint``, or say why not."""
            ...

        def complete(self, key: str, token: str, result: Any) -> bool:
            """Store ``result`` for ``key`` (for ``ttl``) and end the claim."""
            ...

        def release(self, key: str, token: str) -> bool:
            """End the claim on ``key`` without storing anything, so a retry runs again."""
            ...

    @property
    def stores(self) -> tuple[TableView, TableView]:
        """The records table and the claims table, to hand to a ``Sweeper``/``AsyncSweeper``.

        Read-only views that take this store's lock: ``expire``, ``ttl``, ``peek``, ``stats``,
        ``len``, ``in`` and iteration, nothing that writes.
        """
        return self._views

    @property
    def ttl(self) -> float | None:
        """Seconds a completed result is kept."""
        return self._records.default_ttl

    @property
    def lease(self) -> float:
        """Seconds a claim lasts without complete or release."""
        return self._claims.lease

    @property
    def maxsize(self) -> int:
        """The most completed results kept."""
        return self._records.maxsize

    @property
    def max_inflight(self) -> int:
        """The most claims held at once."""
        return self._claims.maxsize

    @property
    def threadsafe(self) -> bool:
        """Whether every method runs under the store's lock."""
        return self._lock is not None

    def stats(self) -> IdempotencyStats:
        """An immutable snapshot of the counters, taken at one instant. Reclaims nothing: a
        dashboard polling it leaves due entries to the sweeper. O(k) for k due entries."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            records, claims = self._records.stats(), self._claims.stats()
            return IdempotencyStats(
                claims=self._claims_started,
                replays=self._replays,
                conflicts=self._conflicts,
                mismatches=self._mismatches,
                busy=self._busy,
                completions=self._completions,
                releases=self._releases,
                stale=self._stale,
                # Claims leave by complete/release (deletions) or by running out (expirations);
                # they are never evicted, see begin().
                lease_expiries=claims.expirations,
                evictions=records.evictions,
                records=records.size,
                inflight=claims.size,
            )
        finally:
            if lock is not None:
                lock.release()

    def __repr__(self) -> str:
        ttl = "None" if self.ttl is None else f"{self.ttl:g}"
        return (
            f"<IdempotencyStore ttl={ttl} maxsize={self.maxsize} lease={self.lease:g} "
            f"max_inflight={self.max_inflight}>"
        )
