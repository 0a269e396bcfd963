"""The in-memory limiter's compute() functions: decide a request and file the bucket's new state.

:class:`~ttlstore.ratelimit.TokenBucketLimiter` keeps one function per cost and hands it to
:meth:`TTLStore.compute` on every ``acquire``. They live here rather than in the limiter's
module so that mypyc compiles them with the arithmetic (:mod:`ttlstore._gcra`) when it
compiles the core: the function the store calls on every request is then native too.

A bucket's state is written to expire exactly when the bucket is full again (see
:func:`deadline_at`): the store holds only buckets in debt, and expiry never changes a decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, Final

from ttlstore._gcra import (
    DECISION,
    NS,
    Bucket,
    Decision,
    DecisionFields,
    State,
    check_cost,
    decide_fields,
    full_at,
    new_decision,
    take_one,
)
from ttlstore._mypyc import mypyc_attr
from ttlstore._slot import Slot
from ttlstore._slot_core import SlotCore, set_until
from ttlstore._writes import locked_compute
from ttlstore.store import TTLStore

__all__ = [
    "LimiterCore",
    "Step",
    "Tally",
    "acquire_fields",
    "deadline_at",
    "step_for",
    "store_clock_for",
]

Step = Callable[[Slot[Hashable, State | None]], DecisionFields]


class Tally:
    """A limiter's decision counters, shared by all its compute() functions."""

    def __init__(self) -> None:
        self.allowed = 0
        self.denied = 0


def deadline_at(full: int) -> float:
    """The store-clock deadline (float seconds since the epoch) for ``full`` ns since it.

    The store's clock is ``n / NS`` for the limiter's integer reading ``n``, correctly rounded,
    so ``full / NS`` expires the entry exactly when ``n`` reaches ``full`` (rounding is
    monotonic). Only when one float step spans more than a nanosecond (past 2**53 ns, about
    104 days after the epoch) could ``full - 1`` read the same: then settle for one step late,
    since early would forgive debt. O(1).
    """
    deadline = full / NS
    if (full - 1) / NS >= deadline:
        deadline = math.nextafter(deadline, math.inf)
    return deadline


def store_clock_for(now_ns: Callable[[], int], epoch: int) -> Callable[[], float]:
    """The limiter's store clock: float seconds since ``epoch`` on the limiter's ns clock, so
    deadlines land on the instants the limiter computes with. Compiled here, a reading costs
    no interpreted frame. O(1)."""

    def store_clock() -> float:
        return (now_ns() - epoch) / NS

    return store_clock


def step_for(
    buckets: tuple[Bucket, ...], now_ns: Callable[[], int], epoch: int, cost: int, tally: Tally
) -> Step:
    """The compute() function deciding a request of ``cost`` against ``buckets``; it answers
    the decision's fields (:data:`~ttlstore._gcra.DecisionFields`).

    It reads the clock after the store has (an entry the store found expired is certainly
    full now too), treats an absent bucket (``slot.value`` None) as full, counts the decision
    in ``tally`` and, if allowed, asks for the new state to be written. A refusal is a read
    too (not a peek): a client that keeps knocking stays recent, so a flood of new keys
    evicts idle buckets before an active abuser's. O(limits).
    """
    if len(buckets) == 1:
        bucket = buckets[0]

        def one_limit(slot: SlotCore) -> DecisionFields:
            # The common case: one arithmetic call (see take_one), deadline_at() written out.
            fields, state, full = take_one(bucket, slot.value, now_ns() - epoch, cost)
            if state is None:
                tally.denied += 1
            else:
                deadline = full / NS
                if (full - 1) / NS >= deadline:
                    deadline = deadline_at(full)
                set_until(slot, state, deadline)
                tally.allowed += 1
            return fields

        return one_limit

    def many_limits(slot: SlotCore) -> DecisionFields:
        now = now_ns() - epoch
        fields, state = decide_fields(buckets, slot.value, now, cost)
        if state is None:
            tally.denied += 1
        else:
            set_until(slot, state, deadline_at(full_at(buckets, state, now)))
            tally.allowed += 1
        return fields

    return many_limits


# Decision functions kept per limiter, one per cost seen.
_STEPS_KEPT: Final = 64


# Subclassed by the interpreted TokenBucketLimiter, which checks the arguments, holds the
# weak-reference slot and declares the typed API (as TTLStore does for StoreCore).
@mypyc_attr(allow_interpreted_subclasses=True)
class LimiterCore:
    """The state of a TokenBucketLimiter and its ``acquire``; see
    :class:`ttlstore.ratelimit.TokenBucketLimiter`. Compiled with the core, an ``acquire``
    runs no interpreted frame."""

    __slots__ = ("_buckets", "_epoch", "_now", "_steps", "_store", "_tally")

    def __init__(
        self,
        buckets: tuple[Bucket, ...],
        now_ns: Callable[[], int],
        store: TTLStore[Hashable, Any],
        epoch: int,
    ) -> None:
        self._buckets = buckets
        self._now = now_ns
        self._epoch = epoch
        self._store = store
        self._steps: dict[int, Step] = {}
        self._tally = Tally()

    def acquire(self, key: Any, cost: Any = 1) -> Decision:
        """Take ``cost`` tokens from every bucket of ``key`` if all have enough; else none.

        ``ValueError`` at once if ``cost`` exceeds a limit's capacity (it could never pass).
        O(limits) plus one store read and, if allowed, one store write, under one lock hold.
        """
        if type(cost) is not int or cost != 1:  # 1 is always valid: skip the call
            cost = check_cost(self._buckets, cost)
        step = self._steps.get(cost)
        if step is None:
            step = self._step_for(cost)
        # Built here through _gcra's Finals, not a helper: a frame per acquire, interpreted.
        return new_decision(DECISION, locked_compute(self._store, key, step))

    def _step_for(self, cost: int) -> Step:
        """The compute() function deciding a request of ``cost``; kept per cost, so that an
        acquire builds no closure (most callers use one or two costs)."""
        step = step_for(self._buckets, self._now, self._epoch, cost, self._tally)
        if len(self._steps) >= _STEPS_KEPT:
            self._steps.clear()
        self._steps[cost] = step
        return step


def acquire_fields(self: LimiterCore, key: Any) -> DecisionFields:
    """``acquire(key)`` (a cost of 1), the decision's fields in a plain tuple: the rate-limit
    middleware's call, which unpacks them.

    A function, and no named tuple built: compiled, the method is looked up by name and
    parses its arguments, and a ``Decision`` costs ``tuple.__new__``'s generic path (together
    about 850 instructions of a 15 k rate-limited request, callgrind, CPython 3.11). O(1).
    """
    step = self._steps.get(1)
    if step is None:
        step = self._step_for(1)
    return locked_compute(self._store, key, step)
