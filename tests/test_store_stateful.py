"""The store against a small reference model, step by step, with a fake clock.

The model is an ``OrderedDict`` of (value, deadline, ttl, weight) in recency order that stores
expired entries until the same moments the real store reclaims them, so after every step it can
check contents, LRU order (and so every LRU victim), length, weight, the removal callbacks and
the size of the deadline index.
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ttlstore import RemovalCause, TTLStore
from ttlstore.store import Slot
from ttlstore.testing import FakeClock

EXPIRED, EVICTED, DELETED, REPLACED = (
    RemovalCause.EXPIRED,
    RemovalCause.EVICTED,
    RemovalCause.DELETED,
    RemovalCause.REPLACED,
)
KEYS = st.sampled_from("abcdefgh")
VALUES = st.integers(min_value=0, max_value=6)
# The default TTL itself is sampled often, so both the FIFO and the heap are exercised.
TTLS = st.sampled_from([None, "default", "default", 0.5, 1, 2, 5, 20])
STEPS = st.sampled_from([0, 0.25, 0.5, 1, 1, 2, 3, 10])
COMPUTE_ACTIONS = st.sampled_from(["keep", "set", "until", "remove"])

MAXSIZE = 5
DEFAULT_TTL = 3.0
MAXWEIGHT = 12
INDEX_SLACK = 32

# Overridable from the environment for long local runs; CI keeps the default of 1 000.
EXAMPLES = int(os.environ.get("TTLSTORE_STATEFUL_EXAMPLES", "1000"))


@dataclass
class Item:
    value: int
    deadline: float
    ttl: float | None
    weight: int


class StoreMachine(RuleBasedStateMachine):
    """Drives one TTLStore and the model in lock step."""

    sliding = False
    weighted = False
    threadsafe = True

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.events: list[tuple[str, int, RemovalCause]] = []
        extra: dict[str, Any] = {}
        if self.weighted:
            extra = {"weigher": lambda key, value: value, "maxweight": MAXWEIGHT}
        self.store: TTLStore[str, int] = TTLStore(
            MAXSIZE,
            DEFAULT_TTL,
            sliding=self.sliding,
            clock=self.clock,
            on_remove=lambda k, v, c: self.events.append((k, v, c)),
            threadsafe=self.threadsafe,
            **extra,
        )
        self.model: OrderedDict[str, Item] = OrderedDict()
        self.expected: list[tuple[str, int, RemovalCause]] = []
        self.counts: Counter[str] = Counter()

    # ---------------------------------------------------------------- model mechanics

    @property
    def now(self) -> float:
        return self.clock.now

    def _weight(self) -> int:
        return sum(item.weight for item in self.model.values())

    def _remove(self, key: str, cause: RemovalCause) -> Item:
        item = self.model.pop(key)
        self.expected.append((key, item.value, cause))
        name = {EXPIRED: "expirations", EVICTED: "evictions", DELETED: "deletions"}[cause]
        self.counts[name] += 1
        return item

    def _reclaim_due(self) -> None:
        for key in [k for k, item in self.model.items() if item.deadline <= self.now]:
            self._remove(key, EXPIRED)

    def _live(self, key: str) -> Item | None:
        item = self.model.get(key)
        if item is not None and item.deadline <= self.now:
            self._remove(key, EXPIRED)
            return None
        return item

    def _evict_lru(self) -> None:
        self._remove(next(iter(self.model)), EVICTED)

    def _ttl(self, ttl: Any) -> float | None:
        return DEFAULT_TTL if ttl == "default" else ttl

    def _deadline(self, ttl: float | None) -> float:
        return math.inf if ttl is None else self.now + ttl

    def _read(self, key: str, item: Item) -> int:
        self.model.move_to_end(key)
        self.counts["hits"] += 1
        if self.sliding and item.ttl is not None:
            item.deadline = self.now + item.ttl
        return item.value

    def _observed(self, call: Any) -> tuple[Any, list[str]]:
        """Run a store call; return its result and the keys it reclaimed as expired.

        A write to a full store reclaims one due entry (or, for weight, as many as it needs)
        in the index's order, which the model does not predict: it learns which from here.
        """
        before = len(self.events)
        result = call()
        return result, [key for key, _, cause in self.events[before:] if cause is EXPIRED]

    def _model_set(
        self, key: str, value: int, ttl: float | None, only_new: bool, reclaimed: list[str]
    ) -> bool:
        weight = value if self.weighted else 0
        item = self._live(key)  # the written key's own expiry is not one of the reclaimed
        self._reclaimed = iter([k for k in reclaimed if k != key])
        if item is not None:
            if only_new:
                return False
            self.model.move_to_end(key)
            old = item.value
            item.weight = 0
            self._shed(weight)
            item.value, item.deadline, item.ttl, item.weight = (
                value,
                self._deadline(ttl),
                ttl,
                weight,
            )
            self.expected.append((key, old, REPLACED))
            self.counts["replacements"] += 1
        else:
            if len(self.model) >= MAXSIZE:
                if self._any_due():
                    self._reclaim_one()  # one due entry frees the one slot needed
                while len(self.model) >= MAXSIZE:
                    self._evict_lru()
            self._shed(weight)
            self.model[key] = Item(value, self._deadline(ttl), ttl, weight)
        assert next(self._reclaimed, None) is None, "reclaimed more than the write needed"
        self.counts["writes"] += 1
        return True

    def _any_due(self) -> bool:
        return any(item.deadline <= self.now for item in self.model.values())

    def _reclaim_one(self) -> None:
        """The store reclaimed one due entry of its choice: check that it was due."""
        key = next(self._reclaimed, None)
        assert key is not None, "a full store evicted a live entry while one was due"
        assert self.model[key].deadline <= self.now, f"{key!r} was reclaimed but not due"
        self._remove(key, EXPIRED)

    def _shed(self, weight: int) -> None:
        if self.weighted and self._weight() + weight > MAXWEIGHT:
            # Due entries first, only as many as needed; live ones only once none is due.
            while self._weight() + weight > MAXWEIGHT and self._any_due():
                self._reclaim_one()
            while self._weight() + weight > MAXWEIGHT:
                self._evict_lru()

    # ---------------------------------------------------------------- rules

    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def set(self, key: str, value: int, ttl: Any) -> None:
        def write() -> None:
            if ttl == "default":
                self.store[key] = value
            else:
                self.store.set(key, value, ttl=ttl)

        _, reclaimed = self._observed(write)
        self._model_set(key, value, self._ttl(ttl), False, reclaimed)

    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def add(self, key: str, value: int, ttl: Any) -> None:
        added, reclaimed = self._observed(lambda: self.store.add(key, value, ttl=self._ttl(ttl)))
        assert added is self._model_set(key, value, self._ttl(ttl), True, reclaimed)

    @rule(key=KEYS, value=VALUES)
    def setdefault(self, key: str, value: int) -> None:
        item = self._live(key)
        if item is not None:
            assert self.store.setdefault(key, value) == self._read(key, item)
            return
        found, reclaimed = self._observed(lambda: self.store.setdefault(key, value))
        self._model_set(key, value, DEFAULT_TTL, False, reclaimed)
        assert found == value

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        item = self._live(key)
        if item is None:
            self.counts["misses"] += 1
            assert self.store.get(key, -1) == -1
        else:
            assert self.store.get(key, -1) == self._read(key, item)

    @rule(key=KEYS)
    def getitem(self, key: str) -> None:
        item = self._live(key)
        if item is None:
            self.counts["misses"] += 1
            with pytest.raises(KeyError):
                self.store[key]
        else:
            assert self.store[key] == self._read(key, item)

    @rule(key=KEYS, value=VALUES)
    def get_or_set(self, key: str, value: int) -> None:
        item = self._live(key)
        if item is not None:
            assert self.store.get_or_set(key, lambda: value) == self._read(key, item)
            return
        self.counts["misses"] += 1
        found, reclaimed = self._observed(lambda: self.store.get_or_set(key, lambda: value))
        self._model_set(key, value, DEFAULT_TTL, False, reclaimed)
        assert found == value

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if self._live(key) is None:
            with pytest.raises(KeyError):
                del self.store[key]
        else:
            self._remove(key, DELETED)
            del self.store[key]

    @rule(key=KEYS)
    def pop(self, key: str) -> None:
        item = self._live(key)
        if item is None:
            assert self.store.pop(key, -1) == -1
        else:
            self._remove(key, DELETED)
            assert self.store.pop(key) == item.value

    @precondition(lambda self: self.model)
    @rule()
    def popitem(self) -> None:
        self._reclaim_due()
        if not self.model:
            with pytest.raises(KeyError):
                self.store.popitem()
            return
        key = next(iter(self.model))
        item = self._remove(key, DELETED)
        assert self.store.popitem() == (key, item.value)

    @rule(key=KEYS, ttl=st.one_of(st.just("own"), TTLS))
    def touch(self, key: str, ttl: Any) -> None:
        item = self._live(key)
        if item is None:
            expected = False
        else:
            if ttl != "own":
                item.ttl = self._ttl(ttl)
            item.deadline = self._deadline(item.ttl)
            self.model.move_to_end(key)
            expected = True
        if ttl == "own":
            assert self.store.touch(key) is expected
        else:
            assert self.store.touch(key, ttl=self._ttl(ttl)) is expected

    @rule(step=STEPS)
    def advance(self, step: float) -> None:
        self.clock.advance(step)

    @rule()
    def expire_all(self) -> None:
        due = sum(item.deadline <= self.now for item in self.model.values())
        self._reclaim_due()
        assert self.store.expire() == due

    @rule(limit=st.integers(min_value=1, max_value=3))
    def expire_some(self, limit: int) -> None:
        due = {k for k, item in self.model.items() if item.deadline <= self.now}
        before = len(self.events)
        reclaimed = self.store.expire(limit)
        assert reclaimed == min(limit, len(due))
        # Which due entries go first is the index's business; the callbacks say which went.
        gone = [key for key, _, cause in self.events[before:] if cause is EXPIRED]
        assert len(gone) == reclaimed and set(gone) <= due
        for key in gone:
            self._remove(key, EXPIRED)

    @rule()
    def clear(self) -> None:
        for key in list(self.model):
            self._remove(key, EXPIRED if self.model[key].deadline <= self.now else DELETED)
        self.store.clear()

    @rule()
    def length(self) -> None:
        self._reclaim_due()
        assert len(self.store) == len(self.model)

    @rule()
    def iterate(self) -> None:
        self._reclaim_due()
        assert list(self.store) == list(self.model)
        assert list(self.store.items()) == [(k, i.value) for k, i in self.model.items()]

    def _live_count(self) -> int:
        return sum(item.deadline > self.now for item in self.model.values())

    @rule()
    def stats(self) -> None:
        # An observer: reclaims nothing, so the model reclaims nothing either.
        stats = self.store.stats()
        for name in ("hits", "misses", "writes", "expirations", "evictions", "deletions"):
            assert getattr(stats, name) == self.counts[name], name
        assert stats.replacements == self.counts["replacements"]
        assert stats.size == self._live_count()
        assert stats.weight == self._weight()

    @rule()
    def live_count(self) -> None:
        assert self.store.live_count() == self._live_count()

    @rule(key=KEYS, value=VALUES, ttl=TTLS, action=COMPUTE_ACTIONS)
    def compute(self, key: str, value: int, ttl: Any, action: str) -> None:
        self._compute(key, value, ttl, action)

    @rule(
        pick=st.integers(min_value=0, max_value=63), value=VALUES, ttl=TTLS, action=COMPUTE_ACTIONS
    )
    def compute_due(self, pick: int, value: int, ttl: Any, action: str) -> None:
        # A key stored but past its deadline (any key if none is), which few random steps
        # reach: the store hides it from fn, and reuses its entry when fn writes it again.
        # Not a precondition: which due entry a full store reclaims follows id() order, so
        # whether one is left may differ between runs of the same steps.
        due = [key for key, item in self.model.items() if item.deadline <= self.now]
        keys = due or sorted(self.model) or ["a"]
        self._compute(keys[pick % len(keys)], value, ttl, action)

    def _compute(self, key: str, value: int, ttl: Any, action: str) -> None:
        item = self._live(key)
        seen: list[tuple[bool, int | None]] = []
        # "until": an absolute deadline, as the rate limiter writes; None stands for one
        # already passed, which stores nothing and removes a live entry as expired.
        span = -1.0 if ttl is None else DEFAULT_TTL if ttl == "default" else float(ttl)

        def fn(slot: Slot[str, int]) -> str:
            seen.append((slot.found, slot.get()))
            if action == "set":
                if ttl == "default":
                    slot.set(value)
                else:
                    slot.set(value, ttl=ttl)
            elif action == "until":
                slot.set(value, deadline=self.now + span)
            elif action == "remove":
                slot.remove()
            return action

        result, reclaimed = self._observed(lambda: self.store.compute(key, fn))
        assert result == action
        assert seen == [(item is not None, None if item is None else item.value)]
        if item is None:
            self.counts["misses"] += 1
        else:
            self._read(key, item)
        if action == "set":
            self._model_set(key, value, self._ttl(ttl), False, reclaimed)
        elif action == "until" and span > 0:
            self._model_set(key, value, span, False, reclaimed)
        elif action == "until" and item is not None:
            self._remove(key, EXPIRED)
        elif action == "remove" and item is not None:
            self._remove(key, DELETED)

    @rule(key=KEYS)
    def remaining(self, key: str) -> None:
        item = self.model.get(key)
        if item is None or item.deadline <= self.now:
            with pytest.raises(KeyError):
                self.store.ttl(key)
        elif item.ttl is None:
            assert self.store.ttl(key) is None
        else:
            assert self.store.ttl(key) == pytest.approx(item.deadline - self.now)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def visible_contents_match(self) -> None:
        for key in "abcdefgh":
            item = self.model.get(key)
            live = item is not None and item.deadline > self.now
            assert (key in self.store) is live
            assert self.store.peek(key, -1) == (item.value if live else -1)  # type: ignore[union-attr]

    @invariant()
    def stored_order_matches(self) -> None:
        # Stored entries (due ones not yet reclaimed included), least recently used first:
        # this order decides every future LRU victim.
        assert list(self.store._data) == list(self.model)

    @invariant()
    def bounds_hold(self) -> None:
        data = self.store._data
        assert len(data) <= MAXSIZE
        if self.weighted:
            assert self.store._weight == self._weight() <= MAXWEIGHT

    @invariant()
    def removals_reported_once_with_cause(self) -> None:
        assert Counter(self.events) == Counter(self.expected)

    @invariant()
    def index_is_exact_and_bounded(self) -> None:
        index = self.store._index
        data = self.store._data
        indexed = [e for e in data.values() if e.filed is not None]
        for entry in data.values():
            if entry.deadline != math.inf:
                assert entry.filed is not None and entry.filed <= entry.deadline
        live_items = [e for e in index.debug_items() if data.get(e.key) is e]
        assert sorted(map(id, live_items)) == sorted(map(id, indexed))
        assert index.stale == len(index) - len(live_items)
        assert len(index) <= 2 * len(indexed) + INDEX_SLACK

    @invariant()
    def counters_match(self) -> None:
        store = self.store
        for name in ("hits", "misses", "writes", "expirations", "evictions", "deletions"):
            assert getattr(store, f"_{name}") == self.counts[name], name
        assert store._replacements == self.counts["replacements"]


class SlidingWeightedMachine(StoreMachine):
    sliding = True
    weighted = True
    threadsafe = False


class SlidingMachine(StoreMachine):
    """Sliding and locked: a due entry written again by compute() keeps its place in the
    store, and the TTL it is given is what each read renews."""

    sliding = True


class UnlockedMachine(StoreMachine):
    """The interpreted build's unlocked fast read path (ttlstore._interpreted)."""

    threadsafe = False


stateful = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None)
TestStore = StoreMachine.TestCase
TestStore.settings = stateful
TestSlidingWeightedStore = SlidingWeightedMachine.TestCase
TestSlidingWeightedStore.settings = stateful
TestSlidingStore = SlidingMachine.TestCase
TestSlidingStore.settings = stateful
TestUnlockedStore = UnlockedMachine.TestCase
TestUnlockedStore.settings = stateful
