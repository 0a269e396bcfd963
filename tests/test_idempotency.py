"""IdempotencyStore, the backend seam and @idempotent, with the fake clock from conftest.

Every outcome of begin(), lease expiry, stale tokens, release, the in-flight bound and a full
store with long-running claims are unit-tested; a hypothesis state machine then checks, for any
interleaving of begin/complete/release/advance over a few keys and owners, that no key ever has
two live owners and that every replay is what the key's owner completed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule

from tests._support import AsyncStore, fault_counts
from ttlstore import _faults
from ttlstore._errors import BackendUnavailable
from ttlstore.idempotency import (
    AsyncIdempotencyBackend,
    Busy,
    BusyError,
    IdempotencyStore,
    InProgress,
    InProgressError,
    Mismatch,
    MismatchError,
    Outcome,
    Replay,
    Started,
    as_async_backend,
    idempotent,
)
from ttlstore.records import StoredResponse
from ttlstore.sweeper import AsyncSweeper, Sweeper
from ttlstore.testing import FakeClock


def claim(store: IdempotencyStore, key: str, fingerprint: str = "fp") -> str:
    """begin() that must answer Started; returns the token."""
    outcome = store.begin(key, fingerprint)
    assert isinstance(outcome, Started), outcome
    return outcome.token


# ---------------------------------------------------------------------- begin() outcomes


def test_started_gives_a_fresh_unguessable_token(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    first, second = claim(store, "a"), claim(store, "b")
    assert first != second
    assert len(first) == 32 and int(first, 16) >= 0  # secrets.token_hex(16)


def test_replay_returns_what_the_owner_completed(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    token = claim(store, "k")
    assert store.complete("k", token, {"id": 1})
    assert store.begin("k", "fp") == Replay({"id": 1})
    assert store.begin("k", "fp") == Replay({"id": 1})
    stats = store.stats()
    assert (stats.claims, stats.completions, stats.replays, stats.records) == (1, 1, 2, 1)
    assert stats.inflight == 0


def test_in_progress_while_the_owner_runs(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    claim(store, "k")
    assert store.begin("k", "fp") == InProgress()
    assert store.stats().conflicts == 1


def test_mismatch_against_a_stored_record_and_a_running_claim(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    claim(store, "running", "fp1")
    assert store.begin("running", "fp2") == Mismatch()
    token = claim(store, "done", "fp1")
    store.complete("done", token, "result")
    assert store.begin("done", "fp2") == Mismatch()
    assert store.stats().mismatches == 2
    # A mismatch changes nothing: the owner still completes, the record still replays.
    assert store.begin("done", "fp1") == Replay("result")


def test_release_lets_a_retry_run_again(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    token = claim(store, "k")
    assert store.release("k", token)
    assert not store.release("k", token)  # already released: stale
    retry = claim(store, "k", "another payload is fine: nothing was stored")
    assert retry != token
    stats = store.stats()
    assert (stats.releases, stats.stale, stats.claims) == (1, 1, 2)


def test_record_expires_after_ttl(clock: FakeClock) -> None:
    store = IdempotencyStore(ttl=10, clock=clock)
    store.complete("k", claim(store, "k"), "r")
    clock.advance(9.999)
    assert store.begin("k", "fp") == Replay("r")
    clock.advance(0.001)  # deadline <= now: gone
    claim(store, "k")


def test_ttl_none_keeps_records_until_evicted(clock: FakeClock) -> None:
    store = IdempotencyStore(ttl=None, maxsize=1, clock=clock)
    store.complete("a", claim(store, "a"), "A")
    clock.advance(1e9)
    assert store.begin("a", "fp") == Replay("A")
    store.complete("b", claim(store, "b"), "B")
    claim(store, "a")  # evicted by b
    assert store.stats().evictions == 1


# ---------------------------------------------------------------------- leases and stale tokens


def test_an_abandoned_claim_is_released_when_its_lease_runs_out(clock: FakeClock) -> None:
    store = IdempotencyStore(lease=30, clock=clock)
    stale = claim(store, "k")
    clock.advance(29.999)
    assert store.begin("k", "fp") == InProgress()
    clock.advance(0.001)
    fresh = claim(store, "k")
    assert store.stats().lease_expiries == 1
    # The stale owner can neither complete nor release the new owner's claim.
    assert not store.complete("k", stale, "stale result")
    assert not store.release("k", stale)
    assert store.begin("k", "fp") == InProgress()
    assert store.complete("k", fresh, "fresh result")
    assert store.begin("k", "fp") == Replay("fresh result")
    assert store.stats().stale == 2


def test_a_stale_token_cannot_complete_after_the_lease_even_if_nobody_claimed(
    clock: FakeClock,
) -> None:
    store = IdempotencyStore(lease=5, clock=clock)
    token = claim(store, "k")
    clock.advance(5)
    assert not store.complete("k", token, "late")
    claim(store, "k")  # nothing was stored


def test_a_token_only_owns_its_own_key(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    token = claim(store, "a")
    claim(store, "b")
    assert not store.complete("b", token, "x")
    assert not store.release("b", token)
    assert not store.complete("never-claimed", token, "x")
    assert store.begin("b", "fp") == InProgress()


# ---------------------------------------------------------------------- bounds


def test_full_in_flight_table_answers_busy_and_keeps_every_running_claim(
    clock: FakeClock,
) -> None:
    store = IdempotencyStore(maxsize=100, max_inflight=2, clock=clock)
    tokens = {key: claim(store, key) for key in ("a", "b")}
    assert store.begin("c", "fp") == Busy()
    # The running claims were not evicted to make room: duplicates still see them.
    assert store.begin("a", "fp") == InProgress()
    assert store.begin("b", "fp") == InProgress()
    assert store.stats().busy == 1
    store.complete("a", tokens["a"], "A")
    claim(store, "c")  # a slot freed up
    assert store.stores[1].stats().evictions == 0


def test_expired_claims_do_not_count_against_the_in_flight_bound(clock: FakeClock) -> None:
    store = IdempotencyStore(lease=1, max_inflight=1, clock=clock)
    claim(store, "a")
    assert store.begin("b", "fp") == Busy()
    clock.advance(1)
    claim(store, "b")


def test_full_record_store_never_runs_a_long_running_key_twice(clock: FakeClock) -> None:
    """Records churn through a tiny LRU while one claim stays held: it is never re-run."""
    store = IdempotencyStore(ttl=3600, maxsize=2, lease=60, max_inflight=4, clock=clock)
    executions = {"slow": 1}
    slow = claim(store, "slow")
    for i in range(50):
        key = f"fast-{i}"
        store.complete(key, claim(store, key), i)
        executions[key] = executions.get(key, 0) + 1
        clock.advance(1)  # 50 s in all: still within the slow claim's lease
        outcome = store.begin("slow", "fp")
        assert outcome == InProgress(), f"slow key would run twice at step {i}: {outcome}"
    assert store.complete("slow", slow, "done")
    assert store.begin("slow", "fp") == Replay("done")
    stats = store.stats()
    assert stats.evictions == 49 and stats.records == 2
    assert stats.lease_expiries == 0
    assert max(executions.values()) == 1


# ---------------------------------------------------------------------- construction and API


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": math.nan}, ValueError, "ttl"),
        ({"ttl": "1h"}, TypeError, "ttl"),
        ({"lease": None}, TypeError, "lease"),
        ({"lease": math.inf}, ValueError, "lease"),
        ({"lease": 0}, ValueError, "lease"),
        ({"maxsize": 0}, ValueError, "maxsize"),
        ({"maxsize": 2.5}, TypeError, "maxsize"),
        ({"maxsize": True}, TypeError, "maxsize"),
        ({"max_inflight": 0}, ValueError, "max_inflight"),
        ({"max_inflight": "10"}, TypeError, "max_inflight"),
        ({"clock": 3}, TypeError, "clock"),
    ],
)
def test_bad_arguments_are_named_with_their_value(
    kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names) as raised:
        IdempotencyStore(**kwargs)
    assert repr(next(iter(kwargs.values())))[:3] in str(raised.value)


def test_begin_refuses_non_string_keys_and_fingerprints() -> None:
    store = IdempotencyStore()
    with pytest.raises(TypeError, match="key must be a str, got 1"):
        store.begin(1, "fp")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fingerprint must be a str, got b'fp'"):
        store.begin("k", b"fp")  # type: ignore[arg-type]


def test_properties_repr_and_default_in_flight_bound() -> None:
    store = IdempotencyStore()
    assert (store.ttl, store.maxsize, store.lease, store.max_inflight) == (3600, 5000, 60, 5000)
    assert repr(store) == ("<IdempotencyStore ttl=3600 maxsize=5000 lease=60 max_inflight=5000>")
    assert repr(IdempotencyStore(ttl=None)).startswith("<IdempotencyStore ttl=None")


def test_not_threadsafe_variant_behaves_the_same(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock, threadsafe=False)
    token = claim(store, "k")
    assert store.begin("k", "fp") == InProgress()
    store.complete("k", token, 1)
    assert store.begin("k", "fp") == Replay(1)


def test_concurrent_threads_claim_a_key_exactly_once() -> None:
    store = IdempotencyStore()
    barrier = threading.Barrier(16)
    outcomes: list[Outcome[Any]] = []

    def contend() -> None:
        barrier.wait()
        outcomes.append(store.begin("k", "fp"))

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(o, Started) for o in outcomes) == 1
    assert sum(isinstance(o, InProgress) for o in outcomes) == 15


async def test_one_async_sweeper_reclaims_both_stores(clock: FakeClock) -> None:
    store = IdempotencyStore(ttl=100, lease=10, clock=clock)
    store.complete("done", claim(store, "done"), "r")
    claim(store, "abandoned")
    records, claims = store.stores
    clock.advance(100)
    sweeper = AsyncSweeper(*store.stores)
    assert await sweeper.sweep() == 2
    # Reclaimed by the sweeper, not by a read: the raw stores are already empty.
    assert repr(records).startswith("<TTLStore stored=0")
    assert repr(claims).startswith("<claims stored=0")
    assert store.stats().lease_expiries == 1


def test_a_thread_sweeper_serves_the_stores_too(clock: FakeClock) -> None:
    store = IdempotencyStore(ttl=1, clock=clock)
    store.complete("k", claim(store, "k"), "r")
    clock.advance(1)
    assert Sweeper(*store.stores).sweep() == 1


# ---------------------------------------------------------------------- the backend seam


async def test_as_async_backend_wraps_sync_and_passes_async_through() -> None:
    store = IdempotencyStore()
    async_store = AsyncStore(store)
    assert as_async_backend(async_store) is async_store
    view: AsyncIdempotencyBackend[Any] = as_async_backend(store)
    outcome = await view.begin("k", "fp")
    assert isinstance(outcome, Started)
    assert await view.complete("k", outcome.token, 7)
    assert await view.begin("k", "fp") == Replay(7)
    assert "async view" in repr(view)


def test_as_async_backend_rejects_non_backends() -> None:
    with pytest.raises(TypeError, match=r"store must have begin\(\), complete\(\) and release"):
        as_async_backend(object())  # type: ignore[arg-type]

    class Mixed:
        def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
            raise NotImplementedError

        async def complete(self, key: str, token: str, result: Any) -> bool:
            raise NotImplementedError

        def release(self, key: str, token: str) -> bool:
            raise NotImplementedError

    with pytest.raises(TypeError, match="all-async or all-sync"):
        as_async_backend(Mixed())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- @idempotent, sync


def test_sync_function_runs_once_per_key(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    calls: list[int] = []

    @idempotent(store, key=lambda order_id, amount: order_id)
    def charge(order_id: str, amount: int) -> dict[str, Any]:
        calls.append(amount)
        return {"order": order_id, "charged": amount}

    assert charge("o1", 10) == {"order": "o1", "charged": 10}
    assert charge("o1", 10) == {"order": "o1", "charged": 10}
    assert charge("o2", 5)["charged"] == 5
    assert calls == [10, 5]
    assert charge.__name__ == "charge"  # functools.wraps


def test_fingerprint_mismatch_raises(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)

    @idempotent(store, key=lambda k, amount: k, fingerprint=lambda k, amount: str(amount))
    def charge(k: str, amount: int) -> int:
        return amount

    assert charge("k", 1) == 1
    with pytest.raises(MismatchError, match="'k' was already used") as raised:
        charge("k", 2)
    assert raised.value.key == "k"


def test_an_exception_releases_the_claim_by_default(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    attempts: list[int] = []

    @idempotent(store, key=lambda: "k")
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("down")
        return "ok"

    with pytest.raises(ConnectionError):
        flaky()
    assert flaky() == "ok"
    assert flaky() == "ok"
    assert len(attempts) == 2
    assert store.stats().releases == 1


class Declined(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def test_store_errors_replays_a_detached_copy_of_the_exception(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    attempts: list[int] = []

    @idempotent(store, key=lambda: "k", store_errors=True)
    def charge() -> None:
        attempts.append(1)
        try:
            raise KeyError("inner")
        except KeyError:
            raise Declined("card_declined") from None

    with pytest.raises(Declined):
        charge()
    errors = []
    for _ in range(3):
        with pytest.raises(Declined) as raised:
            charge()
        errors.append(raised.value)
    assert len(attempts) == 1
    assert {e.code for e in errors} == {"card_declined"}
    assert len({id(e) for e in errors}) == 3  # a fresh copy for every replay
    # Each replayed copy's traceback is only its own raise, not an ever-growing chain.
    depths = [_tb_depth(e) for e in errors]
    assert depths[0] == depths[-1]


def _tb_depth(error: BaseException) -> int:
    depth, tb = 0, error.__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    return depth


def test_store_errors_never_stores_a_base_exception(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)

    class Stop(BaseException):
        pass

    @idempotent(store, key=lambda: "k", store_errors=True)
    def interrupted() -> None:
        raise Stop

    with pytest.raises(Stop):
        interrupted()
    assert store.stats().releases == 1


def test_an_uncopyable_exception_is_released_with_a_warning(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = IdempotencyStore(clock=clock)

    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:  # args do not rebuild it
            super().__init__(a + b)

    @idempotent(store, key=lambda: "k", store_errors=True)
    def fails() -> None:
        raise Odd(1, 2)

    with caplog.at_level(logging.WARNING, logger="ttlstore"), pytest.raises(Odd):
        fails()
    assert "cannot be copied" in caplog.text
    assert store.stats().releases == 1


def test_namespaces_keep_functions_apart(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)

    @idempotent(store, key=lambda order: order)
    def charge(order: str) -> str:
        return f"charged {order}"

    @idempotent(store, key=lambda order: order)
    def refund(order: str) -> str:
        return f"refunded {order}"

    assert charge("o1") == "charged o1"
    assert refund("o1") == "refunded o1"

    @idempotent(store, key=lambda order: order, namespace="shared")
    def one(order: str) -> str:
        return "one"

    @idempotent(store, key=lambda order: order, namespace="shared")
    def other(order: str) -> str:
        return "other"

    assert one("o1") == "one"
    assert other("o1") == "one"  # an explicit shared namespace shares results


def test_a_sync_function_in_progress_raises_or_waits(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    entered, leave = threading.Event(), threading.Event()
    runs: list[int] = []

    def body(n: int) -> int:
        runs.append(n)
        entered.set()
        assert leave.wait(5)
        return n * 10

    eager = idempotent(store, key=lambda n: "k", namespace="ns")(body)
    patient = idempotent(store, key=lambda n: "k", namespace="ns", wait=True)(body)
    results: list[int] = []
    owner = threading.Thread(target=lambda: results.append(patient(1)))
    owner.start()
    assert entered.wait(5)
    with pytest.raises(InProgressError, match="'k' is still in progress"):
        eager(2)
    waiter = threading.Thread(target=lambda: results.append(patient(3)))
    waiter.start()
    leave.set()
    owner.join(5)
    waiter.join(5)
    assert results == [10, 10]
    assert runs == [1]


def test_busy_raises_busy_error(clock: FakeClock) -> None:
    store = IdempotencyStore(max_inflight=1, clock=clock)
    claim(store, "other")

    @idempotent(store, key=lambda: "k")
    def fn() -> None:
        raise AssertionError("must not run")

    with pytest.raises(BusyError):
        fn()


def test_a_result_after_the_lease_is_returned_but_not_stored(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = IdempotencyStore(lease=10, clock=clock)
    runs: list[int] = []

    @idempotent(store, key=lambda: "k")
    def slow() -> int:
        runs.append(1)
        clock.advance(10)
        return len(runs)

    with caplog.at_level(logging.WARNING, logger="ttlstore"):
        assert slow() == 1
    assert "lease too short" in caplog.text
    assert slow() == 2  # nothing was stored, so it ran again


def test_a_failing_backend_does_not_hide_the_result(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
            return Started("t")

        def complete(self, key: str, token: str, result: Any) -> bool:
            raise ConnectionError("backend down")

        def release(self, key: str, token: str) -> bool:
            raise ConnectionError("backend down")

    @idempotent(Broken(), key=lambda: "k")
    def fn() -> str:
        return "value"

    @idempotent(Broken(), key=lambda: "k")
    def fails() -> str:
        raise ValueError("own error")

    with caplog.at_level(logging.ERROR, logger="ttlstore"):
        assert fn() == "value"
        with pytest.raises(ValueError, match="own error"):
            fails()
    assert caplog.text.count("failed to end the claim") == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key": "k"}, TypeError, "key must be a callable returning a str, got 'k'"),
        ({"key": str, "fingerprint": 1}, TypeError, "fingerprint must be a callable"),
        ({"key": str, "wait": 1}, TypeError, "wait must be a bool, got 1"),
        ({"key": str, "store_errors": "yes"}, TypeError, "store_errors must be a bool"),
        ({"key": str, "namespace": 1}, TypeError, "namespace must be a str or None, got 1"),
    ],
)
def test_bad_decorator_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        idempotent(IdempotencyStore(), **kwargs)


def test_key_and_fingerprint_callables_must_return_strings() -> None:
    store = IdempotencyStore()

    def echo(n: int) -> int:
        return n

    by_int = idempotent(store, key=lambda n: n)(echo)
    with pytest.raises(TypeError, match="key callable must return a str, got 1"):
        by_int(1)
    by_bytes = idempotent(store, key=str, fingerprint=lambda n: b"x")(echo)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="fingerprint callable must return a str, got b'x'"):
        by_bytes(1)


def test_a_sync_function_needs_a_sync_backend() -> None:
    decorate = idempotent(AsyncStore(IdempotencyStore()), key=str)
    with pytest.raises(TypeError, match="can only guard async functions"):
        decorate(lambda n: n)


# ---------------------------------------------------------------------- @idempotent, async


async def test_async_duplicate_raises_in_progress_while_the_first_runs(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    entered, leave = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @idempotent(store, key=lambda n: "k")
    async def create(n: int) -> int:
        runs.append(n)
        entered.set()
        await leave.wait()
        return n

    first = asyncio.create_task(create(1))
    await entered.wait()
    with pytest.raises(InProgressError):
        await create(2)
    leave.set()
    assert await first == 1
    assert await create(3) == 1
    assert runs == [1]


@pytest.mark.parametrize("backend_kind", ["sync", "async"])
async def test_async_duplicates_wait_for_the_first_result(
    clock: FakeClock, backend_kind: str
) -> None:
    store = IdempotencyStore(clock=clock)
    backend: Any = store if backend_kind == "sync" else AsyncStore(store)
    entered, leave = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @idempotent(backend, key=lambda n: "k", wait=True)
    async def create(n: int) -> int:
        runs.append(n)
        entered.set()
        await leave.wait()
        return n * 100

    first = asyncio.create_task(create(1))
    await entered.wait()
    waiters = [asyncio.create_task(create(n)) for n in range(2, 12)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    begins = store.stats().claims + store.stats().conflicts
    await asyncio.sleep(0.05)
    # Waiters sleep on the owner's event: no begin() calls while it runs.
    assert store.stats().claims + store.stats().conflicts == begins
    leave.set()
    assert await asyncio.gather(first, *waiters) == [100] * 11
    assert runs == [1]


async def test_waiters_run_themselves_when_the_first_fails(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    entered, leave = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @idempotent(store, key=lambda n: "k", wait=True)
    async def create(n: int) -> int:
        runs.append(n)
        entered.set()
        await leave.wait()
        if n == 1:
            raise RuntimeError("first attempt fails")
        return n

    first = asyncio.create_task(create(1))
    await entered.wait()
    second = asyncio.create_task(create(2))
    await asyncio.sleep(0)
    leave.set()
    with pytest.raises(RuntimeError):
        await first
    assert await second == 2
    assert runs == [1, 2]


async def test_a_cancelled_waiter_leaves_the_owner_running(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    entered, leave = asyncio.Event(), asyncio.Event()

    @idempotent(store, key=lambda: "k", wait=True)
    async def create() -> str:
        entered.set()
        await leave.wait()
        return "done"

    first = asyncio.create_task(create())
    await entered.wait()
    waiter = asyncio.create_task(create())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    leave.set()
    assert await first == "done"


async def test_cancelling_the_owner_releases_the_claim(clock: FakeClock) -> None:
    store = IdempotencyStore(clock=clock)
    entered = asyncio.Event()

    @idempotent(store, key=lambda: "k", store_errors=True)
    async def create() -> str:
        entered.set()
        await asyncio.Event().wait()
        return "never"

    owner = asyncio.create_task(create())
    await entered.wait()
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    stats = store.stats()
    assert (stats.releases, stats.inflight, stats.records) == (1, 0, 0)


async def test_waiting_on_an_owner_elsewhere_backs_off_until_it_releases(
    clock: FakeClock,
) -> None:
    """An owner outside this decorator (another process, say) is re-checked with backoff."""
    store = IdempotencyStore(clock=clock)
    remote = claim(store, "ns\x00k", "")
    runs: list[int] = []

    @idempotent(store, key=lambda: "k", namespace="ns", wait=True)
    async def create() -> str:
        runs.append(1)
        return "mine"

    waiter = asyncio.create_task(create())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    conflicts = store.stats().conflicts
    assert 2 <= conflicts <= 10  # backing off, not spinning
    store.release("ns\x00k", remote)
    assert await asyncio.wait_for(waiter, 5) == "mine"
    assert runs == [1]


async def test_async_store_errors_and_mismatch(clock: FakeClock) -> None:
    backend = AsyncStore(IdempotencyStore(clock=clock))

    @idempotent(backend, key=lambda code: "k", fingerprint=str, store_errors=True)
    async def decline(code: str) -> None:
        raise Declined(code)

    for _ in range(2):
        with pytest.raises(Declined, match="nope"):
            await decline("nope")
    with pytest.raises(MismatchError):
        await decline("other")
    assert backend.store.stats().completions == 1


# ---------------------------------------------------------------------- acceptance 3: stateful

KEYS = st.sampled_from(["a", "b", "c"])
FINGERPRINTS = st.sampled_from(["f1", "f2"])
STEPS = st.sampled_from([0, 1, 2, 3, 5, 10])
TTL, LEASE = 12.0, 5.0
EXAMPLES = int(os.environ.get("TTLSTORE_STATEFUL_EXAMPLES", "300"))


@dataclass(frozen=True)
class Owner:
    """One caller that got Started: the key and token it holds (or held)."""

    key: str
    token: str
    fingerprint: str


@dataclass
class ModelClaim:
    owner: Owner
    deadline: float


@dataclass
class ModelRecord:
    value: int
    fingerprint: str
    deadline: float


class IdempotencyMachine(RuleBasedStateMachine):
    """Drives an IdempotencyStore against a model of who holds each key and what it stored.

    ``maxsize`` at least the number of keys makes the model exact; below it, records may be
    LRU-evicted, which the model allows (only) where a live record turns out to be gone.
    """

    maxsize = 3
    max_inflight = 3

    owners = Bundle("owners")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = IdempotencyStore(
            ttl=TTL,
            maxsize=self.maxsize,
            lease=LEASE,
            max_inflight=self.max_inflight,
            clock=self.clock,
        )
        self.claims: dict[str, ModelClaim] = {}
        self.records: dict[str, ModelRecord] = {}
        self.next_value = 0

    def live_claim(self, key: str) -> ModelClaim | None:
        found = self.claims.get(key)
        return found if found is not None and found.deadline > self.clock.now else None

    def live_record(self, key: str) -> ModelRecord | None:
        found = self.records.get(key)
        return found if found is not None and found.deadline > self.clock.now else None

    @rule(target=owners, key=KEYS, fingerprint=FINGERPRINTS)
    def begin(self, key: str, fingerprint: str) -> Any:
        outcome = self.store.begin(key, fingerprint)
        record, running = self.live_record(key), self.live_claim(key)
        if isinstance(outcome, Replay):
            assert record is not None, "replayed a record that was never completed"
            assert outcome.result == record.value, "replay differs from what the owner stored"
            assert fingerprint == record.fingerprint
        elif isinstance(outcome, Mismatch):
            other = record.fingerprint if record else running.owner.fingerprint if running else None
            assert other is not None and other != fingerprint
        elif isinstance(outcome, InProgress):
            assert running is not None and running.owner.fingerprint == fingerprint
        elif isinstance(outcome, Busy):
            assert running is None
            live = sum(self.live_claim(k) is not None for k in self.claims)
            assert live >= self.max_inflight
        else:
            assert isinstance(outcome, Started)
            # The heart of it: a key is never handed to a second owner while one is live.
            assert running is None, f"{key!r} would execute twice"
            if record is not None:
                assert self.maxsize < 3, "a live record was lost without eviction"
                del self.records[key]
            owner = Owner(key, outcome.token, fingerprint)
            self.claims[key] = ModelClaim(owner, self.clock.now + LEASE)
            return owner
        return multiple()

    @rule(owner=owners)
    def complete(self, owner: Owner) -> None:
        running = self.live_claim(owner.key)
        expected = running is not None and running.owner == owner
        value = self.next_value
        self.next_value += 1
        assert self.store.complete(owner.key, owner.token, value) is expected
        if expected:
            del self.claims[owner.key]
            self.records[owner.key] = ModelRecord(value, owner.fingerprint, self.clock.now + TTL)

    @rule(owner=owners)
    def release(self, owner: Owner) -> None:
        running = self.live_claim(owner.key)
        expected = running is not None and running.owner == owner
        assert self.store.release(owner.key, owner.token) is expected
        if expected:
            del self.claims[owner.key]

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def counts_match(self) -> None:
        stats = self.store.stats()
        assert stats.inflight == sum(self.live_claim(k) is not None for k in self.claims)
        live_records = sum(self.live_record(k) is not None for k in self.records)
        if self.maxsize >= 3:
            assert stats.records == live_records
        else:
            assert stats.records <= min(live_records, self.maxsize)
        assert self.store.stores[1].stats().evictions == 0  # claims are never evicted


class TightIdempotencyMachine(IdempotencyMachine):
    """A record store smaller than the key set and a tight in-flight bound."""

    maxsize = 1
    max_inflight = 2


TestIdempotencyMachine = IdempotencyMachine.TestCase
TestIdempotencyMachine.settings = settings(max_examples=EXAMPLES, stateful_step_count=40)
TestTightIdempotencyMachine = TightIdempotencyMachine.TestCase
TestTightIdempotencyMachine.settings = settings(max_examples=EXAMPLES, stateful_step_count=40)


# ---------------------------------------------------------------------- the lease left


def test_in_progress_tells_the_lease_left(clock: FakeClock) -> None:
    store = IdempotencyStore(lease=60, clock=clock)
    claim(store, "k")
    clock.advance(15)
    outcome = store.begin("k", "fp")
    assert isinstance(outcome, InProgress)
    assert outcome.retry_after == pytest.approx(45)
    assert outcome == InProgress()  # the hint is no part of the outcome's identity


# ---------------------------------------------------------------------- the tables' views


def test_the_tables_are_read_only_views_under_the_stores_lock(clock: FakeClock) -> None:
    store = IdempotencyStore(ttl=100, lease=10, clock=clock)
    store.complete("done", claim(store, "done"), "r")
    claim(store, "running")
    records, claims = store.stores
    assert records.threadsafe and claims.threadsafe
    assert list(records) == ["done"] and "running" in claims and len(claims) == 1
    assert records.ttl("done") == pytest.approx(100) and claims.ttl("running") == 10
    assert records.maxsize == store.maxsize and claims.default_ttl == store.lease
    assert not hasattr(records, "set") and not hasattr(claims, "__delitem__")
    assert store.stores is store.stores  # the same views: a sweeper's weak references hold
    clock.advance(100)
    assert Sweeper(*store.stores).sweep() == 2
    assert store.stats().lease_expiries == 1


def test_an_unlocked_stores_tables_are_refused_by_a_thread_sweeper() -> None:
    store = IdempotencyStore(threadsafe=False)
    assert not any(table.threadsafe for table in store.stores)
    with pytest.raises(ValueError, match="threadsafe"):
        Sweeper(*store.stores)


# ---------------------------------------------------------------------- objects per entry


def tracked_objects_per_entry(fill: Any, n: int = 2_000) -> float:
    """How many objects the cyclic GC tracks per entry ``fill(i)`` adds."""
    gc.collect()
    before = len(gc.get_objects())
    for i in range(n):
        fill(i)
    # Tuples of untracked objects leave the GC's lists during a collection (one per level).
    for _ in range(3):
        gc.collect()
    return (len(gc.get_objects()) - before) / n


def test_a_record_costs_the_gc_one_object() -> None:
    store = IdempotencyStore(maxsize=10_000)
    headers = ((b"content-type", b"application/json"), (b"content-length", b"2"))

    def fill(i: int) -> None:
        key = f"k{i}"
        response = StoredResponse(201, tuple((n, v) for n, v in headers), b"{}")
        assert store.complete(key, claim(store, key, "f" * 64), response)

    # The store's own entry; the record, the response and its headers are untracked tuples.
    assert tracked_objects_per_entry(fill) <= 1.01
    replay = store.begin("k7", "f" * 64)
    assert isinstance(replay, Replay)
    assert replay.result == StoredResponse(201, headers, b"{}")


def test_a_claim_costs_the_gc_one_object() -> None:
    store = IdempotencyStore(maxsize=10_000)
    assert tracked_objects_per_entry(lambda i: claim(store, f"c{i}")) <= 1.01


# ---------------------------------------------------------------------- quiet logs in an outage


def test_an_outage_logs_one_line_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_faults, "clock", clock)

    class Fails:
        """A backend that goes down after handing out each claim."""

        def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
            return Started("t")

        def complete(self, key: str, token: str, result: Any) -> bool:
            raise BackendUnavailable("Redis failed to complete: timeout")

        def release(self, key: str, token: str) -> bool:
            raise BackendUnavailable("Redis failed to release: timeout")

    @idempotent(Fails(), key=str, namespace="orders")
    def create(n: int) -> int:
        return n

    with caplog.at_level(logging.WARNING, logger="ttlstore"):
        for i in range(1_000):
            assert create(i) == i  # the call's own result still stands
            clock.advance(1 / 16)  # 1 000 calls over 62.5 s: 160 per 10 s
    assert fault_counts(caplog.records, "@idempotent") == [1] + [160] * 6  # not one per call
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("@idempotent")]
    assert all("Redis failed to complete" in line for line in lines)
    assert "key '960'" in lines[-1]  # the last error
    assert not any(record.exc_info for record in caplog.records)
