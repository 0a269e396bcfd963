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

try:
    import redis  # noqa: F401  (checked here so the error names the extra)
except ImportError as error:  # the extra is missing
    raise ImportError(
        "ttlstore.redis needs redis-py: install it with pip install 'ttlstore[redis]'"
    ) from error

from ttlstore._errors import BackendUnavailable
from ttlstore.redis.codecs import Codec, JsonCodec, PickleCodec
from ttlstore.redis.idempotency import (
    AsyncRedisIdempotencyStore,
    RedisIdempotencyStats,
    RedisIdempotencyStore,
)
from ttlstore.redis.limiter import (
    AsyncRedisTokenBucketLimiter,
    OnError,
    RedisLimiterStats,
    RedisTokenBucketLimiter,
)

__all__ = [
    "AsyncRedisIdempotencyStore",
    "AsyncRedisTokenBucketLimiter",
    "BackendUnavailable",
    "Codec",
    "JsonCodec",
    "OnError",
    "PickleCodec",
    "RedisIdempotencyStats",
    "RedisIdempotencyStore",
    "RedisLimiterStats",
    "RedisTokenBucketLimiter",
]
