"""The adapter contract, run against every backend: in-memory, and Redis (sync and asyncio) on a
standalone server and on a Redis Cluster of three masters with a replica each.

Each test gets a backend through a harness that hands out *replicas*: handles that share state
the way two processes of one service would (the same in-memory object; two Redis clients on
one server or Cluster and prefix). The tests are written once, as coroutines; a sync backend's
calls are made inline. Refill is kept negligible with slow rates, so real clocks do not change
a count.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from fractions import Fraction
from typing import Any

import pytest

from ttlstore.idempotency import (
    IdempotencyStore,
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Started,
)
from ttlstore.ratelimit import Decision, Limit, TokenBucketLimiter

SLOW = Fraction(1, 1000)  # one token per 1000 s: no refill during a test
BACKENDS = ["memory", "redis", "redis-async", "cluster", "cluster-async"]


async def _settle(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


# ====================================================================== harnesses


class LimiterHandle:
    """One replica's view of a limiter, called the same way whatever the backend."""

    def __init__(
        self,
        limiter: Any,
        ttl_ms: Callable[[str], float | None],
        clock_ms: Callable[[], float],
        deadline_ms: Callable[[str], float],
    ) -> None:
        self.limiter = limiter
        self._ttl_ms = ttl_ms
        self.clock_ms = clock_ms
        """The backend's clock, in ms (Redis: TIME)."""
        self.deadline_ms = deadline_ms
        """When the key's stored state expires, on that clock, in ms (Redis: PEXPIRETIME)."""

    async def acquire(self, key: str, cost: int = 1) -> Decision:
        decision: Decision = await _settle(self.limiter.acquire(key, cost))
        return decision

    async def peek(self, key: str, cost: int = 1) -> Decision:
        decision: Decision = await _settle(self.limiter.peek(key, cost))
        return decision

    async def reset(self, key: str) -> None:
        await _settle(self.limiter.reset(key))

    def ttl_ms(self, key: str) -> float | None:
        """Milliseconds until the key's stored state expires, None if nothing is stored."""
        return self._ttl_ms(key)


class IdempotencyHandle:
    """One replica's view of an idempotency backend."""

    def __init__(self, store: Any, ttl_ms: Callable[[str], float | None]) -> None:
        self.store = store
        self._ttl_ms = ttl_ms

    async def begin(self, key: str, fingerprint: str = "fp") -> Outcome[Any]:
        outcome: Outcome[Any] = await _settle(self.store.begin(key, fingerprint))
        return outcome

    async def claim(self, key: str, fingerprint: str = "fp") -> str:
        outcome = await self.begin(key, fingerprint)
        assert isinstance(outcome, Started), outcome
        return outcome.token

    async def complete(self, key: str, token: str, result: Any) -> bool:
        return bool(await _settle(self.store.complete(key, token, result)))

    async def release(self, key: str, token: str) -> bool:
        return bool(await _settle(self.store.release(key, token)))

    def ttl_ms(self, key: str) -> float | None:
        return self._ttl_ms(key)


class Backend:
    """Makes replicas of limiters and idempotency stores on one backend, and lists TTLs."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self._closers: list[Callable[[], Awaitable[None] | None]] = []
        self._memory: list[Any] = []
        self.admin: Any = None
        if url is not None:
            import redis
            import redis.cluster

            admin = redis.cluster.RedisCluster if kind.startswith("cluster") else redis.Redis
            self.admin = admin.from_url(url, socket_timeout=5)
            self._closers.append(self.admin.close)

    def _client(self) -> Any:
        import redis
        import redis.asyncio
        import redis.asyncio.cluster
        import redis.cluster

        assert self.url is not None
        client: Any
        if self.kind.endswith("-async"):
            factory: Any = (
                redis.asyncio.cluster.RedisCluster
                if self.kind.startswith("cluster")
                else redis.asyncio.Redis
            )
            client = factory.from_url(self.url, socket_timeout=5)
            self._closers.append(client.aclose)
        else:
            factory = redis.cluster.RedisCluster if self.kind == "cluster" else redis.Redis
            client = factory.from_url(self.url, socket_timeout=5)
            self._closers.append(client.close)
        return client

    def _pttl(self, name: str) -> float | None:
        pttl = self.admin.pttl(name)
        assert pttl != -1, f"{name} has no expiry"
        return None if pttl == -2 else float(pttl)

    def limiters(self, *args: Any, **kwargs: Any) -> tuple[LimiterHandle, LimiterHandle]:
        """Two replicas of one limiter."""
        if self.kind == "memory":
            limiter = TokenBucketLimiter(*args, **kwargs)
            self._memory.append(limiter)
            store = limiter.stores[0]

            def memory_ttl(key: str) -> float | None:
                try:
                    seconds = store.ttl(key)
                except KeyError:
                    return None
                assert seconds is not None, f"{key!r} has no expiry"
                return seconds * 1000

            def memory_clock() -> float:
                return time.monotonic() * 1000  # what the limiter reads, as ms

            def memory_deadline(key: str) -> float:
                ttl = memory_ttl(key)
                assert ttl is not None
                # The clock read after the store's own reading: time passing between the two
                # can only push this estimate later. Read before, a thread descheduled between
                # them put the deadline early by that much, past the test's 0.01 ms tolerance.
                return memory_clock() + ttl

            handle = LimiterHandle(limiter, memory_ttl, memory_clock, memory_deadline)
            return handle, handle
        from ttlstore.redis import AsyncRedisTokenBucketLimiter, RedisTokenBucketLimiter

        asynchronous = self.kind.endswith("-async")
        cls: Any = AsyncRedisTokenBucketLimiter if asynchronous else RedisTokenBucketLimiter

        def redis_ttl(key: str) -> float | None:
            return self._pttl(f"{self.prefix}:{{{key}}}:bucket")

        def redis_clock() -> float:
            seconds, micros = self.admin.time()
            return float(seconds * 1000 + micros / 1000)

        def redis_deadline(key: str) -> float:
            return float(self.admin.pexpiretime(f"{self.prefix}:{{{key}}}:bucket"))

        return (
            LimiterHandle(
                cls(self._client(), *args, prefix=self.prefix, **kwargs),
                redis_ttl,
                redis_clock,
                redis_deadline,
            ),
            LimiterHandle(
                cls(self._client(), *args, prefix=self.prefix, **kwargs),
                redis_ttl,
                redis_clock,
                redis_deadline,
            ),
        )

    def idempotency(
        self, ttl: float = 3600, lease: float = 60
    ) -> tuple[IdempotencyHandle, IdempotencyHandle]:
        """Two replicas of one idempotency store."""
        if self.kind == "memory":
            store = IdempotencyStore(ttl=ttl, lease=lease)
            self._memory.append(store)
            records, claims = store.stores

            def memory_ttl(key: str) -> float | None:
                for part in (records, claims):
                    if key in part:
                        seconds = part.ttl(key)
                        assert seconds is not None
                        return seconds * 1000
                return None

            return IdempotencyHandle(store, memory_ttl), IdempotencyHandle(store, memory_ttl)
        from ttlstore.redis import AsyncRedisIdempotencyStore, RedisIdempotencyStore

        cls: Any = (
            AsyncRedisIdempotencyStore if self.kind.endswith("-async") else RedisIdempotencyStore
        )

        def redis_ttl(key: str) -> float | None:
            return self._pttl(f"{self.prefix}:{{{key}}}:idempotency")

        return (
            IdempotencyHandle(
                cls(self._client(), ttl=ttl, lease=lease, prefix=self.prefix), redis_ttl
            ),
            IdempotencyHandle(
                cls(self._client(), ttl=ttl, lease=lease, prefix=self.prefix), redis_ttl
            ),
        )

    def all_ttls_ms(self) -> dict[str, float]:
        """Every key this backend holds (for this test) with its TTL in ms; each must have one."""
        if self.kind == "memory":
            found: dict[str, float] = {}
            for owner in self._memory:
                for store in owner.stores:
                    for key in list(store):
                        seconds = store.ttl(key)
                        assert seconds is not None, f"{key!r} has no expiry"
                        found[str(key)] = seconds * 1000
            return found
        result: dict[str, float] = {}
        for name in self.admin.scan_iter(match=f"{self.prefix}:*"):
            pttl = self.admin.pttl(name)
            result[name.decode()] = float(pttl)
        return result

    async def close(self) -> None:
        for close in reversed(self._closers):
            await _settle(close())


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = None
    if request.param.startswith("redis"):
        url = request.getfixturevalue("redis_server").url
    elif request.param.startswith("cluster"):
        url = request.getfixturevalue("redis_cluster").url
    harness = Backend(request.param, url)
    try:
        yield harness
    finally:
        await harness.close()


# ====================================================================== token buckets


async def test_a_burst_of_capacity_then_a_refusal_that_takes_nothing(backend: Backend) -> None:
    limiter, _ = backend.limiters(SLOW, 5)
    assert [(await limiter.acquire("k")).remaining for _ in range(5)] == [4, 3, 2, 1, 0]
    refused = await limiter.acquire("k")
    assert not refused.allowed and refused.remaining == 0
    assert 999 < refused.retry_after <= 1000  # one token's interval, less the test's own time
    assert 4999 < refused.reset_after <= 5000
    assert (await limiter.peek("k")).remaining == 0


async def test_two_replicas_share_one_bucket_exactly(backend: Backend) -> None:
    first, second = backend.limiters(SLOW, 7)
    seen = []
    for i in range(7):
        decision = await (first if i % 2 else second).acquire("shared")
        assert decision.allowed
        seen.append(decision.remaining)
    assert seen == [6, 5, 4, 3, 2, 1, 0]
    assert not (await first.acquire("shared")).allowed
    assert not (await second.acquire("shared")).allowed
    assert (await first.acquire("other")).remaining == 6  # keys stay apart
    await second.reset("shared")
    assert (await first.acquire("shared")).remaining == 6


async def test_several_limits_are_all_or_nothing(backend: Backend) -> None:
    limiter, replica = backend.limiters(
        limits=[Limit(SLOW, 5, "small"), Limit(Fraction(1, 2000), 8, "big")]
    )
    allowed = await limiter.acquire("k", 4)  # small: 1 left, big: 4 left
    assert allowed.allowed and allowed.remaining == 1 and allowed.limit.name == "small"
    refused = await replica.acquire("k", 4)  # small lacks: big must keep its 4
    assert not refused.allowed and refused.limit.name == "small"
    last = await limiter.acquire("k", 1)  # small: 0 left, big: 3 left
    assert last.allowed and last.remaining == 0
    assert (await replica.acquire("k", 1)).allowed is False


async def test_peek_takes_nothing_and_a_cost_over_capacity_fails_at_once(backend: Backend) -> None:
    limiter, _ = backend.limiters(SLOW, 3)
    await limiter.acquire("k", 2)
    looked = await limiter.peek("k", 1)
    assert looked.allowed and looked.remaining == 1
    assert (await limiter.peek("k", 2)).allowed is False
    assert (await limiter.acquire("k")).remaining == 0
    with pytest.raises(ValueError, match="cost 4 exceeds capacity 3"):
        await limiter.acquire("k", 4)


async def test_every_bucket_expires_exactly_when_full_again(backend: Backend) -> None:
    """The stored state expires at the first whole millisecond at which the bucket is full:
    never before (that would forgive debt), and less than a millisecond after."""
    limiter, replica = backend.limiters(Fraction(1, 10), 4)  # 10 s per token
    assert limiter.ttl_ms("k") is None  # a fresh bucket stores nothing
    steps = [(1, limiter, True), (2, replica, True), (1, limiter, True)]
    steps.append((1, replica, False))  # a refusal writes nothing: the expiry stays as it was
    for cost, handle, allowed in steps:
        before = limiter.clock_ms()
        decision = await handle.acquire("k", cost)
        after = limiter.clock_ms()
        deadline = limiter.deadline_ms("k")
        assert decision.allowed is allowed
        # The decision was taken between `before` and `after`; full `reset_after` later.
        full_ms = decision.reset_after * 1000
        assert before + full_ms - 0.01 <= deadline < after + full_ms + 1, (before, after, full_ms)
        ttl = limiter.ttl_ms("k")
        assert ttl is not None and ttl > 0
    for key in ("a", "b", "c"):
        await replica.acquire(key, 1 + len(key))
    ttls = backend.all_ttls_ms()
    assert len(ttls) == 4 and all(ttl > 0 for ttl in ttls.values()), ttls


# ====================================================================== idempotency keys


async def test_a_key_claimed_through_one_replica_is_in_progress_for_the_other(
    backend: Backend,
) -> None:
    first, second = backend.idempotency()
    token = await first.claim("k", "fp")
    assert isinstance(await second.begin("k", "fp"), InProgress)
    assert isinstance(await second.begin("k", "other"), Mismatch)
    assert await second.complete("k", "not-the-token", "x") is False
    assert await first.complete("k", token, {"status": "done"}) is True
    assert await second.begin("k", "fp") == Replay({"status": "done"})
    assert isinstance(await first.begin("k", "other"), Mismatch)


async def test_release_lets_a_retry_run_again_and_tokens_own_one_claim(backend: Backend) -> None:
    first, second = backend.idempotency()
    token = await first.claim("k")
    assert await second.release("k", "wrong") is False
    assert await first.release("k", token) is True
    assert await first.release("k", token) is False  # once only
    retry = await second.claim("k")
    assert retry != token
    assert await first.complete("k", token, "stale") is False
    assert await second.complete("k", retry, "fresh") is True
    assert await second.complete("k", retry, "again") is False  # the claim is over
    assert await first.begin("k") == Replay("fresh")


async def test_a_lapsed_lease_frees_the_key_and_the_stale_owner_cannot_store(
    backend: Backend,
) -> None:
    first, second = backend.idempotency(ttl=3600, lease=0.15)
    token = await first.claim("k")
    await asyncio.sleep(0.3)
    retry = await second.claim("k")
    assert await first.complete("k", token, "late") is False
    assert await first.release("k", token) is False
    assert isinstance(await first.begin("k"), InProgress)
    assert await second.complete("k", retry, "on time") is True


async def test_a_record_expires_after_its_ttl(backend: Backend) -> None:
    # Redis expires on its own clock, so this one waits in real time. The TTL leaves the
    # replay half a second: 0.15 s failed once on a loaded machine (a cluster round trip).
    first, second = backend.idempotency(ttl=0.5, lease=60)
    token = await first.claim("k")
    assert await first.complete("k", token, 1) is True
    assert await second.begin("k") == Replay(1)
    await asyncio.sleep(0.7)
    assert isinstance(await second.begin("k"), Started)


async def test_claims_last_their_lease_and_records_their_ttl(backend: Backend) -> None:
    first, _ = backend.idempotency(ttl=500, lease=20)
    token = await first.claim("k")
    claim_ttl = first.ttl_ms("k")
    assert claim_ttl is not None and 20_000 - 100 < claim_ttl <= 20_000
    await first.complete("k", token, [1, "two"])
    record_ttl = first.ttl_ms("k")
    assert record_ttl is not None and 500_000 - 100 < record_ttl <= 500_000
    await first.claim("other")
    ttls = backend.all_ttls_ms()
    assert len(ttls) == 2 and all(ttl > 0 for ttl in ttls.values()), ttls
