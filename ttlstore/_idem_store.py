"""IdempotencyStore: idempotency records in a TTLStore and running claims in a table of their own.

Re-exported by :mod:`ttlstore.idempotency`, where the semantics are documented.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ttlstore._checks import positive_int, positive_seconds, ttl_or_none
from ttlstore._idem_api import BUSY, MISMATCH, InProgress, Outcome, Replay, Started
from ttlstore._idem_tables import ABSENT, ClaimTable, Record, TableView
from ttlstore.records import StoredResponse
from ttlstore.store import TTLStore

__all__ = ["IdempotencyStats", "IdempotencyStore"]

# Tokens are drawn from the OS's CSPRNG this many at a time: one os.urandom() call per batch
# instead of one per claim (a system call costs more than the rest of begin()).
_TOKEN_BATCH = 64

# A StoredResponse rebuilt from a record without its Python-level __new__.
_as_response = tuple.__new__


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


class IdempotencyStore:
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

    __slots__ = (
        "__weakref__",
        "_busy",
        "_claims",
        "_claims_started",
        "_clock",
        "_completions",
        "_conflicts",
        "_lock",
        "_mismatches",
        "_records",
        "_releases",
        "_replays",
        "_stale",
        "_tokens",
        "_views",
    )

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
        self._records: TTLStore[str, Record] = TTLStore(maxsize, ttl, clock=clock, threadsafe=False)
        self._claims = ClaimTable(inflight, positive_seconds("lease", lease), clock)
        self._clock = clock
        self._lock: threading.Lock | None = threading.Lock() if threadsafe else None
        self._views = (TableView(self._records, self._lock), TableView(self._claims, self._lock))
        self._tokens: list[str] = []
        self._claims_started = self._replays = self._conflicts = self._mismatches = 0
        self._busy = self._completions = self._releases = self._stale = 0

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        """Claim ``key`` for a request with ``fingerprint``, or say why not. O(1) amortized.

        A stored record wins (``Replay``, or ``Mismatch`` for another fingerprint), then a
        running claim (``InProgress`` with the lease it has left, or ``Mismatch``), then the
        in-flight bound (``Busy``). Otherwise the caller gets ``Started`` with a fresh
        unguessable token.
        """
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"key must be a str, got {key!r}")
        if type(fingerprint) is not str and not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {fingerprint!r}")
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            record = self._records.get(key)
            if record is not None:
                if record[0] != fingerprint:
                    self._mismatches += 1
                    return MISMATCH
                self._replays += 1
                if len(record) == 4:  # a flattened StoredResponse, see complete()
                    return Replay(_as_response(StoredResponse, record[1:]))
                return Replay(record[1])
            claims = self._claims
            data = claims.data
            now = self._clock()
            claim = data.get(key)
            if claim is not None:
                if claim[2] > now:
                    if claim[0] != fingerprint:
                        self._mismatches += 1
                        return MISMATCH
                    self._conflicts += 1
                    return InProgress(claim[2] - now)
                claims.drop(key)  # its lease ran out: the key is free again
            # Checked here rather than by making room: a running claim is never dropped.
            if len(data) >= claims.maxsize and claims.full(now):
                self._busy += 1
                return BUSY
            tokens = self._tokens
            if not tokens:
                pool = secrets.token_hex(16 * _TOKEN_BATCH)
                tokens += [pool[i : i + 32] for i in range(0, len(pool), 32)]
            token = tokens.pop()
            data[key] = (fingerprint, token, now + claims.lease)
            self._claims_started += 1
            return Started(token)
        finally:
            if lock is not None:
                lock.release()

    def complete(self, key: str, token: str, result: Any) -> bool:
        """Store ``result`` for ``key`` (for ``ttl``) and end the claim. O(1) amortized.

        Returns False, storing nothing, if ``token`` no longer owns ``key`` (its lease ran out,
        it was completed or released already, or it never did).
        """
        # Also the body of release() (result ABSENT): the hot call pays no second frame.
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            data = self._claims.data
            claim = data.get(key)
            if claim is None or claim[1] != token or claim[2] <= self._clock():
                self._stale += 1
                return False
            del data[key]
            if result is ABSENT:
                self._releases += 1
                return True
            # A StoredResponse (a tuple) flattens into the record: one object for the GC less.
            self._records[key] = (
                (claim[0], *result) if type(result) is StoredResponse else (claim[0], result)
            )
            self._completions += 1
            return True
        finally:
            if lock is not None:
                lock.release()

    def release(self, key: str, token: str) -> bool:
        """End the claim on ``key`` without storing anything, so a retry runs again. O(1).

        Returns False if ``token`` no longer owns ``key``.
        """
        return self.complete(key, token, ABSENT)

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
