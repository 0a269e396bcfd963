"""What the idempotency adapters store, in a form every backend and codec can carry.

No optional dependency: a custom Redis :class:`~ttlstore.redis.Codec` imports these types to
encode and decode what :class:`~ttlstore.asgi.IdempotencyMiddleware` and
:func:`~ttlstore.idempotency.idempotent` store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Raised", "Returned", "StoredResponse"]


class StoredResponse(NamedTuple):
    """A complete response kept for replay: status, the app's headers, and the whole body.

    A named tuple: immutable, and built for every first request and every replay at half the
    cost of a frozen dataclass.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Returned:
    """A function's stored return value (``@idempotent``)."""

    value: Any


@dataclass(frozen=True, slots=True)
class Raised:
    """A function's stored exception (``@idempotent(store_errors=True)``), without traceback."""

    error: Exception
