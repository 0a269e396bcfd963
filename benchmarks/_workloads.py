"""Workloads of ``python -m benchmarks.compare``: what is timed, on which keys.

Every workload runs the same pre-generated keys (:class:`KeyData`) against every library. A
workload turns an adapter into a :class:`Trial` holding a prepared store; the runner calibrates
each trial once (that run is also the warm-up) so a sample lasts about the target time, then asks
every trial for one sample per round, round-robin across libraries.

The registry :data:`WORKLOADS` holds both kinds: ``kind = "store"`` workloads run against the
store adapters of ``_peers.py`` at every size of the run; ``kind = "limiter"`` ones time a rate
limiter's acquire against the adapters of ``_limiters.py``, on one key or on ``n`` keys
(:class:`LimiterKeys`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from benchmarks._limiters import ROOMY, TIGHT, LimiterAdapter, Quota
from benchmarks._peers import VALUE, Adapter, Loop, Unsupported
from ttlstore.testing import FakeClock

#: Share of writes in the mixed workload.
WRITE_SHARE = 0.2
#: Exponent of the zipf-like popularity of the mixed workload (1.0: classic zipf).
ZIPF_S = 1.0
#: Length of the mixed workload's op sequence (cycled).
MIXED_LENGTH = 1 << 17
#: TTL used by the bulk-expiry workload (the fake clock jumps past it).
EXPIRY_TTL = 60.0
#: The bulk-expiry fill advances the fake clock between this many chunks, so deadlines differ.
EXPIRY_CHUNKS = 64


@dataclass(frozen=True)
class KeyData:
    """The keys of one size ``n``, shared by every library.

    ``universe`` holds ``2 n`` distinct str keys; the first ``n`` are the ones a store is filled
    with, the rest are never inserted before a read (get-miss) or are the fresh keys of
    set-with-eviction.
    """

    n: int
    universe: list[str]
    hit_order: list[str]
    miss_order: list[str]
    mixed_keys: list[str]
    mixed_writes: list[bool]

    @property
    def present(self) -> list[str]:
        return self.universe[: self.n]

    @staticmethod
    def _keys(rng: random.Random, count: int) -> list[str]:
        seen: set[str] = set()
        keys: list[str] = []
        while len(keys) < count:
            key = f"key:{rng.getrandbits(64):016x}"
            if key not in seen:
                seen.add(key)
                keys.append(key)
        return keys

    @classmethod
    def present_keys(cls, n: int, seed: int) -> list[str]:
        """Just the ``present`` keys of ``generate(n, seed)``, without the rest."""
        return cls._keys(random.Random(seed + n), n)

    @classmethod
    def generate(cls, n: int, seed: int) -> KeyData:
        rng = random.Random(seed + n)
        universe = cls._keys(rng, 2 * n)
        order = list(range(n))
        rng.shuffle(order)
        hit_order = [universe[i] for i in order]
        miss_order = [universe[n + i] for i in order]
        # Zipf-like popularity over the whole universe, ranks assigned to keys at random.
        ranked = universe[:]
        rng.shuffle(ranked)
        total = 0.0
        cum_weights: list[float] = []
        for rank in range(len(ranked)):
            total += 1.0 / (rank + 1) ** ZIPF_S
            cum_weights.append(total)
        mixed_keys = rng.choices(ranked, cum_weights=cum_weights, k=MIXED_LENGTH)
        mixed_writes = [rng.random() < WRITE_SHARE for _ in range(MIXED_LENGTH)]
        return cls(n, universe, hit_order, miss_order, mixed_keys, mixed_writes)


class Stream:
    """Cycles over a key sequence (and its write flags), carrying on where the last take ended."""

    def __init__(
        self, keys: Sequence[str], writes: Sequence[bool] | None = None, start: int = 0
    ) -> None:
        self._keys = keys
        self._writes = writes
        self._pos = start % len(keys)

    def take(self, count: int) -> tuple[list[str], list[bool]]:
        keys: list[str] = []
        writes: list[bool] = []
        size = len(self._keys)
        pos = self._pos
        while len(keys) < count:
            end = min(size, pos + count - len(keys))
            keys.extend(self._keys[pos:end])
            if self._writes is not None:
                writes.extend(self._writes[pos:end])
            pos = end % size
        self._pos = pos
        return keys, writes


@dataclass(frozen=True)
class Budget:
    """How long one sample should last, and bounds on its number of operations."""

    target_ns: int
    min_ops: int
    max_ops: int


class Trial(Protocol):
    """One library prepared for one workload at one size."""

    def calibrate(self, budget: Budget) -> None:
        """Warm up and fix the number of operations per sample."""

    def sample(self) -> tuple[int, int]:
        """Run one sample: ``(elapsed ns, operations)``."""
        ...

    def close(self) -> None:
        """Release the store."""


class _Closes(Protocol):
    def close(self, store: Any) -> None: ...


class LoopTrial:
    """A compiled loop over a key stream against one long-lived store."""

    def __init__(self, adapter: _Closes, store: Any, loop: Loop, stream: Stream) -> None:
        self._adapter = adapter
        self._store = store
        self._loop = loop
        self._stream = stream
        self._ops = 0

    def _run(self, ops: int) -> int:
        keys, writes = self._stream.take(ops)
        return self._loop(self._store, keys, writes, VALUE)

    def calibrate(self, budget: Budget) -> None:
        ops = budget.min_ops
        while True:
            elapsed = max(self._run(ops), 1)
            if elapsed * 4 >= budget.target_ns or ops >= budget.max_ops:
                break
            ops = min(ops * 8, budget.max_ops)
        wanted = ops * budget.target_ns // elapsed
        self._ops = max(budget.min_ops, min(budget.max_ops, wanted))

    def sample(self) -> tuple[int, int]:
        return self._run(self._ops), self._ops

    def close(self) -> None:
        self._adapter.close(self._store)
        self._store = None


class ExpiryTrial:
    """Fill ``n`` entries under a fake clock, jump past their deadline, time one ``expire()``.

    A sample repeats that cycle until about the target time has been spent *inside* ``expire()``
    (filling is not timed) and reports the time per reclaimed entry.
    """

    def __init__(self, adapter: Adapter, keys: list[str]) -> None:
        self._adapter = adapter
        self._keys = keys
        self._chunk = max(1, len(keys) // EXPIRY_CHUNKS)
        self._cycles = 1

    def _cycle(self) -> tuple[int, int]:
        adapter = self._adapter
        clock = FakeClock()
        store = adapter.make(len(self._keys), ttl=EXPIRY_TTL, clock=clock)
        try:
            keys, chunk = self._keys, self._chunk
            for start in range(0, len(keys), chunk):
                adapter.fill(store, keys[start : start + chunk])
                clock.advance(0.001)
            clock.advance(EXPIRY_TTL + 1.0)
            t0 = time.perf_counter_ns()
            reclaimed = adapter.expire(store)
            elapsed = time.perf_counter_ns() - t0
        finally:
            adapter.close(store)
        if reclaimed != len(keys):
            raise RuntimeError(f"expire() reclaimed {reclaimed} of {len(keys)} due entries")
        return elapsed, reclaimed

    def calibrate(self, budget: Budget) -> None:
        elapsed, _ = self._cycle()
        most = max(1, budget.max_ops // len(self._keys))
        self._cycles = max(1, min(most, budget.target_ns // max(elapsed, 1)))

    def sample(self) -> tuple[int, int]:
        total_ns = total_ops = 0
        for _ in range(self._cycles):
            elapsed, reclaimed = self._cycle()
            total_ns += elapsed
            total_ops += reclaimed
        return total_ns, total_ops

    def close(self) -> None:
        pass


class Workload:
    """A timed workload. Subclasses set the class attributes and :meth:`prepare`."""

    kind: ClassVar[str] = "store"
    name: ClassVar[str]
    #: What one operation is, for the table heading.
    title: ClassVar[str]
    #: Drawn in the PNG.
    plotted: ClassVar[bool] = True
    #: Fewest operations in one sample, whatever the time budget: a workload whose operations
    #: differ in cost needs enough of them for a sample to be representative.
    min_ops: ClassVar[int] = 0

    def prepare(self, adapter: Any, data: Any) -> Trial:
        """A trial ready to calibrate; raises :class:`Unsupported` when it does not apply.

        A store workload takes an :class:`~benchmarks._peers.Adapter` and :class:`KeyData`,
        a limiter workload a :class:`~benchmarks._limiters.LimiterAdapter` and
        :class:`LimiterKeys`.
        """
        raise NotImplementedError


def _filled(adapter: Adapter, data: KeyData) -> Any:
    store = adapter.make(data.n)
    adapter.fill(store, data.present)
    return store


class GetHit(Workload):
    name = "get-hit"
    title = "read a present key (random order over all n keys)"

    def prepare(self, adapter: Adapter, data: KeyData) -> Trial:
        store = _filled(adapter, data)
        return LoopTrial(adapter, store, adapter.loop("get"), Stream(data.hit_order))


class GetMiss(Workload):
    name = "get-miss"
    title = "read an absent key on a full store"

    def prepare(self, adapter: Adapter, data: KeyData) -> Trial:
        store = _filled(adapter, data)
        return LoopTrial(adapter, store, adapter.loop("get"), Stream(data.miss_order))


class SetUpdate(Workload):
    name = "set-update"
    title = "overwrite a present key (default TTL)"

    def prepare(self, adapter: Adapter, data: KeyData) -> Trial:
        store = _filled(adapter, data)
        return LoopTrial(adapter, store, adapter.loop("set"), Stream(data.hit_order))


class SetEvict(Workload):
    name = "set-evict"
    title = "insert a new key into a full store (one eviction per write)"

    def prepare(self, adapter: Adapter, data: KeyData) -> Trial:
        if not adapter.bounded:
            raise Unsupported("unbounded: nothing to evict")
        # Cycling over 2 n keys from key n on: each key written was evicted n writes ago.
        stream = Stream(data.universe, start=data.n)
        return LoopTrial(adapter, _filled(adapter, data), adapter.loop("set"), stream)


class Mixed(Workload):
    name = "mixed"
    title = "80 % get / 20 % set, zipf-like keys over 2 n (misses and evictions included)"
    min_ops = 1_000

    def prepare(self, adapter: Adapter, data: KeyData) -> Trial:
        stream = Stream(data.mixed_keys, data.mixed_writes)
        return LoopTrial(adapter, _filled(adapter, data), adapter.loop("mixed"), stream)


class BulkExpiry(Workload):
    name = "expire"
    title = "bulk expiry: reclaim n due entries at once, per reclaimed entry (fake clock)"

    def prepare(self, adapter: Adapter, data: KeyData) -> Trial:
        if not adapter.injectable_clock:
            raise Unsupported(adapter.no_expiry_reason)
        return ExpiryTrial(adapter, data.present)


# -- rate limiters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimiterKeys:
    """The keys of one limiter workload: ``n`` distinct keys, visited round-robin."""

    n: int
    keys: list[str]

    @classmethod
    def generate(cls, n: int, seed: int) -> LimiterKeys:
        return cls(n, KeyData.present_keys(n, seed))


def _said(allowed: bool) -> str:
    return "allowed" if allowed else "refused"


class LimiterTrial(LoopTrial):
    """Acquire over a key stream against one long-lived limiter, checking the premise.

    Around each timed loop, untimed: before it, ``fresh_key`` (if any) is forgotten and the
    library's background work is stopped; after it, one more acquire must answer ``expect``
    (otherwise the loop timed something else, and the cell says so as an error), and the
    background work it started is stopped again, so it never runs while another library is
    timed.
    """

    def __init__(
        self,
        adapter: LimiterAdapter,
        limiter: Any,
        stream: Stream,
        *,
        expect: bool,
        fresh_key: str | None = None,
    ) -> None:
        super().__init__(adapter, limiter, adapter.loop(), stream)
        self._limiter_adapter = adapter
        self._expect = expect
        self._fresh_key = fresh_key

    def _run(self, ops: int) -> int:
        adapter, limiter = self._limiter_adapter, self._store
        if self._fresh_key is not None:
            adapter.reset(limiter, self._fresh_key)
        adapter.settle(limiter)
        keys, _ = self._stream.take(ops)
        elapsed = self._loop(limiter, keys, (), VALUE)
        if adapter.allowed(limiter, keys[-1]) is not self._expect:
            raise RuntimeError(f"an acquire meant to be {_said(self._expect)} was not")
        adapter.settle(limiter)
        return elapsed


class LimiterWorkload(Workload):
    """A rate-limiter workload: one acquire of cost 1 per operation."""

    kind = "limiter"
    plotted = False
    #: Run at every size of the run (on ``n`` keys), or once on one key.
    per_size: ClassVar[bool] = False

    def sizes(self, sizes: Sequence[int]) -> tuple[int, ...]:
        """The numbers of keys this workload runs on, given the sizes of the run."""
        return tuple(sizes) if self.per_size else (1,)

    def prepare(self, adapter: LimiterAdapter, data: LimiterKeys) -> Trial:
        raise NotImplementedError


def _made(adapter: LimiterAdapter, quota: Quota, data: LimiterKeys, expect: bool | None) -> Any:
    """A new limiter; unless ``expect`` is None, every key acquired once, after which one
    more acquire must answer ``expect``."""
    limiter = adapter.make(quota, data.n)
    try:
        if expect is not None:
            first = data.keys[0]
            if not adapter.allowed(limiter, first):
                raise RuntimeError("the first acquire of a fresh key was refused")
            adapter.loop()(limiter, data.keys[1:], (), VALUE)
            if adapter.allowed(limiter, first) is not expect:
                raise RuntimeError(f"an acquire meant to be {_said(expect)} was not")
        adapter.settle(limiter)
    except BaseException:
        adapter.close(limiter)
        raise
    return limiter


class AcquireAllowed(LimiterWorkload):
    name = "acquire-allowed"
    title = (
        f"one key, every call allowed (quota {ROOMY}: never refused, never refilled); "
        "each sample starts from a fresh key"
    )

    def prepare(self, adapter: LimiterAdapter, data: LimiterKeys) -> Trial:
        limiter = _made(adapter, ROOMY, data, expect=None)
        # From a fresh key: a moving-window log grows with every allowed hit, so without the
        # reset its cost would depend on how long the run has gone on.
        stream = Stream(data.keys)
        return LimiterTrial(adapter, limiter, stream, expect=True, fresh_key=data.keys[0])


class AcquireRefused(LimiterWorkload):
    name = "acquire-refused"
    title = f"one key, every call refused (quota {TIGHT}, spent by a first call)"

    def prepare(self, adapter: LimiterAdapter, data: LimiterKeys) -> Trial:
        limiter = _made(adapter, TIGHT, data, expect=False)
        return LimiterTrial(adapter, limiter, Stream(data.keys), expect=False)


class AcquireKeys(LimiterWorkload):
    name = "acquire-keys"
    title = (
        f"n keys round-robin, every call allowed (quota {ROOMY}): every library holds state "
        "for all n keys"
    )
    per_size = True

    def prepare(self, adapter: LimiterAdapter, data: LimiterKeys) -> Trial:
        limiter = _made(adapter, ROOMY, data, expect=True)
        return LimiterTrial(adapter, limiter, Stream(data.keys), expect=True)


#: Every workload, in table order: the store workloads, then the rate-limiter ones.
WORKLOADS: tuple[Workload, ...] = (
    GetHit(),
    GetMiss(),
    SetUpdate(),
    SetEvict(),
    Mixed(),
    BulkExpiry(),
    AcquireAllowed(),
    AcquireRefused(),
    AcquireKeys(),
)
