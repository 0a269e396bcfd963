"""ttlstore.redis on a live Redis Cluster (three masters, a replica each): clients, slots, failover.

The shared contract tests run on the Cluster too (test_backend_contract.py); this module covers
what only a Cluster has: ``from_url(..., cluster=True)``, every key that any command touches for
one logical key hashing to one slot (checked by the Cluster itself), scripts loaded again on a
node that lacks them, and a master killed under load, with the failover window measured and
reported by the test.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
import redis.crc
from hypothesis import given, settings
from hypothesis import strategies as st

from ttlstore.idempotency import InProgress, Replay, Started
from ttlstore.redis import (
    AsyncRedisIdempotencyStore,
    AsyncRedisTokenBucketLimiter,
    BackendUnavailable,
    JsonCodec,
    RedisIdempotencyStore,
    RedisTokenBucketLimiter,
)
from ttlstore.redis._client import hash_tag
from ttlstore.testing import RedisCluster

SLOW = Fraction(1, 1000)  # one token per 1000 s: no refill during a test


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


# ====================================================================== clients


def test_from_url_makes_a_bounded_cluster_client(redis_cluster: RedisCluster) -> None:
    limiter = RedisTokenBucketLimiter.from_url(
        redis_cluster.url, SLOW, 5, cluster=True, timeout=0.3, retries=2, prefix=prefix()
    )
    try:
        assert isinstance(limiter.client, redis.cluster.RedisCluster)
        client: Any = limiter.client
        kwargs = client.get_connection_kwargs()
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.3
        assert client.retry.get_retries() == 2
        assert [limiter.acquire(f"k{i}").remaining for i in range(30)] == [4] * 30
        assert limiter.acquire("k0").remaining == 3
    finally:
        limiter.client.close()
    with pytest.raises(TypeError, match="cluster must be a bool, got 'yes'"):
        RedisIdempotencyStore.from_url(redis_cluster.url, cluster="yes")  # type: ignore[arg-type]


async def test_async_from_url_makes_an_asyncio_cluster_client(
    redis_cluster: RedisCluster,
) -> None:
    store = AsyncRedisIdempotencyStore.from_url(
        redis_cluster.url, cluster=True, timeout=0.3, prefix=prefix()
    )
    try:
        assert isinstance(store.client, redis.asyncio.cluster.RedisCluster)
        assert store.client.get_connection_kwargs()["socket_timeout"] == 0.3
        outcomes = [await store.begin(f"k{i}", "fp") for i in range(30)]
        assert all(isinstance(outcome, Started) for outcome in outcomes)
        assert isinstance(await store.begin("k0", "fp"), InProgress)
    finally:
        await store.client.aclose()


def test_a_cluster_client_without_socket_timeout_is_warned_about(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=None)
    bounded = redis.cluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=1)
    try:
        with caplog.at_level(logging.WARNING, logger="ttlstore"):
            RedisTokenBucketLimiter(bounded, 1, 5)
            assert caplog.records == []
            RedisTokenBucketLimiter(client, 1, 5)
        assert "RedisTokenBucketLimiter: the Redis client has no socket_timeout" in caplog.text
    finally:
        client.close()
        bounded.close()


def test_scripts_are_loaded_again_on_every_master_after_a_script_flush(
    redis_cluster: RedisCluster,
) -> None:
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    try:
        limiter = RedisTokenBucketLimiter(client, SLOW, 5, prefix=prefix())
        store = RedisIdempotencyStore(client, prefix=prefix())
        keys = [f"k{i}" for i in range(30)]  # on every master
        assert {limiter.acquire(key).remaining for key in keys} == {4}
        client.script_flush()  # on every master
        assert {limiter.acquire(key).remaining for key in keys} == {3}
        client.script_flush()  # on every master
        tokens = [store.begin(key, "fp") for key in keys]
        client.script_flush()  # on every master
        for key, started in zip(keys, tokens, strict=True):
            assert isinstance(started, Started)
            assert store.complete(key, started.token, key) is True
            assert store.begin(key, "fp") == Replay(key)
    finally:
        client.close()


def test_a_retried_begin_or_complete_recognises_itself_on_the_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """The Cluster client resends a command after a timeout or a failover: same arguments."""
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    try:
        store = RedisIdempotencyStore(client, prefix=prefix())
        keys, args, token = store._begin_call("k", "fp")
        assert store._begin(keys, args) == [b"started"]
        assert store._begin(keys, args) == [b"started"]
        assert isinstance(store.begin("k", "fp"), InProgress)
        keys, args = store._complete_call("k", token, JsonCodec().encode(1))
        assert store._complete(keys, args) == 1
        assert store._complete(keys, args) == 1
        assert store.complete("k", token, 2) is False
        assert store.begin("k", "fp") == Replay(1)
    finally:
        client.close()


# ====================================================================== one slot per key


class _Recording:
    """Wraps a RedisCluster's ``execute_command`` to record every command it sends."""

    def __init__(self, client: Any) -> None:
        self.commands: list[tuple[Any, ...]] = []
        send = client.execute_command

        def record(*args: Any, **kwargs: Any) -> Any:
            self.commands.append(args)
            return send(*args, **kwargs)

        client.execute_command = record


@pytest.fixture(scope="module")
def recorded(redis_cluster: RedisCluster) -> Iterator[tuple[Any, _Recording, Any]]:
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    admin = redis.cluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    yield client, _Recording(client), admin
    client.close()
    admin.close()


_AWKWARD = st.sampled_from(["{", "}", "\\", "e", "(", ")", ":", "a", "é", "中", "😀", "\x00", " "])
KEYS = st.one_of(st.just(""), st.text(_AWKWARD, max_size=12), st.text(max_size=16))


@settings(max_examples=60, deadline=None)
@given(key=KEYS)
def test_every_key_any_command_touches_for_one_key_is_in_one_slot(
    redis_cluster: RedisCluster, recorded: tuple[Any, _Recording, Any], key: str
) -> None:
    """Run every operation of both backends for ``key`` on the live Cluster, ask the server
    which arguments of each command are keys (``COMMAND GETKEYS``), and ask the Cluster their
    slots (``CLUSTER KEYSLOT``): one slot, so a script over several of them can never fail
    with CROSSSLOT, whatever a future script touches."""
    client, recording, admin = recorded
    p = prefix()
    limiter = RedisTokenBucketLimiter(client, SLOW, 5, prefix=p)
    store = RedisIdempotencyStore(client, prefix=p)
    recording.commands.clear()
    assert limiter.acquire(key).remaining == 4
    assert limiter.peek(key).remaining == 4
    limiter.reset(key)
    started = store.begin(key, "fp")
    assert isinstance(started, Started)
    assert store.release(key, started.token) is True
    started = store.begin(key, "fp")
    assert isinstance(started, Started)
    assert store.complete(key, started.token, "done") is True
    assert store.begin(key, "fp") == Replay("done")
    touched = set()
    for command in recording.commands:
        if command[0] in ("SCRIPT LOAD", "SCRIPT EXISTS"):
            continue
        touched.update(admin.command_getkeys(*command))
    assert len(touched) == 2  # the bucket and the idempotency record
    slots = {redis_cluster.keyslot(name) for name in touched}
    assert len(slots) == 1, (key, touched, slots)
    # The slot is the hash of the escaped key alone: the tag is the whole of it.
    assert slots == {redis.crc.key_slot(hash_tag(key).encode())}


@given(first=KEYS, second=KEYS)
def test_distinct_keys_get_distinct_hash_tags(first: str, second: str) -> None:
    assert (hash_tag(first) == hash_tag(second)) is (first == second)
    assert hash_tag(first) and "{" not in hash_tag(first) and "}" not in hash_tag(first)


# ====================================================================== failover


@dataclass
class _Call:
    """One call of the load: when it ran (seconds after the kill), how it ended."""

    started: float
    ended: float
    on_victim: bool
    failed: bool  # a Redis fault, answered by the declared policy
    right: bool = True  # for answers: what the model expected
    what: str = ""


@dataclass
class _Load:
    """The failover load: limiter and idempotency calls, each checked against a model."""

    limiter: Any
    store: Any
    victim: frozenset[int]  # the killed master's slots
    prefix: str
    clock: Callable[[], float]
    calls: list[_Call] = field(default_factory=list)
    acknowledged: dict[str, float] = field(default_factory=dict)  # key: when, since the kill
    stop: bool = False

    def on_victim(self, suffix: str, key: str) -> bool:
        name = f"{self.prefix}:{{{hash_tag(key)}}}:{suffix}"
        return redis.crc.key_slot(name.encode()) in self.victim

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        result = call(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def limiter_worker(self, worker: int) -> None:
        """Per key, capacity 5: allowed with 4, 3, 2, 1, 0 left, then refused with 0 left.
        A degraded (failed) decision must be a refusal ("deny"); the key is then left, since
        a timed-out call may or may not have taken its token."""
        for n in itertools.count():
            key, seen = f"w{worker}-l{n}", 0
            victim = self.on_victim("bucket", key)
            while seen < 7 and not self.stop:
                started = self.clock()
                decision = await self.run(self.limiter.acquire, key)
                call = _Call(started, self.clock(), victim, bool(decision.degraded))
                if decision.degraded:
                    call.right = decision.allowed is False and decision.retry_after == 1.0
                    call.what = f"degraded {decision}"
                else:
                    expected = (seen < 5, max(4 - seen, 0))
                    call.right = (decision.allowed, decision.remaining) == expected
                    call.what = f"{key} #{seen}: {decision}, expected {expected}"
                self.calls.append(call)
                if decision.degraded:
                    await asyncio.sleep(0.02)
                    break
                seen += 1
            if self.stop:
                return

    async def idempotency_worker(self, worker: int) -> None:
        """Per fresh key: begin is Started, complete is True, begin again replays. A fault
        raises BackendUnavailable (the declared policy); the key is then left."""
        for n in itertools.count():
            if self.stop:
                return
            key = f"w{worker}-i{n}"
            victim = self.on_victim("idempotency", key)
            begun = await self.step(key, victim, self.store.begin, (key, "fp"), Started)
            if not isinstance(begun, Started):
                continue
            done = await self.step(key, victim, self.store.complete, (key, begun.token, key), True)
            if done is not True:
                continue
            self.acknowledged[key] = self.clock()
            await self.step(key, victim, self.store.begin, (key, "fp"), Replay(key))

    async def step(
        self, key: str, victim: bool, call: Callable[..., Any], args: tuple[Any, ...], want: Any
    ) -> Any:
        """One idempotency call, recorded: its outcome, or None when it failed or was wrong."""
        begun = self.clock()
        try:
            outcome = await self.run(call, *args)
        except BackendUnavailable as error:
            self.calls.append(_Call(begun, self.clock(), victim, True, what=str(error)))
            await asyncio.sleep(0.02)
            return None
        right = isinstance(outcome, want) if isinstance(want, type) else outcome == want
        what = f"{key} {call.__name__}: {outcome!r}, expected {want!r}"
        self.calls.append(_Call(begun, self.clock(), victim, False, right, what))
        return outcome if right else None


def _threaded(target: Any) -> Any:
    """``target`` with every method call run in a worker thread (a sync backend under load)."""

    class Threaded:
        def __getattr__(self, name: str) -> Any:
            method = getattr(target, name)

            async def call(*args: Any) -> Any:
                return await asyncio.to_thread(method, *args)

            return call

    return Threaded()


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
async def test_a_master_killed_under_load_fails_over_and_every_answer_stays_right(
    redis_cluster: RedisCluster, flavour: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill a master (SIGKILL) while 4 workers run limiter and idempotency calls on keys all
    over the Cluster. Calls fail only within a window that ends once its replica is promoted,
    each failure answered by the declared policy; every answer is what the model expects; and
    every idempotency record acknowledged before the kill is replayed after it. The window is
    reported by the test."""
    p = prefix()
    limiter_cls: Any = (
        AsyncRedisTokenBucketLimiter if flavour == "asyncio" else (RedisTokenBucketLimiter)
    )
    store_cls: Any = AsyncRedisIdempotencyStore if flavour == "asyncio" else RedisIdempotencyStore
    limiter = limiter_cls.from_url(
        redis_cluster.url, SLOW, 5, cluster=True, timeout=0.25, retries=1, on_error="deny", prefix=p
    )
    store = store_cls(limiter.client, prefix=p, lease=60)
    victim = redis_cluster.master_nodes()[0]
    slots = frozenset(
        slot for low, high in redis_cluster.slot_ranges(victim) for slot in range(low, high + 1)
    )
    assert slots
    begin_at = time.monotonic()
    load = _Load(
        limiter if flavour == "asyncio" else _threaded(limiter),
        store if flavour == "asyncio" else _threaded(store),
        slots,
        p,
        lambda: time.monotonic() - begin_at,
    )
    workers = [
        asyncio.create_task(worker(i))
        for i in range(2)
        for worker in (load.limiter_worker, load.idempotency_worker)
    ]
    try:
        await asyncio.sleep(0.5)  # load before the kill
        kill = load.clock()
        redis_cluster.kill_master(victim)
        # Run until the victim's keys have been answered for 1 s after the last failure.
        while load.clock() < kill + 30:
            await asyncio.sleep(0.1)
            last = max((call.ended for call in load.calls if call.failed), default=None)
            if last is None or load.clock() < last + 1.0:
                continue
            if any(c.on_victim and not c.failed and c.started > last for c in load.calls):
                break
    finally:
        load.stop = True
        await asyncio.gather(*workers, return_exceptions=True)
    try:
        failed = [call for call in load.calls if call.failed]
        assert failed, "no call failed: the kill went unnoticed"
        first, last = min(c.started for c in failed), max(c.ended for c in failed)
        wrong = [call for call in load.calls if not call.right]
        assert not wrong, wrong[:5]  # failed calls included: each must follow its policy
        after = [c for c in load.calls if c.on_victim and not c.failed and c.started > last]
        assert after, f"no call on the killed master's slots succeeded within 30 s: {failed[-3:]}"
        # Records acknowledged before the kill survive it. Replication is asynchronous: one
        # acknowledged in the last instant before a crash could be lost, so those are counted.
        durable = [key for key, at in load.acknowledged.items() if at < kill - 0.05]
        recent = [key for key, at in load.acknowledged.items() if kill - 0.05 <= at < kill]
        lost = [k for k in durable if await load.run(store.begin, k, "fp") != Replay(k)]
        lost_recent = [k for k in recent if await load.run(store.begin, k, "fp") != Replay(k)]
        assert not lost, lost[:5]
        answers = [c for c in load.calls if not c.failed]
        after_window = sum(c.started > last for c in answers)
        with capsys.disabled():
            print(
                f"\n[failover, {flavour}] master on port {victim.port} killed at t=0 "
                f"(node timeout {redis_cluster.node_timeout:g} s): calls failed from "
                f"t={first - kill:+.2f} s to t={last - kill:+.2f} s; {len(failed)} failed "
                f"calls ({sum(c.on_victim for c in failed)} on its slots, the slowest "
                f"{max(c.ended - c.started for c in failed):.2f} s), each answered by "
                f"its policy; all {len(answers)} answers right ({after_window} "
                f"after the window); {len(durable)} records acknowledged before the kill all "
                f"replayed after it ({len(lost_recent)} of {len(recent)} acknowledged within "
                f"50 ms before it lost)"
            )
    finally:
        # Begins that failed left background releases: let them finish, then close.
        if flavour == "asyncio":
            await store.drain(10)
            await limiter.client.aclose()
        else:
            store.drain(10)
            limiter.client.close()
        redis_cluster.restart(victim)
