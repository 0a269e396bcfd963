"""Redis backends for several replicas: shared token buckets and shared idempotency keys.

Install with ``pip install 'ttlstore[redis]'`` (redis-py). Four classes implement the protocols
the in-memory adapters implement, so the middlewares and decorators take either:

==================================  ========================================================
:class:`RedisTokenBucketLimiter`    :class:`~ttlstore.ratelimit.Limiter` on ``redis.Redis``
:class:`AsyncRedisTokenBucketLimiter`  :class:`~ttlstore.ratelimit.AsyncLimiter` on
                                    ``redis.asyncio.Redis``
:class:`RedisIdempotencyStore`      :class:`~ttlstore.idempotency.IdempotencyBackend`
:class:`AsyncRedisIdempotencyStore`  :class:`~ttlstore.idempotency.AsyncIdempotencyBackend`
==================================  ========================================================

**One script per operation.** Every operation is one Lua script (``EVALSHA``, loaded again on
``NOSCRIPT`` by redis-py's ``Script``), so it is atomic however many replicas share the server.
The limiter takes the time from Redis ``TIME`` inside the script (no client clock skew) and
decides with the in-memory limiter's exact GCRA arithmetic: a theoretical arrival time (TAT) per
limit, in integer units of ``1/scale`` ns, held in Lua as four limbs (ms, ns, and the
sub-nanosecond remainder in two) so that every number stays an exact integer below 2**53, for
any rate a float, Decimal or Fraction of up to 18 digits can give. The script takes the
decision; the client computes the :class:`~ttlstore.ratelimit.Decision` it returns from the
same instant and the same stored TATs, with the in-memory limiter's code, so both backends
answer alike.

**Key layout.** One key per logical key, its name in a hash tag so that any key a future script
adds for the same logical key lands in the same Redis Cluster slot:

- ``<prefix>:{<key>}:bucket`` -- a hash, one field per limit, named
  ``<ns per token as a fraction>:<capacity>`` (``1000000000/1:5``: 1/s, burst 5), holding that
  limit's TAT as ``<ns since the epoch>:<remainder in 1/scale ns>``. The key expires when every
  bucket in it is full again, rounded up to the millisecond (``PEXPIREAT``, absolute, so never
  early): a full bucket and a missing key decide alike, so Redis keeps only buckets in debt.
- ``<prefix>:{<key>}:idempotency`` -- a hash: ``state`` (``claim`` or ``done``), ``fp``,
  ``token``, and once done ``nonce`` and ``result``; ``PEXPIRE`` is the lease while claimed,
  the ttl once done.

**Failures.** Every Redis or socket error, timeouts included, is a fault. The limiter follows
``on_error``: ``"allow"`` (the default: fail open) and ``"deny"`` return a
:class:`~ttlstore.ratelimit.Decision` whose ``degraded`` describes the fault; ``"raise"`` raises
:class:`BackendUnavailable`. Faults are logged on
logger ``ttlstore``, at most once per 10 s per instance with a count. The idempotency store
always raises :class:`BackendUnavailable`, which ``IdempotencyMiddleware`` answers with 503.
How long a fault takes to surface is the client's business: give it bounded timeouts and few
retries (redis-py 8 defaults to 5 s timeouts and 10 retries), e.g.
``redis.Redis(..., socket_timeout=0.25, socket_connect_timeout=0.25,
retry=Retry(NoBackoff(), 1))``, or use ``from_url`` which does so. A retried script whose reply
was lost may have run: ``begin`` and ``complete`` recognise their own retry, an ``acquire``
may count twice (it then errs on the strict side).

**Results** of the idempotency store go through a :class:`Codec`. The default
:class:`JsonCodec` stores ``StoredResponse`` (the middleware) and ``@idempotent`` return values
that JSON carries unchanged; :class:`PickleCodec` stores anything picklable, but unpickling runs
code chosen by whoever can write to the Redis server: opt in only when that is you alone.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import pickle
import secrets
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar, cast, overload

try:
    import redis
    import redis.asyncio
    import redis.asyncio.retry
    import redis.retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript, Script
    from redis.exceptions import RedisError, ResponseError
except ImportError as error:  # the extra is missing
    raise ImportError(
        "ttlstore.redis needs redis-py: install it with pip install 'ttlstore[redis]'"
    ) from error

from ttlstore._checks import positive_seconds
from ttlstore._errors import BackendUnavailable
from ttlstore.idempotency import (
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Started,
    _Raised,
    _Returned,
)
from ttlstore.ratelimit import (
    Decision,
    Limit,
    Number,
    TokenBucketLimiter,
    _check_timeout,
    _wait_async,
    _wait_sync,
)

if TYPE_CHECKING:
    from ttlstore.asgi import StoredResponse

__all__ = [
    "AsyncRedisIdempotencyStore",
    "AsyncRedisTokenBucketLimiter",
    "BackendUnavailable",
    "Codec",
    "JsonCodec",
    "OnError",
    "PickleCodec",
    "RedisIdempotencyStore",
    "RedisTokenBucketLimiter",
]

logger = logging.getLogger("ttlstore")

OnError = Literal["allow", "deny", "raise"]
"""What a limiter answers when Redis fails: allow the request, refuse it, or raise."""

C = TypeVar("C")  # the redis-py client type
S = TypeVar("S")  # the redis-py script type
S_co = TypeVar("S_co", covariant=True)
T = TypeVar("T", bound="_Connected[Any, Any]")

_NS = 1_000_000_000
_DEGRADED_WAIT = 1.0  # seconds a degraded refusal asks the client to wait
_FAULT_LOG_INTERVAL = 10.0
_FAILURES = (RedisError, OSError)  # redis-py wraps socket errors; OSError for the odd one out
# Error replies that say "not now" rather than "never": the failure policies apply to these.
# Any other error reply (WRONGTYPE on a foreign key, a script bug) is raised as it is, since
# failing open on it would hide it forever.
_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


# ====================================================================== shared plumbing


def _text(value: object) -> str:
    """A reply element as str, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _as_bytes(value: object) -> bytes:
    """A reply element as bytes, whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected a bulk string reply from Redis, got {value!r}")


def _describe(error: BaseException) -> str:
    """``Type: message`` (redis-py 8's exception repr drops the message)."""
    return f"{type(error).__name__}: {error}"


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r}")
    if not prefix or "{" in prefix or "}" in prefix:
        # A brace in the prefix would become every key's hash tag: one Cluster slot for all.
        raise ValueError(f"prefix must be a non-empty str without braces, got {prefix!r}")
    return prefix


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {key!r}")
    return key


def _hash_tag(key: str) -> str:
    """``key`` with its braces escaped (injectively), so that the whole key is the Cluster hash
    tag: a ``}`` in it would otherwise end the tag early and skew keys onto one slot."""
    if "{" not in key and "}" not in key and "\\" not in key:
        return key  # the common case; an escaped key always holds a backslash, this one none
    return key.replace("\\", "\\\\").replace("{", "\\(").replace("}", "\\)")


def _millis(name: str, seconds: object) -> int:
    """Positive finite ``seconds`` as whole milliseconds, rounded up; errors name ``name``."""
    return max(1, math.ceil(positive_seconds(name, seconds) * 1000))


def _unbounded(client: object) -> bool:
    """Whether ``client`` says it reads without a timeout (False when it does not say)."""
    get = getattr(client, "get_connection_kwargs", None)  # Redis, asyncio Redis; not Cluster
    try:
        kwargs = get() if callable(get) else None
    except Exception:
        return False
    return (
        isinstance(kwargs, dict) and "socket_timeout" in kwargs and kwargs["socket_timeout"] is None
    )


class _FaultLog:
    """Counts Redis faults and logs them on ``ttlstore``, at most once per interval."""

    __slots__ = ("_lock", "_next", "_pending", "count", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._pending = 0
        self._next = 0.0
        self._lock = threading.Lock()

    def __call__(self, error: BaseException, action: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.count += 1
            self._pending += 1
            if now < self._next:
                return
            self._next = now + _FAULT_LOG_INTERVAL
            pending, self._pending = self._pending, 0
        logger.warning(
            "%s: Redis failed (%d fault(s) since the last report): %s; %s",
            self.what,
            pending,
            _describe(error),
            action,
            exc_info=error,
        )


class _Scripting(Protocol[S_co]):
    """A redis-py client (sync or asyncio, standalone or Cluster): it can register scripts."""

    def register_script(self, script: str) -> S_co: ...


class _Connected(Generic[C, S]):
    """What both backends share: the client, the key prefix, and ``from_url``."""

    _ASYNC: ClassVar[bool]
    _SUFFIX: ClassVar[str]
    __slots__ = ("_client", "_prefix")

    def __init__(self, client: C, prefix: str) -> None:
        if not callable(getattr(client, "register_script", None)):
            raise TypeError(f"client must be a redis-py client, got {client!r}")
        self._client = client
        self._prefix = _check_prefix(prefix)
        if _unbounded(client):
            logger.warning(
                "%s: the Redis client has no socket_timeout, so a server that stops answering "
                "blocks every call; pass socket_timeout= and socket_connect_timeout=",
                type(self).__name__,
            )

    def _register(self, source: str) -> S:
        return cast("_Scripting[S]", self._client).register_script(source)

    def _key(self, key: str) -> str:
        return f"{self._prefix}:{{{_hash_tag(_check_key(key))}}}:{self._SUFFIX}"

    @property
    def client(self) -> C:
        """The redis-py client (close it when done if ``from_url`` made it)."""
        return self._client

    @property
    def prefix(self) -> str:
        """The prefix of every key written."""
        return self._prefix

    @classmethod
    def from_url(
        cls: type[T], url: str, *args: Any, timeout: float = 0.25, retries: int = 1, **kwargs: Any
    ) -> T:
        """An instance on a new client for ``url`` with bounded timeouts.

        The client gets ``socket_timeout`` and ``socket_connect_timeout`` of ``timeout``
        seconds and ``retries`` immediate retries (one covers a pooled connection the server
        closed), so a failing call surfaces within about ``(retries + 1) * 2 * timeout``.
        ``args`` and ``kwargs`` go to the constructor. The caller closes :attr:`client`.
        """
        timeout = positive_seconds("timeout", timeout)
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be a non-negative int, got {retries!r}")
        if retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        client: Any
        if cls._ASYNC:
            client = redis.asyncio.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=redis.asyncio.retry.Retry(NoBackoff(), retries),
            )
        else:
            client = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=redis.retry.Retry(NoBackoff(), retries),
            )
        return cls(client, *args, **kwargs)


# ====================================================================== token buckets

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
_BUCKET_LUA = """
local B, M = 1000000000, 1000000
local function add(a, b, sh, sl)
  local rh, rl = a[3] + b[3], a[4] + b[4]
  if rl >= B then rh, rl = rh + 1, rl - B end
  local ns = a[2] + b[2]
  if rh > sh or (rh == sh and rl >= sl) then
    rh, rl, ns = rh - sh, rl - sl, ns + 1
    if rl < 0 then rh, rl = rh - 1, rl + B end
  end
  local ms = a[1] + b[1]
  if ns >= M then ms, ns = ms + 1, ns - M end
  return {ms, ns, rh, rl}
end
local function less(a, b)
  for j = 1, 4 do
    if a[j] ~= b[j] then return a[j] < b[j] end
  end
  return false
end
-- Redis 5 and 6 may replicate scripts verbatim, which forbids a write after TIME.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
             (tonumber(t[2]) % 1000) * 1000, 0, 0}
local n = (#ARGV - 1) / 2
local fields, writes = {}, {}
for i = 1, n do fields[i] = ARGV[2 * i] end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))
local reply = {0, t[1], t[2]}
local allowed, full = true, 0
for i = 1, n do
  local v = {}
  for x in string.gmatch(ARGV[2 * i + 1], '%d+') do v[#v + 1] = tonumber(x) end
  local sh, sl = v[1], v[2]
  local tat = now
  local s = stored[i]
  reply[3 + i] = s
  if s then
    local ns, r = string.match(s, '^(%d+):(%d+)$')
    local old = {tonumber(string.sub(ns, 1, -7)) or 0, tonumber(string.sub(ns, -6)),
                 tonumber(string.sub(r, 1, -10)) or 0, tonumber(string.sub(r, -9))}
    if less(now, old) then tat = old end
  end
  local new = add(tat, {v[7], v[8], v[9], v[10]}, sh, sl)
  if less(add(now, {v[3], v[4], v[5], v[6]}, sh, sl), new) then allowed = false end
  local at = new[1]
  if new[2] > 0 or new[3] > 0 or new[4] > 0 then at = at + 1 end
  if at > full then full = at end
  local rest = string.format('%.0f', new[4])
  if new[3] > 0 then rest = string.format('%.0f%09.0f', new[3], new[4]) end
  writes[2 * i - 1] = fields[i]
  writes[2 * i] = string.format('%.0f%06.0f:', new[1], new[2]) .. rest
end
if allowed then
  reply[1] = 1
  if ARGV[1] == '1' then
    redis.call('HSET', KEYS[1], unpack(writes))
    redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', full))
  end
end
return reply
"""

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


class _Limiter(_Connected[C, S]):
    """Shared by the sync and async limiters: validation, script arguments, decisions."""

    _SUFFIX = "bucket"

    __slots__ = ("_args", "_faults", "_fields", "_model", "_on_error", "_script", "_static")

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
        # The in-memory limiter validates the limits and does the arithmetic: one model of the
        # rules, so both backends decide alike. Its store is never used.
        self._model: TokenBucketLimiter = cast(Any, TokenBucketLimiter)(
            rate, capacity, limits=limits, maxsize=1, threadsafe=False
        )
        self._fields: list[str] = []
        self._static: list[str] = []  # per limit: scale and tolerance limbs
        for bucket in self._model._buckets:
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
        self._faults = _FaultLog(type(self).__name__)
        self._script: S = self._register(_BUCKET_LUA)

    # ------------------------------------------------------------------ shared steps

    def _call(self, key: str, cost: int, take: bool) -> tuple[list[str], list[str], int]:
        """KEYS and ARGV of the bucket script, and ``cost`` checked (``key`` too)."""
        name = self._key(key)
        # Only a plain int hits the cache: True and 1.0 hash like 1 but must be refused.
        args = self._args.get((cost, take)) if type(cost) is int else None
        if args is None:
            cost = self._model._check_cost(cost)
            args = ["1" if take else "0"]
            for field, static, bucket in zip(
                self._fields, self._static, self._model._buckets, strict=True
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
            _tat(value, bucket.scale)
            for value, bucket in zip(stored, self._model._buckets, strict=True)
        )
        decision = self._model._decide(state, now, cost, take)[0]
        if decision.allowed != (allowed == 1):
            raise RuntimeError(
                f"the Redis script and the limiter disagree on {reply!r} (a bug in ttlstore)"
            )
        return decision

    def _failed(self, error: BaseException, cost: int) -> Decision:
        """The ``on_error`` answer to a Redis fault: a degraded decision, or raise."""
        if isinstance(error, ResponseError) and not str(error).startswith(_TRANSIENT_REPLIES):
            raise error
        policy = self._on_error
        self._faults(error, {"allow": "allowing", "deny": "denying", "raise": "raising"}[policy])
        if policy == "raise":
            raise BackendUnavailable(
                f"Redis failed during a rate-limit decision: {_describe(error)}"
            ) from error
        limit = self._model.limits[0]
        if policy == "allow":
            return Decision(
                True, limit.capacity - cost, 0.0, 0.0, 0.0, limit, degraded=_describe(error)
            )
        wait = _DEGRADED_WAIT
        return Decision(False, 0, wait, wait, wait, limit, degraded=_describe(error))

    # ------------------------------------------------------------------ introspection

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every key is held to."""
        return self._model.limits

    @property
    def on_error(self) -> OnError:
        """The policy on Redis faults: ``"allow"``, ``"deny"`` or ``"raise"``."""
        return self._on_error

    @property
    def errors(self) -> int:
        """Redis faults met so far (each answered by ``on_error``)."""
        return self._faults.count

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
    ns, _, remainder = _text(value).partition(":")
    return int(ns) * scale + int(remainder)


class RedisTokenBucketLimiter(_Limiter[redis.Redis, Script]):
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
        except _FAILURES as error:
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
        except _FAILURES as error:
            return self._failed(error, cost)
        return self._decision(reply, cost, False)

    def reset(self, key: str) -> None:
        """Forget ``key``'s buckets: it starts full. :class:`BackendUnavailable` on a fault."""
        name = self._key(key)
        try:
            self._client.delete(name)
        except _FAILURES as error:
            raise BackendUnavailable(
                f"Redis failed to reset {name!r}: {_describe(error)}"
            ) from error

    def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Acquire, sleeping (blocking this thread) each refusal's ``retry_after``.

        :class:`~ttlstore.ratelimit.RateLimited` at once when the wait would end after
        ``timeout`` seconds.
        """
        return _wait_sync(self.acquire, key, cost, _check_timeout(timeout))


class AsyncRedisTokenBucketLimiter(_Limiter[redis.asyncio.Redis, AsyncScript]):
    """:class:`RedisTokenBucketLimiter` on ``redis.asyncio.Redis``: an :class:`AsyncLimiter`."""

    _ASYNC = True
    __slots__ = ()

    async def acquire(self, key: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every bucket of ``key`` if all have enough; else none."""
        keys, args, cost = self._call(key, cost, True)
        try:
            reply = await self._script(keys, args)
        except _FAILURES as error:
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
        except _FAILURES as error:
            return self._failed(error, cost)
        return self._decision(reply, cost, False)

    async def reset(self, key: str) -> None:
        """Forget ``key``'s buckets: it starts full. :class:`BackendUnavailable` on a fault."""
        name = self._key(key)
        try:
            await self._client.delete(name)
        except _FAILURES as error:
            raise BackendUnavailable(
                f"Redis failed to reset {name!r}: {_describe(error)}"
            ) from error

    async def wait(self, key: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Acquire, sleeping on the loop each refusal's ``retry_after``, until allowed.

        :class:`~ttlstore.ratelimit.RateLimited` at once when the wait would end after
        ``timeout`` seconds; cancelling while asleep takes nothing.
        """
        return await _wait_async(self.acquire, key, cost, _check_timeout(timeout))


# ====================================================================== result codecs


class Codec(Protocol):
    """Turns stored idempotency results into bytes and back."""

    def encode(self, result: Any) -> bytes:
        """``result`` as bytes; ``TypeError`` if this codec cannot carry it."""
        ...

    def decode(self, data: bytes) -> Any:
        """The result that :meth:`encode` turned into ``data``."""
        ...


@functools.cache
def _stored_response_type() -> type[StoredResponse] | None:
    """``ttlstore.asgi.StoredResponse`` if the ``asgi`` extra is installed, else None."""
    try:
        from ttlstore.asgi import StoredResponse
    except ImportError:
        return None
    return StoredResponse


def _same_json(a: object, b: object) -> bool:
    """Whether ``b`` (decoded JSON) is ``a`` exactly, types included (no tuple -> list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    return a == b


class JsonCodec:
    """The default codec: JSON, safe to read whoever wrote it.

    Carries a ``StoredResponse`` (headers as Latin-1, body as base64), and values that JSON
    gives back unchanged (``None``, bool, int, float, str, and lists and str-keyed dicts of
    them), bare or as ``@idempotent`` return values. Anything else, a tuple, a stored exception
    (``store_errors=True``), is refused with ``TypeError`` rather than returned altered.
    """

    __slots__ = ()

    def encode(self, result: Any) -> bytes:
        """``result`` as ASCII JSON; ``TypeError`` if JSON would not give it back unchanged."""
        response = _stored_response_type()
        if response is not None and isinstance(result, response):
            doc: dict[str, Any] = {
                "t": "response",
                "status": result.status,
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in result.headers],
                "body": base64.b64encode(result.body).decode("ascii"),
            }
        elif isinstance(result, _Raised):
            raise TypeError(
                f"JsonCodec cannot store the exception {result.error!r} (store_errors=True); "
                "use codec=PickleCodec() if only trusted code can write to this Redis"
            )
        elif isinstance(result, _Returned):
            doc = {"t": "returned", "value": self._exact(result.value)}
        else:
            doc = {"t": "json", "value": self._exact(result)}
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @staticmethod
    def _exact(value: Any) -> Any:
        try:
            back = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):
            back = _NOT_JSON
        if not _same_json(value, back):
            raise TypeError(
                f"JsonCodec cannot store {value!r}: JSON would not give it back unchanged; "
                "return JSON types (dict with str keys, list, str, int, float, bool, None) "
                "or pass another codec"
            )
        return value

    def decode(self, data: bytes) -> Any:
        """The result :meth:`encode` wrote; ``ValueError`` for data it did not write."""
        doc = json.loads(data)
        kind = doc.get("t") if isinstance(doc, dict) else None
        if kind == "json":
            return doc["value"]
        if kind == "returned":
            return _Returned(doc["value"])
        if kind == "response":
            response = _stored_response_type()
            if response is None:
                raise ValueError(
                    "a stored response needs ttlstore.asgi: pip install 'ttlstore[asgi]'"
                )
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in doc["headers"])
            return response(doc["status"], headers, base64.b64decode(doc["body"]))
        raise ValueError(f"JsonCodec did not write {data[:80]!r}")

    def __repr__(self) -> str:
        return "JsonCodec()"


_NOT_JSON = object()


class PickleCodec:
    """Any picklable result, exceptions included (base64 text, so decoded clients work).

    **Unsafe unless only trusted code can write to the Redis server**: unpickling runs
    whatever the bytes say, so anyone who can write a key runs code in every replica that
    replays it. Opt in with ``codec=PickleCodec()``.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if isinstance(protocol, bool) or not isinstance(protocol, int):
            raise TypeError(f"protocol must be an int, got {protocol!r}")
        if not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"protocol must be 0..{pickle.HIGHEST_PROTOCOL}, got {protocol!r}")
        self.protocol = protocol

    def encode(self, result: Any) -> bytes:
        """``result`` pickled and base64-encoded; ``TypeError`` if it cannot be pickled."""
        try:
            data = pickle.dumps(result, self.protocol)
        except Exception as error:
            raise TypeError(f"PickleCodec cannot pickle {result!r}: {error}") from error
        return base64.b64encode(data)

    def decode(self, data: bytes) -> Any:
        """The unpickled result (runs code: trusted writers only)."""
        return pickle.loads(base64.b64decode(data))

    def __repr__(self) -> str:
        return f"PickleCodec(protocol={self.protocol})"


# ====================================================================== idempotency keys

# KEYS[1]: the key's hash. ARGV: fingerprint, token, lease ms. A begin that finds its own token
# is redis-py retrying this very call after a lost reply: it still owns the claim.
_BEGIN_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'fp', 'token', 'result')
if h[1] then
  if h[2] ~= ARGV[1] then return {'mismatch'} end
  if h[1] == 'done' then return {'replay', h[4]} end
  if h[3] == ARGV[2] then return {'started'} end
  return {'in_progress'}
end
redis.call('HSET', KEYS[1], 'state', 'claim', 'fp', ARGV[1], 'token', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'started'}
"""

# ARGV: token, call nonce, encoded result, ttl ms. The nonce tells redis-py's retry of this
# call (already done: 1) from a second complete() by the same owner (0, as in memory).
_COMPLETE_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'token', 'nonce')
if h[2] ~= ARGV[1] then return 0 end
if h[1] == 'done' then
  if h[3] == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'nonce', ARGV[2], 'result', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# ARGV: token.
_RELEASE_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'token')
if h[1] ~= 'claim' or h[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

_IN_PROGRESS = InProgress()
_MISMATCH = Mismatch()


class _Idempotency(_Connected[C, S]):
    """Shared by the sync and async idempotency stores: arguments, outcomes, errors."""

    _SUFFIX = "idempotency"

    __slots__ = ("_begin", "_codec", "_complete", "_lease", "_release", "_ttl")

    def __init__(
        self,
        client: C,
        *,
        ttl: float = 3600,
        lease: float = 60,
        prefix: str = "ttlstore",
        codec: Codec | None = None,
    ) -> None:
        self._ttl = _millis("ttl", ttl)
        self._lease = _millis("lease", lease)
        if codec is None:
            codec = JsonCodec()
        elif not (
            callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
        ):
            raise TypeError(f"codec must have encode() and decode() methods, got {codec!r}")
        self._codec = codec
        super().__init__(client, prefix)
        self._begin: S = self._register(_BEGIN_LUA)
        self._complete: S = self._register(_COMPLETE_LUA)
        self._release: S = self._register(_RELEASE_LUA)

    def _begin_call(self, key: str, fingerprint: str) -> tuple[list[str], list[str | int], str]:
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {fingerprint!r}")
        token = secrets.token_hex(16)
        return [self._key(key)], [fingerprint, token, self._lease], token

    def _outcome(self, reply: Any, token: str) -> Outcome[Any]:
        kind = _text(reply[0])
        if kind == "started":
            return Started(token)
        if kind == "replay":
            return Replay(self._codec.decode(_as_bytes(reply[1])))
        if kind == "in_progress":
            return _IN_PROGRESS
        if kind == "mismatch":
            return _MISMATCH
        raise RuntimeError(f"the Redis begin script answered {reply!r} (a bug in ttlstore)")

    def _complete_call(self, key: str, token: str, data: bytes) -> tuple[list[str], list[Any]]:
        return [self._key(key)], [_check_token(token), secrets.token_hex(8), data, self._ttl]

    def _release_call(self, key: str, token: str) -> tuple[list[str], list[Any]]:
        return [self._key(key)], [_check_token(token)]

    def _unavailable(self, what: str, key: str, error: BaseException) -> BackendUnavailable:
        return BackendUnavailable(
            f"Redis failed to {what} idempotency key {key!r}: {_describe(error)}"
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

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} ttl={self.ttl:g} lease={self.lease:g} "
            f"prefix={self._prefix!r} codec={self._codec!r}>"
        )


def _check_token(token: object) -> str:
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {token!r}")
    return token


class RedisIdempotencyStore(_Idempotency[redis.Redis, Script]):
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

    A Redis fault raises :class:`BackendUnavailable` (the middleware answers 503). The ASGI
    middleware calls a sync backend inline on the event loop: use
    :class:`AsyncRedisIdempotencyStore` there.
    """

    _ASYNC = False
    __slots__ = ()

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        """Claim ``key`` for a request with ``fingerprint``, or say why not. One round trip."""
        keys, args, token = self._begin_call(key, fingerprint)
        try:
            reply = self._begin(keys, args)
        except _FAILURES as error:
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
        except _FAILURES as error:
            raise self._unavailable("complete", key, error) from error

    def release(self, key: str, token: str) -> bool:
        """End the claim without storing anything, if ``token`` still owns ``key``."""
        keys, args = self._release_call(key, token)
        try:
            return bool(self._release(keys, args))
        except _FAILURES as error:
            raise self._unavailable("release", key, error) from error


class AsyncRedisIdempotencyStore(_Idempotency[redis.asyncio.Redis, AsyncScript]):
    """:class:`RedisIdempotencyStore` on ``redis.asyncio.Redis``: an ``AsyncIdempotencyBackend``
    for ``IdempotencyMiddleware`` and async ``@idempotent`` functions."""

    _ASYNC = True
    __slots__ = ()

    async def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        """Claim ``key`` for a request with ``fingerprint``, or say why not. One round trip."""
        keys, args, token = self._begin_call(key, fingerprint)
        try:
            reply = await self._begin(keys, args)
        except _FAILURES as error:
            raise self._unavailable("begin", key, error) from error
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
        except _FAILURES as error:
            raise self._unavailable("complete", key, error) from error

    async def release(self, key: str, token: str) -> bool:
        """End the claim without storing anything, if ``token`` still owns ``key``."""
        keys, args = self._release_call(key, token)
        try:
            return bool(await self._release(keys, args))
        except _FAILURES as error:
            raise self._unavailable("release", key, error) from error
