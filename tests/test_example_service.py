"""The FastAPI example end to end: lifespan, sweeper, middleware and routes together.

httpx.ASGITransport does not run the lifespan (and asgi-lifespan is not a dependency), so
``served`` sends the lifespan events through the whole ASGI stack, middleware included, as a
server does, then serves requests through httpx.ASGITransport on the same loop. The metrics
test runs the app under a real uvicorn server on loopback instead and scrapes it over HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from examples.service import (
    BURST,
    MAX_BUCKETS,
    MAX_ORDERS,
    MAX_RECORDS,
    RATE,
    RECORD_TTL,
    SWEEP_INTERVAL,
    create_app,
)
from examples.service import app as default_app
from tests._metrics_support import observe, parse_exposition
from ttlstore.asgi import Message
from ttlstore.idempotency import IdempotencyStore
from ttlstore.ratelimit import TokenBucketLimiter
from ttlstore.testing import FakeClock, free_port

ORDER = {"item": "book", "quantity": 2}


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan around an httpx client for it, as a server would."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await task


@pytest.fixture
def store(clock: FakeClock) -> IdempotencyStore:
    return IdempotencyStore(ttl=RECORD_TTL, maxsize=MAX_RECORDS, clock=clock)


def headers(key: str | None, api_key: str = "client-1") -> dict[str, str]:
    found = {"X-API-Key": api_key}
    if key is not None:
        found["Idempotency-Key"] = key
    return found


@pytest.fixture
def limiter(clock: FakeClock) -> TokenBucketLimiter:
    return TokenBucketLimiter(RATE, BURST, maxsize=MAX_BUCKETS, clock=clock)


def test_the_default_app_has_the_seed_setup() -> None:
    store = default_app.state.idempotency
    assert (store.ttl, store.maxsize) == (3600, 5000)
    limiter = default_app.state.limiter
    assert limiter.maxsize == 10_000
    sweeper = default_app.state.sweeper
    assert sweeper.interval == SWEEP_INTERVAL == 60
    assert all(served in sweeper for served in (*store.stores, *limiter.stores))
    assert default_app.state.metrics.names == ("orders", "idempotency", "rate_limit", "sweeper")
    assert MAX_ORDERS == 10_000


async def test_the_lifespan_runs_the_sweeper(store: IdempotencyStore) -> None:
    app = create_app(store)
    sweeper = app.state.sweeper
    assert not sweeper.running
    async with served(app):
        assert sweeper.running
    assert not sweeper.running


async def test_orders_run_once_per_key_and_client(store: IdempotencyStore) -> None:
    async with served(create_app(store)) as client:
        first = await client.post("/orders", json=ORDER, headers=headers('"order-1"'))
        assert first.status_code == 201
        assert first.json() == {"id": 1, **ORDER}
        again = await client.post("/orders", json=ORDER, headers=headers("order-1"))
        assert again.status_code == 201
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        # Another client may use the same key: it gets its own order.
        other = await client.post("/orders", json=ORDER, headers=headers("order-1", "client-2"))
        assert other.json()["id"] == 2
        assert "idempotent-replayed" not in other.headers
        # Same key, another payload: refused.
        reused = await client.post("/orders", json={"item": "pen"}, headers=headers("order-1"))
        assert reused.status_code == 422
        assert reused.headers["content-type"] == "application/problem+json"
        # Malformed key.
        assert (await client.post("/orders", json=ORDER, headers=headers('""'))).status_code == 400
        # Without a key every POST runs; GETs are never touched.
        await client.post("/orders", json=ORDER, headers=headers(None))
        await client.post("/orders", json=ORDER, headers=headers(None))
        assert (await client.get("/orders")).json() == {"count": 4}
        assert (await client.get("/orders/1")).json() == first.json()


async def test_concurrent_duplicates_create_one_order(store: IdempotencyStore) -> None:
    async with served(create_app(store)) as client:
        responses = await asyncio.gather(
            *(client.post("/orders", json=ORDER, headers=headers("burst")) for _ in range(20))
        )
        assert {r.status_code for r in responses} <= {201, 409}
        assert (await client.get("/orders")).json() == {"count": 1}


async def test_validation_errors_are_stored_so_a_key_is_not_reused(
    store: IdempotencyStore,
) -> None:
    async with served(create_app(store)) as client:
        bad = await client.post("/orders", json={"quantity": 1}, headers=headers("k"))
        assert bad.status_code == 422  # FastAPI's own validation error
        again = await client.post("/orders", json={"quantity": 1}, headers=headers("k"))
        assert again.headers["idempotent-replayed"] == "true"


async def test_records_expire_after_an_hour_and_the_sweeper_reclaims_them(
    store: IdempotencyStore, clock: FakeClock
) -> None:
    app = create_app(store, sweep_interval=0.01)
    async with served(app) as client:
        await client.post("/orders", json=ORDER, headers=headers("k"))
        clock.advance(RECORD_TTL - 1)
        replay = await client.post("/orders", json=ORDER, headers=headers("k"))
        assert replay.headers["idempotent-replayed"] == "true"
        clock.advance(1)
        sweeper = app.state.sweeper

        async def reclaimed() -> None:
            while sweeper.stats().reclaimed < 1:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(reclaimed(), 5)
        # Reclaimed in the background, without any read of the key.
        records, _ = store.stores
        assert repr(records).startswith("<TTLStore stored=0")
        fresh = await client.post("/orders", json=ORDER, headers=headers("k"))
        assert fresh.json()["id"] == 2
        assert "idempotent-replayed" not in fresh.headers


async def test_rate_limit_per_api_key_runs_before_idempotency(
    store: IdempotencyStore, limiter: TokenBucketLimiter, clock: FakeClock
) -> None:
    app = create_app(store, limiter, sweep_interval=0.01)
    async with served(app) as client:
        for i in range(BURST):
            allowed = await client.post("/orders", json=ORDER, headers=headers(f"k{i}"))
            assert allowed.status_code == 201
            assert allowed.headers["ratelimit"].startswith('"default";r=')
        refused = await client.post("/orders", json=ORDER, headers=headers("late"))
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
        # The refused request claimed nothing: once allowed, the key runs.
        other = await client.post("/orders", json=ORDER, headers=headers("x", "client-2"))
        assert other.status_code == 201  # another API key has its own bucket
        clock.advance(1 / RATE)
        late = await client.post("/orders", json=ORDER, headers=headers("late"))
        assert late.status_code == 201 and "idempotent-replayed" not in late.headers

        # Once full again, the bucket's entry expires and the sweeper reclaims it unread.
        (buckets,) = limiter.stores
        # client-2 spent one token, refilled 0.1 s later: its entry is gone already.
        assert len(buckets) == 1
        clock.advance(BURST / RATE)
        sweeper = app.state.sweeper

        async def reclaimed() -> None:
            while not repr(buckets).startswith("<TTLStore stored=0"):
                await asyncio.sleep(0.005)

        await asyncio.wait_for(reclaimed(), 5)
        assert repr(buckets).startswith("<TTLStore stored=0")
        assert sweeper.stats().errors == 0


# ---------------------------------------------------------------------- bounded orders


async def test_orders_are_bounded_and_the_oldest_go_first(store: IdempotencyStore) -> None:
    async with served(create_app(store, max_orders=3)) as client:
        for _ in range(5):
            await client.post("/orders", json=ORDER, headers=headers(None))
        assert (await client.get("/orders")).json() == {"count": 3}
        assert (await client.get("/orders/2")).status_code == 404  # dropped to keep the bound
        assert (await client.get("/orders/5")).json() == {"id": 5, **ORDER}


async def test_memory_stays_flat_under_a_flood_of_new_orders(clock: FakeClock) -> None:
    """Issue 15's 100 000-request flood, scaled down: every store fills, then memory is flat.

    The stores are made small (50 orders, 50 records, 16 clients) so that the warm-up fills
    them all, and tracing starts before it so that one-time allocations (lazy imports, caches)
    land there. The 800 requests with fresh keys after it may then grow the traced memory by
    less than 100 KiB: measured ~12 KiB, flat from 300 to 3 000 requests, against ~570 KiB
    with the orders in a plain dict, as the example had them.
    """
    store = IdempotencyStore(ttl=RECORD_TTL, maxsize=50, clock=clock)
    limiter = TokenBucketLimiter(1_000_000, 1_000_000, clock=clock)  # lets the flood through
    app = create_app(store, limiter, max_orders=50)

    async def flood(client: httpx.AsyncClient, start: int, count: int) -> None:
        for i in range(start, start + count):
            response = await client.post(
                "/orders", json=ORDER, headers=headers(f"flood-{i}", f"client-{i % 16}")
            )
            assert response.status_code == 201

    async with served(app) as client:
        tracemalloc.start()
        try:
            await flood(client, 0, 200)
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            await flood(client, 200, 800)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert (await client.get("/orders")).json() == {"count": 50}
    assert store.stats().records == 50
    assert growth < 100 * 1024, f"memory grew by {growth} bytes over 800 requests"


# ---------------------------------------------------------------------- /metrics over HTTP


@contextmanager
def uvicorn_serving(app: FastAPI) -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """Run ``app`` under uvicorn on a free loopback port, on a thread; yield its URL and loop."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn ended before it started"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}", loop
    finally:
        server.should_exit = True
        thread.join(10)
        loop.close()


def test_metrics_scraped_over_http_are_the_figures_of_the_workload(
    store: IdempotencyStore, limiter: TokenBucketLimiter, clock: FakeClock
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    app = create_app(
        store, limiter, max_orders=10, sweep_interval=3600, meter=provider.get_meter("example")
    )
    sweeper = app.state.sweeper
    with uvicorn_serving(app) as (url, loop), httpx.Client(base_url=url) as client:
        deadline = time.monotonic() + 10
        while sweeper.stats().ticks < 1:  # the lifespan's first tick (nothing due yet)
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def post(key: str | None, api_key: str, body: dict[str, Any] = ORDER) -> int:
            return client.post("/orders", json=body, headers=headers(key, api_key)).status_code

        # client-1 sends 25 orders at once: a burst of 20 passes, 5 are refused.
        statuses = [post(f"k{i}", "client-1") for i in range(25)]
        assert statuses == [201] * BURST + [429] * 5
        # client-2: one order, two replays of it, then the key reused for another payload.
        assert [post("dup", "client-2") for _ in range(3)] == [201, 201, 201]
        assert post("dup", "client-2", {"item": "pen"}) == 422
        # client-3: two orders without a key, then reads of the newest and of an evicted one.
        assert [post(None, "client-3") for _ in range(2)] == [201, 201]
        assert client.get("/orders/23", headers=headers(None, "client-3")).status_code == 200
        assert client.get("/orders/1", headers=headers(None, "client-3")).status_code == 404
        # client-4: a malformed key, refused before any claim.
        assert post('""', "client-4") == 400
        # An hour later every record and every bucket is due; one sweep reclaims them all.
        clock.advance(RECORD_TTL)
        reclaimed = asyncio.run_coroutine_threadsafe(sweeper.sweep(), loop).result(10)
        assert reclaimed == 21 + 4  # records (k0..k19, dup) + buckets of 4 clients

        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "ratelimit" not in response.headers  # scrapes are not rate-limited
        scraped = parse_exposition(response.text)
        observed = observe(reader)
    provider.shutdown()

    def value(name: str, owner: str, **labels: str) -> float:
        return scraped[name, frozenset({("name", owner), *labels.items()})]

    expected = {
        # orders: 23 created (20 + 1 + 2), 10 kept, so 13 evicted; one hit, one miss.
        ("ttlstore_store_writes_total", "orders", ()): 23,
        ("ttlstore_store_hits_total", "orders", ()): 1,
        ("ttlstore_store_misses_total", "orders", ()): 1,
        ("ttlstore_store_removals_total", "orders", (("cause", "evicted"),)): 13,
        ("ttlstore_store_removals_total", "orders", (("cause", "expired"),)): 0,
        ("ttlstore_store_removals_total", "orders", (("cause", "deleted"),)): 0,
        ("ttlstore_store_removals_total", "orders", (("cause", "replaced"),)): 0,
        ("ttlstore_store_entries", "orders", ()): 10,
        ("ttlstore_store_entries_limit", "orders", ()): 10,
        # rate limit: 20 + 4 + 4 + 1 requests allowed, 5 refused, nothing evicted.
        ("ttlstore_limiter_requests_total", "rate_limit", (("outcome", "allowed"),)): 29,
        ("ttlstore_limiter_requests_total", "rate_limit", (("outcome", "denied"),)): 5,
        ("ttlstore_limiter_fail_open_evictions_total", "rate_limit", ()): 0,
        ("ttlstore_limiter_buckets", "rate_limit", ()): 0,
        ("ttlstore_limiter_buckets_limit", "rate_limit", ()): MAX_BUCKETS,
        # idempotency: 21 keys run, 2 replays, 1 mismatch; all completed; all expired since.
        ("ttlstore_idempotency_requests_total", "idempotency", (("outcome", "started"),)): 21,
        ("ttlstore_idempotency_requests_total", "idempotency", (("outcome", "replayed"),)): 2,
        ("ttlstore_idempotency_requests_total", "idempotency", (("outcome", "mismatch"),)): 1,
        ("ttlstore_idempotency_requests_total", "idempotency", (("outcome", "in_progress"),)): 0,
        ("ttlstore_idempotency_requests_total", "idempotency", (("outcome", "busy"),)): 0,
        ("ttlstore_idempotency_claims_ended_total", "idempotency", (("cause", "completed"),)): 21,
        ("ttlstore_idempotency_claims_ended_total", "idempotency", (("cause", "released"),)): 0,
        (
            "ttlstore_idempotency_claims_ended_total",
            "idempotency",
            (("cause", "lease_expired"),),
        ): 0,
        ("ttlstore_idempotency_stale_tokens_total", "idempotency", ()): 0,
        ("ttlstore_idempotency_records_evicted_total", "idempotency", ()): 0,
        ("ttlstore_idempotency_records", "idempotency", ()): 0,
        ("ttlstore_idempotency_records_limit", "idempotency", ()): MAX_RECORDS,
        ("ttlstore_idempotency_claims", "idempotency", ()): 0,
        # sweeper: the lifespan's first tick and ours.
        ("ttlstore_sweeper_ticks_total", "sweeper", ()): 2,
        ("ttlstore_sweeper_reclaimed_total", "sweeper", ()): 25,
        ("ttlstore_sweeper_errors_total", "sweeper", ()): 0,
    }
    for (name, owner, labels), figure in expected.items():
        assert value(name, owner, **dict(labels)) == figure, (name, owner, labels)
    counters = {key for key in scraped if key[0].endswith("_total")}
    assert counters <= {(n, frozenset({("name", o), *ls})) for n, o, ls in expected}, (
        "a counter the workload does not account for"
    )
    # OpenTelemetry, read through its in-memory reader, has the same figures.
    assert observed == scraped
