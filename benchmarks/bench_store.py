"""pytest-benchmark suite for TTLStore's core operations.

Each timed call runs ``OPS`` operations, so ns/op = reported time / OPS. Run with
``pytest benchmarks --benchmark-only``; under ``--benchmark-disable`` each body runs once, which
checks the benchmark code itself.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

import pytest

from ttlstore import TTLStore
from ttlstore.testing import FakeClock

OPS = 1000
SIZES = [1_000, 100_000]
TTL = 3600.0


@pytest.fixture(params=SIZES, ids=lambda n: f"n={n}")
def size(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(params=[False, True], ids=["unlocked", "threadsafe"])
def threadsafe(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def filled(size: int, threadsafe: bool, clock: Callable[[], float] | None = None) -> Any:
    extra = {} if clock is None else {"clock": clock}
    store: TTLStore[str, int] = TTLStore(size, TTL, threadsafe=threadsafe, **extra)
    for i in range(size):
        store[f"key{i}"] = i
    return store


def sample(size: int, prefix: str = "key") -> list[str]:
    rng = random.Random(size)
    return [f"{prefix}{rng.randrange(size)}" for _ in range(OPS)]


def test_get_hit(benchmark: Any, size: int, threadsafe: bool) -> None:
    store, keys = filled(size, threadsafe), sample(size)

    def run() -> None:
        get = store.get
        for key in keys:
            get(key)

    benchmark(run)
    assert store.stats().hits >= OPS


def test_get_miss(benchmark: Any, size: int, threadsafe: bool) -> None:
    store, keys = filled(size, threadsafe), sample(size, "absent")

    def run() -> None:
        get = store.get
        for key in keys:
            get(key)

    benchmark(run)
    assert store.stats().misses >= OPS


def test_set_update(benchmark: Any, size: int, threadsafe: bool) -> None:
    store, keys = filled(size, threadsafe), sample(size)

    def run() -> None:
        put = store.set
        for key in keys:
            put(key, 0)

    benchmark(run)
    assert len(store) == size


def test_set_with_eviction(benchmark: Any, size: int, threadsafe: bool) -> None:
    store = filled(size, threadsafe)
    fresh = iter(range(10**12))

    def run() -> None:
        put = store.set
        for _ in range(OPS):
            put(f"new{next(fresh)}", 0)

    benchmark(run)
    assert len(store) == size and store.stats().evictions >= OPS


@pytest.mark.parametrize("own_ttl", [False, True], ids=["default-ttl", "own-ttl"])
def test_expire(benchmark: Any, size: int, own_ttl: bool) -> None:
    """Reclaiming OPS due entries out of ``size``: FIFO (default TTL) or heap (own TTL)."""
    clock = FakeClock()
    rng = random.Random(1)

    def setup() -> tuple[tuple[Any], dict[str, Any]]:
        clock.now = 0.0
        store: TTLStore[int, int] = TTLStore(size, TTL, clock=clock, threadsafe=False)
        for i in range(size):
            ttl = rng.uniform(1, 2) * TTL if own_ttl else TTL
            store.set(i, i, ttl=ttl)
            clock.now += 1e-6
        # Move the clock so that about OPS entries are due.
        deadlines = sorted(entry.deadline for entry in store._data.values())
        clock.now = deadlines[OPS - 1]
        return (store,), {}

    benchmark.pedantic(lambda store: store.expire(), setup=setup, rounds=5)


# --- the index decision: a binary heap against sortedcontainers.SortedList --------------------


def _heap_cycle(deadlines: list[float]) -> int:
    heap: list[tuple[float, int]] = []
    for i, deadline in enumerate(deadlines):
        heapq.heappush(heap, (deadline, i))
    cutoff = deadlines[len(deadlines) // 2]
    popped = 0
    while heap and heap[0][0] <= cutoff:
        heapq.heappop(heap)
        popped += 1
    return popped


def _sortedlist_cycle(deadlines: list[float]) -> int:
    from sortedcontainers import SortedList

    index: SortedList = SortedList()
    for i, deadline in enumerate(deadlines):
        index.add((deadline, i))
    cutoff = deadlines[len(deadlines) // 2]
    popped = 0
    while index and index[0][0] <= cutoff:
        index.pop(0)
        popped += 1
    return popped


@pytest.mark.parametrize("index", [_heap_cycle, _sortedlist_cycle], ids=["heapq", "SortedList"])
def test_deadline_index(benchmark: Any, size: int, index: Callable[[list[float]], int]) -> None:
    """File ``size`` random deadlines, then pop the due half: what TTLStore's heap does."""
    pytest.importorskip("sortedcontainers")
    rng = random.Random(3)
    deadlines = [rng.uniform(0, 3600) for _ in range(size)]
    cutoff = deadlines[size // 2]
    assert benchmark(index, deadlines) == sum(d <= cutoff for d in deadlines)
