"""pytest-benchmark suite for the idempotency adapter: the cost of one request's bookkeeping.

Run with ``pytest benchmarks/bench_idempotency.py --benchmark-only``; under
``--benchmark-disable`` each body runs once, which checks the benchmark code itself. Cases, each
with ``threadsafe`` on and off:

- *begin + complete, fresh key*: what a first request costs the store (claim, then store the
  result); the store is full, so every completion also evicts the least recently used record
  (the steady state of a busy service);
- *begin answering Replay*: a retry of a completed request;
- *middleware replay*: the same retry through ``IdempotencyMiddleware`` as an ASGI server calls
  it (scope, ``receive`` and ``send`` built by hand, no HTTP client): header parsing, body read,
  fingerprint, lookup and the replayed response. With an in-memory store that path never
  suspends, so one ``coroutine.send(None)`` runs a request to its end: the figure leaves out the
  event loop's per-request cost, which the server adds whatever the middleware does.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Coroutine
from typing import Any

import pytest

from ttlstore.asgi import IdempotencyMiddleware, Message, Receive, Scope, Send
from ttlstore.idempotency import IdempotencyStore, Replay, Started

MAXSIZE = 5_000  # the default: what the seed service keeps
FINGERPRINT = "POST /orders 5f2b1c"
BODY = json.dumps({"item": "book", "quantity": 2}).encode()


@pytest.fixture(params=[True, False], ids=["threadsafe", "threadsafe=False"])
def threadsafe(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def full_store(threadsafe: bool) -> IdempotencyStore:
    """A store holding ``MAXSIZE`` completed records."""
    store = IdempotencyStore(maxsize=MAXSIZE, threadsafe=threadsafe)
    for i in range(MAXSIZE):
        outcome = store.begin(f"resident-{i}", FINGERPRINT)
        assert isinstance(outcome, Started)
        assert store.complete(f"resident-{i}", outcome.token, {"status": 201, "n": i})
    return store


def test_begin_and_complete_fresh_key(benchmark: Any, threadsafe: bool) -> None:
    store = full_store(threadsafe)
    keys = (f"fresh-{i}" for i in itertools.count())
    result = {"status": 201}

    def first_request() -> bool:
        key = next(keys)
        outcome = store.begin(key, FINGERPRINT)
        assert isinstance(outcome, Started)
        return store.complete(key, outcome.token, result)

    assert benchmark(first_request)
    stats = store.stats()
    assert (stats.records, stats.inflight) == (MAXSIZE, 0)
    assert stats.evictions >= 1  # each completion evicted one old record


def test_begin_answering_replay(benchmark: Any, threadsafe: bool) -> None:
    store = full_store(threadsafe)
    outcome = benchmark(store.begin, "resident-42", FINGERPRINT)
    assert isinstance(outcome, Replay)
    assert outcome.result == {"status": 201, "n": 42}


# ---------------------------------------------------------------------- middleware


class OrdersApp:
    """The guarded app: answers 201 with a small JSON body, counting its executions."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        self.calls += 1
        body = json.dumps({"order": self.calls, "status": "created"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def http_scope() -> Scope:
    """A POST with an Idempotency-Key, as an ASGI server hands it over."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"api.example"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"idempotency-key", b'"8e03978e-40d5-43e8-bc93-6894a57f9324"'),
        ],
        "client": ("192.0.2.7", 50123),
        "server": ("192.0.2.1", 443),
    }


def run_to_end(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the ASGI call suspended: it needs an event loop")


def test_middleware_replay(benchmark: Any, threadsafe: bool) -> None:
    app = OrdersApp()
    middleware = IdempotencyMiddleware(app, full_store(threadsafe))
    scope = http_scope()
    request: Message = {"type": "http.request", "body": BODY, "more_body": False}
    sent: list[Message] = []

    async def receive() -> Message:
        return request

    async def send(message: Message) -> None:
        sent.append(message)

    def replayed_request() -> list[Message]:
        sent.clear()
        run_to_end(middleware(scope, receive, send))
        return sent

    run_to_end(middleware(scope, receive, send))  # the first request runs the app
    assert app.calls == 1
    original = [message.get("body") for message in sent]
    messages = benchmark(replayed_request)
    assert app.calls == 1  # every later request was a replay
    start, body = messages
    assert start["status"] == 201
    assert (b"idempotent-replayed", b"true") in start["headers"]
    assert body["body"] == original[1]
