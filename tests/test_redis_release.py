"""The background release of a failed ``begin``'s claim (ttlstore/redis/_release.py).

A ``begin`` that times out may still run once Redis answers again and claim its key with a token
only the caller knows. The schedule of the release is tested with a fake clock; the freeze
scenario on a real redis-server frozen with SIGSTOP (a retry of the key runs within 2 s of the
resume instead of after the 60 s lease); and that a live owner's claim is never released, on a
real freeze and over generated interleavings of a frozen replica's calls with a live owner's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.commands.core import Script

from ttlstore.idempotency import InProgress, Replay, Started
from ttlstore.redis import (
    AsyncRedisIdempotencyStore,
    BackendUnavailable,
    RedisIdempotencyStore,
    _release,
)
from ttlstore.redis._client import FAILURES
from ttlstore.redis._release import ABSENT, OTHER, RELEASED, ReleaseQueue
from ttlstore.testing import FakeClock, RedisServer

FAULT = redis.TimeoutError("Timeout reading from socket")


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


# ====================================================================== the schedule


def test_a_job_is_tried_at_once_then_checked_again_after_redis_answers(clock: FakeClock) -> None:
    queue = ReleaseQueue("S", clock)
    queue.add("k", "tok", FAULT)
    assert len(queue) == 1 and queue.next_due() == clock.now
    job = queue.pop_due()
    assert job is not None and (job.key, job.token) == ("k", "tok")
    assert queue.pop_due() is None  # one job, in flight
    queue.answered(job, RELEASED)
    assert queue.released == 1
    # A copy of the begin still queued behind the answer could claim the key again.
    for after in (0.1, 0.5, 2.0):
        due = queue.next_due()
        assert due is not None and due == pytest.approx(1000.0 + after)
        clock.now = due
        job = queue.pop_due()
        assert job is not None
        queue.answered(job, ABSENT)
    assert len(queue) == 0 and queue.next_due() is None


def test_another_owners_claim_or_record_ends_the_job_at_once(clock: FakeClock) -> None:
    queue = ReleaseQueue("S", clock)
    queue.add("k", "tok", FAULT)
    job = queue.pop_due()
    assert job is not None
    queue.answered(job, OTHER)
    assert len(queue) == 0 and queue.released == 0


def test_while_redis_fails_one_probe_at_a_time_backs_off(clock: FakeClock) -> None:
    queue = ReleaseQueue("S", clock)
    for key in "abc":
        queue.add(key, "tok", FAULT)
    delays = []
    for _ in range(7):
        job = queue.pop_due()
        assert job is not None
        queue.failed(job, FAULT)
        assert queue.pop_due() is None  # no other job is tried before the next probe
        due = queue.next_due()
        assert due is not None
        delays.append(round(due - clock.now, 3))
        clock.now = due
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert len(queue) == 3  # all still pending, tried in turn
    job = queue.pop_due()
    assert job is not None
    queue.answered(job, RELEASED)  # Redis answers: the others are due at once
    assert queue.next_due() == clock.now


def test_a_job_gives_up_after_five_minutes_without_an_answer_and_says_so(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    queue = ReleaseQueue("S", clock)
    queue.add("k", "tok", FAULT)
    with caplog.at_level(logging.WARNING, logger="ttlstore"):
        while (due := queue.next_due()) is not None:
            clock.now = due
            job = queue.pop_due()
            assert job is not None
            queue.failed(job, FAULT)
    # 600 probes of one job, 0.5 s apart once backed off: about the 5 minutes.
    assert 1000 + 290 <= clock.now <= 1000 + 300 and queue.gave_up == 1
    assert len(queue) == 0
    # Faults are logged at most once per 10 s (of real time: here, once), the give-up too.
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "S (background release) retrying to release" in messages[0]
    assert "(1 time(s) since the last report" in messages[0]
    assert "gave up releasing a claim: it lasts its lease" in messages[1]


def test_pending_jobs_are_bounded(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_release, "_MAX_PENDING", 3)
    queue = ReleaseQueue("S", clock)
    assert [queue.add(str(i), "tok", FAULT) for i in range(5)] == [True] * 3 + [False] * 2
    assert len(queue) == 3 and queue.gave_up == 2


# ====================================================================== the freeze scenario

TIMEOUT = 0.25


@pytest.fixture
def server(fresh_redis_server: RedisServer) -> Iterator[RedisServer]:
    yield fresh_redis_server
    if fresh_redis_server.running:
        fresh_redis_server.resume()  # never leave a frozen server to the fixture's close


def _retry_until_started(store: RedisIdempotencyStore, key: str) -> tuple[Started, float]:
    """Retry ``key`` every 20 ms as a client retrying its 503 would; the outcome and how long
    after the call it came (at most 10 s)."""
    start = time.monotonic()
    while True:
        outcome = store.begin(key, "fp")
        if isinstance(outcome, Started):
            return outcome, time.monotonic() - start
        assert isinstance(outcome, InProgress), outcome
        assert time.monotonic() - start < 10, "the key stayed claimed"
        time.sleep(0.02)


def test_after_a_freeze_a_retry_of_the_key_runs_within_2_s_not_after_the_lease(
    server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's scenario: Redis frozen while begin(K) arrives, lease 60 s. Without the
    background release (the control key, on a store whose release is switched off) the late
    begin holds its key for the lease; with it, a retry of K runs within 2 s of the resume."""
    store = RedisIdempotencyStore.from_url(server.url, timeout=TIMEOUT, lease=60)
    control = RedisIdempotencyStore.from_url(server.url, timeout=TIMEOUT, lease=60)
    control._releases = _Stepped(control._release_attempt, FakeClock())  # never stepped: off
    retry = RedisIdempotencyStore.from_url(server.url, lease=60, timeout=5)  # another replica
    try:
        assert isinstance(store.begin("warm", "fp"), Started)  # pooled connections
        assert isinstance(control.begin("warm2", "fp"), Started)
        server.pause()
        for frozen in (store, control):
            with pytest.raises(BackendUnavailable):
                frozen.begin("K", "fp") if frozen is store else frozen.begin("C", "fp")
        assert store.pending_releases == 1
        time.sleep(1.0)  # the freeze lasts; the release keeps probing meanwhile
        server.resume()
        started, waited = _retry_until_started(retry, "K")
        assert waited < 2.0
        assert store.drain(5)
        assert store.pending_releases == 0
        # The release is over and did not touch the retry's claim.
        assert retry.complete("K", started.token, "done") is True
        assert retry.begin("K", "fp") == Replay("done")
        # The control: its late begin ran and holds "C" for the whole lease.
        assert isinstance(retry.begin("C", "fp"), InProgress)
        pttl = retry.client.pttl(f"{retry.prefix}:{{C}}:idempotency")
        assert 55_000 < pttl <= 60_000
        with capsys.disabled():
            print(f"\n[freeze, sync] a retry of the key ran {waited:.2f} s after the resume")
    finally:
        for each in (store, control, retry):
            each.client.close()


async def test_after_a_freeze_an_async_retry_of_the_key_runs_within_2_s(
    server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    store = AsyncRedisIdempotencyStore.from_url(server.url, timeout=TIMEOUT, lease=60)
    retry = AsyncRedisIdempotencyStore.from_url(server.url, lease=60, timeout=5)
    try:
        assert isinstance(await store.begin("warm", "fp"), Started)
        server.pause()
        with pytest.raises(BackendUnavailable):
            await store.begin("K", "fp")
        assert store.pending_releases == 1
        await asyncio.sleep(1.0)
        server.resume()
        start = time.monotonic()
        while not isinstance(outcome := await retry.begin("K", "fp"), Started):
            assert isinstance(outcome, InProgress), outcome
            assert time.monotonic() - start < 10, "the key stayed claimed"
            await asyncio.sleep(0.02)
        waited = time.monotonic() - start
        assert waited < 2.0
        assert await store.drain(5)
        assert await retry.complete("K", outcome.token, "done") is True
        assert await retry.begin("K", "fp") == Replay("done")
        with capsys.disabled():
            print(f"\n[freeze, asyncio] a retry of the key ran {waited:.2f} s after the resume")
    finally:
        await store.client.aclose()
        await retry.client.aclose()


async def test_a_cancelled_begin_releases_its_claim_too(redis_server: RedisServer) -> None:
    store = AsyncRedisIdempotencyStore.from_url(redis_server.url, lease=60, prefix=prefix())
    try:
        call = asyncio.create_task(store.begin("K", "fp"))
        await asyncio.sleep(0)  # sent, or about to be
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert store.pending_releases == 1
        assert await store.drain(5)
        assert isinstance(await store.begin("K", "fp"), Started)
    finally:
        await store.client.aclose()


def test_a_store_that_is_gone_stops_its_background_release(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The release holds its store weakly: a dropped store's thread ends (it would otherwise
    probe a dead server for 5 minutes, keeping the store and its client alive)."""
    # Captured warnings would keep the store alive through their tracebacks' frames.
    caplog.set_level(logging.ERROR, logger="ttlstore")
    store = RedisIdempotencyStore.from_url(server.url, timeout=TIMEOUT, lease=60)
    server.stop()
    with pytest.raises(BackendUnavailable):
        store.begin("K", "fp")
    releases = store._releases
    assert releases.pending == 1
    store.client.close()
    del store
    # Collect until the store is gone: an exception's frames may hold it in a cycle a while.
    for _ in range(40):
        gc.collect()
        if releases.drain(0.05):
            break
    assert releases.pending == 0 and releases.drain(0)


def test_a_live_owners_claim_survives_a_frozen_replicas_late_begin(server: RedisServer) -> None:
    """Owner A holds K. Replica B's begin(K) times out in a freeze and runs late (answering
    "in progress" to nobody); B's release then finds A's claim and leaves it."""
    owner = RedisIdempotencyStore.from_url(server.url, lease=60, timeout=5)
    replica = RedisIdempotencyStore.from_url(server.url, timeout=TIMEOUT, lease=60)
    try:
        started = owner.begin("K", "fp")
        assert isinstance(started, Started)
        assert isinstance(replica.begin("warm", "fp"), Started)
        server.pause()
        with pytest.raises(BackendUnavailable):
            replica.begin("K", "fp")
        time.sleep(0.5)
        server.resume()
        assert replica.drain(5)
        assert owner.client.hget(f"{owner.prefix}:{{K}}:idempotency", "token") == (
            started.token.encode()
        )
        assert owner.complete("K", started.token, "mine") is True
        assert replica.begin("K", "fp") == Replay("mine")
    finally:
        owner.client.close()
        replica.client.close()


# ====================================================================== generated interleavings


class _Partitioned:
    """A sync client stand-in for a replica cut off from Redis: while ``cut``, each script call
    waits in a backlog and times out; :meth:`heal` delivers the backlog in a given order, as
    a resumed Redis would read its sockets, the replies lost."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.cut = False
        self.backlog: list[tuple[Any, ...]] = []

    def register_script(self, source: str) -> Script:
        self.client.script_load(source)  # the backlog is delivered with EVALSHA
        return Script(cast(Any, self), source)

    def get_encoder(self) -> Any:
        return self.client.get_encoder()

    def get_connection_kwargs(self) -> Any:
        return self.client.get_connection_kwargs()

    def script_load(self, source: str) -> Any:
        return self.client.script_load(source)

    def evalsha(self, *args: Any) -> Any:
        if self.cut:
            self.backlog.append(args)
            raise redis.TimeoutError("Timeout reading from socket")
        return self.client.evalsha(*args)

    def heal(self, order: list[int]) -> None:
        """Deliver the backlog: the indexes in ``order`` first, then the rest in turn."""
        backlog, self.backlog, self.cut = self.backlog, [], False
        first = [index for index in order if index < len(backlog)]
        for index in first + [i for i in range(len(backlog)) if i not in first]:
            self.client.evalsha(*backlog[index])


class _Stepped:
    """Stands in for the store's release driver: the test runs each due attempt itself."""

    def __init__(self, attempt: Any, clock: FakeClock) -> None:
        self.queue = ReleaseQueue("B", clock)
        self.attempt = attempt

    @property
    def pending(self) -> int:
        return len(self.queue)

    def schedule(self, key: str, token: str, error: BaseException) -> None:
        self.queue.add(key, token, error)

    def run_due(self) -> None:
        while (job := self.queue.pop_due()) is not None:
            try:
                reply = self.attempt(job.key, job.token)
            except FAILURES as error:
                self.queue.failed(job, error)
            else:
                self.queue.answered(job, reply)


@pytest.fixture(scope="module")
def shared_client(redis_server: RedisServer) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


def test_a_copy_of_the_begin_arriving_after_the_first_answer_is_released_by_a_recheck(
    shared_client: Any, clock: FakeClock
) -> None:
    """redis-py resent the begin on a second connection, or the kernel still retransmits it:
    it can arrive after Redis first answered the release (no claim then), and claim the key."""
    p = prefix()
    link = _Partitioned(shared_client)
    replica = RedisIdempotencyStore(link, lease=60, prefix=p)  # type: ignore[arg-type]
    driver = _Stepped(replica._release_attempt, clock)
    replica._releases = driver
    owner = RedisIdempotencyStore(shared_client, lease=60, prefix=p)
    link.cut = True
    with pytest.raises(BackendUnavailable):
        replica.begin("K", "fp")
    link.cut = False  # Redis answers again, but the begin is still on its way
    driver.run_due()
    assert (driver.queue.released, len(driver.queue)) == (0, 1)  # nothing to release yet
    link.heal([])  # the begin arrives: the key is claimed by a token only the replica knows
    assert isinstance(owner.begin("K", "fp"), InProgress)
    clock.advance(0.1)
    driver.run_due()  # the first recheck
    assert driver.queue.released == 1
    assert isinstance(owner.begin("K", "fp"), Started)
    for _ in range(3):
        clock.advance(1)
        driver.run_due()
    assert len(driver.queue) == 0  # the owner's claim ended the checks


EVENTS = st.lists(
    st.one_of(
        st.sampled_from(["a_begin", "a_complete", "a_release", "b_begin_cut", "heal"]),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.2, 0.6, 2.5])),
        st.tuples(st.just("heal_in"), st.permutations(range(6))),
    ),
    max_size=25,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=EVENTS)
def test_a_background_release_never_ends_a_live_owners_claim_or_record(
    shared_client: Any, events: list[Any]
) -> None:
    """Owner A works normally; replica B is cut off from Redis at times, its begins time out
    and arrive later in any order, and its background release runs whenever due. Whatever
    the interleaving, A's claim stays A's until A ends it, and A's record stays."""
    clock = FakeClock()
    p = prefix()
    name = f"{p}:{{K}}:idempotency"
    owner = RedisIdempotencyStore(shared_client, lease=60, prefix=p)
    link = _Partitioned(shared_client)
    replica = RedisIdempotencyStore(link, lease=60, prefix=p)  # type: ignore[arg-type]
    driver = _Stepped(replica._release_attempt, clock)
    replica._releases = driver
    held: str | None = None  # A's token while A holds the claim
    stored = False
    for event in events:
        kind = event if isinstance(event, str) else event[0]
        if kind == "a_begin" and held is None:
            outcome = owner.begin("K", "fp")
            if isinstance(outcome, Started):
                held = outcome.token
        elif kind == "a_complete" and held is not None:
            assert owner.complete("K", held, "a") is True
            held, stored = None, True
        elif kind == "a_release" and held is not None:
            assert owner.release("K", held) is True
            held = None
        elif kind == "b_begin_cut":
            link.cut = True
            with pytest.raises(BackendUnavailable):
                replica.begin("K", "fp")
        elif kind in ("heal", "heal_in") and link.backlog:
            link.heal(list(event[1]) if kind == "heal_in" else [])
        elif kind == "wait":
            clock.advance(event[1])
            driver.run_due()
        if held is not None:
            assert shared_client.hmget(name, "state", "token") == [b"claim", held.encode()]
        if stored:
            assert shared_client.hget(name, "state") == b"done"
    shared_client.delete(name)
