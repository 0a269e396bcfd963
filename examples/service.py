"""A FastAPI service with the seed service's idempotency and rate-limit setup, on ttlstore.

Idempotency records are kept 1 h, at most 5 000 (least recently used evicted first). Each
client has a token bucket (``RATE`` per second, bursts of ``BURST``), at most 10 000 buckets;
the seed service's "drop after 2 h idle" rule is replaced by lossless expiry: a bucket's entry
expires exactly when it is full again. One :class:`~ttlstore.sweeper.AsyncSweeper` started from
the lifespan reclaims expired records, abandoned claims and refilled buckets every 60 s, so
memory is returned even for keys nobody uses again. Every POST and PATCH carrying an
``Idempotency-Key`` runs at most once per key and API key.

Run it from the repository's root with
``pip install -e '.[example]' && uvicorn examples.service:app``, then::

    curl -X POST localhost:8000/orders -H 'X-API-Key: k1' -H 'Idempotency-Key: "o-1"' \\
         -H 'Content-Type: application/json' -d '{"item": "book", "quantity": 1}'

Repeat the command: the same order comes back with ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.types import Scope

from ttlstore.asgi import IdempotencyMiddleware, RateLimitMiddleware
from ttlstore.idempotency import IdempotencyStore
from ttlstore.ratelimit import TokenBucketLimiter
from ttlstore.sweeper import AsyncSweeper

RECORD_TTL = 3600.0  # seconds a response is replayable: 1 h
MAX_RECORDS = 5000
RATE = 10  # requests per second per API key, sustained
BURST = 20  # requests a rested client may send at once
MAX_BUCKETS = 10_000  # buckets in debt held at once
SWEEP_INTERVAL = 60.0


class OrderIn(BaseModel):
    item: str
    quantity: int = 1


class Order(OrderIn):
    id: int


def api_key_of(scope: Scope) -> str:
    """The client's API key: one client can never be answered with another's stored order.

    Requests without one share a namespace; a real service would have refused them already.
    """
    headers: dict[bytes, bytes] = dict(scope["headers"])  # names are lower-case bytes
    return headers.get(b"x-api-key", b"").decode("latin-1")


def create_app(
    store: IdempotencyStore | None = None,
    limiter: TokenBucketLimiter | None = None,
    *,
    sweep_interval: float = SWEEP_INTERVAL,
    tenant: Callable[[Scope], str] = api_key_of,
) -> FastAPI:
    """Build the service; tests pass stores on a fake clock and a short sweep interval."""
    if store is None:
        store = IdempotencyStore(ttl=RECORD_TTL, maxsize=MAX_RECORDS)
    if limiter is None:
        limiter = TokenBucketLimiter(RATE, BURST, maxsize=MAX_BUCKETS)
    # One sweeper for all three stores: records, claims and buckets.
    sweeper = AsyncSweeper(*store.stores, *limiter.stores, interval=sweep_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with sweeper:  # started with the app, stopped (promptly) with it
            yield

    app = FastAPI(title="orders", lifespan=lifespan)
    app.state.idempotency = store
    app.state.limiter = limiter
    app.state.sweeper = sweeper
    app.add_middleware(IdempotencyMiddleware, store=store, tenant=tenant)
    # Added last, so it runs first: a refused request never claims an idempotency key.
    app.add_middleware(RateLimitMiddleware, limiter=limiter, key=tenant)

    # The orders are the business data of the demo, not service state: a real service keeps them
    # in its database. Only the idempotency records and buckets need bounding here.
    orders: dict[int, Order] = {}
    ids = itertools.count(1)

    @app.post("/orders", status_code=201)
    async def create_order(order: OrderIn) -> Order:
        created = Order(id=next(ids), **order.model_dump())
        orders[created.id] = created
        return created

    @app.get("/orders/{order_id}")
    async def read_order(order_id: int) -> Order:
        if order_id not in orders:
            raise HTTPException(status_code=404, detail="no such order")
        return orders[order_id]

    @app.get("/orders")
    async def count_orders() -> dict[str, int]:
        return {"count": len(orders)}

    return app


app = create_app()
