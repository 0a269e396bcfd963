"""IdempotencyMiddleware through httpx.ASGITransport around a tiny raw ASGI app.

The app counts its executions, echoes what it was asked, and can be held open on an
asyncio.Event, streamed in chunks, or told which status to answer, so every row of the
protocol table is checked from the client's side: replay, 409, 422, 400, 413, 503, pass-through,
scope isolation, the body limits and the stored-status policy.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import inspect
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import http_sf
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._support import (
    AsyncStore,
    CountingApp,
    NotADict,
    asgi_call,
    fault_counts,
    start_message,
)
from ttlstore import _faults
from ttlstore.asgi import (
    DEFAULT_STORE_STATUSES,
    IdempotencyMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    get_header,
    parse_idempotency_key,
)
from ttlstore.asgi._idem_key import MAX_KEY_LENGTH, Fingerprinter, plain_key
from ttlstore.asgi.idempotency import fingerprint
from ttlstore.idempotency import IdempotencyStore, InProgress, Outcome, Replay, Started
from ttlstore.testing import FakeClock, RedisServer

KEY = "Idempotency-Key"


@pytest.fixture
def app() -> CountingApp:
    return CountingApp()


@pytest.fixture
def store(clock: FakeClock) -> IdempotencyStore:
    return IdempotencyStore(clock=clock)


def client_for(asgi_app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app), base_url="http://t")


@pytest.fixture
async def client(app: CountingApp, store: IdempotencyStore) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(IdempotencyMiddleware(app, store)) as c:
        yield c


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = response.json()
    assert doc["status"] == status and doc["title"]
    return doc


# ---------------------------------------------------------------------- replay


async def test_replay_returns_the_stored_response_without_running(
    client: httpx.AsyncClient, app: CountingApp
) -> None:
    first = await client.post("/orders", content=b'{"qty": 1}', headers={KEY: '"order-1"'})
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    again = await client.post("/orders", content=b'{"qty": 1}', headers={KEY: '"order-1"'})
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["x-execution"] == "1"
    assert again.headers["content-type"] == "application/json"
    assert again.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_quoted_and_bare_keys_name_the_same_key(
    client: httpx.AsyncClient, app: CountingApp
) -> None:
    await client.post("/orders", headers={KEY: '"abc-1"'})
    bare = await client.post("/orders", headers={KEY: "abc-1"})
    assert bare.headers["idempotent-replayed"] == "true"
    uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324"  # starts with a digit: not an sf Token
    assert (await client.post("/orders", headers={KEY: uuid})).status_code == 201
    replay = await client.post("/orders", headers={KEY: f'"{uuid}"'})
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 2


@pytest.mark.parametrize(
    ("field", "key"),
    [
        (b'"abc"', "abc"),
        (b"abc", "abc"),
        (b'  "a b"  ', "a b"),
        (b'"a\\"b"', 'a"b'),
        (b'"k";v=1', "k"),
        (b"urn:k/1", "urn:k/1"),
        (b"123", "123"),
        (b"8e03978e-40d5", "8e03978e-40d5"),
        (b'"' + b"x" * 255 + b'"', "x" * 255),
        (b"x" * 255, "x" * 255),
        (b'""', None),
        (b"", None),
        (b'"' + b"x" * 256 + b'"', None),
        (b"x" * 256, None),
        (b'"open', None),
        (b"a b", None),
        (b'"a", "b"', None),
        (b"?1", None),
        (b":YWJj:", None),
        ("é".encode(), None),
    ],
)
def test_parse_idempotency_key(field: bytes, key: str | None) -> None:
    assert parse_idempotency_key(field) == key


# ---------------------------------------------------------------------- 409, 422, 400


async def test_409_while_the_first_request_is_held_open(
    client: httpx.AsyncClient, app: CountingApp
) -> None:
    app.gate = asyncio.Event()
    first = asyncio.create_task(client.post("/orders", content=b"x", headers={KEY: "k"}))
    await app.entered.wait()
    duplicate = await client.post("/orders", content=b"x", headers={KEY: "k"})
    doc = assert_problem(duplicate, 409)
    assert duplicate.headers["retry-after"] == "1"
    assert "Idempotency-Key" in doc["detail"]
    app.gate.set()
    assert (await first).status_code == 201
    replay = await client.post("/orders", content=b"x", headers={KEY: "k"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "/orders", b'{"qty": 2}'),  # another body
        ("POST", "/other", b'{"qty": 1}'),  # another path
        ("POST", "/orders?dry=1", b'{"qty": 1}'),  # another query
        ("PATCH", "/orders", b'{"qty": 1}'),  # another method
    ],
)
async def test_422_for_the_same_key_with_another_request(
    client: httpx.AsyncClient, app: CountingApp, method: str, url: str, body: bytes
) -> None:
    await client.post("/orders", content=b'{"qty": 1}', headers={KEY: "k"})
    reused = await client.request(method, url, content=body, headers={KEY: "k"})
    assert_problem(reused, 422)
    assert app.calls == 1


async def test_422_also_while_the_first_is_running(
    client: httpx.AsyncClient, app: CountingApp
) -> None:
    app.gate = asyncio.Event()
    first = asyncio.create_task(client.post("/orders", content=b"a", headers={KEY: "k"}))
    await app.entered.wait()
    assert_problem(await client.post("/orders", content=b"b", headers={KEY: "k"}), 422)
    app.gate.set()
    await first


@pytest.mark.parametrize(
    "value", ['""', "", '"' + "k" * 256 + '"', "k" * 256, "a b", '"open', '"a", "b"']
)
async def test_400_for_a_malformed_key(
    client: httpx.AsyncClient, app: CountingApp, value: str
) -> None:
    doc = assert_problem(await client.post("/orders", headers={KEY: value}), 400)
    assert "1 to 255 characters" in doc["detail"]
    assert app.calls == 0


async def test_255_characters_are_accepted(client: httpx.AsyncClient) -> None:
    assert (await client.post("/orders", headers={KEY: "k" * 255})).status_code == 201
    assert (await client.post("/orders", headers={KEY: f'"{"q" * 255}"'})).status_code == 201


async def test_400_for_two_key_header_lines(client: httpx.AsyncClient, app: CountingApp) -> None:
    response = await client.post("/orders", headers=[(KEY, "a"), (KEY, "b")])
    assert_problem(response, 400)
    assert app.calls == 0


async def test_400_for_a_missing_key_only_when_required(
    app: CountingApp, store: IdempotencyStore
) -> None:
    async with client_for(IdempotencyMiddleware(app, store, required=True)) as client:
        doc = assert_problem(await client.post("/orders"), 400)
        assert doc["detail"] == "Idempotency-Key is required"
        assert (await client.get("/orders")).status_code == 201  # GET never needs one
    assert app.calls == 1


# ---------------------------------------------------------------------- pass-through


async def test_get_and_unkeyed_requests_are_untouched(
    client: httpx.AsyncClient, app: CountingApp, store: IdempotencyStore
) -> None:
    for _ in range(2):
        got = await client.get("/orders", headers={KEY: "k"})
        assert "idempotent-replayed" not in got.headers
        posted = await client.post("/orders", content=b"x")
        assert "idempotent-replayed" not in posted.headers
    assert app.calls == 4
    assert store.stats().claims == 0


async def test_methods_are_configurable(app: CountingApp, store: IdempotencyStore) -> None:
    async with client_for(IdempotencyMiddleware(app, store, methods=["put"])) as client:
        await client.put("/orders", headers={KEY: "k"})
        assert (await client.put("/orders", headers={KEY: "k"})).headers["x-execution"] == "1"
        await client.post("/orders", headers={KEY: "k"})
        assert (await client.post("/orders", headers={KEY: "k"})).headers["x-execution"] == "3"


async def test_non_http_scopes_pass_through(app: CountingApp, store: IdempotencyStore) -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = IdempotencyMiddleware(inner, store)

    async def nothing() -> Message:
        raise AssertionError

    async def drop(message: Message) -> None:
        raise AssertionError

    await middleware({"type": "lifespan"}, nothing, drop)
    await middleware({"type": "websocket", "path": "/ws", "headers": []}, nothing, drop)
    assert seen == ["lifespan", "websocket"]


# ---------------------------------------------------------------------- scope isolation


async def test_scope_keeps_tenants_apart(app: CountingApp, store: IdempotencyStore) -> None:
    def tenant(scope: Scope) -> str:
        return (get_header(scope, b"x-tenant") or b"").decode()

    async with client_for(IdempotencyMiddleware(app, store, tenant=tenant)) as client:
        a = await client.post("/orders", content=b"same", headers={KEY: "k", "x-tenant": "a"})
        b = await client.post("/orders", content=b"same", headers={KEY: "k", "x-tenant": "b"})
        assert a.headers["x-execution"] == "1" and b.headers["x-execution"] == "2"
        a2 = await client.post("/orders", content=b"same", headers={KEY: "k", "x-tenant": "a"})
        b2 = await client.post("/orders", content=b"same", headers={KEY: "k", "x-tenant": "b"})
        assert a2.content == a.content and a2.headers["idempotent-replayed"] == "true"
        assert b2.content == b.content and b2.headers["idempotent-replayed"] == "true"
    assert app.calls == 2


async def test_a_tenant_that_returns_no_string_is_an_error(
    app: CountingApp, store: IdempotencyStore
) -> None:
    middleware = IdempotencyMiddleware(app, store, tenant=lambda scope: 42)  # type: ignore[arg-type, return-value]
    async with client_for(middleware) as client:
        with pytest.raises(TypeError, match="tenant callable must return a str, got 42"):
            await client.post("/orders", headers={KEY: "k"})


# ---------------------------------------------------------------------- body limits


async def test_request_bodies_over_max_body_get_413(
    app: CountingApp, store: IdempotencyStore
) -> None:
    async def streamed(data: bytes) -> AsyncIterator[bytes]:
        for i in range(len(data)):
            yield data[i : i + 1]

    async with client_for(IdempotencyMiddleware(app, store, max_body=16)) as client:
        declared = await client.post("/orders", content=b"x" * 17, headers={KEY: "a"})
        doc = assert_problem(declared, 413)
        assert "at most 16 bytes" in doc["detail"]
        chunked = await client.post("/orders", content=streamed(b"x" * 17), headers={KEY: "b"})
        assert_problem(chunked, 413)
        assert app.calls == 0
        fits = await client.post("/orders", content=streamed(b"y" * 16), headers={KEY: "c"})
        assert fits.status_code == 201 and fits.json()["body"] == "y" * 16
        # Without a key, nothing is buffered and no limit applies.
        assert (await client.post("/orders", content=b"z" * 100)).status_code == 201
    assert store.stats().claims == 1


@pytest.mark.parametrize(
    ("declared", "refused"),
    [
        (b"9", False),
        (b"99", False),
        (b"100", False),
        (b"0000100", False),
        (b"101", True),
        (b"0101", True),
        (b"1000", True),
        (b"99999999999999999999", True),
    ],
)
async def test_a_declared_content_length_over_max_body_is_refused_before_the_body(
    app: CountingApp, declared: bytes, refused: bool
) -> None:
    # The declared length is compared as a number, whatever its digits (leading zeros too);
    # a body that fits is read and run even when its declared length is wrong.
    middleware = IdempotencyMiddleware(app, IdempotencyStore(), max_body=100)
    headers = [(b"idempotency-key", b'"k"'), (b"content-length", declared)]
    start, _ = await asgi_call(middleware, _post_scope(headers), b"x")
    assert start["status"] == (413 if refused else 201)
    assert app.calls == (0 if refused else 1)


# Bytes of the header fields of a /stream response: they count against max_response too.
STREAM_HEADERS = sum(len(k) + len(v) for k, v in start_message(200, 1)["headers"])


async def test_a_streamed_response_is_stored_whole_and_replayed(
    app: CountingApp, store: IdempotencyStore
) -> None:
    limit = STREAM_HEADERS + 30
    async with client_for(IdempotencyMiddleware(app, store, max_response=limit)) as client:
        first = await client.post("/stream/3", headers={KEY: "k"})
        assert first.content == b"0123456789" * 3
        replay = await client.post("/stream/3", headers={KEY: "k"})
        assert replay.content == first.content
        assert replay.headers["content-length"] == "30"
        assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_response_over_max_response_passes_through_and_is_not_stored(
    app: CountingApp, store: IdempotencyStore
) -> None:
    limit = STREAM_HEADERS + 29
    async with client_for(IdempotencyMiddleware(app, store, max_response=limit)) as client:
        first = await client.post("/stream/3", headers={KEY: "k"})
        assert first.content == b"0123456789" * 3  # the client still gets all of it
        second = await client.post("/stream/3", headers={KEY: "k"})
        assert "idempotent-replayed" not in second.headers
    assert app.calls == 2
    stats = store.stats()
    assert (stats.releases, stats.records, stats.inflight) == (2, 0, 0)


# ---------------------------------------------------------------------- what is stored


@pytest.mark.parametrize(
    ("status", "stored"),
    [
        *[(status, True) for status in (200, 303, 400, 404, 422)],
        *[(status, False) for status in (401, 408, 425, 429, 500, 503)],
    ],
)
async def test_default_stored_statuses(
    client: httpx.AsyncClient, app: CountingApp, status: int, stored: bool
) -> None:
    assert (status in DEFAULT_STORE_STATUSES) is stored
    await client.post(f"/status/{status}", headers={KEY: "k"})
    again = await client.post(f"/status/{status}", headers={KEY: "k"})
    assert again.status_code == status
    assert ("idempotent-replayed" in again.headers) is stored
    assert app.calls == (1 if stored else 2)


async def test_store_every_status_like_stripe(app: CountingApp, store: IdempotencyStore) -> None:
    middleware = IdempotencyMiddleware(app, store, store_statuses=range(100, 600))
    async with client_for(middleware) as client:
        await client.post("/status/500", headers={KEY: "k"})
        again = await client.post("/status/500", headers={KEY: "k"})
        assert again.status_code == 500 and again.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_an_app_exception_releases_the_key(
    client: httpx.AsyncClient, app: CountingApp, store: IdempotencyStore
) -> None:
    for _ in range(2):
        with pytest.raises(RuntimeError, match="handler failed"):
            await client.post("/boom", headers={KEY: "k"})
    assert app.calls == 2
    assert store.stats().releases == 2


# ---------------------------------------------------------------------- 503 and backends


async def test_503_when_the_in_flight_table_is_full(app: CountingApp, clock: FakeClock) -> None:
    store = IdempotencyStore(max_inflight=1, clock=clock)
    app.gate = asyncio.Event()
    async with client_for(IdempotencyMiddleware(app, store)) as client:
        first = asyncio.create_task(client.post("/orders", headers={KEY: "a"}))
        await app.entered.wait()
        busy = await client.post("/orders", headers={KEY: "b"})
        assert_problem(busy, 503)
        assert busy.headers["retry-after"] == "1"
        app.gate.set()
        await first
        assert (await client.post("/orders", headers={KEY: "b"})).status_code == 201


class Unavailable:
    """A backend whose every call fails, like Redis with the network down."""

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        raise ConnectionError("backend down")

    def complete(self, key: str, token: str, result: Any) -> bool:
        raise ConnectionError("backend down")

    def release(self, key: str, token: str) -> bool:
        raise ConnectionError("backend down")


async def test_503_when_the_store_fails(app: CountingApp, caplog: pytest.LogCaptureFixture) -> None:
    async with client_for(IdempotencyMiddleware(app, Unavailable())) as client:
        with caplog.at_level(logging.ERROR, logger="ttlstore"):
            response = await client.post("/orders", headers={KEY: "k"})
    assert_problem(response, 503)
    assert app.calls == 0
    assert "failed on begin()" in caplog.text


async def test_a_store_failing_after_the_run_still_delivers_the_response(
    app: CountingApp, caplog: pytest.LogCaptureFixture
) -> None:
    class FailsLater(Unavailable):
        def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
            return Started("t")

    async with client_for(IdempotencyMiddleware(app, FailsLater())) as client:
        with caplog.at_level(logging.ERROR, logger="ttlstore"):
            response = await client.post("/orders", headers={KEY: "k"})
    assert response.status_code == 201
    assert "failed to end a claim" in caplog.text


async def test_an_async_backend_works_the_same(app: CountingApp, store: IdempotencyStore) -> None:
    async with client_for(IdempotencyMiddleware(app, AsyncStore(store))) as client:
        await client.post("/orders", headers={KEY: "k"})
        again = await client.post("/orders", headers={KEY: "k"})
    assert again.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


# ---------------------------------------------------------------------- raw ASGI edge cases


async def test_the_result_is_stored_before_the_last_chunk_is_sent(
    app: CountingApp, store: IdempotencyStore
) -> None:
    """A client gone at the very end (send raises) can retry and get the replay."""
    middleware = IdempotencyMiddleware(app, store)
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "query_string": b"",
        "headers": [(b"idempotency-key", b"k")],
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def send_fails_at_the_end(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client went away")

    with pytest.raises(OSError):
        await middleware(scope, receive, send_fails_at_the_end)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    assert (b"idempotent-replayed", b"true") in sent[0]["headers"]
    assert sent[0]["status"] == 201
    assert app.calls == 1


async def test_a_client_gone_before_the_body_arrived_claims_nothing(
    app: CountingApp, store: IdempotencyStore
) -> None:
    middleware = IdempotencyMiddleware(app, store)
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "headers": [(b"idempotency-key", b"k")],
    }
    messages = [{"type": "http.request", "body": b"x", "more_body": True}]

    async def receive() -> Message:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing to answer")

    await middleware(scope, receive, send)
    assert app.calls == 0 and store.stats().claims == 0


async def test_a_claim_that_outlives_its_lease_is_not_stored(
    app: CountingApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = IdempotencyStore(lease=10, clock=clock)
    app.gate = asyncio.Event()
    async with client_for(IdempotencyMiddleware(app, store)) as client:
        first = asyncio.create_task(client.post("/orders", headers={KEY: "k"}))
        await app.entered.wait()
        clock.advance(10)
        app.gate.set()
        with caplog.at_level(logging.WARNING, logger="ttlstore"):
            await first
        assert "lease shorter than the request" in caplog.text
        assert (await client.post("/orders", headers={KEY: "k"})).headers["x-execution"] == "2"


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": "POST"}, TypeError, "methods must be a collection of method names"),
        ({"methods": ["PO ST"]}, ValueError, "methods must hold HTTP method names"),
        ({"header": "Idempotency Key"}, ValueError, "header must be a header field name"),
        ({"header": ""}, ValueError, "header must be a header field name, got ''"),
        ({"header": "Clé"}, ValueError, "header must be a header field name, got 'Clé'"),
        ({"header": 5}, TypeError, "header must be a header field name .str., got 5"),
        ({"methods": [5]}, TypeError, "methods must hold HTTP method names .str., got 5"),
        ({"required": "yes"}, TypeError, "required must be a bool, got 'yes'"),
        ({"tenant": "t"}, TypeError, "tenant must be a callable"),
        ({"max_body": 0}, ValueError, "max_body must be a positive int, got 0"),
        ({"max_response": 1.5}, TypeError, "max_response must be a positive int, got 1.5"),
        ({"store_statuses": 200}, TypeError, "store_statuses must be a collection of ints"),
        ({"store_statuses": [99]}, ValueError, r"HTTP statuses 100\.\.599, got 99"),
        ({"store_statuses": ["200"]}, TypeError, "store_statuses must hold ints, got '200'"),
    ],
)
def test_bad_middleware_arguments(
    app: CountingApp, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        IdempotencyMiddleware(app, IdempotencyStore(), **kwargs)


def test_the_store_and_app_must_be_what_they_claim(app: CountingApp) -> None:
    with pytest.raises(TypeError, match="store must have begin"):
        IdempotencyMiddleware(app, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        IdempotencyMiddleware(None, IdempotencyStore())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- fast paths = http_sf

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def key_by_http_sf(value: bytes) -> str | None:
    """The key rule as the README states it, computed by http_sf alone (the parser of record):
    an sf String or Token (parameters ignored), else a bare run of token characters; 1 to 255
    characters."""
    stripped = value.strip(b" \t")
    try:
        parsed = http_sf.parse(stripped, tltype="item")
    except http_sf.StructuredFieldError:
        parsed = None
    item = parsed[0] if isinstance(parsed, tuple) else None
    if isinstance(item, str):
        key = item
    elif isinstance(item, http_sf.Token):
        key = str(item)
    elif stripped and all(chr(b) in _TOKEN_CHARS for b in stripped):
        key = stripped.decode("ascii")
    else:
        return None
    return key if 1 <= len(key) <= 255 else None


_printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E))
_field_values = st.one_of(
    st.binary(max_size=40),
    _printable.map(str.encode),
    _printable.map(lambda text: b'"' + text.encode() + b'"'),  # quotes and escapes inside too
    st.text(alphabet=_TOKEN_CHARS + ":/", min_size=1).map(str.encode),
    st.builds(
        lambda n, quoted: (b'"%s"' if quoted else b"%s") % (b"k" * n),
        st.integers(250, 260),
        st.booleans(),
    ),
    st.builds(
        lambda pad, value, params: pad + value + params + pad,
        st.sampled_from([b"", b" ", b"\t", b"  "]),
        st.sampled_from([b'"abc"', b"abc", b"8e03978e-40d5-43e8", b"123", b"1.5", b"*x", b"%x"]),
        st.sampled_from([b"", b";a=1", b";a", b", b", b" x"]),
    ),
)


@given(_field_values)
@settings(max_examples=2_000, deadline=None)
def test_the_key_parser_agrees_with_http_sf(value: bytes) -> None:
    assert parse_idempotency_key(value) == key_by_http_sf(value)


@given(_field_values)
@settings(max_examples=2_000, deadline=None)
def test_the_middleware_s_plain_key_fast_path_agrees_with_http_sf(value: bytes) -> None:
    # The middleware takes the key plain_key() reads, if any, without the full parser.
    key = plain_key(value)
    if key is not None:
        assert key == key_by_http_sf(value) == parse_idempotency_key(value)


@given(_printable.filter(lambda text: '"' not in text and "\\" not in text))
def test_the_plain_key_fast_path_takes_every_plain_quoted_key(text: str) -> None:
    value = b'"' + text.encode() + b'"'
    expected = key_by_http_sf(value)
    assert plain_key(value) == expected
    assert parse_idempotency_key(value) == expected


@given(st.binary(max_size=300))
@settings(max_examples=2_000, deadline=None)
def test_plain_key_agrees_with_http_sf_on_any_bytes(value: bytes) -> None:
    # Quotes, backslashes, controls, DEL and non-ASCII bytes inside the quotes, any length.
    quoted = b'"' + value + b'"'
    for candidate in (value, quoted):
        key = plain_key(candidate)
        if key is not None:
            assert key == key_by_http_sf(candidate)
    plain = 1 <= len(value) <= MAX_KEY_LENGTH and all(
        0x20 <= byte <= 0x7E and byte not in b'"\\' for byte in value
    )
    assert (plain_key(quoted) is not None) == plain


async def _bytes_like_headers_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    headers = [[bytearray(b"content-type"), memoryview(b"text/plain")], (b"x-n", bytearray(b"1"))]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": b"made"})


def _post_scope(headers: list[tuple[bytes, Any]]) -> Scope:
    """The scope of a POST /orders with ``headers``, as a server hands it over."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "headers": headers,
    }


async def _post_raw(app: Any, key: bytes) -> list[Message]:
    """One POST straight through ``app`` (no HTTP client, which wants its headers as bytes)."""
    return await asgi_call(app, _post_scope([(b"idempotency-key", key)]), b"x")


async def test_scopes_and_messages_that_are_not_dicts_are_stored_and_replayed_alike() -> None:
    """The compiled build reads dicts natively; any other mapping, as scope, request
    message or response message, is guarded the same, and the app gets what it was given."""
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        request = await receive()
        start = {"type": "http.response.start", "status": 201, "headers": [(b"x-n", b"1")]}
        await send(NotADict(start))
        await send(NotADict({"type": "http.response.body", "body": b"made " + request["body"]}))

    async def receive() -> Message:
        return NotADict({"type": "http.request", "body": b"x", "more_body": False})

    async def post(middleware: IdempotencyMiddleware) -> list[Message]:
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await middleware(NotADict(_post_scope([(b"idempotency-key", b'"a"')])), receive, send)
        return sent

    store = IdempotencyStore()
    middleware = IdempotencyMiddleware(app, store)
    for _ in range(2):
        sent = await post(middleware)
        start, body = sent
        assert start["status"] == 201
        assert start["headers"][0] == (b"x-n", b"1")
        assert body["body"] == b"made x"
    assert len(scopes) == 1  # the second was a replay
    assert type(scopes[0]) is NotADict
    assert sent[0]["headers"][1] == (b"idempotent-replayed", b"true")
    assert store.stores[0].peek("asgi\x00\x00a")[2] == ((b"x-n", b"1"),)


async def test_bytes_like_response_headers_are_stored_as_bytes_and_replayed() -> None:
    store = IdempotencyStore()
    middleware = IdempotencyMiddleware(_bytes_like_headers_app, store)
    for key in (b'"a"', b'"b"'):  # the second response's copy comes from the shared table
        start, _ = await _post_raw(middleware, key)
        assert start["status"] == 201
    expected = ((b"content-type", b"text/plain"), (b"x-n", b"1"))
    for name in ("a", "b"):
        record = store.stores[0].peek(f"asgi\x00\x00{name}")
        assert record[2] == expected
        assert all(type(part) is bytes for header in record[2] for part in header)
    start, body = await _post_raw(middleware, b'"a"')
    assert start["headers"][:3] == [*expected, (b"idempotent-replayed", b"true")]
    assert body["body"] == b"made"


async def _fixed_headers_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    headers = [(b"content-type", b"application/json")]  # a new list and tuple each time
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_responses_with_equal_headers_share_one_stored_copy() -> None:
    store = IdempotencyStore()
    async with client_for(IdempotencyMiddleware(_fixed_headers_app, store)) as client:
        for key in ("a", "b"):
            assert (await client.post("/orders", content=b"x", headers={KEY: key})).is_success
        replay = await client.post("/orders", content=b"x", headers={KEY: "b"})
    assert replay.headers["content-type"] == "application/json"
    first, second = (store.stores[0].peek(f"asgi\x00\x00{key}") for key in ("a", "b"))
    assert first[2] == ((b"content-type", b"application/json"),)
    assert first[2] is second[2]


async def test_each_record_holds_its_own_responses_headers_when_an_app_reuses_its_list() -> None:
    # One list object, changed in place between responses: each record must hold what its
    # response had, whether it repeats the previous response's headers or an older one's.
    shared_list: list[tuple[bytes, bytes]] = []
    sets = {
        "a": [(b"content-type", b"application/json")],
        "b": [(b"content-type", b"text/plain"), (b"x-n", b"1")],
        "none": [],
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        shared_list[:] = sets[scope["path"].rsplit("/", 1)[1]]
        await send({"type": "http.response.start", "status": 201, "headers": shared_list})
        await send({"type": "http.response.body", "body": b"{}"})

    def scope_for(i: int, name: str) -> Scope:
        return {**_post_scope([(b"idempotency-key", b'"k-%d"' % i)]), "path": f"/o/{name}"}

    store = IdempotencyStore()
    middleware = IdempotencyMiddleware(app, store)
    order = ["a", "a", "b", "a", "none", "b", "b", "none", "a"]
    for i, name in enumerate(order):
        await asgi_call(middleware, scope_for(i, name), b"x")
    for i, name in enumerate(order):
        record = store.stores[0].peek(f"asgi\x00\x00k-{i}")
        assert record[2] == tuple(sets[name]), (i, name)
        start, _ = await asgi_call(middleware, scope_for(i, name), b"x")
        assert start["headers"][: len(sets[name])] == sets[name]
        assert (b"idempotent-replayed", b"true") in start["headers"]


class CountingStore(IdempotencyStore):
    """An in-memory store whose methods count their calls (a subclass overriding them)."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        self.calls.append("begin")
        return super().begin(key, fingerprint)

    def complete(self, key: str, token: str, result: Any) -> bool:
        self.calls.append("complete")
        return super().complete(key, token, result)

    def release(self, key: str, token: str) -> bool:
        self.calls.append("release")
        return super().release(key, token)


async def test_a_store_that_overrides_its_methods_is_called_through_them(
    app: CountingApp,
) -> None:
    """The middleware calls an in-memory store's core natively only when begin, complete and
    release are the store's own: overridden, they are what the middleware calls, and what
    either way stores answers the same replays."""
    store = CountingStore()
    async with client_for(IdempotencyMiddleware(app, store)) as client:
        first = await client.post("/orders", content=b"x", headers={KEY: "a"})
        again = await client.post("/orders", content=b"x", headers={KEY: "a"})
        with pytest.raises(RuntimeError, match="handler failed"):
            await client.post("/boom", content=b"x", headers={KEY: "b"})
    assert store.calls == ["begin", "complete", "begin", "begin", "release"]
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert isinstance(store.begin("asgi\x00\x00b", "any"), Started)  # released
    # The record the overriding path stored reads back as one the native path stores.
    plain = IdempotencyStore()
    async with client_for(IdempotencyMiddleware(CountingApp(), plain)) as client:
        await client.post("/orders", content=b"x", headers={KEY: "a"})
    assert plain.stores[0].peek("asgi\x00\x00a")[1:] == store.stores[0].peek("asgi\x00\x00a")[1:]


async def test_a_stored_response_holds_no_header_objects_of_its_own() -> None:
    # Objects allocated per stored record, everything counted (tracked or not): the lookup
    # key, the store's entry, the record, the fingerprint, and what the store's bookkeeping
    # takes. The headers (a tuple of (name, value) tuples) are one copy, shared by all.
    store = IdempotencyStore(maxsize=10_000)
    middleware = IdempotencyMiddleware(_fixed_headers_app, store)
    await _post_raw(middleware, b'"warm-up"')
    n = 2_000
    gc.collect()
    before = sys.getallocatedblocks()
    for i in range(n):
        await _post_raw(middleware, b'"k-%d"' % i)
    gc.collect()
    per_record = (sys.getallocatedblocks() - before) / n
    assert len(store.stores[0]) == n + 1
    assert per_record < 6.5, per_record  # 6 measured; a copy per record would make it 8


class _JunkReplays:
    """A sync backend whose every answer is a Replay of something no response is."""

    def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        return Replay("not a response")

    def complete(self, key: str, token: str, result: Any) -> bool:
        return False

    def release(self, key: str, token: str) -> bool:
        return False


async def test_a_replay_of_no_stored_response_is_a_type_error_naming_it(app: CountingApp) -> None:
    # The same message in both builds (the compiled one must not pre-empt it with mypyc's).
    middleware = IdempotencyMiddleware(app, _JunkReplays())
    async with client_for(middleware) as client:
        with pytest.raises(TypeError, match="holds 'not a response', not a StoredResponse"):
            await client.post("/orders", content=b"x", headers={KEY: "k"})
    assert app.calls == 0


def test_the_middleware_is_a_coroutine_function_for_servers_that_ask() -> None:
    # uvicorn and others tell ASGI 3 apps from ASGI 2 ones by asking this, in both builds.
    middleware = IdempotencyMiddleware(CountingApp(), IdempotencyStore())
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert asyncio.iscoroutinefunction(middleware.__call__)


def fingerprint_by_definition(method: str, path: bytes, query: bytes, body: bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (method.encode("ascii"), path, query, body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@given(
    st.sampled_from(["POST", "PATCH", "PUT"]),
    st.binary(max_size=30),
    st.binary(max_size=30),
    st.binary(max_size=300),
)
def test_the_fingerprint_is_blake2b_over_length_prefixed_parts(
    method: str, path: bytes, query: bytes, body: bytes
) -> None:
    assert fingerprint(method, path, query, body) == fingerprint_by_definition(
        method, path, query, body
    )


@given(
    st.sampled_from(["POST", "PATCH", "PUT"]),
    st.integers(250, 1100).map(lambda n: b"/" * n),
    st.integers(250, 300).map(lambda n: b"q" * n),
    st.binary(max_size=20),
)
def test_a_middleware_s_fingerprint_is_the_defined_one_for_long_paths_too(
    method: str, path: bytes, query: bytes, body: bytes
) -> None:
    # The lengths of short parts come from a table, of long ones from struct: both as defined.
    expected = fingerprint_by_definition(method, path, query, body)
    assert Fingerprinter(method)(path, query, body) == expected
    assert Fingerprinter(method)(query, path, body) == fingerprint_by_definition(
        method, query, path, body
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"/a", b"/b", b"/a?", b""]) | st.binary(max_size=8),
            st.sampled_from([b"", b"x=1", b"/a"]) | st.binary(max_size=8),
            st.binary(max_size=40),
        ),
        max_size=40,
    )
)
def test_one_fingerprinter_reused_gives_the_defined_fingerprint_every_time(
    requests: list[tuple[bytes, bytes, bytes]],
) -> None:
    # A Fingerprinter keeps hash states per (path, query): reused over repeated and distinct
    # paths and queries (an empty one too), each answer is still the defined one.
    fingerprinter = Fingerprinter("PATCH")
    for path, query, body in requests * 2:
        expected = fingerprint_by_definition("PATCH", path, query, body)
        assert fingerprinter(path, query, body) == expected


def test_a_fingerprinter_keeps_a_bounded_number_of_hash_states() -> None:
    fingerprinter = Fingerprinter("POST")
    for i in range(1_000):
        path = b"/orders/%d" % i
        assert fingerprinter(path, b"", b"{}") == fingerprint_by_definition(
            "POST", path, b"", b"{}"
        )
    assert 0 < len(fingerprinter._states) <= 128


def test_the_fingerprint_keeps_parts_apart() -> None:
    assert fingerprint("POST", b"/a", b"b", b"") != fingerprint("POST", b"/ab", b"", b"")


# ---------------------------------------------------------------------- Retry-After of a 409


async def test_409_retry_after_is_1_while_this_process_runs_the_owner(
    client: httpx.AsyncClient, app: CountingApp, clock: FakeClock
) -> None:
    app.gate = asyncio.Event()
    first = asyncio.create_task(client.post("/orders", content=b"x", headers={KEY: "k"}))
    await app.entered.wait()
    clock.advance(5)  # most of the 60 s lease is left, but the owner is alive here
    duplicate = await client.post("/orders", content=b"x", headers={KEY: "k"})
    assert_problem(duplicate, 409)
    assert duplicate.headers["retry-after"] == "1"
    app.gate.set()
    await first


async def test_409_retry_after_is_the_lease_left_when_the_owner_is_elsewhere(
    app: CountingApp, clock: FakeClock
) -> None:
    store = IdempotencyStore(lease=60, clock=clock)
    # Another replica (or a request this middleware no longer tracks) holds the claim.
    other = IdempotencyMiddleware(app, store)
    async with client_for(IdempotencyMiddleware(app, store)) as client:
        app.gate = asyncio.Event()
        async with client_for(other) as other_client:
            first = asyncio.create_task(
                other_client.post("/orders", content=b"x", headers={KEY: "k"})
            )
            await app.entered.wait()
            clock.advance(10.5)
            duplicate = await client.post("/orders", content=b"x", headers={KEY: "k"})
            assert_problem(duplicate, 409)
            assert duplicate.headers["retry-after"] == "50"  # 49.5 s left, rounded up
            clock.advance(49)  # 0.5 s left: never below 1
            late = await client.post("/orders", content=b"x", headers={KEY: "k"})
            assert late.headers["retry-after"] == "1"
            app.gate.set()
            await first


async def test_409_retry_after_without_a_lease_hint_is_1(app: CountingApp) -> None:
    class Unknown:
        def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
            return InProgress()

        def complete(self, key: str, token: str, result: Any) -> bool:
            return False

        def release(self, key: str, token: str) -> bool:
            return False

    async with client_for(IdempotencyMiddleware(app, Unknown())) as client:
        duplicate = await client.post("/orders", headers={KEY: "k"})
    assert_problem(duplicate, 409)
    assert duplicate.headers["retry-after"] == "1"


async def test_409_retry_after_from_redis_is_the_claims_pttl(
    app: CountingApp, redis_server: RedisServer
) -> None:
    from ttlstore.redis import AsyncRedisIdempotencyStore

    store = AsyncRedisIdempotencyStore.from_url(
        redis_server.url, lease=30, prefix=f"retry-{uuid.uuid4().hex}"
    )
    try:
        middleware = IdempotencyMiddleware(app, store)
        # Claimed by another replica: the same lookup key the middleware builds.
        lookup = "asgi\x00\x00k"
        held = await store.begin(lookup, fingerprint("POST", b"/orders", b"", b"x"))
        assert isinstance(held, Started)
        async with client_for(middleware) as client:
            duplicate = await client.post("/orders", content=b"x", headers={KEY: "k"})
        assert_problem(duplicate, 409)
        assert 29 <= int(duplicate.headers["retry-after"]) <= 30
        assert app.calls == 0
    finally:
        await store.client.aclose()


# ---------------------------------------------------------------------- quiet logs in an outage


async def test_an_outage_logs_one_line_per_interval_with_the_count(
    app: CountingApp,
    fresh_redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ttlstore.redis import AsyncRedisIdempotencyStore

    clock = FakeClock()
    monkeypatch.setattr(_faults, "clock", clock)
    store = AsyncRedisIdempotencyStore.from_url(fresh_redis_server.url, timeout=0.5)
    fresh_redis_server.stop()  # Redis is down for the whole run
    middleware = IdempotencyMiddleware(app, store)
    statuses = []
    try:
        async with client_for(middleware) as client:
            with caplog.at_level(logging.WARNING, logger="ttlstore"):
                for i in range(1_000):
                    response = await client.post("/orders", headers={KEY: f"k{i}"})
                    statuses.append(response.status_code)
                    clock.advance(1 / 16)  # 1 000 requests over 62.5 s: 160 per 10 s
    finally:
        await store.client.aclose()
    assert set(statuses) == {503} and app.calls == 0
    # One line at the first fault, then one per 10 s interval, each with the faults counted
    # since the line before and the last error (the request that triggered it).
    counts = fault_counts(caplog.records, "IdempotencyMiddleware")
    assert counts == [1, 160, 160, 160, 160, 160, 160]
    assert middleware.faults == 1_000
    ours = [r for r in caplog.records if r.getMessage().startswith("IdempotencyMiddleware")]
    assert "'asgi\\x00\\x00k960'" in ours[-1].getMessage()
    assert not any(record.exc_info for record in ours)  # an outage is no bug: no traceback
    # The backend's own components (its background release of failed begins) log on the same
    # clock, also at most once per interval each: 62.5 s hold 7 intervals.
    others = [r.getMessage().split(":")[0] for r in caplog.records if r not in ours]
    assert all(others.count(component) <= 7 for component in others), others
