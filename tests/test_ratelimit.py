"""Tests of ttlstore.ratelimit: exact token buckets, lossless expiry, waiting, the decorator."""

from __future__ import annotations

import asyncio
import math
import pickle
import re
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttlstore.ratelimit import (
    Decision,
    Limit,
    LimiterStats,
    Number,
    RateLimited,
    TokenBucketLimiter,
    rate_limited,
)
from ttlstore.sweeper import Sweeper

NS = 10**9


class NsClock:
    """A fake clock kept in integer nanoseconds.

    The shared ``clock`` fixture adds float seconds, which drifts over many steps and cannot
    step by one nanosecond at any offset; the exactness tests here need both.
    """

    def __init__(self, start_ns: int = 0) -> None:
        self.ns = start_ns

    def __call__(self) -> float:
        return self.ns / NS

    def advance(self, seconds: float | Fraction = 0, ns: int = 0) -> None:
        self.ns += round(Fraction(seconds) * NS) + ns


@pytest.fixture
def ns_clock() -> NsClock:
    return NsClock()


# ---------------------------------------------------------------------- acceptance 1


def test_burst_of_capacity_then_refusal(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 5, clock=ns_clock)
    assert [limiter.acquire("k").remaining for _ in range(5)] == [4, 3, 2, 1, 0]
    refused = limiter.acquire("k")
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == 1.0
    assert refused.reset_after == 5.0
    assert limiter.stats() == LimiterStats(allowed=5, denied=1, fail_open_evictions=0, size=1)


def test_refill_below_one_per_second_is_exact(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(0.5, 10, clock=ns_clock)
    for _ in range(10):
        assert limiter.acquire("k")
    ns_clock.advance(10)
    now = limiter.peek("k")
    assert (now.remaining, now.reset_after, now.refill_after) == (5, 10.0, 2.0)
    assert [limiter.acquire("k").allowed for _ in range(6)] == [True] * 5 + [False]


def test_path_independence_over_a_million_small_steps() -> None:
    """10^6 steps of 1 ms, each with a (refused) request, leave what one step of 1000 s does.

    A bucket that refills a float on every read drifts here; a TAT is never rewritten by a
    refusal and counts in whole units, so both paths end in the same exact state.
    """
    rate = Fraction(7, 10)
    stepped_clock, jumped_clock = NsClock(), NsClock()
    stepped = TokenBucketLimiter(rate, 1000, clock=stepped_clock, threadsafe=False)
    jumped = TokenBucketLimiter(rate, 1000, clock=jumped_clock, threadsafe=False)
    for limiter in (stepped, jumped):
        assert limiter.acquire("k", 1000).remaining == 0
    acquire = stepped.acquire
    for _ in range(10**6):
        stepped_clock.ns += 1_000_000
        acquire("k", 1000)  # 700 tokens at most by the end: always refused
    jumped_clock.advance(1000)

    def tokens(limiter: TokenBucketLimiter) -> Fraction:
        return 1000 - Fraction(limiter.peek("k").reset_after) * rate

    assert stepped_clock.ns == jumped_clock.ns
    assert abs(tokens(stepped) - tokens(jumped)) <= Fraction(1, 10**9)
    assert stepped.peek("k") == jumped.peek("k")
    assert stepped.peek("k").remaining == 700
    assert stepped.stats().denied == 10**6


def test_retry_after_is_exact_below_a_nanosecond(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(3, 2, clock=ns_clock)  # a token every third of a second
    limiter.acquire("k", 2)
    refused = limiter.acquire("k")
    assert refused.retry_after == float(Fraction(1, 3))
    ns_clock.advance(ns=333_333_333)  # 1/3 ns short of the token
    assert limiter.acquire("k").retry_after == float(Fraction(1, 3 * NS))
    ns_clock.advance(ns=1)
    assert limiter.acquire("k").allowed


@pytest.mark.parametrize(
    ("rate", "cost", "expected"), [(0.5, 1, 2.0), (0.1, 1, 10.0), (4, 3, 0.75)]
)
def test_retry_after_names_the_exact_wait(
    ns_clock: NsClock, rate: float, cost: int, expected: float
) -> None:
    limiter = TokenBucketLimiter(rate, 3, clock=ns_clock)
    limiter.acquire("k", 3)
    assert limiter.acquire("k", cost).retry_after == expected
    ns_clock.advance(expected, ns=-1)
    assert not limiter.acquire("k", cost).allowed
    ns_clock.advance(ns=1)
    assert limiter.acquire("k", cost).allowed


def test_multi_limit_refusal_consumes_from_none(ns_clock: NsClock) -> None:
    fast = Limit(1, 1, "fast")
    slow = Limit.per(3, 3600, "slow")
    limiter = TokenBucketLimiter(limits=[fast, slow], clock=ns_clock)
    assert limiter.acquire("k").limit == fast
    for _ in range(5):  # refused by fast: must not take from slow
        refused = limiter.acquire("k")
        assert (refused.allowed, refused.limit, refused.retry_after) == (False, fast, 1.0)
    ns_clock.advance(1)
    assert limiter.acquire("k").allowed
    ns_clock.advance(1)
    assert limiter.acquire("k").allowed
    ns_clock.advance(1)  # fast has a token again; slow gave its three
    refused = limiter.acquire("k")
    assert (refused.allowed, refused.limit, refused.remaining) == (False, slow, 0)
    assert refused.retry_after == 1200 - 3  # slow's first token, taken at 0 s, returns at 1200 s
    assert limiter.stats().allowed == 3


def test_multi_limit_reports_the_most_restrictive(ns_clock: NsClock) -> None:
    burst = Limit(10, 5, "burst")
    daily = Limit.per(8, 86400, "daily")
    limiter = TokenBucketLimiter(limits=[burst, daily], clock=ns_clock)
    assert limiter.acquire("k", 4).limit == burst  # burst 1 left, daily 4
    refused = limiter.acquire("k", 5)  # both refuse: daily needs far longer
    assert (refused.limit, refused.remaining) == (daily, 4)
    assert refused.retry_after == 86400 / 8
    ns_clock.advance(1)  # burst full again, daily still 4
    allowed = limiter.acquire("k", 2)
    assert (allowed.limit, allowed.remaining) == (daily, 2)


def test_multi_limit_ties_go_to_the_first_listed(ns_clock: NsClock) -> None:
    first, second = Limit(1, 2, "first"), Limit(1, 2, "second")
    limiter = TokenBucketLimiter(limits=[first, second], clock=ns_clock)
    assert limiter.acquire("k").limit == first  # equal remaining
    limiter.acquire("k")
    assert limiter.acquire("k").limit == first  # equal waits


def test_entry_disappears_exactly_when_full(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(0.5, 10, clock=ns_clock)
    (store,) = limiter.stores
    limiter.acquire("k", 3)  # full again after 6 s
    assert store.ttl("k") == 6.0
    ns_clock.advance(6, ns=-1)
    assert "k" in store
    assert limiter.peek("k").remaining == 9
    ns_clock.advance(ns=1)
    assert "k" not in store
    assert len(store) == 0
    assert limiter.peek("k").remaining == 10


@pytest.mark.parametrize("start_ns", [0, 123_456_789_012_345])
def test_entry_disappears_at_the_first_whole_nanosecond_of_full(start_ns: int) -> None:
    clock = NsClock(start_ns)
    limiter = TokenBucketLimiter(3, 2, clock=clock)
    (store,) = limiter.stores
    limiter.acquire("k")  # full after 1/3 s: 333_333_333.3 ns
    clock.advance(ns=333_333_333)
    assert "k" in store
    assert limiter.peek("k").remaining == 1
    clock.advance(ns=1)
    assert "k" not in store
    assert limiter.peek("k").remaining == 2


def test_sweeping_full_buckets_changes_no_decision(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 2, clock=ns_clock)
    for key in "abc":
        limiter.acquire(key)
    limiter.acquire("c")
    ns_clock.advance(1)  # a and b full again, c still in debt
    assert Sweeper(*limiter.stores).sweep() == 2
    assert limiter.stats().size == 1
    assert limiter.peek("a").remaining == 2
    assert limiter.peek("c").remaining == 1


# ---------------------------------------------------------------------- bounds and stats


def test_flood_of_new_keys_stays_bounded_and_counts_fail_open(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 3, maxsize=10, clock=ns_clock)
    limiter.acquire("victim", 3)
    for i in range(100):
        assert limiter.acquire(f"flood-{i}").allowed
        assert len(limiter.stores[0]) <= 10
    stats = limiter.stats()
    assert (stats.size, stats.fail_open_evictions) == (10, 91)
    assert limiter.acquire("victim").remaining == 2  # evicted in debt: started afresh


def test_full_buckets_expire_rather_than_count_as_evictions(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 3, maxsize=2, clock=ns_clock)
    limiter.acquire("a")
    limiter.acquire("b")
    ns_clock.advance(1)
    limiter.acquire("c")
    limiter.acquire("d")
    assert limiter.stats().fail_open_evictions == 0


def test_refused_clients_stay_recent(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 1, maxsize=2, clock=ns_clock)
    limiter.acquire("abuser")
    limiter.acquire("idle")
    limiter.acquire("abuser")  # refused, but active
    limiter.acquire("newcomer")
    assert "abuser" in limiter.stores[0]
    assert "idle" not in limiter.stores[0]


def test_reset_try_acquire_and_peek(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 2, clock=ns_clock)
    assert limiter.try_acquire("k", 2)
    assert not limiter.try_acquire("k")
    peeked = limiter.peek("k", 2)
    assert (peeked.allowed, peeked.retry_after) == (False, 2.0)
    assert limiter.stats().denied == 1  # peek counts nothing
    limiter.reset("k")
    limiter.reset("never-seen")
    fresh = limiter.peek("k")
    assert (fresh.allowed, fresh.remaining, fresh.reset_after, fresh.refill_after) == (
        True,
        2,
        0.0,
        0.0,
    )


class _SpyLock:
    """A lock that reports when a thread finds it held, before that thread waits for it."""

    def __init__(self, on_contended: Callable[[], None]) -> None:
        self._inner = threading.Lock()
        self._on_contended = on_contended

    def acquire(self) -> bool:
        if not self._inner.acquire(blocking=False):
            self._on_contended()
            self._inner.acquire()
        return True

    def release(self) -> None:
        self._inner.release()


def test_reset_racing_an_acquire_is_not_lost(ns_clock: NsClock) -> None:
    """A deterministic interleaving: an acquire is paused after it read the bucket and before
    it wrote it back; a reset from another thread in that gap must wait for the write, or the
    write would bring the forgotten debt back."""
    paused, resume, progressed = threading.Event(), threading.Event(), threading.Event()
    pause_once = [False]
    acquirer: threading.Thread | None = None

    def clock_pausing_the_acquirer() -> float:
        # The acquire reads the clock only after the store looked the bucket up, with the
        # store's lock held: pausing here is pausing between its read and its write.
        if threading.current_thread() is acquirer and not pause_once[0]:
            pause_once[0] = True
            paused.set()
            assert resume.wait(10)
        return ns_clock()

    limiter = TokenBucketLimiter(1, 5, clock=clock_pausing_the_acquirer)
    limiter.acquire("k")  # in debt: the store holds the bucket
    (store,) = limiter.stores
    # The limiter decides under the store's own lock: spy on that one.
    store._lock = _SpyLock(progressed.set)

    def reset() -> None:
        limiter.reset("k")
        progressed.set()

    acquirer = threading.Thread(target=limiter.acquire, args=("k",))
    resetter = threading.Thread(target=reset)
    acquirer.start()
    assert paused.wait(10)  # the acquire has read the bucket and holds the lock
    resetter.start()
    # Either the reset finished inside the gap (the bug), or it found the lock held and now
    # waits for the acquire to finish (the fix): no timing decides which.
    assert progressed.wait(10)
    resume.set()
    acquirer.join(10)
    resetter.join(10)
    assert not acquirer.is_alive() and not resetter.is_alive()
    # The reset came after the acquire's write: the bucket is full again.
    assert limiter.peek("k").remaining == 5
    assert "k" not in store


def test_decision_is_frozen_and_truthy_when_allowed(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=ns_clock)
    allowed, refused = limiter.acquire("k"), limiter.acquire("k")
    assert allowed and not refused
    with pytest.raises(AttributeError):
        allowed.allowed = False  # type: ignore[misc]
    assert allowed.degraded is None


def test_limits_and_introspection() -> None:
    limiter = TokenBucketLimiter(limits=[Limit(2, 4, "a"), Limit.per(10, 60, "b")], maxsize=7)
    assert [limit.name for limit in limiter.limits] == ["a", "b"]
    assert limiter.maxsize == 7
    assert "TokenBucketLimiter" in repr(limiter)
    assert Limit.per(1000, 3600).window == 3600
    assert Limit(0.1, 1).window == 10  # a float rate means the decimal it prints as
    assert Limit(Decimal("0.3"), 3).window == 10


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (Decimal("NaN"), ValueError),
        (True, TypeError),
        ("1", TypeError),
        (None, TypeError),
    ],
)
def test_bad_rate_is_named(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=rf"rate .*{re.escape(repr(value))}"):
        Limit(value, 1)  # type: ignore[arg-type]
    if value is not None:  # None means "use limits=" there
        with pytest.raises(error, match="rate"):
            TokenBucketLimiter(value, 1)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("rate", "capacity"),
    [
        (5e-324, 2),  # capacity / rate overflows a float
        (1e-300, 2),  # just past the bound
        (Fraction(1, 10**400), 1),
        (Decimal("1e-400"), 1),
        (10**301, 1),  # 1 / rate underflows to zero
        (Fraction(10**400), 1),
    ],
)
def test_rates_beyond_a_float_fail_at_construction(rate: Number, capacity: int) -> None:
    with pytest.raises(ValueError, match=rf"^rate .*{re.escape(repr(rate))}"):
        Limit(rate, capacity)
    with pytest.raises(ValueError, match=r"^rate "):
        TokenBucketLimiter(rate, capacity)


def test_extreme_rates_within_the_bounds_work(ns_clock: NsClock) -> None:
    slow = TokenBucketLimiter(1e-300, 1, clock=ns_clock)  # a window of exactly 1e300 s
    assert slow.acquire("k").allowed
    refused = slow.acquire("k")
    assert (refused.allowed, refused.retry_after, refused.reset_after) == (False, 1e300, 1e300)
    fast = TokenBucketLimiter(1e300, 1, clock=ns_clock)
    assert [fast.acquire("k").allowed for _ in range(2)] == [True, False]
    ns_clock.advance(ns=1)
    assert fast.acquire("k").allowed


@settings(max_examples=300, deadline=None)
@given(
    rate=st.one_of(
        st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False),
        st.fractions(min_value=Fraction(1, 10**310), max_value=10**310),
    ),
    capacity=st.integers(1, 10**20),
    start_ns=st.integers(0, 10**6 * NS),
)
def test_every_accepted_limit_answers_in_finite_floats(
    rate: Number, capacity: int, start_ns: int
) -> None:
    """Either the limit is refused up front, naming the rate, or no acquire ever raises."""
    try:
        limit = Limit(rate, capacity)
    except ValueError as exc:
        assert str(exc).startswith("rate ")
        return
    clock = NsClock(start_ns)
    limiter = TokenBucketLimiter(limits=[limit], clock=clock, threadsafe=False)
    decisions = [limiter.acquire("k", capacity), limiter.acquire("k"), limiter.peek("k")]
    clock.advance(ns=1)
    decisions.append(limiter.acquire("k"))
    for decision in decisions:
        for value in (decision.retry_after, decision.reset_after, decision.refill_after):
            assert math.isfinite(value) and value >= 0
    assert decisions[0].allowed


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-3, ValueError), (1.5, TypeError), (math.inf, TypeError), (True, TypeError)],
)
def test_bad_capacity_and_cost_are_named(
    ns_clock: NsClock, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=rf"capacity .*{re.escape(repr(value))}"):
        TokenBucketLimiter(1, value, clock=ns_clock)  # type: ignore[call-overload]
    limiter = TokenBucketLimiter(1, 5, clock=ns_clock)
    for method in (limiter.acquire, limiter.try_acquire, limiter.peek):
        with pytest.raises(error, match=rf"cost .*{re.escape(repr(value))}"):
            method("k", value)  # type: ignore[arg-type]
    assert limiter.stats().allowed == limiter.stats().denied == 0


def test_cost_above_capacity_fails_at_once(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(limits=[Limit(1, 10, "a"), Limit(1, 3, "b")], clock=ns_clock)
    with pytest.raises(ValueError, match=r"cost 4 exceeds capacity 3 of Limit\(.*'b'\)"):
        limiter.acquire("k", 4)
    with pytest.raises(ValueError, match="exceeds capacity"):
        asyncio.run(limiter.wait("k", 4))


def test_bad_construction() -> None:
    with pytest.raises(TypeError, match="rate and capacity, or limits"):
        TokenBucketLimiter(1)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="not both"):
        TokenBucketLimiter(1, 1, limits=[Limit(1, 1)])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="at least one"):
        TokenBucketLimiter(limits=[])
    with pytest.raises(ValueError, match="distinct names"):
        TokenBucketLimiter(limits=[Limit(1, 1), Limit(2, 2)])
    with pytest.raises(ValueError, match="distinct names"):
        TokenBucketLimiter(limits=[Limit(1, 1, "x"), Limit(2, 2, "x")])
    with pytest.raises(TypeError, match="Limit instances"):
        TokenBucketLimiter(limits=[(1, 1)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="printable ASCII"):
        Limit(1, 1, "caf\u00e9")
    with pytest.raises(ValueError, match="maxsize"):
        TokenBucketLimiter(1, 1, maxsize=0)
    with pytest.raises(ValueError, match="seconds"):
        Limit.per(10, 0)


# ---------------------------------------------------------------------- acceptance 2


class ReferenceBuckets:
    """The textbook token bucket in exact rational arithmetic: tokens and last refill time."""

    def __init__(self, limits: list[Limit]) -> None:
        self.limits = limits
        self.rates = [Fraction(str(limit.rate)) for limit in limits]
        self.state: dict[str, tuple[Fraction, list[Fraction]]] = {}

    def _tokens(self, key: str, now: Fraction) -> list[Fraction]:
        if key not in self.state:
            return [Fraction(limit.capacity) for limit in self.limits]
        then, tokens = self.state[key]
        return [
            min(Fraction(limit.capacity), held + (now - then) * rate)
            for limit, rate, held in zip(self.limits, self.rates, tokens, strict=True)
        ]

    def _describe(self, i: int, tokens: Fraction) -> tuple[int, float, float]:
        capacity, rate = self.limits[i].capacity, self.rates[i]
        refill = 0 if tokens == capacity else (math.floor(tokens) + 1 - tokens) / rate
        return math.floor(tokens), float((capacity - tokens) / rate), float(refill)

    def decide(self, key: str, cost: int, now: Fraction, take: bool) -> Decision:
        tokens = self._tokens(key, now)
        waits = [
            max(Fraction(0), (cost - held) / rate)
            for held, rate in zip(tokens, self.rates, strict=True)
        ]
        worst = max(range(len(waits)), key=lambda i: (waits[i], -i))
        if waits[worst] > 0:
            remaining, reset, refill = self._describe(worst, tokens[worst])
            return Decision(
                False, remaining, float(waits[worst]), reset, refill, self.limits[worst]
            )
        after = [held - cost for held in tokens]
        if take:
            self.state[key] = (now, after)
        shown = after if take else tokens
        best = min(range(len(shown)), key=lambda i: (math.floor(shown[i]), i))
        remaining, reset, refill = self._describe(best, shown[best])
        return Decision(True, remaining, 0.0, reset, refill, self.limits[best])


limit_sets = st.lists(
    st.tuples(
        st.fractions(min_value=Fraction(1, 50), max_value=50, max_denominator=400),
        st.integers(min_value=1, max_value=8),
    ),
    min_size=1,
    max_size=3,
).map(lambda specs: [Limit(rate, cap, f"l{i}") for i, (rate, cap) in enumerate(specs)])

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(min_value=0, max_value=4 * NS)),
        st.tuples(st.just("acquire"), st.sampled_from("abc"), st.integers(1, 8)),
        st.tuples(st.just("peek"), st.sampled_from("abc"), st.integers(1, 8)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("reset"), st.sampled_from("abc")),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(limits=limit_sets, ops=operations, start_ns=st.integers(0, 10**6 * NS))
def test_every_decision_matches_an_exact_reference(
    limits: list[Limit], ops: list[tuple[object, ...]], start_ns: int
) -> None:
    clock = NsClock(start_ns)
    limiter = TokenBucketLimiter(limits=limits, clock=clock)
    model = ReferenceBuckets(limits)
    largest = min(limit.capacity for limit in limits)
    for op in ops:
        now = Fraction(clock.ns, NS)
        if op[0] == "advance":
            clock.advance(ns=int(op[1]))  # type: ignore[call-overload]
        elif op[0] == "expire":
            limiter.stores[0].expire()  # lossless: must change no later decision
        elif op[0] == "reset":
            limiter.reset(op[1])
            model.state.pop(str(op[1]), None)
        else:
            _, key, cost = op
            cost = min(int(cost), largest)  # type: ignore[call-overload]
            take = op[0] == "acquire"
            got = (limiter.acquire if take else limiter.peek)(key, cost)
            assert got == model.decide(str(key), cost, now, take)


# ---------------------------------------------------------------------- acceptance 3


async def test_wait_wakes_when_allowed() -> None:
    limiter = TokenBucketLimiter(20, 1)  # a token every 50 ms, real clock
    limiter.acquire("k")
    started = time.monotonic()
    decision = await limiter.wait("k")
    elapsed = time.monotonic() - started
    assert decision.allowed
    assert 0.04 <= elapsed < 1.0


async def test_waiters_take_turns() -> None:
    limiter = TokenBucketLimiter(20, 1)
    limiter.acquire("k")
    started = time.monotonic()
    decisions = await asyncio.gather(*(limiter.wait("k") for _ in range(3)))
    assert all(decisions)
    assert 0.13 <= time.monotonic() - started < 1.5
    assert limiter.stats().allowed == 4


async def test_wait_raises_at_once_when_the_timeout_is_too_short() -> None:
    limiter = TokenBucketLimiter(1, 1)
    limiter.acquire("k")
    started = time.monotonic()
    with pytest.raises(RateLimited) as raised:
        await limiter.wait("k", timeout=0.05)
    assert time.monotonic() - started < 0.5
    assert 0.5 < raised.value.retry_after <= 1.0
    assert raised.value.decision is not None and not raised.value.decision.allowed


async def test_wait_within_the_timeout() -> None:
    limiter = TokenBucketLimiter(20, 1)
    limiter.acquire("k")
    assert await limiter.wait("k", timeout=2.0)
    with pytest.raises(ValueError, match="timeout"):
        await limiter.wait("k", timeout=-1)


async def test_cancelled_wait_takes_nothing() -> None:
    limiter = TokenBucketLimiter(5, 1)  # a token every 200 ms
    limiter.acquire("k")
    waiter = asyncio.create_task(limiter.wait("k"))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.stats().allowed == 1
    await asyncio.sleep(0.3)
    assert limiter.acquire("k").allowed  # the token the waiter would have had


class CountingLimiter:
    """Wraps a limiter and counts acquire calls: waiting must not poll."""

    def __init__(self, inner: TokenBucketLimiter) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self.inner.limits

    def acquire(self, key: str, cost: int = 1) -> Decision:
        self.calls += 1
        return self.inner.acquire(key, cost)


class AsyncWrapper(CountingLimiter):
    """The same, behind a coroutine acquire, as a shared-store limiter would be."""

    async def acquire(self, key: str, cost: int = 1) -> Decision:  # type: ignore[override]
        return super().acquire(key, cost)


async def test_waiting_sleeps_once_per_refusal() -> None:
    counting = CountingLimiter(TokenBucketLimiter(10, 1))

    @rate_limited(counting, wait=True)
    async def work() -> str:
        return "done"

    assert await work() == "done"
    started = time.monotonic()
    assert await work() == "done"
    assert time.monotonic() - started >= 0.08
    assert counting.calls == 3  # allowed, refused, allowed after one exact sleep


# ---------------------------------------------------------------------- decorator


def test_rate_limited_sync_raises_and_skips_the_call(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=ns_clock)
    calls: list[str] = []

    @rate_limited(limiter, key=lambda user: user)
    def handle(user: str) -> str:
        calls.append(user)
        return user.upper()

    assert handle("ann") == "ANN"
    assert handle("bob") == "BOB"  # another key, another bucket
    with pytest.raises(RateLimited) as raised:
        handle("ann")
    assert raised.value.retry_after == 1.0
    assert calls == ["ann", "bob"]
    assert handle.__name__ == "handle"


def test_rate_limited_sync_wait_sleeps() -> None:
    limiter = TokenBucketLimiter(20, 1)

    @rate_limited(limiter, wait=True, timeout=2.0)
    def ping() -> int:
        return 1

    started = time.monotonic()
    assert ping() + ping() == 2
    assert 0.04 <= time.monotonic() - started < 1.0


async def test_rate_limited_async_raises(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 2, clock=ns_clock)

    @rate_limited(limiter, cost=2)
    async def heavy() -> str:
        return "ok"

    assert await heavy() == "ok"
    with pytest.raises(RateLimited, match=r"retry after 2\.000 s"):
        await heavy()


async def test_rate_limited_with_an_async_limiter(ns_clock: NsClock) -> None:
    wrapped = AsyncWrapper(TokenBucketLimiter(1, 1, clock=ns_clock))

    @rate_limited(wrapped)
    async def once() -> int:
        return 1

    assert await once() == 1
    with pytest.raises(RateLimited):
        await once()
    with pytest.raises(TypeError, match="synchronous"):

        @rate_limited(wrapped)
        def sync() -> None: ...


def test_rate_limited_bad_arguments() -> None:
    limiter = TokenBucketLimiter(1, 1)
    with pytest.raises(ValueError, match="wait=True"):
        rate_limited(limiter, timeout=1.0)
    with pytest.raises(ValueError, match="cost"):
        rate_limited(limiter, cost=0)
    with pytest.raises(TypeError, match="key"):
        rate_limited(limiter, key="user")  # type: ignore[arg-type]


def test_rate_limited_pickles(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 1, clock=ns_clock)
    limiter.acquire("k")
    error = RateLimited(1.0, decision=limiter.acquire("k"))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.retry_after, copy.decision) == (1.0, error.decision)
    assert str(copy) == str(error) == "rate limited: retry after 1.000 s"


def test_threads_never_overdraw() -> None:
    limiter = TokenBucketLimiter(Fraction(1, 3600), 3000)  # no refill during the test
    barrier = threading.Barrier(8)
    granted: list[int] = []

    def hammer() -> None:
        barrier.wait()
        granted.append(sum(limiter.try_acquire("shared") for _ in range(1000)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 3000
    assert limiter.stats() == LimiterStats(allowed=3000, denied=5000, fail_open_evictions=0, size=1)


def test_unlocked_limiter_behaves_the_same(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 2, clock=ns_clock, threadsafe=False)
    assert [limiter.try_acquire("k") for _ in range(3)] == [True, True, False]
    assert "threadsafe=False" in repr(limiter.stores[0])


def test_the_store_counts_a_miss_for_each_new_bucket(ns_clock: NsClock) -> None:
    limiter = TokenBucketLimiter(1, 5, clock=ns_clock)
    for _ in range(3):
        limiter.acquire("a")
    limiter.acquire("b")
    (store,) = limiter.stores
    stats = store.stats()
    assert (stats.hits, stats.misses) == (2, 2)
    assert limiter.stats().allowed == 4
