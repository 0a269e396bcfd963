"""pytest-benchmark suite for TokenBucketLimiter.acquire: the cost of one call.

Run with ``pytest benchmarks/bench_ratelimit.py --benchmark-only``; under ``--benchmark-disable``
each body runs once, which checks the benchmark code itself. Three cases, each with one limit
and with two (all-or-nothing over both):

- *allowed*: a key whose bucket is in debt, so each call reads and rewrites its store entry
  (the steady state of an active client);
- *refused*: a drained key, so each call reads and writes nothing (a client being throttled);
- *new key, full store*: every call is a new client in a store at ``maxsize``, so each one
  evicts a bucket in debt (the flood case the LRU bound exists for).
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from typing import Any

import pytest

from ttlstore.ratelimit import Limit, TokenBucketLimiter

MAXSIZE = 10_000
# Big enough that no benchmark run drains it, small enough that the bucket stays in debt.
ROOMY = 10**12


def limits(count: int, rate: Fraction, capacity: int) -> list[Limit]:
    """``count`` limits of the same shape; the second one is what all-or-nothing costs."""
    return [Limit(rate, capacity, f"limit{i}") for i in range(count)]


@pytest.fixture(params=[1, 2], ids=["one-limit", "two-limits"])
def count(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_acquire_allowed(benchmark: Any, count: int) -> None:
    limiter = TokenBucketLimiter(limits=limits(count, Fraction(1), ROOMY), maxsize=MAXSIZE)
    decision = benchmark(limiter.acquire, "client")
    assert decision.allowed
    assert limiter.stats().size == 1


def test_acquire_refused(benchmark: Any, count: int) -> None:
    limiter = TokenBucketLimiter(limits=limits(count, Fraction(1, 10**6), 1), maxsize=MAXSIZE)
    assert limiter.acquire("client").allowed
    decision = benchmark(limiter.acquire, "client")
    assert not decision.allowed
    assert limiter.stats().allowed == 1


def test_acquire_new_key_in_full_store(benchmark: Any, count: int) -> None:
    limiter = TokenBucketLimiter(limits=limits(count, Fraction(1), ROOMY), maxsize=MAXSIZE)
    for i in range(MAXSIZE):
        limiter.acquire(f"resident-{i}")
    fresh = (f"new-{i}" for i in itertools.count())

    def acquire_new() -> bool:
        return limiter.acquire(next(fresh)).allowed

    assert benchmark(acquire_new)
    stats = limiter.stats()
    assert stats.size == MAXSIZE
    assert stats.fail_open_evictions >= 1
