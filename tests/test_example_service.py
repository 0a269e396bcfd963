"""The FastAPI example end to end: lifespan, sweeper, middleware and routes together.

httpx.ASGITransport does not run the lifespan (and asgi-lifespan is not a dependency), so
``served`` sends the lifespan events through the whole ASGI stack, middleware included, as a
server does, then serves requests through httpx.ASGITransport on the same loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from examples.service import (
    BURST,
    MAX_BUCKETS,
    MAX_RECORDS,
    RATE,
    RECORD_TTL,
    SWEEP_INTERVAL,
    create_app,
)
from examples.service import app as default_app
from ttlstore.asgi import Message
from ttlstore.idempotency import IdempotencyStore
from ttlstore.ratelimit import TokenBucketLimiter
from ttlstore.testing import FakeClock

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
