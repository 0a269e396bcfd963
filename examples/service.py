"""A FastAPI service with the seed service's idempotency and rate-limit setup, on ttlstore.

Idempotency records are kept 1 h, at most 5 000 (least recently used evicted first). Each
client has a token bucket (``RATE`` per second, bursts of ``BURST``), at most 10 000 buckets;
the seed service's "drop after 2 h idle" rule is replaced by lossless expiry: a bucket's entry
expires exactly when it is full again. One :class:`~ttlstore.sweeper.AsyncSweeper` started from
the lifespan reclaims expired records, abandoned claims and refilled buckets every 60 s, so
memory is returned even for keys nobody uses again. Every POST and PATCH carrying an
``Idempotency-Key`` runs at most once per key and API key. The orders themselves (the demo's
stand-in for a database) are bounded too: the latest ``MAX_ORDERS`` are kept.

``GET /metrics`` serves every store, the limiter and the sweeper to Prometheus (through
:mod:`ttlstore.metrics`); it is not rate-limited, so a scraper never spends a client's tokens.

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
from opentelemetry.metrics import Meter
from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
from pydantic import BaseModel
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ttlstore import TTLStore
from ttlstore.asgi import IdempotencyMiddleware, RateLimitMiddleware
from ttlstore.idempotency import IdempotencyStore
from ttlstore.metrics import register
from ttlstore.ratelimit import TokenBucketLimiter
from ttlstore.sweeper import AsyncSweeper

RECORD_TTL = 3600.0  # seconds a response is replayable: 1 h
MAX_RECORDS = 5000
RATE = 10  # requests per second per API key, sustained
BURST = 20  # requests a rested client may send at once
MAX_BUCKETS = 10_000  # buckets in debt held at once
SWEEP_INTERVAL = 60.0
MAX_ORDERS = 10_000  # orders kept (the least recently used go first)
METRICS_PATH = "/metrics"


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


class _Asgi:
    """Serves an ASGI app at a route's exact path (a mount would redirect ``/metrics``).

    Starlette calls a route endpoint that is a plain function with a request; any other
    callable is an ASGI app, as prometheus_client's is meant to be.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def create_app(
    store: IdempotencyStore | None = None,
    limiter: TokenBucketLimiter | None = None,
    *,
    sweep_interval: float = SWEEP_INTERVAL,
    tenant: Callable[[Scope], str] = api_key_of,
    max_orders: int = MAX_ORDERS,
    registry: CollectorRegistry | None = None,
    meter: Meter | None = None,
) -> FastAPI:
    """Build the service; tests pass stores on a fake clock and a short sweep interval.

    ``/metrics`` serves ``registry`` (a registry of its own when ``None``); with a ``meter``
    the same figures also go to OpenTelemetry.
    """
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

    def limit_key(scope: Scope) -> str | None:
        # None lets the request through untouched: scrapes spend no client's tokens.
        return None if scope["path"] == METRICS_PATH else tenant(scope)

    # Added last, so it runs first: a refused request never claims an idempotency key.
    app.add_middleware(RateLimitMiddleware, limiter=limiter, key=limit_key)

    # The orders stand in for the business data a real service keeps in its database. Held in
    # memory, they are bounded like everything else: a plain dict grew by ~600 bytes per order.
    orders: TTLStore[int, Order] = TTLStore(max_orders)
    ids = itertools.count(1)

    if registry is None:
        registry = CollectorRegistry()
    app.state.metrics = register(
        {"orders": orders, "idempotency": store, "rate_limit": limiter, "sweeper": sweeper},
        registry=registry,
        meter=meter,
    )
    app.router.routes.append(Route(METRICS_PATH, _Asgi(make_asgi_app(registry)), methods=["GET"]))

    @app.post("/orders", status_code=201)
    async def create_order(order: OrderIn) -> Order:
        created = Order(id=next(ids), **order.model_dump())
        orders[created.id] = created
        return created

    @app.get("/orders/{order_id}")
    async def read_order(order_id: int) -> Order:
        found = orders.get(order_id)
        if found is None:
            raise HTTPException(status_code=404, detail="no such order (or no longer kept)")
        return found

    @app.get("/orders")
    async def count_orders() -> dict[str, int]:
        return {"count": len(orders)}

    return app


# The module's app serves prometheus_client's global registry: process metrics included.
app = create_app(registry=REGISTRY)
