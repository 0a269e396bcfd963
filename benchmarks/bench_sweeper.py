"""pytest-benchmark suite for the sweepers: one tick over a backlog of due entries, and idle ticks.

Run with ``pytest benchmarks/bench_sweeper.py --benchmark-only``; under ``--benchmark-disable``
each body runs once, which checks the benchmark code itself. Every round gets a fresh backlog
(filling it is setup, not timed). Divide a tick's time by ``BACKLOG`` for the cost per entry;
comparing ``batch`` values shows what slicing (one lock hold per slice) costs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest

from ttlstore import TTLStore
from ttlstore.sweeper import AsyncSweeper, Sweeper
from ttlstore.testing import FakeClock

BACKLOG = 100_000
TTL = 3600.0
IDLE_STORES = 100


def due_store(clock: FakeClock, own_ttl: bool, rng: random.Random) -> TTLStore[int, int]:
    """A threadsafe store holding ``BACKLOG`` entries, every one of them due."""
    clock.now = 0.0
    store: TTLStore[int, int] = TTLStore(BACKLOG, TTL, clock=clock)
    for i in range(BACKLOG):
        # Own TTLs go through the heap; the store default through the FIFO fast path.
        store.set(i, i, ttl=rng.uniform(1, 2) * TTL if own_ttl else TTL)
    clock.now = 3 * TTL
    return store


@pytest.fixture
def event_loop_for_bench() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.mark.parametrize("batch", [100, 1_000, 10_000], ids=lambda b: f"batch={b}")
def test_thread_tick_reclaims_backlog(benchmark: Any, batch: int) -> None:
    """``Sweeper.sweep()``: one tick reclaiming BACKLOG default-TTL entries, ``batch`` at a time."""
    clock, rng = FakeClock(), random.Random(1)
    sweeper = Sweeper(batch=batch)
    keep: list[TTLStore[int, int]] = []  # the sweeper holds stores weakly

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        keep.clear()
        keep.append(due_store(clock, False, rng))
        sweeper.add(keep[0])
        return (), {}

    benchmark.pedantic(sweeper.sweep, setup=setup, rounds=5)
    assert sweeper.stats().per_store[id(keep[0])] == BACKLOG


def test_thread_tick_reclaims_backlog_of_own_ttls(benchmark: Any) -> None:
    """As above with per-entry TTLs, so the store's heap index does the work."""
    clock, rng = FakeClock(), random.Random(1)
    sweeper = Sweeper(batch=1_000)
    keep: list[TTLStore[int, int]] = []

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        keep.clear()
        keep.append(due_store(clock, True, rng))
        sweeper.add(keep[0])
        return (), {}

    benchmark.pedantic(sweeper.sweep, setup=setup, rounds=5)
    assert sweeper.stats().per_store[id(keep[0])] == BACKLOG


def test_async_tick_reclaims_backlog(
    benchmark: Any, event_loop_for_bench: asyncio.AbstractEventLoop
) -> None:
    """``await AsyncSweeper.sweep()``: the same tick, yielding to the loop between slices."""
    clock, rng = FakeClock(), random.Random(1)
    sweeper = AsyncSweeper(batch=1_000)
    keep: list[TTLStore[int, int]] = []

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        keep.clear()
        keep.append(due_store(clock, False, rng))
        sweeper.add(keep[0])
        return (), {}

    def tick() -> int:
        return event_loop_for_bench.run_until_complete(sweeper.sweep())

    benchmark.pedantic(tick, setup=setup, rounds=5)
    assert sweeper.stats().per_store[id(keep[0])] == BACKLOG


def test_idle_tick_over_many_stores(benchmark: Any) -> None:
    """A tick with nothing due over IDLE_STORES stores: the sweeper's fixed cost per store."""
    clock = FakeClock()
    stores = [TTLStore[int, int](1_000, TTL, clock=clock) for _ in range(IDLE_STORES)]
    for store in stores:
        for i in range(100):
            store.set(i, i)
    sweeper = Sweeper(*stores)
    assert benchmark(sweeper.sweep) == 0
    assert len(sweeper.stores) == IDLE_STORES
