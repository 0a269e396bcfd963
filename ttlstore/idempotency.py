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

The names live in three private modules (outcomes and protocols, the store, its tables) and
``@idempotent`` in a fourth; import them from here.
"""

from __future__ import annotations

from ttlstore._idem_api import (
    AsyncIdempotencyBackend,
    Busy,
    BusyError,
    IdempotencyBackend,
    IdempotencyError,
    InProgress,
    InProgressError,
    Mismatch,
    MismatchError,
    Outcome,
    Replay,
    Started,
    as_async_backend,
)
from ttlstore._idem_store import IdempotencyStats, IdempotencyStore
from ttlstore._idempotent import idempotent

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
