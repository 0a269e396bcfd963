"""TTLStore behaviour a user relies on, with a fake clock; test_store_stateful has the model."""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import math
import os
import random
import subprocess
import sys
import threading
import tracemalloc
import warnings
from collections.abc import Generator
from typing import Any

import pytest

import ttlstore
from ttlstore import RemovalCause, Slot, StoreStats, TTLStore
from ttlstore.testing import FakeClock

Events = list[tuple[Any, Any, RemovalCause]]


@pytest.fixture(params=[True, False], ids=["threadsafe", "unlocked"])
def threadsafe(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def make(
    clock: FakeClock, threadsafe: bool = True, maxsize: int = 10, ttl: float | None = 10, **kw: Any
) -> TTLStore[Any, Any]:
    return TTLStore(maxsize, ttl, clock=clock, threadsafe=threadsafe, **kw)


def recorder() -> tuple[Events, Any]:
    events: Events = []
    return events, lambda key, value, cause: events.append((key, value, cause))


# ------------------------------------------------------------------------ visibility


def test_entry_is_gone_at_its_deadline_from_every_view(clock: FakeClock, threadsafe: bool) -> None:
    store = make(clock, threadsafe)
    store["a"] = 1
    store.set("b", 2, ttl=20)
    clock.advance(10)  # exactly a's deadline: expired
    assert store.get("a") is None
    assert store.peek("a") is None
    assert "a" not in store
    with pytest.raises(KeyError):
        store["a"]
    assert len(store) == 1
    assert list(store) == ["b"]
    assert list(store.keys()) == ["b"]
    assert list(store.values()) == [2]
    assert list(store.items()) == [("b", 2)]
    assert ("a", 1) not in store.items()
    assert store == {"b": 2}


def test_len_equals_iteration_while_entries_expire_unreclaimed(clock: FakeClock) -> None:
    store = make(clock, maxsize=100)
    for i in range(50):
        store.set(i, i, ttl=1 + i % 7)
    for _ in range(8):
        clock.advance(1)
        assert store.peek(0) is None or clock.now < 1001
        assert len(store) == len(list(store)) == len(store.items())


def test_ttl_none_never_expires_but_stays_lru_bounded(clock: FakeClock) -> None:
    store = make(clock, maxsize=2, ttl=None)
    store["a"] = 1
    clock.advance(1e9)
    assert store["a"] == 1
    assert store.ttl("a") is None
    store["b"] = 2
    store["c"] = 3
    assert list(store) == ["b", "c"]


def test_per_call_ttl_overrides_default_and_none_means_forever(clock: FakeClock) -> None:
    store = make(clock, ttl=10)
    store.set("short", 1, ttl=1)
    store.set("forever", 2, ttl=None)
    store.set("default", 3)
    assert store.ttl("short") == 1 and store.ttl("default") == 10
    clock.advance(5)
    assert "short" not in store and "default" in store
    clock.advance(100)
    assert dict(store.items()) == {"forever": 2}


def test_fixed_deadline_is_not_extended_by_reads(clock: FakeClock) -> None:
    store = make(clock, ttl=10)
    store["a"] = 1
    for _ in range(9):
        clock.advance(1)
        assert store["a"] == 1
    clock.advance(1)
    assert "a" not in store


def test_sliding_read_renews_deadline_but_peek_does_not(clock: FakeClock) -> None:
    store = make(clock, ttl=10, sliding=True)
    store["a"] = 1
    store["b"] = 2
    for _ in range(5):
        clock.advance(6)
        assert store.get("a") == 1
        store.peek("b")
    assert "a" in store
    assert "b" not in store
    assert store.ttl("a") == 10
    clock.advance(10)
    assert "a" not in store


def test_sliding_entry_with_own_ttl_renews_by_its_own_ttl(clock: FakeClock) -> None:
    store = make(clock, ttl=10, sliding=True)
    store.set("a", 1, ttl=2)
    clock.advance(1.5)
    assert store["a"] == 1
    assert store.ttl("a") == 2
    clock.advance(2)
    assert "a" not in store


def test_touch_renews_and_marks_recent(clock: FakeClock) -> None:
    store = make(clock, maxsize=2, ttl=10)
    store["a"] = 1
    store["b"] = 2
    clock.advance(8)
    assert store.touch("a") is True
    assert store.ttl("a") == 10
    store["c"] = 3  # evicts b, the least recently used
    assert list(store) == ["a", "c"]
    assert store.touch("a", ttl=1) is True
    clock.advance(1)
    assert store.touch("a") is False
    assert store.touch("missing") is False
    assert store.touch("c", ttl=None) is True
    clock.advance(1e6)
    assert list(store) == ["c"]


# ------------------------------------------------------------------------ recency and bounds


def test_lru_victim_is_least_recently_read_or_written(clock: FakeClock, threadsafe: bool) -> None:
    events, listener = recorder()
    store = make(clock, threadsafe, maxsize=3, on_remove=listener)
    store.update(a=1, b=2, c=3)
    store.get("a")  # read: most recent
    assert store.peek("b") == 2 and "b" in store and list(store)  # none of these count
    store["d"] = 4
    assert events == [("b", 2, RemovalCause.EVICTED)]
    assert list(store) == ["c", "a", "d"]


def test_full_store_reclaims_due_entries_before_evicting_live_ones(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, maxsize=3, on_remove=listener)
    store.set("old", 1, ttl=100)
    store.set("due1", 2, ttl=1)
    store.set("due2", 3, ttl=1)
    clock.advance(1)
    store["new"] = 4
    # One due entry frees the slot; the live one is kept.
    assert len(events) == 1 and events[0][2] is RemovalCause.EXPIRED
    assert events[0][0] in ("due1", "due2")
    assert list(store) == ["old", "new"]
    assert len(events) == 2  # iteration reclaimed the other due entry


def test_a_write_to_a_full_store_pays_for_one_due_entry_not_the_backlog(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, maxsize=5000, ttl=1, on_remove=listener)
    store.update((i, i) for i in range(5000))
    clock.advance(1)
    store["new"] = 0
    assert len(events) == 1  # the rest is left to sweeps and reads
    assert len(store) == 1 and len(events) == 5000


def test_weight_bound_evicts_lru_until_it_fits(clock: FakeClock, threadsafe: bool) -> None:
    events, listener = recorder()
    store = make(clock, threadsafe, weigher=lambda k, v: len(v), maxweight=10, on_remove=listener)
    store["a"] = "xxxx"
    store["b"] = "xxxx"
    store["c"] = "xxx"
    assert [k for k, _, _ in events] == ["a"]
    store["b"] = "xxxxxx"  # 3 + 6 fits: nothing to evict
    assert list(store) == ["c", "b"]
    store["b"] = "xxxxxxxx"  # 3 + 8 does not: c goes, never the key being written
    assert list(store) == ["b"] and store.stats().weight == 8


def test_item_heavier_than_maxweight_is_refused_and_evicts_nothing(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, weigher=lambda k, v: v, maxweight=10, on_remove=listener)
    store.update(a=5, b=5)
    with pytest.raises(ValueError, match=r"weight 11 of key 'c' exceeds maxweight 10"):
        store["c"] = 11
    with pytest.raises(ValueError, match="exceeds maxweight"):
        store.update(d=1, e=11)  # all or nothing: d is not written either
    assert store == {"a": 5, "b": 5} and events == []


@pytest.mark.parametrize("weight", [-1, math.nan, "3", None])
def test_bad_weight_is_refused_and_store_unchanged(clock: FakeClock, weight: Any) -> None:
    store = make(clock, weigher=lambda k, v: weight, maxweight=10)
    with pytest.raises((TypeError, ValueError), match=r"weig.*for key 'k'"):
        store["k"] = 1
    assert len(store) == 0 and store.stats().weight == 0 and store.stats().writes == 0


# ------------------------------------------------------------------------ removal causes


def test_every_removal_reported_once_with_its_cause(clock: FakeClock, threadsafe: bool) -> None:
    events, listener = recorder()
    store = make(clock, threadsafe, maxsize=2, on_remove=listener)
    store["a"] = 1
    store["a"] = 2  # REPLACED
    store["b"] = 3
    store["c"] = 4  # EVICTED a
    del store["b"]  # DELETED
    store.set("d", 5, ttl=1)
    clock.advance(1)
    assert store.expire() == 1  # EXPIRED d
    store.set("e", 6, ttl=1)
    clock.advance(1)
    store.clear()  # DELETED c, EXPIRED e
    assert events == [
        ("a", 1, RemovalCause.REPLACED),
        ("a", 2, RemovalCause.EVICTED),
        ("b", 3, RemovalCause.DELETED),
        ("d", 5, RemovalCause.EXPIRED),
        ("c", 4, RemovalCause.DELETED),
        ("e", 6, RemovalCause.EXPIRED),
    ]
    stats = store.stats()
    assert (stats.replacements, stats.evictions, stats.deletions, stats.expirations) == (1, 1, 2, 2)


def test_overwriting_an_expired_key_reports_expired_not_replaced(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, on_remove=listener)
    store["a"] = 1
    clock.advance(10)
    store["a"] = 2
    assert events == [("a", 1, RemovalCause.EXPIRED)]


def test_callback_may_read_and_write_the_store_without_deadlock(clock: FakeClock) -> None:
    store: TTLStore[str, int]
    seen: list[Any] = []

    def listener(key: str, value: int, cause: RemovalCause) -> None:
        # Runs after the lock is released: reading and writing the store is allowed.
        seen.append((key, store.get("keep"), len(store)))
        if key == "a":
            store[f"{key}-tombstone"] = value

    store = TTLStore(3, 10, clock=clock, on_remove=listener)
    store["keep"] = 0
    store["a"] = 1
    del store["a"]
    assert seen == [("a", 0, 1)]
    assert store["a-tombstone"] == 1


def test_callback_that_raises_is_logged_and_store_stays_consistent(
    clock: FakeClock, threadsafe: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def listener(key: Any, value: Any, cause: RemovalCause) -> None:
        raise RuntimeError("listener broke")

    store = make(clock, threadsafe, maxsize=2, on_remove=listener)
    with caplog.at_level(logging.ERROR, logger="ttlstore"):
        store.update(a=1, b=2)
        store["c"] = 3  # evicts a; the listener raises
        del store["b"]
    assert store == {"c": 3}
    failures = [r for r in caplog.records if r.name == "ttlstore"]
    assert len(failures) == 2 and "listener broke" in failures[0].exc_text  # type: ignore[operator]
    store["d"] = 4
    assert store.stats().evictions == 1 and len(store) == 2


# ------------------------------------------------------------------------ API


def test_add_only_writes_absent_or_expired_keys(clock: FakeClock) -> None:
    store = make(clock)
    assert store.add("a", 1) is True
    assert store.add("a", 2) is False
    assert store["a"] == 1
    clock.advance(10)
    assert store.add("a", 3, ttl=5) is True
    assert store.ttl("a") == 5


def test_pop_popitem_setdefault(clock: FakeClock) -> None:
    store = make(clock)
    store.update({"a": 1, "b": 2})
    assert store.pop("a") == 1
    assert store.pop("a", "gone") == "gone"
    with pytest.raises(KeyError):
        store.pop("a")
    assert store.setdefault("b", 9) == 2
    assert store.setdefault("c", 3) == 3
    assert store.popitem() == ("b", 2)
    clock.advance(10)
    with pytest.raises(KeyError, match="empty"):
        store.popitem()


def test_ttl_of_missing_or_expired_key_raises(clock: FakeClock) -> None:
    store = make(clock)
    with pytest.raises(KeyError):
        store.ttl("a")
    store.set("a", 1, ttl=2.5)
    clock.advance(1)
    assert store.ttl("a") == pytest.approx(1.5)


def test_expire_reclaims_due_entries_up_to_limit(clock: FakeClock) -> None:
    store = make(clock, maxsize=100)
    for i in range(30):
        store.set(i, i, ttl=1 if i % 2 else 10)  # FIFO and heap both hold due entries
    for i in range(30, 40):
        store.set(i, i, ttl=1.0 + i)
    clock.advance(5)
    assert store.expire(limit=10) == 10
    assert store.expire() == 5
    assert store.expire() == 0
    assert store.stats().expirations == 15
    assert len(store) == 25


def test_stats_is_an_immutable_snapshot(clock: FakeClock) -> None:
    store = make(clock)
    store["a"] = 1
    store.get("a")
    store.get("b")
    stats = store.stats()
    assert stats == StoreStats(
        hits=1,
        misses=1,
        writes=1,
        expirations=0,
        evictions=0,
        deletions=0,
        replacements=0,
        size=1,
        weight=0,
    )
    with pytest.raises(AttributeError):
        stats.hits = 5  # type: ignore[misc]
    store.get("a")
    assert stats.hits == 1


def test_repr_is_short_and_does_not_dump_entries(clock: FakeClock) -> None:
    store = make(clock, maxsize=100_000)
    store.update((f"key{i}", i) for i in range(1000))
    text = repr(store)
    assert len(text) < 120 and "key1" not in text
    assert "stored=1000" in text and "maxsize=100000" in text


def test_views_do_not_touch_recency(clock: FakeClock) -> None:
    store = make(clock, maxsize=2)
    store.update(a=1, b=2)
    assert ("a", 1) in store.items() and 1 in store.values()
    assert list(store.values()) == [1, 2]
    store["c"] = 3
    assert list(store) == ["b", "c"]


def test_iteration_survives_concurrent_writes(clock: FakeClock) -> None:
    store = make(clock, maxsize=100)
    store.update((i, i) for i in range(10))
    seen = []
    for key in store:
        seen.append(key)
        store[key + 100] = key
    assert seen == list(range(10))


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, "10", True, None])
def test_bad_maxsize_names_argument_and_value(maxsize: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"maxsize .*{maxsize!r}"):
        TTLStore(maxsize)


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "5", True])
def test_bad_ttl_names_argument_and_value_and_changes_nothing(clock: FakeClock, ttl: Any) -> None:
    pattern = "ttl .*" + ("nan" if ttl != ttl else repr(ttl).replace("'", "."))
    with pytest.raises((TypeError, ValueError), match=pattern):
        TTLStore(10, ttl)
    store = make(clock)
    store["a"] = 1
    for call in (
        lambda: store.set("a", 2, ttl=ttl),
        lambda: store.set("b", 2, ttl=ttl),
        lambda: store.add("b", 2, ttl=ttl),
        lambda: store.touch("a", ttl=ttl),
        lambda: store.get_or_set("b", lambda: 2, ttl=ttl),
    ):
        with pytest.raises((TypeError, ValueError), match=pattern):
            call()
    assert store == {"a": 1} and store.ttl("a") == 10


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"maxweight": 10}, "weigher and maxweight go together"),
        ({"weigher": len}, "weigher and maxweight go together"),
        ({"weigher": len, "maxweight": 0}, "maxweight must be a positive number, got 0"),
        ({"weigher": len, "maxweight": "9"}, "maxweight must be a positive number, got '9'"),
        ({"clock": 5}, "clock must be callable, got 5"),
        ({"on_remove": 5}, "on_remove must be callable or None, got 5"),
        ({"threadsafe": 1}, "threadsafe must be a bool, got 1"),
    ],
)
def test_bad_options_name_argument_and_value(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises((TypeError, ValueError), match=pattern):
        TTLStore(10, **kwargs)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_expire_limit_names_argument(clock: FakeClock, limit: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"limit .*{limit!r}"):
        make(clock).expire(limit)


def test_unhashable_key_raises_type_error_like_dict(clock: FakeClock, threadsafe: bool) -> None:
    store = make(clock, threadsafe)
    for call in (
        lambda: store.get([1]),
        lambda: store.peek([1]),
        lambda: store.set([1], 1),
        lambda: [1] in store,
        lambda: store[[1]],
        lambda: store.pop([1], None),
    ):
        with pytest.raises(TypeError, match="unhashable"):
            call()
    assert len(store) == 0
    store["ok"] = 1  # the lock was released on the way out
    assert store["ok"] == 1


def test_subclassing_is_refused_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match="not designed for subclassing"):

        class Mine(TTLStore[str, int]):
            pass


# ------------------------------------------------------------------------ first contact


def test_signature_and_help_show_the_documented_parameters() -> None:
    signature = inspect.signature(TTLStore)
    assert list(signature.parameters) == [
        "maxsize",
        "ttl",
        "sliding",
        "maxweight",
        "weigher",
        "clock",
        "on_remove",
        "threadsafe",
    ]
    assert signature.parameters["threadsafe"].default is True
    assert signature.parameters["sliding"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("threadsafe", [True, False])
def test_both_variants_are_ttlstores_usable_in_annotations(threadsafe: bool) -> None:
    store: TTLStore[str, int] = TTLStore(10, threadsafe=threadsafe)
    assert type(store) is TTLStore and isinstance(store, TTLStore)
    assert store.threadsafe is threadsafe
    assert TTLStore[str, int] is not None


def test_sliding_without_a_ttl_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"sliding=True .*ttl"):
        TTLStore(10, sliding=True)
    assert TTLStore(10, 5, sliding=True).default_ttl == 5


def test_the_build_under_test_is_the_one_expected() -> None:
    """CI runs the suite on the compiled wheel with TTLSTORE_EXPECT_COMPILED=1: a build that
    silently fell back to pure Python fails here. Without it (the editable dev install, the
    pure wheel) the core must be pure Python."""
    expected = os.environ.get("TTLSTORE_EXPECT_COMPILED", "0") == "1"
    assert ttlstore.compiled is expected
    # Every module setup.py compiles, not just one of them.
    names = (
        "_core",
        "_steps",
        "_writes",
        "_flights",
        "_deadlines",
        "_checks",
        "_gcra",
        "_bucket_steps",
        "_slot_core",
        "_ratelimit_run",
        "_idem_core",
        "_idem_run",
        "_idem_call",
        "_idem_read",
    )
    files = [str(importlib.import_module(f"ttlstore.{name}").__file__) for name in names]
    assert [not file.endswith(".py") for file in files] == [expected] * len(names), files


def test_importing_ttlstore_does_not_import_asyncio() -> None:
    code = "import sys, ttlstore; print('asyncio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------ compute


def _bump(slot: Slot[str, int]) -> int:
    new = slot.value + 1 if slot.found else 1
    slot.set(new)
    return new


def test_compute_reads_decides_and_writes_counting_a_read_and_a_write(
    clock: FakeClock, threadsafe: bool
) -> None:
    events, listener = recorder()
    store = make(clock, threadsafe, on_remove=listener)
    assert store.compute("n", _bump) == 1
    assert store.compute("n", _bump) == 2
    assert store["n"] == 2 and store.ttl("n") == 10
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.writes, stats.replacements) == (2, 1, 2, 1)
    assert events == [("n", 1, RemovalCause.REPLACED)]


def test_compute_hands_its_function_a_generic_slot_without_a_dict(clock: FakeClock) -> None:
    """The Slot a function gets is the public, subscriptable type, and (compiled or not) an
    object of fixed slots: no __dict__, and no weak-reference slot for the collector."""
    seen: list[Slot[str, int]] = []

    def keep(slot: Slot[str, int]) -> None:
        seen.append(slot)
        slot.set(1, deadline=slot.now + 5.0)

    store = make(clock, True)
    store.compute("k", keep)
    assert isinstance(seen[0], Slot) and Slot[str, int] is not None
    assert not hasattr(seen[0], "__dict__") and not hasattr(seen[0], "__weakref__")
    assert store.ttl("k") == 5.0
    with pytest.raises(RuntimeError, match="only valid inside the compute"):
        seen[0].set(2)


def test_compute_that_writes_nothing_is_a_read_only(clock: FakeClock) -> None:
    store = make(clock, maxsize=2)
    store.update(a=1, b=2)
    assert store.compute("a", lambda slot: slot.get()) == 1  # a read: "a" is recent now
    assert store.compute("zz", lambda slot: slot.get(-1)) == -1
    store["c"] = 3
    assert list(store) == ["a", "c"]
    assert (store.stats().hits, store.stats().misses, store.stats().writes) == (1, 1, 3)


def test_compute_remove_and_per_call_ttl_and_deadline(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, on_remove=listener)
    store["gone"] = 1
    store.compute("gone", lambda slot: slot.remove())
    store.compute("absent", lambda slot: slot.remove())  # nothing to remove: nothing happens
    assert "gone" not in store and events == [("gone", 1, RemovalCause.DELETED)]
    store.compute("own", lambda slot: slot.set(1, ttl=3))
    store.compute("forever", lambda slot: slot.set(1, ttl=None))
    store.compute("at", lambda slot: slot.set(1, deadline=slot.now + 7.5))
    assert (store.ttl("own"), store.ttl("forever"), store.ttl("at")) == (3, None, 7.5)
    clock.advance(7.5)
    assert "at" not in store and "forever" in store
    store.compute("forever", lambda slot: slot.set(2, deadline=slot.now))  # already passed
    assert "forever" not in store
    assert events[-1] == ("forever", 1, RemovalCause.EXPIRED)


def test_compute_fn_that_raises_changes_and_counts_nothing(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, on_remove=listener)
    store["k"] = 1
    before = store.stats()

    def broken(slot: Slot[str, int]) -> None:
        slot.set(2)
        raise RuntimeError("decided badly")

    with pytest.raises(RuntimeError, match="decided badly"):
        store.compute("k", broken)
    with pytest.raises(ValueError, match=r"ttl .*-1"):
        store.compute("k", lambda slot: slot.set(3, ttl=-1))
    with pytest.raises(ValueError, match=r"deadline .*nan"):
        store.compute("k", lambda slot: slot.set(3, deadline=math.nan))
    with pytest.raises(TypeError, match="ttl or deadline"):
        store.compute("k", lambda slot: slot.set(3, ttl=1, deadline=2.0))
    assert store.stats() == before and store["k"] == 1 and events == []


def test_compute_slot_is_dead_after_the_call_and_holds_no_value(clock: FakeClock) -> None:
    store = make(clock)
    store["k"] = "held"
    kept = store.compute("k", lambda slot: slot)
    with pytest.raises(RuntimeError, match="only valid inside the compute"):
        kept.set(1)
    with pytest.raises(RuntimeError, match="only valid inside the compute"):
        kept.remove()
    assert store["k"] == "held"
    assert kept.value is None and not kept.found  # no reference kept to the value


def test_compute_nested_in_a_compute_of_the_same_unlocked_store(clock: FakeClock) -> None:
    store = make(clock, threadsafe=False)

    def write_two(inner: Slot[str, int]) -> str:
        inner.set(2)
        return inner.key

    def outer(slot: Slot[str, int]) -> int:
        inner = store.compute("inner", write_two)
        assert inner == "inner" and slot.key == "outer"  # the outer slot is untouched
        slot.set(1)
        return 1

    assert store.compute("outer", outer) == 1
    assert dict(store.items()) == {"inner": 2, "outer": 1}


def test_compute_holds_the_lock_once_and_calls_back_after_release(clock: FakeClock) -> None:
    store: TTLStore[str, int]
    seen: list[int | None] = []
    store = make(clock, maxsize=1, on_remove=lambda k, v, c: seen.append(store.peek("new")))
    store["old"] = 1
    lock = _CountingLock(store)
    store._lock = lock
    store.compute("new", lambda slot: slot.set(5))  # evicts "old"
    # The compute, then the callback queue's swap, then the callback's own peek.
    assert len(lock.reclaimed_per_hold) == 3
    assert seen == [5]  # the callback ran after release: it could read the store


def test_compute_on_a_full_store_reclaims_a_due_entry_before_evicting(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, maxsize=2, on_remove=listener)
    store.set("due", 1, ttl=1)
    store["live"] = 2
    clock.advance(1)
    store.compute("new", lambda slot: slot.set(3))
    assert events == [("due", 1, RemovalCause.EXPIRED)]
    assert dict(store.items()) == {"live": 2, "new": 3}


def test_compute_writing_a_due_key_again_is_a_reclaim_then_a_write(
    clock: FakeClock, threadsafe: bool
) -> None:
    """What a rate limiter does when a client comes back after its bucket refilled. Both
    modes leave the same: a locked store reuses the due entry in place, an unlocked one
    reclaims it before fn runs (fn may read that store)."""
    events, listener = recorder()
    store = make(clock, threadsafe, on_remove=listener)
    store["due"] = 1
    store.set("live", 2, ttl=100)
    clock.advance(10)
    seen: list[tuple[bool, int | None]] = []

    def rewrite(slot: Slot[str, int]) -> str:
        seen.append((slot.found, slot.value))
        slot.set(3, deadline=slot.now + 4.0)
        return "rewritten"

    assert store.compute("due", rewrite) == "rewritten"
    assert seen == [(False, None)]  # fn never sees the due value
    assert events == [("due", 1, RemovalCause.EXPIRED)]
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.writes) == (0, 1, 3)
    assert (stats.expirations, stats.replacements, stats.size) == (1, 0, 2)
    assert store["due"] == 3 and store.ttl("due") == 4.0
    assert list(store) == ["live", "due"]  # the most recent now
    clock.advance(4)  # the new deadline, not the old one, governs from here
    assert store.expire() == 1 and list(store) == ["live"]
    assert events[-1] == ("due", 3, RemovalCause.EXPIRED)

    def broken(slot: Slot[str, int]) -> None:
        slot.set(5, deadline=slot.now + 4.0)
        raise RuntimeError("decided badly")

    store.set("again", 4, ttl=1)
    clock.advance(1)
    with pytest.raises(RuntimeError, match="decided badly"):
        store.compute("again", broken)
    # The read reclaimed the due entry all the same; the write never happened.
    assert "again" not in store and store.stats().expirations == 3
    store["next"] = 6  # the callback is delivered with the store's next call
    assert events[-1] == ("again", 4, RemovalCause.EXPIRED)


# ------------------------------------------------------------------------ get_or_set


def test_get_or_set_runs_factory_once_for_concurrent_callers() -> None:
    store: TTLStore[str, int] = TTLStore(10)
    release = threading.Event()
    calls = []

    def factory() -> int:
        calls.append(threading.get_ident())
        release.wait(5)
        return 42

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.get_or_set("k", factory)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    while not calls:
        threading.Event().wait(0.001)
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == [42] * 8 and len(calls) == 1
    assert store["k"] == 42 and not store._flights


def test_get_or_set_exception_reaches_every_waiter_and_caches_nothing() -> None:
    store: TTLStore[str, int] = TTLStore(10)
    entered = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def factory() -> int:
        entered.set()
        release.wait(5)
        raise LookupError("backend down")

    def call() -> None:
        try:
            store.get_or_set("k", factory)
        except LookupError as exc:
            errors.append(exc)

    first = threading.Thread(target=call)
    first.start()
    entered.wait(5)
    waiters = [threading.Thread(target=call) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    while sum(1 for t in waiters if t.is_alive()) < 3:  # pragma: no cover - start-up race
        pass
    release.set()
    for thread in [first, *waiters]:
        thread.join(5)
    assert len(errors) == 4 and all(str(e) == "backend down" for e in errors)
    assert "k" not in store and not store._flights
    assert store.get_or_set("k", lambda: 7) == 7


def test_get_or_set_factory_asking_for_its_own_key_fails_fast(threadsafe: bool) -> None:
    store: TTLStore[str, int] = TTLStore(10, threadsafe=threadsafe)

    def factory() -> int:
        return store.get_or_set("k", factory)

    with pytest.raises(RuntimeError, match="asked for its own key"):
        store.get_or_set("k", factory)
    assert "k" not in store and not store._flights


# ------------------------------------------------------------------------ threads and memory


async def _answer() -> int:
    return 42


class _Pending:
    """An awaitable that is not a coroutine."""

    def __await__(self) -> Generator[Any, None, int]:
        yield
        return 1


@pytest.mark.parametrize(
    "factory",
    [_answer, lambda: _answer(), lambda: _Pending()],
    ids=["async-def", "lambda", "awaitable"],
)
def test_get_or_set_refuses_an_async_factory_and_stores_nothing(
    threadsafe: bool, factory: Any
) -> None:
    store: TTLStore[str, Any] = TTLStore(10, threadsafe=threadsafe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine never awaited would warn when collected
        with pytest.raises(TypeError, match=r"ttlstore\.memo\.aget_or_set"):
            store.get_or_set("k", factory)
        gc.collect()
    assert "k" not in store and not store._flights
    assert store.get_or_set("k", lambda: 1) == 1  # the key is not stuck


def test_four_threads_hammering_one_store_keep_every_bound() -> None:
    events, listener = recorder()
    store: TTLStore[int, int] = TTLStore(
        64, 0.002, weigher=lambda k, v: v % 5, maxweight=100, on_remove=listener
    )
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15_000):
                key = rng.randrange(200)
                op = rng.random()
                if op < 0.4:
                    store.get(key)
                elif op < 0.7:
                    store.set(key, key, ttl=rng.choice([None, 0.001, 0.01]))
                elif op < 0.8:
                    store.pop(key, None)
                elif op < 0.85:
                    store.expire(rng.randrange(1, 5))
                elif op < 0.95:
                    store.get_or_set(key, lambda k=key: k)  # type: ignore[misc]
                else:
                    store.pop(key, None)
                    len(store)
                assert len(store._data) <= 64
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = store.stats()  # reclaims nothing: what is stored stays put while we look
    assert stats.size <= len(store._data) <= 64
    assert stats.weight == sum(e.value % 5 for e in store._data.values()) <= 100
    assert len(store._index) <= 2 * len(store._data) + 32
    assert not store._flights
    removed = stats.expirations + stats.evictions + stats.deletions + stats.replacements
    assert len(events) == removed


def _traced(action: Any) -> int:
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    action()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


def test_overwrites_and_deletes_leave_no_stale_index_growth() -> None:
    clock = FakeClock()
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(10)]
    ttls = [rng.choice([None, 1.0, 5.0, 30.0, 60.0]) for _ in range(200_000)]
    tracemalloc.start()
    try:
        store: TTLStore[str, int] = TTLStore(100, 60, clock=clock)
        for key in keys:
            store[key] = 0
        baseline_index = len(store._index)

        def overwrite() -> None:
            for i, ttl in enumerate(ttls):
                store.set(keys[i % 10], 0, ttl=ttl)
                if i % 1000 == 0:
                    clock.advance(0.1)

        def set_delete() -> None:
            for i in range(200_000):
                store.set("churn", 0, ttl=ttls[i])
                del store["churn"]

        grown = _traced(overwrite) + _traced(set_delete)
    finally:
        tracemalloc.stop()
    assert len(store) == 10
    assert len(store._index) <= 2 * 10 + 32 + baseline_index
    # A store of 10 entries holds a few KiB; stale index growth would be tens of MiB.
    assert grown < 16 * 1024


class _CountingLock:
    """Stands in for a store's lock and records how much each hold reclaimed."""

    def __init__(self, store: TTLStore[Any, Any]) -> None:
        self._inner = threading.Lock()
        self._store = store
        self.reclaimed_per_hold: list[int] = []

    def acquire(self) -> bool:
        self._inner.acquire()
        self._before = self._store._expirations
        return True

    def release(self) -> None:
        self.reclaimed_per_hold.append(self._store._expirations - self._before)
        self._inner.release()


@pytest.mark.parametrize("operation", [len, list, lambda s: list(s.items())])
def test_large_backlog_is_reclaimed_in_slices_by_len_and_iteration(
    clock: FakeClock, operation: Any
) -> None:
    store = make(clock, maxsize=10_000, ttl=1)
    store.update((i, i) for i in range(5000))
    clock.advance(1)
    lock = _CountingLock(store)
    store._lock = lock
    operation(store)
    assert sum(lock.reclaimed_per_hold) == 5000
    assert max(lock.reclaimed_per_hold) <= 1024


@pytest.mark.parametrize("observe", [TTLStore.stats, TTLStore.live_count])
def test_stats_and_live_count_reclaim_nothing_and_hold_the_lock_once(
    clock: FakeClock, observe: Any
) -> None:
    events, listener = recorder()
    store = make(clock, maxsize=10_000, ttl=1, on_remove=listener)
    store.update((i, i) for i in range(5000))
    store.set("long", 0, ttl=100)
    store.set("short", 0, ttl=0.5)
    clock.advance(1)
    lock = _CountingLock(store)
    store._lock = lock
    observe(store)
    assert lock.reclaimed_per_hold == [0]
    assert events == []
    assert store.live_count() == store.stats().size == 1
    assert repr(store).startswith("<TTLStore stored=5002 ")
    assert len(store) == 1  # len() does reclaim
    assert store.stats().expirations == 5001 and len(events) == 5001


def test_live_count_equals_len_at_every_instant_without_reclaiming(clock: FakeClock) -> None:
    store = make(clock, maxsize=200, ttl=5, sliding=True)
    rng = random.Random(3)
    for step in range(400):
        key = rng.randrange(60)
        op = rng.random()
        if op < 0.5:
            store.set(key, step, ttl=rng.choice([None, 1, 2.5, 5, 9]))
        elif op < 0.8:
            store.get(key)  # sliding: moves deadlines later in place
        else:
            clock.advance(rng.choice([0.5, 1, 2]))
        expired_before = store.stats().expirations
        count = store.live_count()
        assert store.stats().expirations == expired_before
        assert count == sum(1 for k in range(60) if k in store)
    assert store.live_count() == len(store)


def test_replacing_never_evicts_the_key_itself_despite_float_residue(clock: FakeClock) -> None:
    events, listener = recorder()
    store = make(clock, weigher=lambda k, v: v, maxweight=0.9, on_remove=listener)
    for i, weight in enumerate([0.2, 0.3, 0.1, 0.2]):
        store[f"k{i}"] = weight  # the running total keeps a float residue of ~3e-17
    store["k0"] = 0.9
    assert store == {"k0": 0.9}
    assert store.stats().weight == 0.9
    assert ("k0", 0.2, RemovalCause.REPLACED) in events
    assert [k for k, _, cause in events if cause is RemovalCause.EVICTED] == ["k1", "k2", "k3"]


def test_copy_and_pickle_are_refused_rather_than_sharing_state(clock: FakeClock) -> None:
    import copy
    import pickle

    store = make(clock)
    store["a"] = 1
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            attempt(store)
    assert store == {"a": 1}


def test_sliding_read_on_a_clock_that_steps_back_keeps_expiry_exact(clock: FakeClock) -> None:
    store = make(clock, ttl=10, sliding=True)
    store["a"] = 1
    clock.now -= 50  # an injected clock may misbehave; the deadline never moves earlier
    assert store.get("a") == 1
    clock.now += 60
    assert "a" not in store
    assert len(store) == len(list(store)) == 0


@pytest.mark.parametrize("ttl", [10**400, -(10**400)])
def test_ttl_beyond_float_range_is_a_value_error_naming_ttl(ttl: int) -> None:
    with pytest.raises(ValueError, match="ttl must be a positive finite number"):
        TTLStore(10, ttl)


def test_ttl_may_be_any_real_number_or_a_decimal(clock: FakeClock) -> None:
    from decimal import Decimal
    from fractions import Fraction

    store = make(clock)
    for ttl in (2, 2.0, Fraction(2), Decimal("2")):
        store.set("k", 1, ttl=ttl)
        assert store.ttl("k") == 2.0
    for bad in (Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity"), Decimal("-1")):
        with pytest.raises(ValueError, match="ttl must be a positive finite number"):
            store.set("k", 1, ttl=bad)
