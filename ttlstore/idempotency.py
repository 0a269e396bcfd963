"""Idempotency keys on TTLStore: claim a key, run once, replay the stored result.

Semantics follow the IETF draft *The Idempotency-Key HTTP Header Field* and Stripe's documented
behaviour. A caller asks :meth:`IdempotencyStore.begin` about ``(key, fingerprint)`` and gets one
of five outcomes:

==================  =========================================================================
``Started(token)``  the caller owns the key: run, then ``complete(key, token, result)`` or
                    ``release(key, token)``
``Replay(result)``  the key already ran with this fingerprint: here is what it answered
``InProgress()``    another owner holds the key and is still running
``Mismatch()``      the key is in use (running or stored) with another fingerprint
``Busy()``          the in-flight table is full: nothing was claimed, try again shortly
==================  =========================================================================

Two tables hold the state. Completed *records* live in a TTLStore (``ttl``, LRU-bounded by
``maxsize``); running *claims* live in a table of their own (each for one ``lease``, bounded by
``max_inflight``) that is never evicted to make room: when it is full,
:meth:`~IdempotencyStore.begin` answers ``Busy`` instead of dropping a running claim, so a key
is never run twice at once because the store was full. A claim whose owner never finishes
expires with its lease; a token belongs to one claim only, so an owner whose lease ran out can
neither complete nor release a later owner's claim.

:func:`idempotent` wraps sync and async functions; :class:`IdempotencyBackend` and
:class:`AsyncIdempotencyBackend` are the seam through which it (and
:class:`ttlstore.asgi.IdempotencyMiddleware`) reach a store, so a Redis backend can replace the
in-memory one.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

from ttlstore._checks import positive_int, positive_seconds, ttl_or_none
from ttlstore.records import StoredResponse
from ttlstore.store import StoreStats, TTLStore

__all__ = [
    "AsyncIdempotencyBackend",
    "Busy",
    "BusyError",
    "IdempotencyBackend",
    "IdempotencyError",
    "IdempotencyStats",
    "IdempotencyStore",
    "InProgress",
    "InProgressError",
    "Mismatch",
    "MismatchError",
    "Outcome",
    "Replay",
    "Started",
    "as_async_backend",
    "idempotent",
]

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("ttlstore")


# ---------------------------------------------------------------------- outcomes of begin()


@dataclass(frozen=True, slots=True)
class Started:
    """The caller owns the key; it must ``complete`` or ``release`` it with ``token``."""

    token: str


@dataclass(frozen=True, slots=True)
class Replay(Generic[R]):
    """The key already ran with the same fingerprint; ``result`` is what its owner stored."""

    result: R


@dataclass(frozen=True, slots=True)
class InProgress:
    """Another owner holds the key with the same fingerprint and has not finished yet."""

    retry_after: float | None = field(default=None, compare=False)
    """Seconds until the owner's claim runs out unless it finishes first (its lease left), if
    the backend knows; ``None`` if not. Not part of equality: ``InProgress()`` matches any."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key is running or stored with another fingerprint: a client reused a key."""


@dataclass(frozen=True, slots=True)
class Busy:
    """The in-flight table is full. Nothing was claimed; a later attempt may succeed."""


Outcome: TypeAlias = Started | Replay[R] | InProgress | Mismatch | Busy
"""What :meth:`IdempotencyBackend.begin` answers."""

_MISMATCH = Mismatch()
_BUSY = Busy()


# ---------------------------------------------------------------------- errors of @idempotent


class IdempotencyError(Exception):
    """Base of the errors :func:`idempotent` raises instead of running the function."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        """The caller's key (without the decorator's namespace)."""


class InProgressError(IdempotencyError):
    """Another call with this key is still running (raised with ``wait=False``)."""

    def __init__(self, key: str) -> None:
        super().__init__(key, f"a call with idempotency key {key!r} is still in progress")


class MismatchError(IdempotencyError):
    """This key was used with other arguments (another fingerprint)."""

    def __init__(self, key: str) -> None:
        super().__init__(key, f"idempotency key {key!r} was already used with other arguments")


class BusyError(IdempotencyError):
    """The store's in-flight table is full; nothing ran. Retry shortly."""

    def __init__(self, key: str) -> None:
        super().__init__(key, f"too many calls in flight to claim idempotency key {key!r}")


# ---------------------------------------------------------------------- the seam


class IdempotencyBackend(Protocol[R]):
    """What :func:`idempotent` and the ASGI middleware need from a store (blocking calls).

    Implementations make each call atomic. ``begin`` claims ``key`` for the caller only when
    the key is neither stored nor running; ``complete`` and ``release`` act only if ``token``
    still owns the key, and return whether they did.
    """

    def begin(self, key: str, fingerprint: str) -> Outcome[R]:
        """Claim ``key``, or say why not."""
        ...

    def complete(self, key: str, token: str, result: R) -> bool:
        """Store ``result`` for ``key`` and end the claim, if ``token`` still owns it."""
        ...

    def release(self, key: str, token: str) -> bool:
        """End the claim without storing anything, if ``token`` still owns it."""
        ...


class AsyncIdempotencyBackend(Protocol[R]):
    """:class:`IdempotencyBackend` with coroutine methods, for backends that do I/O (Redis)."""

    async def begin(self, key: str, fingerprint: str) -> Outcome[R]:
        """Claim ``key``, or say why not."""
        ...

    async def complete(self, key: str, token: str, result: R) -> bool:
        """Store ``result`` for ``key`` and end the claim, if ``token`` still owns it."""
        ...

    async def release(self, key: str, token: str) -> bool:
        """End the claim without storing anything, if ``token`` still owns it."""
        ...


def is_async_backend(backend: object, name: str = "store") -> bool:
    """Whether ``backend`` has coroutine methods; TypeError naming ``name`` if it is no backend."""
    methods = [getattr(backend, method, None) for method in ("begin", "complete", "release")]
    if not all(callable(method) for method in methods):
        raise TypeError(
            f"{name} must have begin(), complete() and release() methods, got {backend!r}"
        )
    kinds = {inspect.iscoroutinefunction(method) for method in methods}
    if len(kinds) != 1:
        raise TypeError(
            f"{name} must have all-async or all-sync begin/complete/release, got {backend!r}"
        )
    return kinds.pop()


class _AsyncView(Generic[R]):
    """A sync backend seen through the async protocol, called inline on the event loop.

    No executor: the in-memory store holds its lock for microseconds and never does I/O, so a
    thread hop would cost far more than the call. A sync backend that does I/O would block the
    loop; such a backend should implement :class:`AsyncIdempotencyBackend` itself.
    """

    __slots__ = ("backend",)

    def __init__(self, backend: IdempotencyBackend[R]) -> None:
        self.backend = backend

    async def begin(self, key: str, fingerprint: str) -> Outcome[R]:
        return self.backend.begin(key, fingerprint)

    async def complete(self, key: str, token: str, result: R) -> bool:
        return self.backend.complete(key, token, result)

    async def release(self, key: str, token: str) -> bool:
        return self.backend.release(key, token)

    def __repr__(self) -> str:
        return f"<async view of {self.backend!r}>"


def as_async_backend(
    backend: IdempotencyBackend[R] | AsyncIdempotencyBackend[R], *, name: str = "store"
) -> AsyncIdempotencyBackend[R]:
    """``backend`` itself if its methods are coroutines, else an async view calling it inline.

    ``TypeError`` naming ``name`` if ``backend`` lacks the three methods or mixes kinds. O(1).
    """
    if is_async_backend(backend, name):
        return cast("AsyncIdempotencyBackend[R]", backend)
    return _AsyncView(cast("IdempotencyBackend[R]", backend))


# ---------------------------------------------------------------------- the in-memory store


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


# A record is ``(fingerprint, result)``, or ``(fingerprint, status, headers, body)`` for a
# StoredResponse; a claim is ``(fingerprint, token)``. Exact tuples of strings, bytes and ints
# are untracked by CPython's cyclic GC, so a full store costs a full collection one object per
# entry (the store's own), not three.
_Record: TypeAlias = tuple[Any, ...]

# Tokens are drawn from the OS's CSPRNG this many at a time: one os.urandom() call per batch
# instead of one per claim (a system call costs more than the rest of begin()).
_TOKEN_BATCH = 64


_as_response = tuple.__new__


def _result(record: _Record) -> Any:
    if len(record) == 4:
        return _as_response(StoredResponse, record[1:])
    return record[1]


class _Claims:
    """The running claims of an :class:`IdempotencyStore`: key -> (fingerprint, token, deadline).

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


_Table: TypeAlias = "TTLStore[str, Any] | _Claims"


class _StoreView(Mapping[str, Any]):
    """One of an :class:`IdempotencyStore`'s two tables, every method under the store's lock.

    What :attr:`IdempotencyStore.stores` hands out: a read-only mapping with ``expire`` (for a
    ``Sweeper`` or ``AsyncSweeper``), ``ttl``, ``peek`` and ``stats``, so the tables can be
    swept and inspected without ever being changed behind the store's back.
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
            value = self._store.peek(key, _ABSENT)
        if value is _ABSENT:
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


_ABSENT: Any = object()


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
        self._records: TTLStore[str, _Record] = TTLStore(
            maxsize, ttl, clock=clock, threadsafe=False
        )
        self._claims = _Claims(inflight, positive_seconds("lease", lease), clock)
        self._clock = clock
        self._lock: threading.Lock | None = threading.Lock() if threadsafe else None
        self._views = (_StoreView(self._records, self._lock), _StoreView(self._claims, self._lock))
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
                    return _MISMATCH
                self._replays += 1
                return Replay(_result(record))
            claims = self._claims
            data = claims.data
            now = self._clock()
            claim = data.get(key)
            if claim is not None:
                if claim[2] > now:
                    if claim[0] != fingerprint:
                        self._mismatches += 1
                        return _MISMATCH
                    self._conflicts += 1
                    return InProgress(claim[2] - now)
                claims.drop(key)  # its lease ran out: the key is free again
            # Checked here rather than by making room: a running claim is never dropped.
            if len(data) >= claims.maxsize and claims.full(now):
                self._busy += 1
                return _BUSY
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
        return self._end(key, token, result)

    def release(self, key: str, token: str) -> bool:
        """End the claim on ``key`` without storing anything, so a retry runs again. O(1).

        Returns False if ``token`` no longer owns ``key``.
        """
        return self._end(key, token, _ABSENT)

    def _end(self, key: str, token: str, result: Any) -> bool:
        """End the claim if ``token`` owns it, storing ``result`` unless it is ``_ABSENT``."""
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
            if result is _ABSENT:
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

    @property
    def stores(self) -> tuple[_StoreView, _StoreView]:
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


# Last, since the decorator's module imports the names above.
from ttlstore._idempotent import idempotent  # noqa: E402
