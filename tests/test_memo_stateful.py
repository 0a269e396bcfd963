"""@cached against a reference model: random calls, clock steps, invalidations and clears.

The model is an ``OrderedDict`` from the normalized arguments ``(x, y, z)`` to (value,
deadline), in recency order. After every call it checks the returned value and the number of
calls the function has received: a hit must return exactly what the model holds, and a call
must happen exactly when the model holds nothing live for the key.

Three machines: no eviction with a TTL (exact), LRU eviction without a TTL (exact: fewer than
``RECENT_HITS`` hits ever separate two misses, so the recency buffer loses nothing), and both
at once, where the model cannot tell which entry a full store gives up first (a due one or the
least recently used one) and only checks that nothing expired, stale or foreign is ever served.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from ttlstore import cached
from ttlstore.testing import FakeClock

# -1 and -2 hash alike in CPython; 1, 1.0 and True are equal arguments (one entry, untyped).
XS = st.sampled_from([0, 1, 2, 3, -1, -2, 1.0, True])
YS = st.sampled_from([None, 0, 1])  # None: not passed (the default, 0)
STEPS = st.sampled_from([0, 0.5, 1, 2, 3, 5])
FORMS = st.sampled_from(["positional", "keyword", "mixed"])

EXAMPLES = int(os.environ.get("TTLSTORE_STATEFUL_EXAMPLES", "300"))


class MemoMachine(RuleBasedStateMachine):
    maxsize = 64
    ttl: float | None = 3.0
    exact = True

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.calls = 0
        self.model: OrderedDict[tuple[Any, ...], tuple[Any, float]] = OrderedDict()

        @cached(self.maxsize, ttl=self.ttl, clock=self.clock)
        def f(x: Any, y: int = 0, *, z: int = 0) -> tuple[Any, ...]:
            self.calls += 1
            return (x, y, z, self.calls)

        self.f = f

    def _live(self, key: tuple[Any, ...]) -> tuple[Any, float] | None:
        item = self.model.get(key)
        if item is not None and item[1] > self.clock.now:
            return item
        return None

    @rule(x=XS, y=YS, z=st.sampled_from([0, 0, 1]), form=FORMS)
    def call(self, x: Any, y: int | None, z: int, form: str) -> None:
        key = (x, 0 if y is None else y, z)
        before = self.calls
        if y is None:
            result = self.f(x, z=z) if form != "keyword" else self.f(z=z, x=x)
        elif form == "positional":
            result = self.f(x, y, z=z)
        elif form == "keyword":
            result = self.f(z=z, y=y, x=x)
        else:
            result = self.f(x, y=y, z=z)
        assert self.calls - before in (0, 1)
        live = self._live(key)
        called = self.calls != before
        if live is not None and not called:
            assert result == live[0]
            assert result[3] == live[0][3]  # the very value computed then, not an equal one
            self.model.move_to_end(key)
            return
        if live is not None and self.exact:
            raise AssertionError(f"{key} was live, yet the function ran again")
        assert called, f"{key} had nothing live, yet no call happened (got {result})"
        assert result == (x, key[1], z, self.calls)
        self.model.pop(key, None)
        self.model[key] = (result, self.clock.now + (self.ttl or float("inf")))
        if self.exact:
            self._evict_lru()

    def _evict_lru(self) -> None:
        # Only reached without a TTL or without eviction: plain LRU.
        while len(self.model) > self.maxsize:
            self.model.popitem(last=False)

    @rule(x=XS, y=st.sampled_from([0, 1]))
    def invalidate(self, x: Any, y: int) -> None:
        key = (x, y, 0)
        dropped = self.f.cache_invalidate(x, y)
        live = self._live(key)
        if self.exact:
            assert dropped == (live is not None)
        elif dropped:
            assert live is not None
        self.model.pop(key, None)

    @rule()
    def clear(self) -> None:
        self.f.cache_clear()
        self.model.clear()
        assert self.f.cache_info().currsize == 0

    @rule(step=STEPS)
    def advance(self, step: float) -> None:
        self.clock.advance(step)

    @rule()
    def check_store(self) -> None:
        # A rule, not an invariant: reading the store reclaims due entries, and the cache must
        # also be right when nothing has reclaimed them yet.
        store = self.f.cache_store
        assert len(store) <= self.maxsize
        for (x, y, z), value in store.items():
            item = self._live((x, y, z))
            assert item is not None, f"the store holds {x, y, z}, which the model says is gone"
            assert value == item[0]
        if self.exact:
            live = {k for k in self.model if self._live(k) is not None}
            assert {key for key in store} == live


class EvictingMachine(MemoMachine):
    maxsize = 3
    ttl = None


class EvictingExpiringMachine(MemoMachine):
    maxsize = 3
    ttl = 2.0
    exact = False


stateful = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None)
TestMemo = MemoMachine.TestCase
TestMemo.settings = stateful
TestMemoEvicting = EvictingMachine.TestCase
TestMemoEvicting.settings = stateful
TestMemoEvictingExpiring = EvictingExpiringMachine.TestCase
TestMemoEvictingExpiring.settings = stateful
