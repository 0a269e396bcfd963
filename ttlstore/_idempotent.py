"""``@idempotent``: run a sync or async function at most once per idempotency key.

Re-exported by :mod:`ttlstore.idempotency`, which holds the stores and outcomes it drives.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ttlstore._errors import BackendUnavailable
from ttlstore._faults import FaultLog
from ttlstore._idem_api import (
    AsyncIdempotencyBackend,
    Busy,
    BusyError,
    IdempotencyBackend,
    InProgress,
    InProgressError,
    Mismatch,
    MismatchError,
    Outcome,
    Replay,
    Started,
    as_async_backend,
    is_async_backend,
)
from ttlstore.records import Raised, Returned

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger("ttlstore")

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

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


class _Faults:
    """The two fault logs of one decorated function: at most one line per interval each, so
    a backend outage (or a lease too short for every call) cannot flood the logs."""

    __slots__ = ("late", "store")

    def __init__(self, name: str) -> None:
        self.store = FaultLog(f"@idempotent {name}: the idempotency store failed")
        self.late = FaultLog(f"@idempotent {name}")

    def unless_stored(self, stored: bool, key: str) -> None:
        """Log a ``complete`` the backend refused: the token had lost the key."""
        if not stored:
            self.late.log(
                f"the claim on key {key!r} ended before the call finished (lease too short?); "
                "its result was not stored"
            )

    def settle_failed(self, error: Exception, key: str) -> None:
        """Log a backend fault while ending a claim. The call's own outcome still stands: the
        function ran, so its caller gets its value or error, and the claim ends with its
        lease."""
        traceback = not isinstance(error, BackendUnavailable)
        self.store.log(error, f"to end the claim on key {key!r}", traceback=traceback)


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
    """Turns a call's arguments into (caller's key, store key, fingerprint); holds the
    function's fault logs."""

    __slots__ = ("faults", "fingerprint", "key", "prefix")

    def __init__(
        self,
        key: Callable[..., str],
        fingerprint: Callable[..., str] | None,
        prefix: str,
        faults: _Faults,
    ) -> None:
        self.key = key
        self.fingerprint = fingerprint
        self.prefix = prefix
        self.faults = faults

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
    is_async = is_async_backend(store)

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@idempotent decorates a function, got {fn!r}")
        prefix = namespace if namespace is not None else f"{fn.__module__}.{fn.__qualname__}"
        keys = _Keys(key, fingerprint, prefix, _Faults(prefix))
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

    faults = keys.faults

    def settle(key: str, store_key: str, token: str, record: Returned | Raised | None) -> None:
        try:
            if record is None:
                backend.release(store_key, token)
            else:
                faults.unless_stored(backend.complete(store_key, token, record), key)
        except Exception as error:
            faults.settle_failed(error, key)

    return call


def _async_wrapper(
    fn: Callable[..., Awaitable[Any]],
    backend: AsyncIdempotencyBackend[Any],
    keys: _Keys,
    wait: bool,
    store_errors: bool,
) -> Callable[..., Awaitable[Any]]:
    # Imported here: only an async function needs asyncio, and `import ttlstore` must not.
    import asyncio

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

    faults = keys.faults

    async def settle(
        key: str, store_key: str, token: str, record: Returned | Raised | None
    ) -> None:
        try:
            if record is None:
                await backend.release(store_key, token)
            else:
                faults.unless_stored(await backend.complete(store_key, token, record), key)
        except Exception as error:
            faults.settle_failed(error, key)

    return call
