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

Two TTLStores hold the state. Completed *records* live in one (``ttl``, LRU-bounded by
``maxsize``); running *claims* live in another (TTL ``lease``, bounded by ``max_inflight``) that
is never evicted to make room: when it is full, :meth:`~IdempotencyStore.begin` answers
``Busy`` instead of dropping a running claim, so a key is never run twice at once because the
store was full. A claim whose owner never finishes expires with its lease; a token belongs to
one claim only, so an owner whose lease ran out can neither complete nor release a later
owner's claim.

:func:`idempotent` wraps sync and async functions; :class:`IdempotencyBackend` and
:class:`AsyncIdempotencyBackend` are the seam through which it (and
:class:`ttlstore.asgi.IdempotencyMiddleware`) reach a store, so a Redis backend can replace the
in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

from ttlstore._checks import positive_int, positive_seconds, ttl_or_none
from ttlstore.records import Raised, Returned
from ttlstore.store import TTLStore

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


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key is running or stored with another fingerprint: a client reused a key."""


@dataclass(frozen=True, slots=True)
class Busy:
    """The in-flight table is full. Nothing was claimed; a later attempt may succeed."""


Outcome: TypeAlias = Started | Replay[R] | InProgress | Mismatch | Busy
"""What :meth:`IdempotencyBackend.begin` answers."""

_IN_PROGRESS = InProgress()
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


def _is_async_backend(backend: object, name: str = "store") -> bool:
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
    if _is_async_backend(backend, name):
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


@dataclass(frozen=True, slots=True)
class _Claim:
    fingerprint: str
    token: str


@dataclass(frozen=True, slots=True)
class _Record:
    fingerprint: str
    result: Any


class IdempotencyStore:
    """In-memory idempotency records and claims, built on two :class:`~ttlstore.TTLStore`.

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

    Every method is O(1) amortized. Memory is bounded by ``maxsize`` records plus
    ``max_inflight`` claims; each record holds whatever result its owner stored.
    """

    __slots__ = (
        "__weakref__",
        "_busy",
        "_claims",
        "_claims_started",
        "_completions",
        "_conflicts",
        "_lock",
        "_mismatches",
        "_records",
        "_releases",
        "_replays",
        "_stale",
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
        self._records: TTLStore[str, _Record] = TTLStore(
            maxsize, ttl, clock=clock, threadsafe=threadsafe
        )
        self._claims: TTLStore[str, _Claim] = TTLStore(
            inflight, lease, clock=clock, threadsafe=threadsafe
        )
        # One lock over both stores: begin() and complete() read one and write the other.
        self._lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if threadsafe else contextlib.nullcontext()
        )
        self._claims_started = self._replays = self._conflicts = self._mismatches = 0
        self._busy = self._completions = self._releases = self._stale = 0

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        """Claim ``key`` for a request with ``fingerprint``, or say why not. O(1) amortized.

        A stored record wins (``Replay``, or ``Mismatch`` for another fingerprint), then a
        running claim (``InProgress``, or ``Mismatch``), then the in-flight bound (``Busy``).
        Otherwise the caller gets ``Started`` with a fresh unguessable token.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {key!r}")
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {fingerprint!r}")
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                if record.fingerprint != fingerprint:
                    self._mismatches += 1
                    return _MISMATCH
                self._replays += 1
                return Replay(record.result)
            claim = self._claims.peek(key)
            if claim is not None:
                if claim.fingerprint != fingerprint:
                    self._mismatches += 1
                    return _MISMATCH
                self._conflicts += 1
                return _IN_PROGRESS
            # len() reclaims expired claims first, so only live ones count against the bound.
            # Checking here, rather than letting set() evict, is what keeps running claims.
            if len(self._claims) >= self._claims.maxsize:
                self._busy += 1
                return _BUSY
            token = secrets.token_hex(16)
            self._claims.set(key, _Claim(fingerprint, token))
            self._claims_started += 1
            return Started(token)

    def complete(self, key: str, token: str, result: Any) -> bool:
        """Store ``result`` for ``key`` (for ``ttl``) and end the claim. O(1) amortized.

        Returns False, storing nothing, if ``token`` no longer owns ``key`` (its lease ran out,
        it was completed or released already, or it never did).
        """
        with self._lock:
            claim = self._owned(key, token)
            if claim is None:
                return False
            del self._claims[key]
            self._records.set(key, _Record(claim.fingerprint, result))
            self._completions += 1
            return True

    def release(self, key: str, token: str) -> bool:
        """End the claim on ``key`` without storing anything, so a retry runs again. O(1).

        Returns False if ``token`` no longer owns ``key``.
        """
        with self._lock:
            if self._owned(key, token) is None:
                return False
            del self._claims[key]
            self._releases += 1
            return True

    def _owned(self, key: str, token: str) -> _Claim | None:
        """The live claim on ``key`` if ``token`` owns it, else None (counted as stale)."""
        claim = self._claims.peek(key)
        if claim is None or claim.token != token:
            self._stale += 1
            return None
        return claim

    @property
    def stores(self) -> tuple[TTLStore[str, Any], TTLStore[str, Any]]:
        """The records store and the claims store, to hand to a ``Sweeper``/``AsyncSweeper``."""
        return self._records, self._claims

    @property
    def ttl(self) -> float | None:
        """Seconds a completed result is kept."""
        return self._records.default_ttl

    @property
    def lease(self) -> float:
        """Seconds a claim lasts without complete or release."""
        lease = self._claims.default_ttl
        assert lease is not None  # checked in __init__
        return lease

    @property
    def maxsize(self) -> int:
        """The most completed results kept."""
        return self._records.maxsize

    @property
    def max_inflight(self) -> int:
        """The most claims held at once."""
        return self._claims.maxsize

    def stats(self) -> IdempotencyStats:
        """An immutable snapshot of the counters, after reclaiming due entries. O(1) amortized."""
        with self._lock:
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

    def __repr__(self) -> str:
        ttl = "None" if self.ttl is None else f"{self.ttl:g}"
        return (
            f"<IdempotencyStore ttl={ttl} maxsize={self.maxsize} lease={self.lease:g} "
            f"max_inflight={self.max_inflight}>"
        )


# ---------------------------------------------------------------------- @idempotent

# Waiting on an owner this process cannot observe (another thread's sync backend call in
# flight, another process through Redis) backs off between these bounds; an owner in this
# process wakes its waiters at once, and they re-check at least this often anyway, so a claim
# whose lease ran out is taken over without waiting for its owner.
_POLL_MIN = 0.005
_POLL_MAX = 1.0


def _detached(error: Exception) -> Exception | None:
    """A copy of ``error`` without traceback, cause or context, or None if it cannot be copied.

    Storing the original would pin its traceback's frames (and their locals) for the record's
    whole TTL, and raising one instance on every replay would grow its traceback each time.
    """
    try:
        clone = copy.copy(error)
    except Exception:
        return None
    if type(clone) is not type(error):
        return None
    clone.__traceback__ = clone.__cause__ = clone.__context__ = None
    return clone


def _failure_record(error: BaseException, store_errors: bool, key: str) -> Raised | None:
    """What to store when the function raised ``error``: a record, or None to release."""
    if not store_errors or not isinstance(error, Exception):
        return None  # cancellation and KeyboardInterrupt say nothing about the operation
    clone = _detached(error)
    if clone is None:
        logger.warning(
            "idempotent: %r for key %r cannot be copied, so it is not stored; "
            "the claim is released and a retry runs again",
            error,
            key,
        )
        return None
    return Raised(clone)


_WAIT: Any = object()


def _answer(outcome: Outcome[Any], key: str, wait: bool) -> Any:
    """The call's result for any outcome but ``Started``: a value, an error, or ``_WAIT``."""
    if isinstance(outcome, Replay):
        record = outcome.result
        if isinstance(record, Returned):
            return record.value
        if isinstance(record, Raised):
            clone = _detached(record.error)
            raise clone if clone is not None else record.error
        raise TypeError(
            f"idempotency key {key!r} holds {record!r}, which @idempotent did not store; "
            "use a namespace of its own for each decorated function"
        )
    if isinstance(outcome, InProgress):
        if wait:
            return _WAIT
        raise InProgressError(key)
    if isinstance(outcome, Mismatch):
        raise MismatchError(key)
    if isinstance(outcome, Busy):
        raise BusyError(key)
    raise TypeError(f"begin() answered {outcome!r} for key {key!r}, which is no Outcome")


def _warn_unless_stored(stored: bool, key: str) -> None:
    """Log a ``complete`` the backend refused: the token had lost the key, nothing was kept."""
    if not stored:
        logger.warning(
            "idempotent: the claim on key %r ended before the call finished (lease too "
            "short?); its result was not stored",
            key,
        )


def _settle_failed(key: str) -> None:
    """Log a backend fault while ending a claim. The call's own outcome still stands: the
    function ran, so its caller gets its value or error, and the claim ends with its lease."""
    logger.exception("idempotent: could not end the claim on key %r", key)


def _check_decorator_args(
    key: object, fingerprint: object, wait: object, store_errors: object, namespace: object
) -> None:
    if not callable(key):
        raise TypeError(f"key must be a callable returning a str, got {key!r}")
    if fingerprint is not None and not callable(fingerprint):
        raise TypeError(
            f"fingerprint must be a callable returning a str, or None, got {fingerprint!r}"
        )
    if not isinstance(wait, bool):
        raise TypeError(f"wait must be a bool, got {wait!r}")
    if not isinstance(store_errors, bool):
        raise TypeError(f"store_errors must be a bool, got {store_errors!r}")
    if namespace is not None and not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str or None, got {namespace!r}")


class _Keys:
    """Turns a call's arguments into (caller's key, store key, fingerprint)."""

    __slots__ = ("fingerprint", "key", "prefix")

    def __init__(
        self, key: Callable[..., str], fingerprint: Callable[..., str] | None, prefix: str
    ) -> None:
        self.key = key
        self.fingerprint = fingerprint
        self.prefix = prefix

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str, str]:
        key = self.key(*args, **kwargs)
        if not isinstance(key, str):
            raise TypeError(f"key callable must return a str, got {key!r}")
        fingerprint = "" if self.fingerprint is None else self.fingerprint(*args, **kwargs)
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint callable must return a str, got {fingerprint!r}")
        # The namespace keeps two decorated functions sharing a store from replaying each
        # other's results; "\x00" cannot be confused with the end of a namespace.
        return key, f"{self.prefix}\x00{key}", fingerprint


def idempotent(
    store: IdempotencyBackend[Any] | AsyncIdempotencyBackend[Any],
    *,
    key: Callable[..., str],
    fingerprint: Callable[..., str] | None = None,
    wait: bool = False,
    store_errors: bool = False,
    namespace: str | None = None,
) -> Callable[[F], F]:
    """Run the decorated function at most once per key; repeat calls get the stored result.

    ``key(*args, **kwargs)`` and ``fingerprint(*args, **kwargs)`` are computed from each call's
    arguments. A call whose key already completed with the same fingerprint returns the stored
    value (or re-raises the stored error) without running; with another fingerprint it raises
    :class:`MismatchError`. ``fingerprint=None`` checks no arguments: same key, same result.

    While a call with the same key runs, a duplicate raises :class:`InProgressError`
    (``wait=False``) or waits for it to finish and then returns its result (``wait=True``).
    Waiting needs no polling when the owner runs in this process (a per-key event wakes the
    waiters); an owner elsewhere (another process sharing a Redis backend) is re-checked with
    backoff. A full in-flight table raises :class:`BusyError`.

    An exception releases the claim, so a retry runs again, unless ``store_errors=True``: then
    an ``Exception`` (never a cancellation) is stored and re-raised, as a copy, by every replay.
    A stored return value is handed out as it is, not copied: callers must not mutate it.

    Keys are stored under ``namespace`` (default: the function's module and qualified name), so
    functions sharing a store never see each other's results. Sync functions need a sync
    backend (such as :class:`IdempotencyStore`); async functions accept either kind.

    Each call costs O(1) besides the function: one ``begin`` and one ``complete`` or
    ``release`` on the backend (one round trip each for a remote one).
    """
    _check_decorator_args(key, fingerprint, wait, store_errors, namespace)
    is_async = _is_async_backend(store)

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@idempotent decorates a function, got {fn!r}")
        prefix = namespace if namespace is not None else f"{fn.__module__}.{fn.__qualname__}"
        keys = _Keys(key, fingerprint, prefix)
        if inspect.iscoroutinefunction(fn):
            wrapper: Callable[..., Any] = _async_wrapper(
                fn, as_async_backend(store), keys, wait, store_errors
            )
        elif is_async:
            raise TypeError(
                f"store {store!r} is async, so it can only guard async functions, got {fn!r}"
            )
        else:
            backend = cast("IdempotencyBackend[Any]", store)
            wrapper = _sync_wrapper(fn, backend, keys, wait, store_errors)
        return cast(F, functools.wraps(fn)(wrapper))

    return decorate


def _sync_wrapper(
    fn: Callable[..., Any],
    backend: IdempotencyBackend[Any],
    keys: _Keys,
    wait: bool,
    store_errors: bool,
) -> Callable[..., Any]:
    # Store key -> event set when this process's owner of the key finishes. Bounded by the
    # calls running right now; each entry is removed by its owner.
    flights: dict[str, threading.Event] = {}
    lock = threading.Lock()

    def call(*args: Any, **kwargs: Any) -> Any:
        key, store_key, fp = keys(args, kwargs)
        delay = _POLL_MIN
        while True:
            outcome = backend.begin(store_key, fp)
            if isinstance(outcome, Started):
                flight = threading.Event()
                with lock:
                    flights[store_key] = flight
                try:
                    return run(key, store_key, outcome.token, args, kwargs)
                finally:
                    with lock:
                        if flights.get(store_key) is flight:
                            del flights[store_key]
                    flight.set()
            result = _answer(outcome, key, wait)
            if result is not _WAIT:
                return result
            with lock:
                running = flights.get(store_key)
            if running is not None:
                running.wait(_POLL_MAX)
            else:
                time.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)

    def run(
        key: str, store_key: str, token: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            value = fn(*args, **kwargs)
        except BaseException as error:
            settle(key, store_key, token, _failure_record(error, store_errors, key))
            raise
        settle(key, store_key, token, Returned(value))
        return value

    def settle(key: str, store_key: str, token: str, record: Returned | Raised | None) -> None:
        try:
            if record is None:
                backend.release(store_key, token)
            else:
                _warn_unless_stored(backend.complete(store_key, token, record), key)
        except Exception:
            _settle_failed(key)

    return call


def _async_wrapper(
    fn: Callable[..., Awaitable[Any]],
    backend: AsyncIdempotencyBackend[Any],
    keys: _Keys,
    wait: bool,
    store_errors: bool,
) -> Callable[..., Awaitable[Any]]:
    # Store key -> future resolved when this process's owner of the key finishes. A future
    # belongs to one loop; a waiter on another loop treats the owner as remote.
    flights: dict[str, asyncio.Future[None]] = {}

    async def call(*args: Any, **kwargs: Any) -> Any:
        key, store_key, fp = keys(args, kwargs)
        delay = _POLL_MIN
        while True:
            outcome = await backend.begin(store_key, fp)
            if isinstance(outcome, Started):
                flight = asyncio.get_running_loop().create_future()
                flights[store_key] = flight
                try:
                    return await run(key, store_key, outcome.token, args, kwargs)
                finally:
                    if flights.get(store_key) is flight:
                        del flights[store_key]
                    flight.set_result(None)
            result = _answer(outcome, key, wait)
            if result is not _WAIT:
                return result
            running = flights.get(store_key)
            if running is not None and running.get_loop() is asyncio.get_running_loop():
                # asyncio.wait, not await: a cancelled waiter must not cancel the flight.
                await asyncio.wait({running}, timeout=_POLL_MAX)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)

    async def run(
        key: str, store_key: str, token: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            value = await fn(*args, **kwargs)
        except BaseException as error:
            await settle(key, store_key, token, _failure_record(error, store_errors, key))
            raise
        await settle(key, store_key, token, Returned(value))
        return value

    async def settle(
        key: str, store_key: str, token: str, record: Returned | Raised | None
    ) -> None:
        try:
            if record is None:
                await backend.release(store_key, token)
            else:
                _warn_unless_stored(await backend.complete(store_key, token, record), key)
        except Exception:
            _settle_failed(key)

    return call
