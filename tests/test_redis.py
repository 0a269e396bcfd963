"""ttlstore.redis against a real redis-server: exact Lua arithmetic, layout, codecs, faults.

The backend-neutral behaviour is in test_backend_contract.py; this module covers what only the
Redis backends have: the Lua script agreeing with the in-memory arithmetic to the unit (a
hypothesis test that plants arbitrary bucket states), key names and Cluster hash tags, script
reloading, result codecs, retried scripts, the middlewares and decorators on Redis,
concurrency, and faults on private servers that are stopped (refused connections) or paused
with SIGSTOP (connections hang until the socket timeout).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import redis.crc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._support import CountingApp
from ttlstore._gcra import decide, full_at
from ttlstore.asgi import IdempotencyMiddleware, RateLimitMiddleware
from ttlstore.idempotency import InProgress, Replay, Started, idempotent
from ttlstore.ratelimit import Limit, RateLimited
from ttlstore.records import Returned, StoredResponse
from ttlstore.redis import (
    AsyncRedisIdempotencyStore,
    AsyncRedisTokenBucketLimiter,
    BackendUnavailable,
    JsonCodec,
    PickleCodec,
    RedisIdempotencyStore,
    RedisTokenBucketLimiter,
)
from ttlstore.testing import RedisServer

NS = 10**9
SLOW = Fraction(1, 1000)


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
async def aclient(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    await client.aclose()


# ====================================================================== import and arguments


def test_importing_without_redis_py_names_the_extra() -> None:
    code = "import sys; sys.modules['redis'] = None; import ttlstore.redis"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "ImportError: ttlstore.redis needs redis-py" in run.stderr
    assert "pip install 'ttlstore[redis]'" in run.stderr
    # The package itself never imports redis.
    code = "import sys; sys.modules['redis'] = None; import ttlstore, ttlstore.idempotency"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_error": "ignore"}, ValueError, "on_error must be 'allow', 'deny' or 'raise'"),
        ({"prefix": "a{b}"}, ValueError, "prefix must be a non-empty str without braces"),
        ({"prefix": ""}, ValueError, "prefix must be"),
        ({"prefix": 3}, TypeError, "prefix must be a str, got 3"),
    ],
)
def test_bad_limiter_arguments_are_named(
    admin: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RedisTokenBucketLimiter(admin, 1, 5, **kwargs)


def test_limits_are_checked_as_in_memory_and_must_fit_exact_lua_arithmetic(admin: Any) -> None:
    with pytest.raises(TypeError, match="give rate and capacity, or limits"):
        RedisTokenBucketLimiter(admin)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="capacity must be a positive int, got 0"):
        RedisTokenBucketLimiter(admin, 1, 0)
    with pytest.raises(ValueError, match="several limits need distinct names"):
        RedisTokenBucketLimiter(admin, limits=[Limit(1, 2), Limit(1, 3)])
    with pytest.raises(ValueError, match="finer than the Redis limiter can count exactly"):
        RedisTokenBucketLimiter(admin, Fraction(10**19 + 1), 5)
    with pytest.raises(ValueError, match="takes too long to refill"):
        RedisTokenBucketLimiter(admin, Fraction(1, 10**13), 10**6)
    with pytest.raises(TypeError, match="client must be a redis-py client, got 'redis://x'"):
        RedisTokenBucketLimiter("redis://x", 1, 5)  # type: ignore[call-overload]
    limiter = RedisTokenBucketLimiter(admin, 1, 5, prefix=prefix())
    with pytest.raises(TypeError, match="key must be a str, got 7"):
        limiter.acquire(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost must be a positive int, got 0"):
        limiter.acquire("k", 0)
    assert limiter.acquire("k", 1).allowed  # its arguments are cached now ...
    for cost in (True, 1.0):  # ... and nothing that merely hashes like 1 may use them
        with pytest.raises(TypeError, match="cost must be a positive int"):
            limiter.acquire("k", cost)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ttl": None}, TypeError, "ttl must be a positive number of seconds, got None"),
        ({"ttl": 0}, ValueError, "ttl must be a positive finite number of seconds, got 0"),
        ({"lease": float("nan")}, ValueError, "lease must be a positive finite number"),
        ({"lease": "60"}, TypeError, "lease must be a positive number of seconds"),
        ({"codec": object()}, TypeError, "codec must have encode"),
        ({"prefix": "x}"}, ValueError, "prefix must be a non-empty str without braces"),
    ],
)
def test_bad_idempotency_arguments_are_named(
    admin: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RedisIdempotencyStore(admin, **kwargs)


def test_begin_checks_key_and_fingerprint_types(admin: Any) -> None:
    store = RedisIdempotencyStore(admin, prefix=prefix())
    with pytest.raises(TypeError, match="key must be a str, got b'k'"):
        store.begin(b"k", "fp")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fingerprint must be a str, got None"):
        store.begin("k", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token must be a str, got 1"):
        store.release("k", 1)  # type: ignore[arg-type]


def test_from_url_bounds_the_client_and_checks_its_arguments(redis_server: RedisServer) -> None:
    limiter = RedisTokenBucketLimiter.from_url(redis_server.url, 1, 5, timeout=0.3, retries=2)
    try:
        kwargs = limiter.client.get_connection_kwargs()
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.3
        assert kwargs["retry"].get_retries() == 2
        assert limiter.acquire("k").allowed
    finally:
        limiter.client.close()
    with pytest.raises(
        ValueError, match="timeout must be a positive finite number of seconds, got 0"
    ):
        RedisIdempotencyStore.from_url(redis_server.url, timeout=0)
    with pytest.raises(TypeError, match=r"retries must be a non-negative int, got 1\.5"):
        RedisIdempotencyStore.from_url(redis_server.url, retries=1.5)  # type: ignore[arg-type]


async def test_async_from_url_makes_an_asyncio_client(redis_server: RedisServer) -> None:
    store = AsyncRedisIdempotencyStore.from_url(redis_server.url, ttl=5, prefix=prefix())
    try:
        assert isinstance(store.client, redis.asyncio.Redis)
        assert isinstance(await store.begin("k", "fp"), Started)
    finally:
        await store.client.aclose()


def test_a_client_without_socket_timeout_is_warned_about(
    redis_server: RedisServer, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=None)
    try:
        with caplog.at_level(logging.WARNING, logger="ttlstore"):
            RedisTokenBucketLimiter(admin, 1, 5)  # socket_timeout=5: fine
            assert caplog.records == []
            RedisIdempotencyStore(client)
        assert "RedisIdempotencyStore: the Redis client has no socket_timeout" in caplog.text
    finally:
        client.close()


def test_reprs_show_the_configuration(admin: Any) -> None:
    limiter = RedisTokenBucketLimiter(admin, 2, 10, prefix="rl", on_error="deny")
    assert repr(limiter) == (
        "<RedisTokenBucketLimiter limits=[10@2/s] prefix='rl' on_error='deny'>"
    )
    assert limiter.limits == (Limit(2, 10),)
    assert (limiter.on_error, limiter.prefix, limiter.errors) == ("deny", "rl", 0)
    store = RedisIdempotencyStore(admin, ttl=1.5, lease=0.25, prefix="idem")
    assert repr(store) == (
        "<RedisIdempotencyStore ttl=1.5 lease=0.25 prefix='idem' codec=JsonCodec()>"
    )
    assert (store.ttl, store.lease) == (1.5, 0.25)


# ====================================================================== exact arithmetic


def _rates() -> st.SearchStrategy[Fraction | float]:
    fractions = st.builds(
        Fraction, st.integers(1, 10**6), st.integers(1, 10**4)
    )  # 1e-4 .. 1e6 per second, with awkward denominators
    floats = st.sampled_from([0.1, 0.3, 1 / 3, 2 / 3, 10 / 3, 1 / 7, 2.5, 7.0, 123.456, 1e6 / 7])
    return st.one_of(fractions, floats, st.floats(1e-3, 1e6))


@pytest.fixture(scope="module")
def module_client(redis_server: RedisServer) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.data(),
    rates=st.lists(_rates(), min_size=1, max_size=3),
    take=st.booleans(),
)
def test_the_script_decides_and_stores_exactly_what_the_in_memory_arithmetic_does(
    module_client: Any, data: st.DataObject, rates: list[Fraction | float], take: bool
) -> None:
    """Plant arbitrary TATs (in debt or long past, on any sub-millisecond unit), run the
    script, and compare its decision, the stored TATs and the key's expiry with the model."""
    limits = [
        Limit(rate, data.draw(st.integers(1, 10**6), label="capacity"), f"l{i}")
        for i, rate in enumerate(rates)
    ]
    limiter = RedisTokenBucketLimiter(module_client, limits=limits, prefix=prefix())
    buckets = limiter._buckets
    cost = data.draw(st.integers(1, min(limit.capacity for limit in limits)), label="cost")
    seconds, micros = module_client.time()
    approx_now = seconds * NS + micros * 1000
    planted = {}
    for field, bucket in zip(limiter._fields, buckets, strict=True):
        if data.draw(st.booleans(), label="stored"):
            offset = data.draw(
                st.integers(-bucket.tolerance, bucket.tolerance + bucket.interval * cost)
            )
            ns, remainder = divmod(approx_now * bucket.scale + offset, bucket.scale)
            planted[field] = f"{ns}:{remainder}"
    name = f"{limiter.prefix}:{{k}}:bucket"
    if planted:
        module_client.hset(name, mapping=planted)
    keys, args, _ = limiter._call("k", cost, take)
    # One MULTI/EXEC, so that the key is read right after the script. A key whose buckets are
    # full again within the millisecond may still be gone: then its deadline must have passed.
    pipe = module_client.pipeline(transaction=True)
    limiter._script(keys, args, client=pipe)
    pipe.hgetall(name)
    pipe.pexpiretime(name)
    pipe.time()
    reply, stored_raw, expires_at, (read_s, read_us) = pipe.execute()
    decision = limiter._decision(reply, cost, take)  # raises if the two disagree
    now = int(reply[1]) * NS + int(reply[2]) * 1000
    state = tuple(
        0 if field not in planted else _units(planted[field], bucket.scale)
        for field, bucket in zip(limiter._fields, buckets, strict=True)
    )
    expected, new_state = decide(buckets, state, now, cost, take)
    assert decision == expected
    stored = {k.decode(): v.decode() for k, v in stored_raw.items()}
    if take and new_state is not None:
        # Expires at the first whole millisecond at which every bucket is full.
        full_ms = -(-full_at(buckets, new_state, now) // 10**6)
        if not stored:
            assert read_s * 1000 + read_us // 1000 >= full_ms
            return
        assert expires_at == full_ms
        assert stored.keys() == set(limiter._fields)
        for field, bucket, tat in zip(limiter._fields, buckets, new_state, strict=True):
            assert _units(stored[field], bucket.scale) == tat
            assert stored[field] == f"{tat // bucket.scale}:{tat % bucket.scale}"
    else:
        assert stored == planted
    module_client.delete(name)


def _units(text: str, scale: int) -> int:
    ns, remainder = text.split(":")
    return int(ns) * scale + int(remainder)


# ====================================================================== layout and scripts


def test_keys_are_prefixed_and_hash_tagged_per_logical_key(admin: Any) -> None:
    p = prefix()
    RedisTokenBucketLimiter(admin, SLOW, 5, prefix=p).acquire("user:1")
    store = RedisIdempotencyStore(admin, prefix=p)
    store.begin("tenant\x00key", "fp")
    names = sorted(admin.scan_iter(match=f"{p}:*"))
    assert names == [
        f"{p}:{{tenant\x00key}}:idempotency".encode(),
        f"{p}:{{user:1}}:bucket".encode(),
    ]
    assert redis.crc.key_slot(names[1]) == redis.crc.key_slot(b"user:1")
    assert redis.crc.key_slot(names[0]) == redis.crc.key_slot(b"tenant\x00key")
    assert admin.hgetall(names[1]) == {
        b"1000000000000/1:5": admin.hget(names[1], "1000000000000/1:5")
    }
    assert admin.hget(names[0], "state") == b"claim"


def test_scripts_are_loaded_again_after_a_script_flush(admin: Any) -> None:
    limiter = RedisTokenBucketLimiter(admin, SLOW, 5, prefix=prefix())
    store = RedisIdempotencyStore(admin, prefix=prefix())
    assert limiter.acquire("k").remaining == 4
    admin.script_flush()
    assert limiter.acquire("k").remaining == 3
    admin.script_flush()
    token = store.begin("k", "fp")
    assert isinstance(token, Started)
    admin.script_flush()
    assert store.complete("k", token.token, "done") is True


def test_a_retried_begin_or_complete_recognises_itself(admin: Any) -> None:
    """redis-py resends a script whose reply was lost: it must not turn into 409 or False."""
    store = RedisIdempotencyStore(admin, prefix=prefix())
    keys, args, token = store._begin_call("k", "fp")
    assert store._begin(keys, args) == [b"started"]
    assert store._begin(keys, args) == [b"started"]  # the same call again: still ours
    assert isinstance(store.begin("k", "fp"), InProgress)  # anyone else: in progress
    keys, args = store._complete_call("k", token, JsonCodec().encode(1))
    assert store._complete(keys, args) == 1
    assert store._complete(keys, args) == 1  # the same call again
    assert store.complete("k", token, 2) is False  # a second complete: over, as in memory
    assert store.begin("k", "fp") == Replay(1)


def test_decoding_clients_work_too(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5, decode_responses=True)
    try:
        limiter = RedisTokenBucketLimiter(client, SLOW, 3, prefix=prefix())
        assert [limiter.acquire("k").remaining for _ in range(3)] == [2, 1, 0]
        assert not limiter.acquire("k").allowed
        for codec in (JsonCodec(), PickleCodec()):
            store = RedisIdempotencyStore(client, prefix=prefix(), codec=codec)
            outcome = store.begin("k", "fp")
            assert isinstance(outcome, Started)
            response = StoredResponse(201, ((b"x-bin", b"\xff\x00"),), b"\x00\xfe body")
            assert store.complete("k", outcome.token, response)
            assert store.begin("k", "fp") == Replay(response)
    finally:
        client.close()


# ====================================================================== codecs


def test_json_codec_carries_responses_and_json_values_unchanged() -> None:
    codec = JsonCodec()
    response = StoredResponse(200, ((b"content-type", b"text/plain"), (b"x", b"\x80")), b"\xff")
    returned = Returned
    for value in (
        response,
        None,
        {"a": [1, 2.5, "x", None, True, {"b": []}]},
        "é",
        returned({"id": 7}),
        returned(None),
    ):
        data = codec.encode(value)
        assert data.isascii()
        assert codec.decode(data) == value


@pytest.mark.parametrize(
    "value",
    [(1, 2), {1: "a"}, {"a": (1,)}, float("nan"), {1, 2}, b"bytes", Fraction(1, 3)],
)
def test_json_codec_refuses_what_json_would_alter(value: Any) -> None:
    with pytest.raises(TypeError, match="JSON would not give it back unchanged"):
        JsonCodec().encode(value)
    with pytest.raises(TypeError, match="JSON would not give it back unchanged"):
        JsonCodec().encode(Returned(value))


def test_json_codec_refuses_foreign_data_and_pickle_codec_carries_anything() -> None:
    with pytest.raises(ValueError, match="JsonCodec did not write"):
        JsonCodec().decode(b'{"t": "mystery"}')
    codec = PickleCodec()
    error = KeyError("gone")
    back = codec.decode(codec.encode(error))
    assert type(back) is KeyError and back.args == ("gone",)
    with pytest.raises(TypeError, match="PickleCodec cannot pickle"):
        codec.encode(lambda: None)
    with pytest.raises(ValueError, match=r"protocol must be 0\.\."):
        PickleCodec(99)
    assert repr(PickleCodec(4)) == "PickleCodec(protocol=4)"


def test_a_result_the_codec_refuses_releases_the_claim(admin: Any) -> None:
    store = RedisIdempotencyStore(admin, prefix=prefix())
    outcome = store.begin("k", "fp")
    assert isinstance(outcome, Started)
    with pytest.raises(TypeError, match=r"cannot store \(1, 2\)"):
        store.complete("k", outcome.token, (1, 2))
    assert isinstance(store.begin("k", "fp"), Started)  # released: a retry runs again


async def test_async_a_refused_result_releases_the_claim_too(aclient: Any) -> None:
    store = AsyncRedisIdempotencyStore(aclient, prefix=prefix())
    outcome = await store.begin("k", "fp")
    assert isinstance(outcome, Started)
    with pytest.raises(TypeError, match="cannot store"):
        await store.complete("k", outcome.token, {1: 2})
    assert isinstance(await store.begin("k", "fp"), Started)


# ====================================================================== decorators and middlewares


async def test_idempotent_runs_once_across_replicas_and_waits_for_a_remote_owner(
    redis_server: RedisServer,
) -> None:
    p = prefix()
    clients = [redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5) for _ in range(2)]
    stores = [AsyncRedisIdempotencyStore(client, prefix=p) for client in clients]
    runs = 0
    gate = asyncio.Event()

    def replica(store: AsyncRedisIdempotencyStore) -> Any:
        @idempotent(store, key=lambda order: order, wait=True, namespace="charge")
        async def charge(order: str) -> dict[str, Any]:
            nonlocal runs
            runs += 1
            await gate.wait()
            return {"order": order, "run": runs}

        return charge

    first, second = replica(stores[0]), replica(stores[1])
    try:
        owner = asyncio.create_task(first("o-1"))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(second("o-1"))  # the owner is "remote": it polls
        await asyncio.sleep(0.05)
        gate.set()
        assert await owner == await waiter == {"order": "o-1", "run": 1}
        assert await second("o-1") == {"order": "o-1", "run": 1}
        assert runs == 1
    finally:
        for client in clients:
            await client.aclose()


def test_store_errors_needs_pickle_codec_to_replay_an_exception(admin: Any) -> None:
    store = RedisIdempotencyStore(admin, prefix=prefix(), codec=PickleCodec())
    runs = 0

    @idempotent(store, key=lambda n: str(n), store_errors=True, namespace="f")
    def fail(n: int) -> None:
        nonlocal runs
        runs += 1
        raise LookupError(f"no {n}")

    for _ in range(2):
        with pytest.raises(LookupError, match="no 3"):
            fail(3)
    assert runs == 1


async def test_idempotency_middleware_replays_across_replicas(redis_server: RedisServer) -> None:
    p = prefix()
    clients = [redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5) for _ in range(2)]
    app = CountingApp()
    replicas = [
        IdempotencyMiddleware(app, AsyncRedisIdempotencyStore(c, prefix=p)) for c in clients
    ]
    transports = [httpx.ASGITransport(app=replica) for replica in replicas]
    try:
        async with (
            httpx.AsyncClient(transport=transports[0], base_url="http://t") as one,
            httpx.AsyncClient(transport=transports[1], base_url="http://t") as two,
        ):
            first = await one.post("/orders", json={"n": 1}, headers={"Idempotency-Key": "k1"})
            again = await two.post("/orders", json={"n": 1}, headers={"Idempotency-Key": "k1"})
            other = await two.post("/orders", json={"n": 2}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 201
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        assert other.status_code == 422
        assert app.calls == 1
    finally:
        for client in clients:
            await client.aclose()


async def test_rate_limit_middleware_shares_buckets_across_replicas(
    redis_server: RedisServer,
) -> None:
    async def hello(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})

    p = prefix()
    clients = [redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5) for _ in range(2)]
    replicas = [
        RateLimitMiddleware(hello, AsyncRedisTokenBucketLimiter(c, SLOW, 3, prefix=p))
        for c in clients
    ]
    try:
        statuses = []
        for i in range(5):
            transport = httpx.ASGITransport(app=replicas[i % 2])
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                response = await http.get("/")
                statuses.append(response.status_code)
        assert statuses == [200, 200, 200, 429, 429]
        assert response.headers["retry-after"] == "1000"
    finally:
        for client in clients:
            await client.aclose()


# ====================================================================== concurrency


async def test_eight_asyncio_clients_on_one_bucket_admit_exactly_its_capacity(
    redis_server: RedisServer,
) -> None:
    capacity, p = 60, prefix()
    clients = [redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5) for _ in range(8)]
    limiters = [AsyncRedisTokenBucketLimiter(c, SLOW, capacity, prefix=p) for c in clients]

    async def hammer(limiter: AsyncRedisTokenBucketLimiter) -> list[int]:
        admitted = []
        for _ in range(25):  # 8 * 25 = 200 attempts on 60 tokens
            decision = await limiter.acquire("hot")
            if decision.allowed:
                admitted.append(decision.remaining)
        return admitted

    try:
        results = await asyncio.gather(*(hammer(limiter) for limiter in limiters))
    finally:
        for client in clients:
            await client.aclose()
    remaining = sorted(r for result in results for r in result)
    # Exactly the capacity (refill: one token per 1000 s), each token handed out once.
    assert remaining == list(range(capacity))


def test_eight_threads_on_one_bucket_admit_exactly_its_capacity(redis_server: RedisServer) -> None:
    capacity, p = 40, prefix()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5, max_connections=8)
    limiter = RedisTokenBucketLimiter(client, SLOW, capacity, prefix=p)
    admitted: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(15):
            decision = limiter.acquire("hot")
            if decision.allowed:
                with lock:
                    admitted.append(decision.remaining)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        client.close()
    assert sorted(admitted) == list(range(capacity))


# ====================================================================== faults

TIMEOUT = 0.2
RETRIES = 1
# A failing call: each attempt may spend a connect timeout and a read timeout.
BOUND = (RETRIES + 1) * 2 * TIMEOUT + 1.0


def _break(server: RedisServer, how: str) -> None:
    if how == "stopped":
        server.stop()  # connections are refused (or reset)
    else:
        server.pause()  # connections hang until the socket timeout


class Clock:
    def __enter__(self) -> Clock:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self.start


@pytest.mark.parametrize("how", ["stopped", "paused"])
@pytest.mark.parametrize("policy", ["allow", "deny", "raise"])
def test_limiter_follows_its_policy_within_the_timeout(
    fresh_redis_server: RedisServer, policy: Any, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisTokenBucketLimiter.from_url(
        fresh_redis_server.url, SLOW, 5, timeout=TIMEOUT, retries=RETRIES, on_error=policy
    )
    try:
        assert limiter.acquire("k").remaining == 4  # a pooled connection, then the fault
        _break(fresh_redis_server, how)
        with caplog.at_level(logging.WARNING, logger="ttlstore"), Clock() as clock:
            if policy == "raise":
                with pytest.raises(BackendUnavailable) as raised:
                    limiter.acquire("k")
                assert isinstance(raised.value.__cause__, redis.RedisError)
            else:
                decision = limiter.acquire("k")
                assert decision.degraded
                assert decision.allowed is (policy == "allow")
                assert decision.remaining == (4 if policy == "allow" else 0)
                assert decision.retry_after == (0.0 if policy == "allow" else 1.0)
                assert decision.degraded.startswith(("ConnectionError: ", "TimeoutError: "))
        assert clock.elapsed < BOUND
        assert limiter.errors == 1
        action = {"allow": "allowing", "deny": "denying", "raise": "raising"}[policy]
        assert f"RedisTokenBucketLimiter {action}: " in caplog.text
        assert "(1 time(s) since the last report" in caplog.text
    finally:
        limiter.client.close()


@pytest.mark.parametrize("how", ["stopped", "paused"])
@pytest.mark.parametrize("policy", ["allow", "deny", "raise"])
async def test_async_limiter_follows_its_policy_within_the_timeout(
    fresh_redis_server: RedisServer, policy: Any, how: str
) -> None:
    limiter = AsyncRedisTokenBucketLimiter.from_url(
        fresh_redis_server.url, SLOW, 5, timeout=TIMEOUT, retries=RETRIES, on_error=policy
    )
    try:
        assert (await limiter.acquire("k")).remaining == 4
        _break(fresh_redis_server, how)
        with Clock() as clock:
            if policy == "raise":
                with pytest.raises(BackendUnavailable):
                    await limiter.acquire("k")
                with pytest.raises(BackendUnavailable):
                    await limiter.peek("k")
            else:
                decision = await limiter.acquire("k")
                assert decision.degraded
                assert decision.allowed is (policy == "allow")
                assert (await limiter.peek("k")).allowed is (policy == "allow")
        assert clock.elapsed < 2 * BOUND  # two calls
        assert limiter.errors == 2
        with pytest.raises(BackendUnavailable):
            await limiter.reset("k")
    finally:
        await limiter.client.aclose()


@pytest.mark.parametrize("how", ["stopped", "paused"])
def test_idempotency_store_raises_backend_unavailable_within_the_timeout(
    fresh_redis_server: RedisServer, how: str
) -> None:
    store = RedisIdempotencyStore.from_url(fresh_redis_server.url, timeout=TIMEOUT, retries=RETRIES)
    try:
        outcome = store.begin("k", "fp")
        assert isinstance(outcome, Started)
        _break(fresh_redis_server, how)
        for call in (
            lambda: store.begin("k2", "fp"),
            lambda: store.complete("k", outcome.token, "x"),
            lambda: store.release("k", outcome.token),
        ):
            with Clock() as clock, pytest.raises(BackendUnavailable, match="Redis failed to"):
                call()
            assert clock.elapsed < BOUND
    finally:
        store.client.close()


@pytest.mark.parametrize("how", ["stopped", "paused"])
async def test_async_idempotency_store_raises_backend_unavailable_within_the_timeout(
    fresh_redis_server: RedisServer, how: str
) -> None:
    store = AsyncRedisIdempotencyStore.from_url(
        fresh_redis_server.url, timeout=TIMEOUT, retries=RETRIES
    )
    try:
        outcome = await store.begin("k", "fp")
        assert isinstance(outcome, Started)
        _break(fresh_redis_server, how)
        for call in (
            lambda: store.begin("k2", "fp"),
            lambda: store.complete("k", outcome.token, "x"),
            lambda: store.release("k", outcome.token),
        ):
            with Clock() as clock, pytest.raises(BackendUnavailable) as raised:
                await call()
            assert clock.elapsed < BOUND
            assert isinstance(raised.value.__cause__, redis.RedisError)
    finally:
        await store.client.aclose()


async def test_the_middleware_answers_503_when_redis_hangs(
    fresh_redis_server: RedisServer,
) -> None:
    store = AsyncRedisIdempotencyStore.from_url(
        fresh_redis_server.url, timeout=TIMEOUT, retries=RETRIES
    )
    app = CountingApp()
    transport = httpx.ASGITransport(app=IdempotencyMiddleware(app, store))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.post("/", headers={"Idempotency-Key": "a"})).status_code == 201
            fresh_redis_server.pause()
            with Clock() as clock:
                response = await http.post("/", headers={"Idempotency-Key": "b"})
            assert clock.elapsed < BOUND
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "1"
            assert response.json()["title"] == "Idempotency store unavailable"
            assert app.calls == 1  # the request did not run unprotected
            fresh_redis_server.resume()
            # The timed-out begin reached Redis and runs now; the store releases its claim on
            # "b" in the background (tests/test_redis_release.py). Other keys work at once.
            recovered = await http.post("/", headers={"Idempotency-Key": "c"})
            assert recovered.status_code == 201 and app.calls == 2
    finally:
        await store.client.aclose()


def test_faults_are_logged_at_most_once_per_interval_and_service_recovers(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisTokenBucketLimiter.from_url(
        fresh_redis_server.url, SLOW, 5, timeout=TIMEOUT, retries=RETRIES, on_error="deny"
    )
    try:
        assert limiter.acquire("k").remaining == 4
        fresh_redis_server.pause()
        with caplog.at_level(logging.WARNING, logger="ttlstore"):
            decisions = [limiter.acquire("k") for _ in range(3)]
        assert [d.allowed for d in decisions] == [False] * 3
        assert limiter.errors == 3
        assert len([r for r in caplog.records if r.name == "ttlstore"]) == 1
        with pytest.raises(RateLimited):
            limiter.wait("k", timeout=0.5)  # a degraded refusal asks for 1 s: over the budget
        fresh_redis_server.resume()
        # The timed-out scripts reached Redis and run now: "k" may have lost tokens to them
        # (a timeout errs on the strict side). The limiter itself recovers at once.
        assert limiter.acquire("k").remaining < 4
        assert limiter.acquire("other").remaining == 4
    finally:
        limiter.client.close()


def test_braces_in_a_key_are_escaped_so_the_whole_key_is_the_hash_tag(admin: Any) -> None:
    p = prefix()
    limiter = RedisTokenBucketLimiter(admin, SLOW, 5, prefix=p)
    for key in ("a}b", "{x}", "a{b", "a\\(b"):
        assert limiter.acquire(key).remaining == 4  # four distinct buckets, none shared
    names = {name.decode() for name in admin.scan_iter(match=f"{p}:*")}
    assert names == {
        f"{p}:{{a\\)b}}:bucket",
        f"{p}:{{\\(x\\)}}:bucket",
        f"{p}:{{a\\(b}}:bucket",
        f"{p}:{{a\\\\(b}}:bucket",
    }
    # The tag is the whole escaped key, not the part before its first closing brace.
    assert redis.crc.key_slot(f"{p}:{{a\\)b}}:bucket".encode()) == redis.crc.key_slot(b"a\\)b")


def test_a_permanent_error_reply_is_raised_not_failed_open(admin: Any) -> None:
    p = prefix()
    limiter = RedisTokenBucketLimiter(admin, SLOW, 5, prefix=p, on_error="allow")
    admin.set(f"{p}:{{wrong}}:bucket", "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        limiter.acquire("wrong")
    assert limiter.acquire("right").degraded is None
