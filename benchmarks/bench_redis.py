"""Redis-backed rate limiting: ``acquire`` round trips per second, next to the ``limits`` package.

Two ways to run it:

- ``pytest benchmarks/bench_redis.py --benchmark-only``: pytest-benchmark timings on the test
  suite's own ``redis-server`` (loopback, started by the fixture). Under ``--benchmark-disable``
  each body runs once, which checks the benchmark code. Without ``redis-server`` the cases skip
  (and fail under ``CI=true``); ``limits`` cases skip when ``limits`` is not installed.
- ``python -m benchmarks.bench_redis [--seconds S]``: starts its own server and prints a
  Markdown table of round trips per second (what :func:`measure` returns), for the comparison
  report.

Cases: ttlstore's sync limiter (one Lua script per call), its asyncio limiter called in
sequence and from 8 concurrent tasks (one client, pooled connections), one idempotency
begin + complete, and the ``limits`` package's ``RedisStorage`` with ``MovingWindowRateLimiter``
(also one Lua script per hit). Every bucket is roomy, so each call is an allowed acquire that
rewrites its key: the steady state of an active client. Loopback numbers measure client and
server CPU, not the network; across a LAN every case is bounded by the round-trip time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest

from ttlstore.testing import RedisServer

ROOMY = 10**12  # tokens: no run drains the bucket
BATCH = 100  # awaits per timed round of the async cases
TASKS = 8


def _sync_limiter(url: str) -> Any:
    from ttlstore.redis import RedisTokenBucketLimiter

    return RedisTokenBucketLimiter.from_url(url, Fraction(1), ROOMY, prefix="bench")


def _async_limiter(url: str) -> Any:
    from ttlstore.redis import AsyncRedisTokenBucketLimiter

    return AsyncRedisTokenBucketLimiter.from_url(url, Fraction(1), ROOMY, prefix="bench")


def _limits_hit(url: str) -> tuple[Callable[[], bool], Callable[[], None]]:
    """A ``limits`` moving-window hit on Redis, and its cleanup."""
    from limits import parse
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    storage = RedisStorage(url, socket_timeout=0.25, socket_connect_timeout=0.25)
    limiter = MovingWindowRateLimiter(storage)
    item = parse("1000000/second")

    def hit() -> bool:
        return limiter.hit(item, "bench")

    def close() -> None:
        storage.reset()

    return hit, close


def _idempotency(url: str) -> Any:
    from ttlstore.redis import RedisIdempotencyStore

    return RedisIdempotencyStore.from_url(url, ttl=60, lease=10, prefix="bench")


# ====================================================================== pytest-benchmark


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_ttlstore_sync_acquire(benchmark: Any, url: str) -> None:
    """One ``RedisTokenBucketLimiter.acquire``: one EVALSHA round trip."""
    limiter = _sync_limiter(url)
    try:
        assert benchmark(limiter.acquire, "client").allowed
    finally:
        limiter.client.close()


def test_ttlstore_async_acquire_sequential(
    benchmark: Any, url: str, loop: asyncio.AbstractEventLoop
) -> None:
    """``BATCH`` awaited ``AsyncRedisTokenBucketLimiter.acquire`` calls, one after another."""
    limiter = _async_limiter(url)

    async def batch() -> bool:
        allowed = True
        for _ in range(BATCH):
            allowed &= (await limiter.acquire("client")).allowed
        return allowed

    try:
        assert benchmark(lambda: loop.run_until_complete(batch()))
    finally:
        loop.run_until_complete(limiter.client.aclose())


def test_ttlstore_async_acquire_concurrent(
    benchmark: Any, url: str, loop: asyncio.AbstractEventLoop
) -> None:
    """``BATCH`` acquires spread over ``TASKS`` concurrent tasks on one client."""
    limiter = _async_limiter(url)

    async def worker(n: int) -> bool:
        return all([(await limiter.acquire("client")).allowed for _ in range(n)])

    async def batch() -> bool:
        return all(await asyncio.gather(*(worker(BATCH // TASKS) for _ in range(TASKS))))

    try:
        assert benchmark(lambda: loop.run_until_complete(batch()))
    finally:
        loop.run_until_complete(limiter.client.aclose())


def test_ttlstore_idempotency_begin_complete(benchmark: Any, url: str) -> None:
    """``begin`` on a new key, then ``complete``: two round trips, a claim and a record."""
    store = _idempotency(url)
    keys = (f"k{i}" for i in itertools.count())

    def begin_complete() -> bool:
        key = next(keys)
        outcome = store.begin(key, "fp")
        return bool(store.complete(key, outcome.token, {"status": 201}))

    try:
        assert benchmark(begin_complete)
    finally:
        store.client.close()


def test_limits_moving_window_hit(benchmark: Any, url: str) -> None:
    """``limits``: ``MovingWindowRateLimiter.hit`` on ``RedisStorage``."""
    pytest.importorskip("limits", reason="the limits package is not installed")
    hit, close = _limits_hit(url)
    try:
        assert benchmark(hit)
    finally:
        close()


# ====================================================================== the standalone table


@dataclass(frozen=True)
class Row:
    """One case of :func:`measure`."""

    case: str
    calls_per_second: float
    us_per_call: float


def _rate(run: Callable[[int], None], seconds: float) -> float:
    """Calls per second of ``run(n)`` (n calls): n grows until one run takes a tenth of
    ``seconds``, then the best of three runs of that n."""
    n = 16
    while True:
        start = time.perf_counter()
        run(n)
        if time.perf_counter() - start >= seconds / 10:
            break
        n *= 2
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        run(n)
        best = max(best, n / (time.perf_counter() - start))
    return best


def measure(url: str, seconds: float = 1.0) -> list[Row]:
    """Round trips per second of each case against the server at ``url``."""
    rates: dict[str, float] = {}
    limiter = _sync_limiter(url)

    def pings(n: int) -> None:
        for _ in range(n):
            limiter.client.ping()

    def sync_calls(n: int) -> None:
        for _ in range(n):
            limiter.acquire("client")

    try:
        rates["redis-py PING (one round trip: the floor)"] = _rate(pings, seconds)
        rates["ttlstore RedisTokenBucketLimiter.acquire (sync)"] = _rate(sync_calls, seconds)
    finally:
        limiter.client.close()

    loop = asyncio.new_event_loop()
    alimiter = _async_limiter(url)

    async def sequential(n: int) -> None:
        for _ in range(n):
            await alimiter.acquire("client")

    async def concurrent(n: int) -> None:
        await asyncio.gather(*(sequential(n // TASKS) for _ in range(TASKS)))

    def on_loop(body: Callable[[int], Awaitable[None]]) -> Callable[[int], None]:
        def run(n: int) -> None:
            loop.run_until_complete(body(n))

        return run

    try:
        rates["ttlstore AsyncRedisTokenBucketLimiter.acquire (sequential)"] = _rate(
            on_loop(sequential), seconds
        )
        rates[f"ttlstore AsyncRedisTokenBucketLimiter.acquire ({TASKS} tasks)"] = _rate(
            on_loop(concurrent), seconds
        )
    finally:
        loop.run_until_complete(alimiter.client.aclose())
        loop.close()

    try:
        hit, close = _limits_hit(url)
    except ImportError:
        return _rows(rates)

    def limits_calls(n: int) -> None:
        for _ in range(n):
            hit()

    try:
        rates["limits MovingWindowRateLimiter.hit (RedisStorage)"] = _rate(limits_calls, seconds)
    finally:
        close()
    return _rows(rates)


def _rows(rates: dict[str, float]) -> list[Row]:
    return [Row(case, rate, 1e6 / rate) for case, rate in rates.items()]


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| case | calls/s | µs/call |", "|---|---:|---:|"]
    lines += [f"| {r.case} | {r.calls_per_second:,.0f} | {r.us_per_call:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start a loopback redis-server, measure, print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_redis")
    parser.add_argument("--seconds", type=float, default=1.0, help="budget per case")
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not on PATH: nothing to measure", file=sys.stderr)
        return 1
    server = RedisServer(binary).start()
    try:
        print(markdown(measure(server.url, args.seconds)))
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
