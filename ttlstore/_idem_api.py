"""The outcomes, errors and backend protocols of the idempotency adapter.

Re-exported by :mod:`ttlstore.idempotency` (where they are documented and imported from); kept
apart so the in-memory store, ``@idempotent`` and the ASGI middleware share them without
importing one another.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeAlias, TypeVar, cast

__all__ = [
    "BUSY",
    "MISMATCH",
    "AsyncIdempotencyBackend",
    "Busy",
    "BusyError",
    "IdempotencyBackend",
    "IdempotencyError",
    "InProgress",
    "InProgressError",
    "Mismatch",
    "MismatchError",
    "Outcome",
    "Replay",
    "Started",
    "as_async_backend",
    "is_async_backend",
]

R = TypeVar("R")


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

# The answers that carry nothing: one instance each, handed out by every store.
MISMATCH = Mismatch()
BUSY = Busy()


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


class AsyncView(Generic[R]):
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
    return AsyncView(cast("IdempotencyBackend[R]", backend))
