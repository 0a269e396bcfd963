"""Idempotency keys shared through Redis: :class:`RedisIdempotencyStore` and its asyncio twin.

Each operation is one Lua script (``begin.lua``, ``complete.lua``, ``release.lua``); see the
package docstring for the key layout.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.commands.core import AsyncScript, Script

from ttlstore._errors import BackendUnavailable
from ttlstore.idempotency import InProgress, Mismatch, Outcome, Replay, Started
from ttlstore.redis._client import (
    FAILURES,
    C,
    Connected,
    S,
    Tally,
    as_bytes,
    describe,
    millis,
    script_source,
    text,
)
from ttlstore.redis._release import RELEASED, TaskReleaser, ThreadReleaser
from ttlstore.redis.codecs import Codec, JsonCodec

__all__ = ["AsyncRedisIdempotencyStore", "RedisIdempotencyStats", "RedisIdempotencyStore"]

# KEYS[1]: the key's hash. ARGV: fingerprint, token, lease ms. A begin that finds its own token
# is redis-py retrying this very call after a lost reply: it still owns the claim.
_BEGIN_LUA = script_source("begin.lua")

# ARGV: token, call nonce, encoded result, ttl ms. The nonce tells redis-py's retry of this
# call (already done: 1) from a second complete() by the same owner (0, as in memory).
_COMPLETE_LUA = script_source("complete.lua")

# ARGV: token. Replies 1 (released), 0 (no such key) or -1 (another owner's claim or a record):
# the background release of a failed begin tells these apart (see _release.py).
_RELEASE_LUA = script_source("release.lua")

_IN_PROGRESS = InProgress()
_MISMATCH = Mismatch()


@dataclass(frozen=True, slots=True)
class RedisIdempotencyStats:
    """An immutable snapshot of a Redis idempotency store's counters (this instance's calls)."""

    claims: int
    """``begin`` calls answered ``Started``."""
    replays: int
    """``begin`` calls answered ``Replay``."""
    conflicts: int
    """``begin`` calls answered ``InProgress``."""
    mismatches: int
    """``begin`` calls answered ``Mismatch``."""
    errors: int
    """Calls that raised ``BackendUnavailable`` because Redis failed."""


class _Idempotency(Connected[C, S]):
    """Shared by the sync and async idempotency stores: arguments, outcomes, errors."""

    _SUFFIX = "idempotency"

    __slots__ = (
        "_begin",
        "_codec",
        "_complete",
        "_counts",
        "_lease",
        "_release",
        "_releases",
        "_ttl",
    )

    def __init__(
        self,
        client: C,
        *,
        ttl: float = 3600,
        lease: float = 60,
        prefix: str = "ttlstore",
        codec: Codec | None = None,
    ) -> None:
        self._ttl = millis("ttl", ttl)
        self._lease = millis("lease", lease)
        if codec is None:
            codec = JsonCodec()
        elif not (
            callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
        ):
            raise TypeError(f"codec must have encode() and decode() methods, got {codec!r}")
        self._codec = codec
        self._counts = Tally("claims", "replays", "conflicts", "mismatches", "errors")
        super().__init__(client, prefix)
        self._begin: S = self._register(_BEGIN_LUA)
        self._complete: S = self._register(_COMPLETE_LUA)
        self._release: S = self._register(_RELEASE_LUA)
        # A weak method: the background release never keeps the store (and client) alive.
        self._releases: Any = (TaskReleaser if self._ASYNC else ThreadReleaser)(
            type(self).__name__, weakref.WeakMethod(self._release_attempt)
        )

    def _release_attempt(self, key: str, token: str) -> Any:
        """One run of the release script: 1, 0 or -1 (a coroutine on the async client)."""
        script: Any = self._release
        return script(*self._release_call(key, token))

    @property
    def pending_releases(self) -> int:
        """Claims of failed ``begin`` calls still being released in the background."""
        return int(self._releases.pending)

    def _begin_call(self, key: str, fingerprint: str) -> tuple[list[str], list[str | int], str]:
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {fingerprint!r}")
        token = secrets.token_hex(16)
        return [self._key(key)], [fingerprint, token, self._lease], token

    def _outcome(self, reply: Any, token: str) -> Outcome[Any]:
        kind = text(reply[0])
        if kind == "started":
            self._counts.add("claims")
            return Started(token)
        if kind == "replay":
            self._counts.add("replays")
            return Replay(self._codec.decode(as_bytes(reply[1])))
        if kind == "in_progress":
            self._counts.add("conflicts")
            # The claim's PTTL: the lease its owner has left (a 409 tells clients to wait it).
            left = int(reply[1]) if len(reply) > 1 else -1
            return InProgress(left / 1000) if left >= 0 else _IN_PROGRESS
        if kind == "mismatch":
            self._counts.add("mismatches")
            return _MISMATCH
        raise RuntimeError(f"the Redis begin script answered {reply!r} (a bug in ttlstore)")

    def _complete_call(self, key: str, token: str, data: bytes) -> tuple[list[str], list[Any]]:
        return [self._key(key)], [_check_token(token), secrets.token_hex(8), data, self._ttl]

    def _release_call(self, key: str, token: str) -> tuple[list[str], list[Any]]:
        return [self._key(key)], [_check_token(token)]

    def _unavailable(self, what: str, key: str, error: BaseException) -> BackendUnavailable:
        self._counts.add("errors")
        return BackendUnavailable(
            f"Redis failed to {what} idempotency key {key!r}: {describe(error)}"
        )

    @property
    def ttl(self) -> float:
        """Seconds a completed result is kept."""
        return self._ttl / 1000

    @property
    def lease(self) -> float:
        """Seconds a claim lasts without complete or release."""
        return self._lease / 1000

    @property
    def codec(self) -> Codec:
        """How results are stored."""
        return self._codec

    def stats(self) -> RedisIdempotencyStats:
        """An immutable snapshot of this instance's counters; no round trip. O(1)."""
        return RedisIdempotencyStats(**self._counts.snapshot())

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} ttl={self.ttl:g} lease={self.lease:g} "
            f"prefix={self._prefix!r} codec={self._codec!r}>"
        )


def _check_token(token: object) -> str:
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {token!r}")
    return token


class RedisIdempotencyStore(_Idempotency[redis.Redis | redis.cluster.RedisCluster, Script]):
    """Idempotency keys shared through Redis (``redis.Redis``): an ``IdempotencyBackend``.

    Answers as :class:`~ttlstore.idempotency.IdempotencyStore` does (``Started``, ``Replay``,
    ``InProgress``, ``Mismatch``) for every replica on the same server and ``prefix``. There is
    no ``maxsize`` and so no ``Busy``: each claim lasts at most ``lease``, each record ``ttl``
    (a number: Redis keys must expire), and Redis's own ``maxmemory`` bounds the rest.

    :param client: a ``redis.Redis`` with bounded ``socket_timeout``/``socket_connect_timeout``.
    :param ttl: seconds a completed result is kept (whole milliseconds, rounded up).
    :param lease: seconds a claim lasts if its owner never completes or releases it.
    :param prefix: the first part of every key (no braces).
    :param codec: how results are stored; default :class:`JsonCodec`.

    A Redis fault raises :class:`BackendUnavailable` (the middleware answers 503). A ``begin``
    that failed may still run when Redis answers again, or ran with its reply lost: its claim
    is released by token in the background (a daemon thread; :attr:`pending_releases`,
    :meth:`drain`), so a retry of the key runs again as soon as Redis answers instead of after
    the lease; another owner's claim is never touched. The ASGI middleware calls a sync
    backend inline on the event loop: use :class:`AsyncRedisIdempotencyStore` there.
    """

    _ASYNC = False
    __slots__ = ()

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        """Claim ``key`` for a request with ``fingerprint``, or say why not. One round trip."""
        keys, args, token = self._begin_call(key, fingerprint)
        try:
            reply = self._begin(keys, args)
        except FAILURES as error:
            # It may still run, or have run with its reply lost: end our claim when Redis
            # answers again, so that a retry of the key need not wait out the lease.
            self._releases.schedule(key, token, error)
            raise self._unavailable("begin", key, error) from error
        return self._outcome(reply, token)

    def complete(self, key: str, token: str, result: Any) -> bool:
        """Store ``result`` for ``ttl`` and end the claim, if ``token`` still owns ``key``.

        A result the codec refuses releases the claim (a retry runs again) and raises its
        ``TypeError``.
        """
        try:
            data = self._codec.encode(result)
        except TypeError:
            self.release(key, token)
            raise
        keys, args = self._complete_call(key, token, data)
        try:
            return bool(self._complete(keys, args))
        except FAILURES as error:
            raise self._unavailable("complete", key, error) from error

    def release(self, key: str, token: str) -> bool:
        """End the claim without storing anything, if ``token`` still owns ``key``."""
        keys, args = self._release_call(key, token)
        try:
            return bool(self._release(keys, args) == RELEASED)
        except FAILURES as error:
            raise self._unavailable("release", key, error) from error

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no claim of a failed ``begin`` is being released in the background;
        False if some still are after ``timeout`` seconds."""
        return bool(self._releases.drain(timeout))


class AsyncRedisIdempotencyStore(
    _Idempotency[redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster, AsyncScript]
):
    """:class:`RedisIdempotencyStore` on ``redis.asyncio.Redis``: an ``AsyncIdempotencyBackend``
    for ``IdempotencyMiddleware`` and async ``@idempotent`` functions. The claim of a failed or
    cancelled ``begin`` is released by an asyncio task on the caller's loop."""

    _ASYNC = True
    __slots__ = ()

    async def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        """Claim ``key`` for a request with ``fingerprint``, or say why not. One round trip."""
        keys, args, token = self._begin_call(key, fingerprint)
        try:
            reply = await self._begin(keys, args)
        except FAILURES as error:
            # It may still run, or have run with its reply lost: see RedisIdempotencyStore.
            self._releases.schedule(key, token, error)
            raise self._unavailable("begin", key, error) from error
        except asyncio.CancelledError as error:
            self._releases.schedule(key, token, error)  # the same: sent, answer unknown
            raise
        return self._outcome(reply, token)

    async def complete(self, key: str, token: str, result: Any) -> bool:
        """Store ``result`` for ``ttl`` and end the claim, if ``token`` still owns ``key``."""
        try:
            data = self._codec.encode(result)
        except TypeError:
            await self.release(key, token)
            raise
        keys, args = self._complete_call(key, token, data)
        try:
            return bool(await self._complete(keys, args))
        except FAILURES as error:
            raise self._unavailable("complete", key, error) from error

    async def release(self, key: str, token: str) -> bool:
        """End the claim without storing anything, if ``token`` still owns ``key``."""
        keys, args = self._release_call(key, token)
        try:
            return bool(await self._release(keys, args) == RELEASED)
        except FAILURES as error:
            raise self._unavailable("release", key, error) from error

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until no claim of a failed ``begin`` is being released in the background
        on this event loop; False if some still are after ``timeout`` seconds."""
        return bool(await self._releases.drain(timeout))
