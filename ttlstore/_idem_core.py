"""The compiled half of an :class:`~ttlstore.idempotency.IdempotencyStore`: its state, its
running claims, and the two calls every request makes (``begin`` and ``complete``).

mypyc compiles this module (setup.py ``COMPILED``); :mod:`ttlstore._idem_store` adds the
constructor with its argument checks, the weak-reference slot and everything that is not on a
request's path, interpreted in every build. Methods take ``Any`` and check their arguments
themselves, so a wrong type gets this package's message, not mypyc's.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeAlias

from ttlstore._idem_api import BUSY, MISMATCH, InProgress, Outcome, Replay, Started
from ttlstore._mypyc import mypyc_attr
from ttlstore._steps import read
from ttlstore._writes import acquire_lock, release_lock, write
from ttlstore.records import StoredResponse
from ttlstore.store import StoreStats, TTLStore

__all__ = ["ABSENT", "ClaimTable", "IdempotencyCore", "Record", "claim", "end_claim"]

# A record is ``(fingerprint, result)``, or ``(fingerprint, status, headers, body)`` for a
# StoredResponse; a claim is ``(fingerprint, token, deadline)``. Exact tuples of strings, bytes
# and ints are untracked by CPython's cyclic GC, so a full store costs a full collection one
# object per entry (the store's own), not three. (A record holding its Replay would spare a
# replay building it, but costs the collector three objects more per record.)
Record: TypeAlias = tuple[Any, ...]

ABSENT: Final[Any] = object()
"""What no table holds: a lookup's "not found", and the store's "release, store nothing"."""

# Tokens are drawn from the OS's CSPRNG this many at a time: one os.urandom() call per batch
# instead of one per claim (a system call costs more than the rest of begin()).
_TOKEN_BATCH: Final = 64

# A StoredResponse rebuilt from a record without its Python-level __new__.
_as_response: Final = tuple.__new__

# Outcomes built without their dataclass __init__ (a Python frame and a frozen setattr): the
# object, then its one slot set through the slot's own descriptor. A fifth cheaper, and equal.
_new: Final = object.__new__
# Imported classes read on every request, bound to Finals: compiled, a Final is a C static,
# where an imported name is a dictionary lookup in the module's globals on each read.
_STARTED: Final = Started
_REPLAY: Final = Replay
_STORED_RESPONSE: Final = StoredResponse

_set_token: Final = Started.__dict__["token"].__set__
_set_result: Final = Replay.__dict__["result"].__set__


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
        # Claims as Python tuples: the compiled build would otherwise convert each one it reads.
        self.data: OrderedDict[str, Any] = OrderedDict()
        self._expirations = 0

    def drop(self, key: Any) -> None:
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

    def ttl(self, key: Any) -> float:
        """Seconds left of the claim on ``key``; ``KeyError`` if there is none."""
        now = self._clock()
        claim = self.data.get(key)
        if claim is None or claim[2] <= now:
            raise KeyError(key)
        left: float = claim[2] - now
        return left

    def peek(self, key: Any, default: Any = None) -> Any:
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


# Compiled with an interpreted subclass (IdempotencyStore) that adds the constructor's checks
# and the weak-reference slot (mypyc's own is mis-traversed by CPython 3.11's collector).
@mypyc_attr(allow_interpreted_subclasses=True)
class IdempotencyCore:
    """State, ``begin``, ``complete`` and ``release`` of an IdempotencyStore; see there. Its
    lock is always a threading.Lock, taken through the type's methods
    (:data:`ttlstore._writes.acquire_lock`: compiled, ``lock.acquire()`` is a lookup by name)."""

    __slots__ = (
        "_busy",
        "_claims",
        "_claims_started",
        "_clock",
        "_completions",
        "_conflicts",
        "_lock",
        "_mismatches",
        "_records",
        "_records_ttl",
        "_releases",
        "_replays",
        "_stale",
        "_tokens",
    )

    def __init__(
        self,
        records: TTLStore[str, Record],
        claims: ClaimTable,
        clock: Callable[[], float],
        lock: threading.Lock | None,
    ) -> None:
        """Set up an empty store from tables and arguments IdempotencyStore made and checked."""
        self._records = records
        # What records[key] = record passes write(); the records store is unlocked, weighs
        # nothing and calls nobody back (IdempotencyStore makes it so), so write() is all of it.
        self._records_ttl = records.default_ttl
        self._claims = claims
        self._clock = clock
        self._lock = lock
        self._tokens: list[str] = []
        self._claims_started = self._replays = self._conflicts = self._mismatches = 0
        self._busy = self._completions = self._releases = self._stale = 0

    def begin(self, key: Any, fingerprint: Any) -> Outcome[Any]:
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
        outcome = claim(self, key, fingerprint)
        if type(outcome) is str:
            started: Started = _new(_STARTED)
            _set_token(started, outcome)
            return started
        if type(outcome) is not tuple:
            return outcome  # type: ignore[no-any-return]
        replay: Replay[Any] = _new(_REPLAY)
        if len(outcome) == 4:  # a flattened StoredResponse, see end_claim()
            _set_result(replay, _as_response(_STORED_RESPONSE, outcome[1:]))
        else:
            _set_result(replay, outcome[1])
        return replay

    def complete(self, key: Any, token: Any, result: Any) -> bool:
        """Store ``result`` for ``key`` (for ``ttl``) and end the claim. O(1) amortized.

        Returns False, storing nothing, if ``token`` no longer owns ``key`` (its lease ran out,
        it was completed or released already, or it never did).
        """
        return end_claim(self, key, token, result, type(result) is _STORED_RESPONSE)

    def release(self, key: Any, token: Any) -> bool:
        """End the claim on ``key`` without storing anything, so a retry runs again. O(1).

        Returns False if ``token`` no longer owns ``key``.
        """
        return end_claim(self, key, token, ABSENT, False)


def claim(self: IdempotencyCore, key: str, fingerprint: str) -> Any:
    """:meth:`IdempotencyCore.begin` for arguments known to be strings, a claim answered
    with its token (a str) rather than a ``Started``, and a replay with the stored record
    itself (a tuple, see :func:`end_claim`) rather than a ``Replay``.

    The idempotency middleware's call: native, where the method is looked up by name and
    parses its arguments, and none of the objects built that the middleware would unpack at
    once. O(1) amortized.
    """
    lock = self._lock
    if lock is not None:
        acquire_lock(lock)
    try:
        # read(): TTLStore.get's body, called natively (the method is looked up by name).
        record = read(self._records, key, None)
        if record is not None:
            if record[0] != fingerprint:
                self._mismatches += 1
                return MISMATCH
            self._replays += 1
            return record
        claims = self._claims
        data = claims.data
        now = self._clock()
        running = data.get(key)
        if running is not None:
            if running[2] > now:
                if running[0] != fingerprint:
                    self._mismatches += 1
                    return MISMATCH
                self._conflicts += 1
                return InProgress(running[2] - now)
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
        return token
    finally:
        if lock is not None:
            release_lock(lock)


def end_claim(self: IdempotencyCore, key: Any, token: Any, result: Any, flat: bool) -> bool:
    """End ``token``'s claim on ``key``, storing ``result`` unless it is :data:`ABSENT`.

    The body of ``complete`` and ``release``, and the idempotency middleware's call (native,
    see :func:`claim`). With ``flat``, ``result`` is a response's (status, headers, body), a
    StoredResponse or the plain tuple of its fields, flattened into the record: one object
    for the GC less per record. O(1) amortized.
    """
    lock = self._lock
    if lock is not None:
        acquire_lock(lock)
    try:
        data = self._claims.data
        held = data.get(key)
        if held is None or held[1] != token or held[2] <= self._clock():
            self._stale += 1
            return False
        del data[key]
        if result is ABSENT:
            self._releases += 1
            return True
        if flat:
            # Concatenated: unpacked into a display, a tuple subclass goes through a list
            # and the iterator protocol (1.6 k instructions more compiled, callgrind;
            # 132 ns against 61 interpreted, timeit).
            record: Record = (held[0],) + result  # noqa: RUF005
        else:
            record = (held[0], result)
        # write(): TTLStore.__setitem__'s body, called natively (and without an interpreted
        # frame: the method is looked up by name, or is a frame of its own, interpreted).
        write(self._records, key, record, self._records_ttl, 0.0, False)
        self._completions += 1
        return True
    finally:
        if lock is not None:
            release_lock(lock)
