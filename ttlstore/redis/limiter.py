"""Token buckets shared through Redis: :class:`RedisTokenBucketLimiter` and its asyncio twin.

Each decision is one Lua script (``bucket.lua``) deciding with the in-memory limiter's exact
GCRA arithmetic; see the package docstring for the key layout and failure policies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, overload

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.commands.core import AsyncScript, Script
from redis.exceptions import ResponseError

from ttlstore._errors import BackendUnavailable
from ttlstore._faults import FaultLog
from ttlstore._gcra import (
    Bucket,
    Decision,
    Limit,
    Number,
    buckets_of,
    check_cost,
    check_timeout,
    decide,
    limits_from,
    wait_async,
    wait_sync,
)
from ttlstore.redis._client import (
    FAILURES,
    TRANSIENT_REPLIES,
    C,
    Connected,
    S,
    Tally,
    describe,
    script_source,
    text,
)

__all__ = [
    "AsyncRedisTokenBucketLimiter",
    "OnError",
    "RedisLimiterStats",
    "RedisTokenBucketLimiter",
]

OnError = Literal["allow", "deny", "raise"]
"""What a limiter answers when Redis fails: allow the request, refuse it, or raise."""

_NS = 1_000_000_000
_POLICY_ACTIONS = {"allow": "allowing", "deny": "denying", "raise": "raising"}
_DEGRADED_WAIT = 1.0  # seconds a degraded refusal asks the client to wait


# Token buckets (GCRA) of one key, decided exactly; see the module docstring.
#
# A limit counts time in units of 1/scale ns. An instant T (units) is held as four exact Lua
# numbers {ms, ns, rh, rl}: T = (ms * 1e6 + ns) * scale + rh * 1e9 + rl, with ns < 1e6 and
# rh * 1e9 + rl < scale. Adding two such instants carries through the limbs, and the order of
# instants is the order of their limbs, so no number exceeds 2**53 whatever the rate. A TAT is
# stored as "<ns since the epoch>:<remainder>" (T = ns * scale + remainder): readable, and its
# ceiling in ms, the instant the bucket is full again, needs no division.
#
# KEYS[1]: the bucket hash. ARGV[1]: "1" to take (acquire), "0" to look (peek). Then two per
# limit: its field, and its numbers in one string (fewer arguments to encode and send):
# scale (hi, lo), tolerance (4 limbs), cost (4 limbs). Replies {allowed, TIME
# seconds, TIME microseconds, the stored TAT of each limit or nil}; the client derives the
# Decision from exactly these. An allowed acquire writes the new TATs and sets the key to
# expire at the first whole millisecond at which every bucket is full (PEXPIREAT: absolute,
# so never early whatever the script's own start time).
_BUCKET_LUA = script_source("bucket.lua")

_LIMB = 1_000_000_000  # the remainder's two limbs: hi * 1e9 + lo
_SCALE_MAX = _LIMB * _LIMB  # the remainder must fit two limbs
_MS_MAX = 2**50  # milliseconds stay exact far beyond any clock reading plus this
_ARGS_CACHE = 64  # script arguments kept per (cost, take): most callers use one or two costs


def _limbs(units: int, scale: int) -> tuple[int, int, int, int]:
    """``units`` (1/scale ns) as the script's four limbs: ms, ns, remainder hi, lo."""
    ns, remainder = divmod(units, scale)
    ms, ns = divmod(ns, 1_000_000)
    hi, lo = divmod(remainder, _LIMB)
    return ms, ns, hi, lo


@dataclass(frozen=True, slots=True)
class RedisLimiterStats:
    """An immutable snapshot of a Redis limiter's counters (this instance's calls only)."""

    allowed: int
    """Requests allowed by a decision of the script (acquire)."""
    denied: int
    """Requests refused by a decision of the script (acquire)."""
    degraded: int
    """Decisions (acquire or peek) answered by ``on_error`` because Redis failed."""
    errors: int
    """Redis faults met, ``on_error="raise"`` ones included."""


class _Limiter(Connected[C, S]):
    """Shared by the sync and async limiters: validation, script arguments, decisions."""

    _SUFFIX = "bucket"

    __slots__ = (
        "_args",
        "_buckets",
        "_counts",
        "_faults",
        "_fields",
        "_on_error",
        "_script",
        "_static",
    )

    @overload
    def __init__(
        self,
        client: C,
        rate: Number,
        capacity: int,
        *,
        prefix: str = "ttlstore",
        on_error: OnError = "allow",
    ) -> None: ...
    @overload
    def __init__(
        self,
        client: C,
        *,
        limits: Iterable[Limit],
        prefix: str = "ttlstore",
        on_error: OnError = "allow",
    ) -> None: ...
    def __init__(
        self,
        client: C,
        rate: Number | None = None,
        capacity: int | None = None,
        *,
        limits: Iterable[Limit] | None = None,
        prefix: str = "ttlstore",
        on_error: OnError = "allow",
    ) -> None:
        if on_error not in ("allow", "deny", "raise"):
            raise ValueError(f"on_error must be 'allow', 'deny' or 'raise', got {on_error!r}")
        # The in-memory limiter's rules and arithmetic (ttlstore._gcra): one model, so both
        # backends validate and decide alike.
        self._buckets: tuple[Bucket, ...] = buckets_of(limits_from(rate, capacity, limits))
        self._fields: list[str] = []
        self._static: list[str] = []  # per limit: scale and tolerance limbs
        for bucket in self._buckets:
            if bucket.scale >= _SCALE_MAX:
                raise ValueError(
                    f"rate {bucket.limit.rate!r} of {bucket.limit!r} needs time units of "
                    f"1/{bucket.scale} ns, finer than the Redis limiter can count exactly"
                )
            tolerance = _limbs(bucket.tolerance, bucket.scale)
            if tolerance[0] > _MS_MAX:
                raise ValueError(f"{bucket.limit!r} takes too long to refill for Redis")
            self._fields.append(f"{bucket.interval}/{bucket.scale}:{bucket.limit.capacity}")
            self._static.append(" ".join(map(str, (*divmod(bucket.scale, _LIMB), *tolerance))))
        self._args: dict[tuple[int, bool], list[str]] = {}
        super().__init__(client, prefix)
        self._on_error: OnError = on_error
        self._faults = FaultLog(type(self).__name__)
        self._counts = Tally("allowed", "denied", "degraded")
        self._script: S = self._register(_BUCKET_LUA)

    # ------------------------------------------------------------------ shared steps

    def _call(self, key: str, cost: int, take: bool) -> tuple[list[str], list[str], int]:
        """KEYS and ARGV of the bucket script, and ``cost`` checked (``key`` too)."""
        name = self._key(key)
        # Only a plain int hits the cache: True and 1.0 hash like 1 but must be refused.
        args = self._args.get((cost, take)) if type(cost) is int else None
        if args is None:
            cost = check_cost(self._buckets, cost)
            args = ["1" if take else "0"]
            for field, static, bucket in zip(
                self._fields, self._static, self._buckets, strict=True
            ):
                limbs = _limbs(cost * bucket.interval, bucket.scale)
                args += (field, f"{static} {' '.join(map(str, limbs))}")
            if len(self._args) >= _ARGS_CACHE:
                self._args.clear()
            self._args[cost, take] = args
        return [name], args, cost

    def _decision(self, reply: Any, cost: int, take: bool) -> Decision:
        """The Decision for the script's reply: same instant, same TATs, in-memory arithmetic."""
        allowed, seconds, micros, *stored = reply
        now = int(seconds) * _NS + int(micros) * 1000
        state = tuple(
            _tat(value, bucket.scale) for value, bucket in zip(stored, self._buckets, strict=True)
        )
        decision = decide(self._buckets, state, now, cost, take)[0]
        if decision.allowed != (allowed == 1):
            raise RuntimeError(
                f"the Redis script and the limiter disagree on {reply!r} (a bug in ttlstore)"
            )
        if take:
            self._counts.add("allowed" if decision.allowed else "denied")
        return decision

    def _failed(self, error: BaseException, cost: int) -> Decision:
        """The ``on_error`` answer to a Redis fault: a degraded decision, or raise."""
        if isinstance(error, ResponseError) and not str(error).startswith(TRANSIENT_REPLIES):
            raise error
        policy = self._on_error
        self._faults.log(error, _POLICY_ACTIONS[policy])
        if policy == "raise":
            raise BackendUnavailable(
                f"Redis failed during a rate-limit decision: {describe(error)}"
            ) from error
        self._counts.add("degraded")
        limit = self._buckets[0].limit
        if policy == "allow":
            return Decision(
                True, limit.capacity - cost, 0.0, 0.0, 0.0, limit, degraded=describe(error)
            )
        wait = _DEGRADED_WAIT
        return Decision(False, 0, wait, wait, wait, limit, degraded=describe(error))

    # ------------------------------------------------------------------ introspection

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every key is held to."""
        return tuple(bucket.limit for bucket in self._buckets)

    @property
    def on_error(self) -> OnError:
        """The policy on Redis faults: ``"allow"``, ``"deny"`` or ``"raise"``."""
        return self._on_error

    @property
    def errors(self) -> int:
        """Redis faults met so far (each answered by ``on_error``)."""
        return self._faults.count

    def stats(self) -> RedisLimiterStats:
        """An immutable snapshot of this instance's counters; no round trip. O(1)."""
        counts = self._counts.snapshot()
        return RedisLimiterStats(**counts, errors=self._faults.count)

    def __repr__(self) -> str:
        limits = ", ".join(f"{limit.capacity}@{limit.rate}/s" for limit in self.limits)
        return (
            f"<{type(self).__name__} limits=[{limits}] prefix={self._prefix!r} "
            f"on_error={self._on_error!r}>"
        )


def _tat(value: object, scale: int) -> int:
    """A stored TAT (``"<ns>:<remainder>"``) in units; 0 (long past: full) when absent."""
    if value is None:
        return 0
    ns, _, remainder = text(value).partition(":")
    return int(ns) * scale + int(remainder)


class RedisTokenBucketLimiter(_Limiter[redis.Redis | redis.cluster.RedisCluster, Script]):
    """Token buckets shared through Redis (``redis.Redis``): a :class:`Limiter` for replicas.

    Same constructor and decisions as :class:`~ttlstore.ratelimit.TokenBucketLimiter`:
    ``RedisTokenBucketLimiter(client, rate, capacity)`` or ``(client, limits=[...])``; several
    limits are all-or-nothing. Time comes from the Redis server. Every instance with the same
    ``prefix`` and limits shares the buckets; give differently configured limiters their own
    prefix (each would cut the other's key expiry short).

    :param client: a ``redis.Redis`` with bounded ``socket_timeout``/``socket_connect_timeout``.
    :param prefix: the first part of every key (no braces).
    :param on_error: on a Redis fault, ``"allow"`` or ``"deny"`` (a decision whose
        ``degraded`` describes the fault, logged) or ``"raise"`` (:class:`BackendUnavailable`).

    Each call is one round trip; there is no ``maxsize``: Redis holds only buckets in debt,
    each expiring when full again.
    """

    _ASYNC = False
    __slots__ = ()

    def acquire(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every bucket of ``key`` if all have enough; else none.

        ``ValueError`` at once if ``cost`` exceeds a limit's capacity. One round trip.
        """
        keys, args, cost = self._call(key, cost, True)
        try:
            reply = self._script(keys, args)
        except FAILURES as error:
            return self._failed(error, cost)
        return self._decision(reply, cost, True)

    def try_acquire(self, key: str, cost: int = 1) -> bool:
        """Whether ``cost`` tokens were taken from ``key``, as :meth:`acquire` does."""
        return self.acquire(key, cost).allowed

    def peek(self, key: str, cost: int = 1) -> Decision:
        """What :meth:`acquire` would answer now, taking nothing. One round trip."""
        keys, args, cost = self._call(key, cost, False)
        try:
            reply = self._script(keys, args)
        except FAILURES as error:
            return self._failed(error, cost)
        return self._decision(reply, cost, False)

    def reset(self, key: str) -> None:
        """Forget ``key``'s buckets: it starts full. :class:`BackendUnavailable` on a fault."""
        name = self._key(key)
        try:
            self._client.delete(name)
        except FAILURES as error:
            raise BackendUnavailable(
                f"Redis failed to reset {name!r}: {describe(error)}"
            ) from error

    def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Acquire, sleeping (blocking this thread) each refusal's ``retry_after``.

        :class:`~ttlstore.ratelimit.RateLimited` at once when the wait would end after
        ``timeout`` seconds.
        """
        return wait_sync(self.acquire, key, cost, check_timeout(timeout))


class AsyncRedisTokenBucketLimiter(
    _Limiter[redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster, AsyncScript]
):
    """:class:`RedisTokenBucketLimiter` on ``redis.asyncio.Redis``: an :class:`AsyncLimiter`."""

    _ASYNC = True
    __slots__ = ()

    async def acquire(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every bucket of ``key`` if all have enough; else none."""
        keys, args, cost = self._call(key, cost, True)
        try:
            reply = await self._script(keys, args)
        except FAILURES as error:
            return self._failed(error, cost)
        return self._decision(reply, cost, True)

    async def try_acquire(self, key: str, cost: int = 1) -> bool:
        """Whether ``cost`` tokens were taken from ``key``, as :meth:`acquire` does."""
        return (await self.acquire(key, cost)).allowed

    async def peek(self, key: str, cost: int = 1) -> Decision:
        """What :meth:`acquire` would answer now, taking nothing."""
        keys, args, cost = self._call(key, cost, False)
        try:
            reply = await self._script(keys, args)
        except FAILURES as error:
            return self._failed(error, cost)
        return self._decision(reply, cost, False)

    async def reset(self, key: str) -> None:
        """Forget ``key``'s buckets: it starts full. :class:`BackendUnavailable` on a fault."""
        name = self._key(key)
        try:
            await self._client.delete(name)
        except FAILURES as error:
            raise BackendUnavailable(
                f"Redis failed to reset {name!r}: {describe(error)}"
            ) from error

    async def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Acquire, sleeping on the loop each refusal's ``retry_after``, until allowed.

        :class:`~ttlstore.ratelimit.RateLimited` at once when the wait would end after
        ``timeout`` seconds; cancelling while asleep takes nothing.
        """
        return await wait_async(self.acquire, key, cost, check_timeout(timeout))
