"""ttlstore.metrics: exact figures in Prometheus and OpenTelemetry, weak registration, bad input.

Every object runs on the fake clock, so each exported counter is the exact figure the scripted
workload implies. Prometheus output is read back with prometheus_client's own text parser, and
OpenTelemetry through the SDK's InMemoryMetricReader.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

from tests._metrics_support import Figures, observe, parse_exposition
from ttlstore import (
    IdempotencyStore,
    Started,
    StoreStats,
    Sweeper,
    TokenBucketLimiter,
    TTLStore,
)
from ttlstore.metrics import FAMILIES, Metrics, register
from ttlstore.testing import FakeClock, RedisServer, free_port


def scrape(registry: CollectorRegistry) -> Figures:
    """Every sample of ``registry``, parsed back from the text exposition format."""
    return parse_exposition(generate_latest(registry).decode())


def figure(figures: Figures, metric: str, /, **labels: str) -> float:
    return figures[metric, frozenset(labels.items())]


def of(figures: Figures, name: str) -> Figures:
    """The figures labelled ``name``."""
    return {key: value for key, value in figures.items() if ("name", name) in key[1]}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


class Otel:
    """An SDK meter provider read by an in-memory reader."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.meter = self.provider.get_meter("ttlstore-test")

    def read(self) -> Figures:
        return observe(self.reader)


@pytest.fixture
def otel() -> Iterator[Otel]:
    otel = Otel()
    yield otel
    otel.provider.shutdown()


class Workload:
    """One object of every in-memory kind, driven through a known script on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.store: TTLStore[str, int] = TTLStore(2, ttl=10, clock=clock)
        self.limiter = TokenBucketLimiter(1, 2, clock=clock)
        self.idempotency = IdempotencyStore(ttl=60, maxsize=1, lease=5, clock=clock)
        self.sweeper = Sweeper(self.store, *self.idempotency.stores, batch=1)
        store, limiter, idem = self.store, self.limiter, self.idempotency

        store["a"] = 1
        store["a"] = 2  # replaced
        assert store.get("a") == 2  # hit
        assert store.get("x") is None  # miss
        store["b"] = 1
        store["c"] = 1  # full: evicts "a", the least recently used
        del store["b"]  # deleted

        assert limiter.acquire("k1") and limiter.acquire("k1")
        assert not limiter.acquire("k1")  # the burst of 2 is spent
        assert limiter.acquire("k2")

        first = idem.begin("o1", "f")
        assert isinstance(first, Started)
        assert idem.complete("o1", first.token, "r1")
        idem.begin("o1", "f")  # replay
        idem.begin("o1", "g")  # mismatch
        second = idem.begin("o2", "f")
        assert isinstance(second, Started)
        idem.begin("o2", "f")  # in progress
        assert idem.release("o2", second.token)
        third = idem.begin("o3", "f")
        assert isinstance(third, Started)
        assert idem.complete("o3", third.token, "r3")  # evicts o1's record (maxsize 1)
        fourth = idem.begin("o4", "f")
        assert isinstance(fourth, Started)

        clock.advance(10)  # "c" falls due; o4's lease (5 s) runs out
        assert self.sweeper.sweep() == 2  # one slice each: "c", and o4's claim
        assert not idem.complete("o4", fourth.token, "late")  # stale token

    def objects(self) -> dict[str, object]:
        return {
            "cache": self.store,
            "api": self.limiter,
            "orders": self.idempotency,
            "sweeper": self.sweeper,
        }


# What the script above implies, counter by counter.
EXPECTED = {
    ("ttlstore_store_hits_total", ()): 1,
    ("ttlstore_store_misses_total", ()): 1,
    ("ttlstore_store_writes_total", ()): 4,
    ("ttlstore_store_removals_total", (("cause", "expired"),)): 1,
    ("ttlstore_store_removals_total", (("cause", "evicted"),)): 1,
    ("ttlstore_store_removals_total", (("cause", "deleted"),)): 1,
    ("ttlstore_store_removals_total", (("cause", "replaced"),)): 1,
    ("ttlstore_store_entries", ()): 0,
    ("ttlstore_store_entries_limit", ()): 2,
    ("ttlstore_limiter_requests_total", (("outcome", "allowed"),)): 3,
    ("ttlstore_limiter_requests_total", (("outcome", "denied"),)): 1,
    ("ttlstore_limiter_fail_open_evictions_total", ()): 0,
    ("ttlstore_limiter_buckets", ()): 0,  # full again 10 s later: expired
    ("ttlstore_limiter_buckets_limit", ()): 10_000,
    ("ttlstore_idempotency_requests_total", (("outcome", "started"),)): 4,
    ("ttlstore_idempotency_requests_total", (("outcome", "replayed"),)): 1,
    ("ttlstore_idempotency_requests_total", (("outcome", "in_progress"),)): 1,
    ("ttlstore_idempotency_requests_total", (("outcome", "mismatch"),)): 1,
    ("ttlstore_idempotency_requests_total", (("outcome", "busy"),)): 0,
    ("ttlstore_idempotency_claims_ended_total", (("cause", "completed"),)): 2,
    ("ttlstore_idempotency_claims_ended_total", (("cause", "released"),)): 1,
    ("ttlstore_idempotency_claims_ended_total", (("cause", "lease_expired"),)): 1,
    ("ttlstore_idempotency_stale_tokens_total", ()): 1,
    ("ttlstore_idempotency_records_evicted_total", ()): 1,
    ("ttlstore_idempotency_records", ()): 1,
    ("ttlstore_idempotency_records_limit", ()): 1,
    ("ttlstore_idempotency_claims", ()): 0,
    ("ttlstore_idempotency_claims_limit", ()): 1,
    ("ttlstore_sweeper_ticks_total", ()): 1,
    ("ttlstore_sweeper_reclaimed_total", ()): 2,
    ("ttlstore_sweeper_errors_total", ()): 0,
}
OWNER = {"store": "cache", "limiter": "api", "idempotency": "orders", "sweeper": "sweeper"}


def expected_figures() -> Figures:
    return {
        (name, frozenset({("name", OWNER[name.split("_")[1]]), *labels})): value
        for (name, labels), value in EXPECTED.items()
    }


def without_timings(figures: Figures) -> Figures:
    """All but the sweeper's wall-clock gauges, which no fake clock fixes."""
    return {key: value for key, value in figures.items() if "last_tick" not in key[0]}


def test_prometheus_exports_the_figures_the_workload_implies(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    work = Workload(clock)
    register(work.objects(), registry=registry)
    figures = scrape(registry)
    assert without_timings(figures) == expected_figures()
    # The wall-clock gauges are there, with plausible values.
    stats = work.sweeper.stats()
    sweeper = {"name": "sweeper"}
    assert figure(figures, "ttlstore_sweeper_last_tick_duration_seconds", **sweeper) == (
        stats.last_tick_duration
    )
    assert figure(figures, "ttlstore_sweeper_last_tick_longest_slice_seconds", **sweeper) > 0
    assert figure(figures, "ttlstore_sweeper_last_tick_timestamp_seconds", **sweeper) == (
        stats.last_tick_time
    )


def test_opentelemetry_gives_the_same_figures_under_the_same_names(
    clock: FakeClock, registry: CollectorRegistry, otel: Otel
) -> None:
    work = Workload(clock)
    register(work.objects(), registry=registry, meter=otel.meter)
    observed = otel.read()
    assert without_timings(observed) == expected_figures()
    assert observed == scrape(registry)  # timings too: nothing ticked in between


def test_figures_move_with_the_objects_between_two_reads(
    clock: FakeClock, registry: CollectorRegistry, otel: Otel
) -> None:
    store: TTLStore[str, int] = TTLStore(10, clock=clock)
    register({"s": store}, registry=registry, meter=otel.meter)
    assert figure(scrape(registry), "ttlstore_store_writes_total", name="s") == 0
    for i in range(7):
        store[str(i)] = i
    for read in (scrape(registry), otel.read()):
        assert figure(read, "ttlstore_store_writes_total", name="s") == 7
        assert figure(read, "ttlstore_store_entries", name="s") == 7


def test_units_and_names_follow_each_convention() -> None:
    seen = set()
    for family in FAMILIES:
        prometheus = family.prometheus_name
        assert prometheus not in seen
        seen.add(prometheus)
        assert prometheus == family.otel_name.replace(".", "_") + (
            "_seconds" if family.unit == "s" else ""
        ) + ("_total" if family.instrument == "counter" else "")
        assert family.unit == "s" or (family.unit.startswith("{") and family.unit.endswith("}"))
        assert bool(family.label) == (len(family.values) > 1)


def test_a_scrape_reads_each_object_once_and_only_then(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    class Counting:
        """A store look-alike that counts how often its stats are read."""

        def __init__(self) -> None:
            self.reads = 0
            self.store: TTLStore[str, int] = TTLStore(10, clock=clock)

        def stats(self) -> StoreStats:
            self.reads += 1
            return self.store.stats()

    counting = Counting()
    register({"c": counting}, registry=registry)
    after_registration = counting.reads
    for _ in range(100):
        counting.store["k"] = 1  # the hot path: no read of the stats
    assert counting.reads == after_registration
    scrape(registry)
    assert counting.reads == after_registration + 1


# ---------------------------------------------------------------------- weak registration


def test_a_dropped_store_is_collected_and_gone_from_the_next_scrape(
    clock: FakeClock, registry: CollectorRegistry, otel: Otel
) -> None:
    kept: TTLStore[str, int] = TTLStore(10, clock=clock)
    dropped: TTLStore[str, int] = TTLStore(10, clock=clock)
    dropped["k"] = 1
    metrics = register({"kept": kept, "dropped": dropped}, registry=registry)
    metrics_otel = Metrics({"dropped": dropped}, registry=None, meter=otel.meter)
    assert of(scrape(registry), "dropped")
    assert of(otel.read(), "dropped")
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None, "registration kept the store alive"
    figures = scrape(registry)
    assert not of(figures, "dropped")
    assert of(figures, "kept")
    assert not of(otel.read(), "dropped")
    assert metrics.names == ("kept",)
    assert "dropped" not in metrics
    assert metrics_otel.names == ()
    # The name is free again.
    replacement: TTLStore[str, int] = TTLStore(3, clock=clock)
    metrics.add("dropped", replacement)
    assert figure(scrape(registry), "ttlstore_store_entries_limit", name="dropped") == 3


def test_a_metrics_collector_keeps_no_object_alive_through_any_kind(
    clock: FakeClock, registry: CollectorRegistry, otel: Otel
) -> None:
    work = Workload(clock)
    register(work.objects(), registry=registry, meter=otel.meter)
    refs = [weakref.ref(obj) for obj in work.objects().values()]
    del work
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)
    assert scrape(registry) == {}
    assert otel.read() == {}


# ---------------------------------------------------------------------- bad input


class NoStats:
    pass


class OtherStats:
    def stats(self) -> dict[str, int]:
        return {"hits": 1}


class Unreferenceable:
    __slots__ = ("store",)

    def __init__(self) -> None:
        self.store: TTLStore[str, int] = TTLStore(1)

    def stats(self) -> StoreStats:
        return self.store.stats()


@pytest.mark.parametrize(
    ("objects", "error", "message"),
    [
        ({"x": NoStats()}, TypeError, r"'x': .*NoStats.* has no stats\(\) method"),
        ({"x": OtherStats()}, TypeError, r"'x': .*returned \{'hits': 1\}, which is none of"),
        ({"x": Unreferenceable()}, TypeError, r"'x': .* cannot be weakly referenced"),
        ({"": TTLStore(1)}, TypeError, r"non-empty str, got ''"),
        ({3: TTLStore(1)}, TypeError, r"non-empty str, got 3"),
        ([("x", TTLStore(1))], TypeError, r"objects must be a mapping"),
    ],
)
def test_bad_input_raises_at_registration_and_registers_nothing(
    registry: CollectorRegistry, objects: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        register(objects, registry=registry)
    assert scrape(registry) == {}
    # Not half-applied either when added to a live Metrics next to a good object.
    metrics = Metrics(registry=registry)
    good: TTLStore[str, int] = TTLStore(1)
    if isinstance(objects, dict):
        with pytest.raises(error, match=message):
            metrics.update({"good": good, **objects})
    assert metrics.names == ()


def test_a_name_or_an_object_registered_twice_is_refused(registry: CollectorRegistry) -> None:
    store: TTLStore[str, int] = TTLStore(1)
    other: TTLStore[str, int] = TTLStore(2)
    metrics = register({"s": store}, registry=registry)
    with pytest.raises(ValueError, match=r"name 's' is already registered"):
        metrics.add("s", other)
    with pytest.raises(ValueError, match=r"'t': .* is already registered as 's'"):
        metrics.update({"u": other, "t": store})
    assert metrics.names == ("s",)  # "u" was not added either
    with pytest.raises(ValueError, match=r"registry already exports ttlstore metrics"):
        register({"o": other}, registry=registry)
    assert metrics.remove("s")
    assert not metrics.remove("s")
    metrics.add("s", other)
    assert figure(scrape(registry), "ttlstore_store_entries_limit", name="s") == 2


def test_close_leaves_the_registry_and_silences_opentelemetry(
    registry: CollectorRegistry, otel: Otel
) -> None:
    store: TTLStore[str, int] = TTLStore(1)
    metrics = register({"s": store}, registry=registry, meter=otel.meter)
    metrics.close()
    assert scrape(registry) == {}
    assert otel.read() == {}
    with pytest.raises(RuntimeError, match="closed"):
        metrics.add("t", store)
    register({"s": store}, registry=registry)  # the registry is free for another one


def test_an_object_whose_stats_fail_is_skipped_and_logged_once(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.store: TTLStore[str, int] = TTLStore(1)
            self.fail = False

        def stats(self) -> StoreStats:
            if self.fail:
                raise RuntimeError("injected")
            return self.store.stats()

    flaky, fine = Flaky(), TTLStore[str, int](1)
    register({"flaky": flaky, "fine": fine}, registry=registry)
    flaky.fail = True
    with caplog.at_level(logging.WARNING, logger="ttlstore"):
        for _ in range(3):
            figures = scrape(registry)
            assert not of(figures, "flaky")
            assert of(figures, "fine")
    failures = [r for r in caplog.records if "stats() of 'flaky'" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


def test_the_core_imports_neither_prometheus_nor_opentelemetry() -> None:
    code = (
        "import sys, ttlstore, ttlstore.store, ttlstore.sweeper;"
        "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- sweeper figures


def test_the_sweeper_reports_when_it_last_swept_and_its_longest_slice(clock: FakeClock) -> None:
    class Slow:
        """Two slices, the second of which holds "the lock" for at least 20 ms."""

        def __init__(self) -> None:
            self.calls = 0

        def expire(self, limit: int) -> int:
            self.calls += 1
            if self.calls == 1:
                return limit  # a full slice: the sweeper comes back for more
            if self.calls == 2:
                end = time.perf_counter() + 0.02
                while time.perf_counter() < end:
                    pass
            return 0

    sweeper = Sweeper(slow := Slow(), batch=5)
    assert sweeper.stats().last_tick_time == 0.0
    assert sweeper.stats().last_tick_longest_slice == 0.0
    before = time.time()
    assert sweeper.sweep() == 5
    after = time.time()
    stats = sweeper.stats()
    assert slow.calls == 2
    assert before <= stats.last_tick_time <= after
    assert 0.02 <= stats.last_tick_longest_slice <= stats.last_tick_duration
    sweeper.sweep()  # a quick tick: the figure is the last tick's, not the worst ever
    assert sweeper.stats().last_tick_longest_slice < 0.02


# ---------------------------------------------------------------------- Redis backends


def test_redis_backends_export_their_counters(
    redis_server: RedisServer, registry: CollectorRegistry
) -> None:
    import redis

    from ttlstore.redis import RedisIdempotencyStore, RedisTokenBucketLimiter

    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.flushall()
    nobody = f"redis://127.0.0.1:{free_port()}"  # connections refused at once
    failing = RedisTokenBucketLimiter.from_url(nobody, 1, 2, on_error="deny", retries=0)
    failing_store = RedisIdempotencyStore.from_url(nobody, retries=0)
    try:
        limiter = RedisTokenBucketLimiter(client, 1, 2, prefix="m")
        store = RedisIdempotencyStore(client, prefix="m")
        register(
            {"api": limiter, "down": failing, "orders": store, "orders-down": failing_store},
            registry=registry,
        )
        assert limiter.acquire("k") and limiter.acquire("k")
        assert not limiter.acquire("k")
        limiter.peek("k")  # not a request
        assert not failing.acquire("k")  # degraded, denied by policy
        first = store.begin("o", "f")
        assert isinstance(first, Started)
        store.begin("o", "f")  # in progress
        store.begin("o", "g")  # mismatch
        assert store.complete("o", first.token, {"id": 1})
        store.begin("o", "f")  # replay
        with pytest.raises(Exception, match="Redis failed"):
            failing_store.begin("o", "f")

        figures = scrape(registry)
        requests = "ttlstore_limiter_requests_total"
        assert figure(figures, requests, name="api", outcome="allowed") == 2
        assert figure(figures, requests, name="api", outcome="denied") == 1
        assert figure(figures, requests, name="api", outcome="degraded") == 0
        assert figure(figures, requests, name="down", outcome="degraded") == 1
        assert figure(figures, requests, name="down", outcome="denied") == 0
        assert figure(figures, "ttlstore_limiter_backend_errors_total", name="down") == 1
        assert figure(figures, "ttlstore_limiter_backend_errors_total", name="api") == 0
        idem = "ttlstore_idempotency_requests_total"
        for outcome in ("started", "replayed", "in_progress", "mismatch"):
            assert figure(figures, idem, name="orders", outcome=outcome) == 1
        assert figure(figures, "ttlstore_idempotency_backend_errors_total", name="orders") == 0
        errors = figure(figures, "ttlstore_idempotency_backend_errors_total", name="orders-down")
        assert errors == 1
        # No figure a Redis backend cannot know is made up for it.
        assert not [key for key in of(figures, "api") if "buckets" in key[0]]
        assert not [key for key in of(figures, "orders") if "records" in key[0]]
    finally:
        client.close()
        failing.client.close()
        failing_store.client.close()
