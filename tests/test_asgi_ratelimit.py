"""Tests of RateLimitMiddleware through httpx.ASGITransport: 429s, RateLimit fields, keys."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
from collections.abc import Hashable
from fractions import Fraction
from typing import Any

import http_sf
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._support import NotADict, asgi_call, fault_counts
from ttlstore import _faults
from ttlstore._errors import BackendUnavailable
from ttlstore._ratelimit_run import FIELDS_KEPT
from ttlstore.asgi import (
    Message,
    RateLimitMiddleware,
    Receive,
    Scope,
    Send,
    client_host,
    get_header,
)
from ttlstore.asgi.ratelimit import ratelimit_field
from ttlstore.ratelimit import Decision, Limit, TokenBucketLimiter
from ttlstore.testing import FakeClock, RedisServer


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """The guarded app: 200 with a header of its own."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"x-app", b"yes")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def forwarded_for(scope: Scope) -> str | None:
    """Key on the client a trusted proxy reports (never use this without such a proxy)."""
    header = get_header(scope, b"x-forwarded-for")
    return None if header is None else header.decode("latin-1").split(",")[0].strip()


def client(app: Any, host: str = "198.51.100.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def field(response: httpx.Response, name: str) -> Any:
    """A RateLimit field parsed back as a Structured Field List."""
    return http_sf.parse(response.headers[name].encode(), tltype="list")


async def test_allowed_responses_carry_the_fields(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(limits=[Limit.per(100, 60)], clock=clock)
    async with client(RateLimitMiddleware(hello, limiter)) as http:
        response = await http.get("/")
    assert response.status_code == 200
    assert response.text == "ok"
    assert response.headers["x-app"] == "yes"
    assert response.headers["ratelimit-policy"] == '"default";q=100;w=60'
    assert response.headers["ratelimit"] == '"default";r=99;t=1'


async def test_refusal_is_429_with_retry_after_and_problem_json(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(0.4, 2, clock=clock)  # a token every 2.5 s
    app = RateLimitMiddleware(hello, limiter)
    async with client(app) as http:
        assert [(await http.get("/")).status_code for _ in range(2)] == [200, 200]
        refused = await http.get("/")
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "3"  # 2.5 s, rounded up
        assert field(refused, "ratelimit") == [("default", {"r": 0, "t": 3})]
        assert field(refused, "ratelimit-policy") == [("default", {"q": 2, "w": 5})]
        problem = json.loads(refused.content)
        assert problem["status"] == 429
        assert problem["title"] == "Too Many Requests"
        assert "3 s" in problem["detail"]
        clock.advance(2)
        again = await http.get("/")
        assert (again.status_code, again.headers["retry-after"]) == (429, "1")  # 0.5 s left
        clock.advance(0.5)
        assert (await http.get("/")).status_code == 200
    assert limiter.stats().denied == 2


async def test_retry_after_never_below_t(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(
        limits=[Limit(3, 3, "fast"), Limit.per(4, 3600, "slow")], clock=clock
    )
    async with client(RateLimitMiddleware(hello, limiter)) as http:
        for _ in range(4):
            clock.advance(0.5)
            assert (await http.get("/")).status_code == 200
        refused = await http.get("/")
    assert refused.status_code == 429
    ((name, params),) = field(refused, "ratelimit")
    assert name == "slow"
    assert int(refused.headers["retry-after"]) >= params["t"]
    # slow's first token (one per 900 s) was taken 1.5 s ago: 898.5 s, rounded up.
    assert refused.headers["retry-after"] == "899"
    assert field(refused, "ratelimit-policy") == [
        ("fast", {"q": 3, "w": 1}),
        ("slow", {"q": 4, "w": 3600}),
    ]


async def test_two_clients_are_independent(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=clock)
    app = RateLimitMiddleware(hello, limiter)
    async with client(app, "192.0.2.1") as first, client(app, "192.0.2.2") as second:
        assert (await first.get("/")).status_code == 200
        assert (await first.get("/")).status_code == 429
        assert (await second.get("/")).status_code == 200
        assert (await second.get("/")).status_code == 429


async def test_flood_of_distinct_keys_stays_bounded_and_is_counted(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(1, 5, maxsize=50, clock=clock)
    app = RateLimitMiddleware(hello, limiter, key=forwarded_for)
    (store,) = limiter.stores
    async with client(app) as http:
        for i in range(500):
            response = await http.get(
                "/", headers={"x-forwarded-for": f"10.0.{i // 256}.{i % 256}"}
            )
            assert response.status_code == 200
            assert len(store) <= 50
    stats = limiter.stats()
    assert (stats.size, stats.fail_open_evictions, stats.allowed) == (50, 450, 500)


async def test_headers_can_be_turned_off(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=clock)
    async with client(RateLimitMiddleware(hello, limiter, headers=False)) as http:
        allowed, refused = await http.get("/"), await http.get("/")
    assert "ratelimit" not in allowed.headers and "ratelimit-policy" not in allowed.headers
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "ratelimit" not in refused.headers


async def test_policy_name_for_unnamed_limits(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(2, 10, clock=clock)
    async with client(RateLimitMiddleware(hello, limiter, policy_name="api")) as http:
        response = await http.get("/")
    assert response.headers["ratelimit-policy"] == '"api";q=10;w=5'
    assert response.headers["ratelimit"] == '"api";r=9;t=1'


async def test_no_key_means_no_limit(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=clock)
    app = RateLimitMiddleware(hello, limiter, key=forwarded_for)
    async with client(app) as http:
        responses = [await http.get("/") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert "ratelimit" not in responses[0].headers
    assert limiter.stats().allowed == 0


async def test_non_http_scopes_pass_through(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=clock)
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None: ...

    middleware = RateLimitMiddleware(app, limiter)
    for _ in range(3):
        await middleware({"type": "lifespan"}, receive, send)
        await middleware({"type": "websocket", "client": ("192.0.2.1", 1)}, receive, send)
    assert seen == ["lifespan", "websocket"] * 3
    assert limiter.stats().allowed == limiter.stats().denied == 0


async def test_servers_see_an_asgi3_app_whose_calls_are_coroutines(clock: FakeClock) -> None:
    """uvicorn tells ASGI 3 from ASGI 2 by ``__call__`` being a coroutine function, and task
    groups want a coroutine object: both hold in the compiled build too, whose ``__call__``
    is mypyc's."""
    middleware = RateLimitMiddleware(hello, TokenBucketLimiter(1, 1, clock=clock))
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert asyncio.iscoroutinefunction(middleware.__call__)
    seen: list[Message] = []

    async def send(message: Message) -> None:
        seen.append(message)

    scope = http_scope(client=("192.0.2.1", 1))
    call = middleware(scope, None, send)  # type: ignore[arg-type]
    assert asyncio.iscoroutine(call)
    await asyncio.create_task(call)
    assert seen[0]["status"] == 200


class SharedLimiter:
    """An AsyncLimiter stand-in: a coroutine acquire, as a Redis-backed limiter has."""

    def __init__(self, inner: TokenBucketLimiter) -> None:
        self.inner = inner

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self.inner.limits

    async def acquire(self, key: str, cost: int = 1) -> Decision:
        return self.inner.acquire(key, cost)


async def test_async_limiter(clock: FakeClock) -> None:
    app = RateLimitMiddleware(hello, SharedLimiter(TokenBucketLimiter(1, 1, clock=clock)))
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
        refused = await http.get("/")
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "1")


def test_default_key_is_the_peer_address() -> None:
    assert client_host({"type": "http", "client": ("203.0.113.9", 5555)}) == "203.0.113.9"
    assert client_host({"type": "http", "client": None}) is None
    assert client_host({"type": "http"}) is None


def http_scope(**extra: Any) -> Scope:
    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": [], **extra}
    return scope


async def test_scopes_and_messages_that_are_not_dicts_read_the_same(clock: FakeClock) -> None:
    """The compiled build reads dicts natively; any other mapping takes the same path's
    answers, and the app gets the scope it was given."""
    limiter = TokenBucketLimiter(limits=[Limit.per(100, 60)], clock=clock)
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        start = {"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"yes")]}
        await send(NotADict(start))
        await send(NotADict({"type": "http.response.body", "body": b"ok"}))

    scope = NotADict(http_scope(client=("192.0.2.1", 1)))
    middleware = RateLimitMiddleware(app, limiter)
    start, body = await asgi_call(middleware, scope)
    assert scopes[0] is scope
    assert start["status"] == 200
    assert start["headers"] == [
        (b"x-app", b"yes"),
        (b"ratelimit-policy", b'"default";q=100;w=60'),
        (b"ratelimit", b'"default";r=99;t=1'),
    ]
    assert body["body"] == b"ok"
    assert limiter.peek("192.0.2.1").remaining == 99


class CountingLimiter(TokenBucketLimiter):
    """A limiter whose acquire counts its calls (a subclass overriding acquire)."""

    calls = 0

    def acquire(self, key: Hashable, cost: int = 1) -> Decision:
        type(self).calls += 1
        return super().acquire(key, cost)


class WithInstanceDict(TokenBucketLimiter):
    """A subclass without __slots__, so that acquire can be set on an instance."""


async def test_a_limiter_that_overrides_acquire_is_asked_through_it(clock: FakeClock) -> None:
    """The middleware calls an in-memory limiter's decision natively, without building a
    Decision, only when ``acquire`` is TokenBucketLimiter's own: an override, in a subclass
    or on the instance, is what the middleware calls."""
    CountingLimiter.calls = 0
    limiter = CountingLimiter(limits=[Limit.per(100, 60)], clock=clock)
    scope = http_scope(client=("192.0.2.1", 1))
    for _ in range(3):
        await asgi_call(RateLimitMiddleware(hello, limiter), scope)
    assert CountingLimiter.calls == 3

    refused = Decision(False, 0, 9.0, 9.0, 9.0, Limit.per(100, 60))
    patched = WithInstanceDict(limits=[Limit.per(100, 60)], clock=clock)
    patched.acquire = lambda key, cost=1: refused  # type: ignore[method-assign]
    start, _ = await asgi_call(RateLimitMiddleware(hello, patched), scope)
    assert start["status"] == 429


async def test_no_client_address_warns_once_per_middleware(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=clock)
    first, second = RateLimitMiddleware(hello, limiter), RateLimitMiddleware(hello, limiter)
    with caplog.at_level(logging.WARNING, logger="ttlstore"):
        for _ in range(3):
            for scope in (http_scope(), http_scope(client=None)):
                assert (await asgi_call(first, scope))[0]["status"] == 200
        assert (await asgi_call(second, http_scope()))[0]["status"] == 200
    warnings = [r for r in caplog.records if r.name == "ttlstore"]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 2  # one per middleware
    message = warnings[0].getMessage()
    assert "no client address" in message
    assert "NOT rate limited" in message
    assert "key=" in message
    assert limiter.stats().allowed == limiter.stats().denied == 0
    # With an address the default key limits as usual.
    sent = await asgi_call(first, http_scope(client=("192.0.2.1", 1)))
    assert sent[0]["status"] == 200
    assert (await asgi_call(first, http_scope(client=("192.0.2.1", 1))))[0]["status"] == 429


async def test_a_key_function_returning_none_is_not_warned_about(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=clock)
    app = RateLimitMiddleware(hello, limiter, key=forwarded_for)
    with caplog.at_level(logging.WARNING, logger="ttlstore"):
        assert (await asgi_call(app, http_scope()))[0]["status"] == 200
    assert not [r for r in caplog.records if r.name == "ttlstore"]


async def test_windows_beyond_a_structured_field_integer_still_serialise(
    clock: FakeClock,
) -> None:
    limiter = TokenBucketLimiter(1e-300, 1, clock=clock)  # refills in 1e300 s
    app = RateLimitMiddleware(hello, limiter)
    async with client(app) as http:
        allowed, refused = await http.get("/"), await http.get("/")
    assert allowed.headers["ratelimit-policy"] == '"default";q=1;w=999999999999999'
    assert allowed.headers["ratelimit"] == '"default";r=0;t=999999999999999'
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) == math.ceil(1e300)


def test_bad_configuration_fails_at_construction() -> None:
    limiter = TokenBucketLimiter(1, 1)
    for name in ("caf\u00e9", "", "tab\there"):
        with pytest.raises(ValueError, match=rf"policy_name .*{re.escape(repr(name))}"):
            RateLimitMiddleware(hello, limiter, policy_name=name)
    with pytest.raises(TypeError, match=r"policy_name .*5"):
        RateLimitMiddleware(hello, limiter, policy_name=5)  # type: ignore[arg-type]
    for flag in ("no", 1, None):
        with pytest.raises(TypeError, match=rf"headers .*{re.escape(repr(flag))}"):
            RateLimitMiddleware(hello, limiter, headers=flag)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        RateLimitMiddleware(hello, limiter, key="client")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="acquire"):
        RateLimitMiddleware(hello, object())  # type: ignore[arg-type]


async def test_a_limiter_backend_fault_is_a_503_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    class Down:
        limits = (Limit(1, 1),)

        def acquire(self, key: str, cost: int = 1) -> Decision:
            raise BackendUnavailable("Redis failed during a rate-limit decision: timeout")

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - not reached
        raise AssertionError("the app must not run")

    middleware = RateLimitMiddleware(app, Down(), key=lambda scope: "k")
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.WARNING, logger="ttlstore"):
            response = await client.get("/")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert "Redis failed" in caplog.text


async def test_a_degraded_decision_advertises_no_bucket_state() -> None:
    limit = Limit(1, 5)

    class Degraded:
        limits = (limit,)

        def acquire(self, key: str, cost: int = 1) -> Decision:
            return Decision(True, 4, 0.0, 0.0, 0.0, limit, degraded="TimeoutError: no answer")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = RateLimitMiddleware(app, Degraded(), key=lambda scope: "k")
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers


# ---------------------------------------------------------------------- fast fields = http_sf

_names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)
_ints = st.one_of(st.integers(0, 100), st.integers(0, 10**18))


@given(_names, _ints, _ints)
@settings(max_examples=1_000)
def test_the_ratelimit_field_is_what_http_sf_serialises(
    name: str, remaining: int, reset: int
) -> None:
    cap = 999_999_999_999_999
    item: http_sf.ItemType = (name, {"r": min(remaining, cap), "t": min(reset, cap)})
    expected = http_sf.ser([item])
    serialised_name = http_sf.ser(name).encode("ascii")
    assert ratelimit_field(serialised_name, remaining, reset) == expected.encode("ascii")


def sf_item(name: str, **params: int) -> http_sf.ItemType:
    """A Structured Field Item for http_sf: a String with Integer parameters."""
    return (name, {key: value for key, value in params.items()})


class Recording:
    """A limiter that remembers its last decision."""

    def __init__(self, limiter: TokenBucketLimiter) -> None:
        self.limiter = limiter
        self.limits = limiter.limits
        self.last: Decision | None = None

    def acquire(self, key: str, cost: int = 1) -> Decision:
        self.last = self.limiter.acquire(key, cost)
        return self.last


@given(st.lists(_names, min_size=1, max_size=3, unique=True), st.integers(1, 200), st.data())
@settings(max_examples=50, deadline=None)
async def test_the_middleware_sends_http_sf_serialisations(
    names: list[str], capacity: int, data: st.DataObject
) -> None:
    clock = FakeClock()
    limits = [Limit(Fraction(capacity, 7), capacity, name=name) for name in names]
    limiter = Recording(TokenBucketLimiter(limits=limits, clock=clock))
    policy = http_sf.ser([sf_item(name, q=capacity, w=7) for name in names])
    async with client(RateLimitMiddleware(hello, limiter)) as c:
        for _ in range(data.draw(st.integers(1, 5))):
            response = await c.get("/")
            decision = limiter.last
            assert decision is not None
            assert decision.limit.name is not None
            reset = math.ceil(decision.refill_after)
            expected = sf_item(decision.limit.name, r=decision.remaining, t=reset)
            assert response.headers["ratelimit"] == http_sf.ser([expected])
            assert response.headers["ratelimit-policy"] == policy
            clock.advance(data.draw(st.sampled_from([0, 0.1, 3])))


# ---------------------------------------------------------------------- quiet logs in an outage


async def test_an_outage_logs_one_line_per_interval_with_the_count(
    fresh_redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ttlstore.redis import AsyncRedisTokenBucketLimiter

    clock = FakeClock()
    monkeypatch.setattr(_faults, "clock", clock)
    limiter = AsyncRedisTokenBucketLimiter.from_url(
        fresh_redis_server.url, 10, 10, on_error="raise", timeout=0.5
    )
    fresh_redis_server.stop()  # Redis is down for the whole run
    middleware = RateLimitMiddleware(hello, limiter, key=lambda scope: "k")
    statuses = []
    try:
        async with client(middleware) as c:
            with caplog.at_level(logging.WARNING, logger="ttlstore"):
                for _ in range(1_000):
                    statuses.append((await c.get("/")).status_code)
                    clock.advance(1 / 16)  # 1 000 requests over 62.5 s: 160 per 10 s
    finally:
        await limiter.client.aclose()
    assert set(statuses) == {503}
    assert fault_counts(caplog.records, "RateLimitMiddleware") == [1] + [160] * 6
    ours = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RateLimit")]
    assert all("Redis failed" in message for message in ours)
    assert middleware.faults == 1_000
    # The Redis limiter's own fault log is one component too: one line per interval, counted.
    assert fault_counts(caplog.records, "AsyncRedisTokenBucketLimiter") == [1] + [160] * 6


# ---------------------------------------------------------------------- kept fields stay exact


class Scripted:
    """A limiter answering a scripted list of decisions, in order."""

    def __init__(self, limits: tuple[Limit, ...], decisions: list[Decision]) -> None:
        self.limits = limits
        self.decisions = iter(decisions)

    def acquire(self, key: str, cost: int = 1) -> Decision:
        return next(self.decisions)


async def fields_sent(middleware: RateLimitMiddleware, requests: int) -> list[bytes]:
    """The RateLimit field of each of ``requests`` responses, calling the app directly."""
    sent: list[bytes] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            sent.append(dict(message["headers"])[b"ratelimit"])

    for _ in range(requests):
        await middleware({"type": "http", "client": ("192.0.2.1", 1)}, receive, send)
    return sent


@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 40), st.integers(0, 3)), max_size=60),
    st.integers(0, 2_100),
)
@settings(max_examples=40, deadline=None)
async def test_repeated_decisions_get_the_fields_http_sf_serialises(
    script: list[tuple[int, int, int]], flood: int
) -> None:
    # Two limits answering the same (remaining, reset), decisions repeating after more
    # distinct ones than any table could keep: every field must still name its own limit.
    limits = (Limit(1, 50, name="burst"), Limit(Fraction(1, 60), 50, name="hourly"))
    plan = [(i % 2, i, i % 5) for i in range(flood)] + script + script
    decisions = [
        Decision(True, remaining, 0.0, 9.0, reset - 0.5 if reset else 0.0, limits[which])
        for which, remaining, reset in plan
    ]
    middleware = RateLimitMiddleware(hello, Scripted(limits, decisions))
    sent = await fields_sent(middleware, len(plan))
    expected = [
        http_sf.ser([sf_item(limits[which].name or "", r=remaining, t=reset)]).encode()
        for which, remaining, reset in plan
    ]
    assert sent == expected


async def test_the_kept_fields_stay_bounded() -> None:
    limits = (Limit(1, 5_000, name="burst"),)
    decisions = [Decision(True, remaining, 0.0, 9.0, 0.5, limits[0]) for remaining in range(3_000)]
    middleware = RateLimitMiddleware(hello, Scripted(limits, decisions))
    await fields_sent(middleware, len(decisions))
    assert 0 < len(middleware._fields) <= FIELDS_KEPT
