"""One adapter per rate limiter compared by ``python -m benchmarks.compare`` ("Rate limiters").

The same method as the store adapters in ``_peers.py``: an adapter builds a limiter and says how
to call its acquire as a line of source code (an :class:`~benchmarks._peers.Op`), which the
workloads paste into the one loop template, so every library is timed by the same loop and
called the way its users call it, with no wrapper in between. The line runs with ``c`` (what
:meth:`LimiterAdapter.make` returned) and ``k`` (the key) in scope.

Every library is held to the same :class:`Quota`, "``capacity`` requests per ``period``
seconds": a token bucket of that burst refilled at ``capacity / period`` per second, or a
window of ``period`` seconds admitting ``capacity``.

To add a limiter: subclass :class:`LimiterAdapter`, fill in the class attributes and the
methods that raise ``NotImplementedError``, and append an instance to :data:`LIMITERS`. One that
does not import is reported as missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from benchmarks._peers import Library, Loop, Op, compile_loop


@dataclass(frozen=True)
class Quota:
    """``capacity`` requests per ``period`` seconds."""

    capacity: int
    period: int

    def __str__(self) -> str:
        return f"{self.capacity:,} per {self.period:,} s".replace(",", " ")


#: Never refused in a run, and a key's state stays in debt (a token bucket is never full
#: again, a window never ends): every library keeps state for every key it has seen, as for
#: clients that keep using their quota.
ROOMY = Quota(10**9, 10**9)
#: One request an hour: once spent, every call is refused.
TIGHT = Quota(1, 3600)


class LimiterAdapter(Library):
    """How to drive one rate limiter. Subclasses set the class attributes and the methods."""

    kind: ClassVar[str] = "limiter"
    #: The algorithm, as the table shows it.
    algorithm: ClassVar[str]
    #: Whether one instance may be shared by threads without an external lock.
    threadsafe: ClassVar[bool] = True
    #: One acquire of ``cost`` 1 for key ``k`` on limiter ``c``.
    acquire_op: ClassVar[Op]
    #: Quirks worth a footnote.
    notes: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._loop: Loop | None = None

    def make(self, quota: Quota, keys: int) -> Any:
        """A limiter holding every key to ``quota``, with room for ``keys`` keys at once."""
        raise NotImplementedError

    def allowed(self, limiter: Any, key: str) -> bool:
        """One acquire, outside any timing: whether it was allowed."""
        raise NotImplementedError

    def reset(self, limiter: Any, key: str) -> None:
        """Forget ``key``: its next acquire starts from a fresh quota."""
        raise NotImplementedError

    def settle(self, limiter: Any) -> None:
        """Stop background work the last calls started (timer threads), so that it does not
        run while another library is timed. Only what ran *during* a sample is counted."""

    def close(self, limiter: Any) -> None:
        """Release whatever the limiter holds besides memory."""
        self.settle(limiter)

    def loop(self) -> Loop:
        """The compiled timed loop of :attr:`acquire_op` over a list of keys (cached)."""
        if self._loop is None:
            self._loop = compile_loop(f"{self.name} acquire", self.acquire_op)
        return self._loop


# -- ttlstore -----------------------------------------------------------------------------------


class _TokenBucket(LimiterAdapter):
    module = "ttlstore.ratelimit"
    distribution = "ttlstore"
    algorithm = "token bucket (GCRA, exact)"
    acquire_op = Op("acquire(k)", "acquire = c.acquire")
    tsafe: ClassVar[bool]

    def make(self, quota: Quota, keys: int) -> Any:
        from ttlstore.ratelimit import Limit, TokenBucketLimiter

        return TokenBucketLimiter(
            limits=[Limit.per(quota.capacity, quota.period)],
            maxsize=max(10_000, keys),
            threadsafe=self.tsafe,
        )

    def allowed(self, limiter: Any, key: str) -> bool:
        return bool(limiter.acquire(key).allowed)

    def reset(self, limiter: Any, key: str) -> None:
        limiter.reset(key)


class TokenBucketSafe(_TokenBucket):
    name = "ttlstore.TokenBucketLimiter"
    tsafe = True
    notes = (
        "`acquire` returns a full decision (allowed, remaining, retry_after, reset_after, "
        "refill_after): what the RateLimit headers need, in the one call",
    )


class TokenBucketUnsafe(_TokenBucket):
    name = "ttlstore.TokenBucketLimiter(threadsafe=False)"
    tsafe = False
    threadsafe = False


# -- limits -------------------------------------------------------------------------------------


class _LimitsLimiter:
    """What a `limits` user holds: a strategy over a storage, and the limit item."""

    __slots__ = ("item", "limiter", "storage")

    def __init__(self, limiter: Any, item: Any, storage: Any) -> None:
        self.limiter = limiter
        self.item = item
        self.storage = storage


class _Limits(LimiterAdapter):
    module = "limits"
    distribution = "limits"
    acquire_op = Op("hit(item, k)", "hit = c.limiter.hit\nitem = c.item")
    strategy: ClassVar[str]

    def load(self) -> None:
        strategies = importlib.import_module("limits.strategies")
        importlib.import_module("limits.storage").MemoryStorage  # noqa: B018
        getattr(strategies, self.strategy)

    def make(self, quota: Quota, keys: int) -> Any:
        from limits import RateLimitItemPerSecond
        from limits.storage import MemoryStorage

        storage = MemoryStorage()
        strategy = getattr(importlib.import_module("limits.strategies"), self.strategy)
        item = RateLimitItemPerSecond(quota.capacity, quota.period)
        return _LimitsLimiter(strategy(storage), item, storage)

    def allowed(self, limiter: Any, key: str) -> bool:
        return bool(limiter.limiter.hit(limiter.item, key))

    def reset(self, limiter: Any, key: str) -> None:
        limiter.limiter.clear(limiter.item, key)

    def settle(self, limiter: Any) -> None:
        # MemoryStorage's calls (re)start a threading.Timer that wakes 10 ms later and walks
        # every key to drop expired ones. Cancel it, or wait for the walk already running.
        timer = getattr(limiter.storage, "timer", None)
        if timer is not None:
            timer.cancel()
            timer.join()


class LimitsMoving(_Limits):
    name = "limits MovingWindow"
    strategy = "MovingWindowRateLimiter"
    algorithm = "moving window (one entry per hit)"
    notes = (
        "keeps one entry per hit inside the window and inserts each new one at the front of a "
        "list: a hit costs O(hits in the window), so a key that is never refused grows without "
        "bound; the one-key allowed workload therefore starts every sample from a fresh key",
        "(every `limits` strategy) `hit` answers a bool; the remaining quota and reset time "
        "take a second call (`get_window_stats`)",
        "(every `limits` strategy) a call to `MemoryStorage` starts a timer thread that wakes "
        "10 ms later and walks every key to drop expired ones; the walks that fall inside a "
        "sample are counted, the one still pending at its end is cancelled",
    )


class LimitsFixed(_Limits):
    name = "limits FixedWindow"
    strategy = "FixedWindowRateLimiter"
    algorithm = "fixed window (a counter)"
    notes = ("a refused hit still increments the counter",)


class LimitsSlidingCounter(_Limits):
    name = "limits SlidingWindowCounter"
    strategy = "SlidingWindowCounterRateLimiter"
    algorithm = "sliding window counter (two counters, weighted)"


# -- pyrate-limiter -----------------------------------------------------------------------------


def _pyrate() -> Any:
    """The pyrate_limiter module, if it has the v4 API used here (else ImportError)."""
    pyrate = importlib.import_module("pyrate_limiter")
    if "blocking" not in inspect.signature(pyrate.Limiter.try_acquire).parameters:
        raise ImportError(
            "pyrate-limiter 4 or later is needed (`try_acquire(..., blocking=False)`); "
            f"found {importlib.metadata.version('pyrate-limiter')}"
        )
    return pyrate


_FACTORY: Any = None


def _per_name_factory() -> Any:
    """The per-key bucket factory of pyrate-limiter's documentation ("PerNameFactory")."""
    global _FACTORY
    if _FACTORY is None:
        pyrate = _pyrate()
        base: Any = pyrate.BucketFactory

        class PerNameFactory(base):  # type: ignore[misc]
            def __init__(self, clock: Any, make_bucket: Any) -> None:
                self.clock = clock
                self.buckets: dict[str, Any] = {}
                self._make_bucket = make_bucket

            def wrap_item(self, name: str, weight: int = 1) -> Any:
                return pyrate.RateItem(name, self.clock.now(), weight=weight)

            def get(self, item: Any) -> Any:
                bucket = self.buckets.get(item.name)
                if bucket is None:
                    bucket = self.buckets[item.name] = self._make_bucket()
                return bucket

        _FACTORY = PerNameFactory
    return _FACTORY


class _Pyrate(LimiterAdapter):
    module = "pyrate_limiter"
    distribution = "pyrate-limiter"
    acquire_op = Op("try_acquire(k, blocking=False)", "try_acquire = c.try_acquire")

    def load(self) -> None:
        _per_name_factory()

    def bucket(self, pyrate: Any, rate: Any) -> Any:
        raise NotImplementedError

    def make(self, quota: Quota, keys: int) -> Any:
        pyrate = _pyrate()
        rate = pyrate.Rate(quota.capacity, quota.period * 1000)  # interval in ms
        factory = _per_name_factory()(pyrate.MonotonicClock(), lambda: self.bucket(pyrate, rate))
        return pyrate.Limiter(factory)

    def allowed(self, limiter: Any, key: str) -> bool:
        return bool(limiter.try_acquire(key, blocking=False))

    def reset(self, limiter: Any, key: str) -> None:
        limiter.bucket_factory.buckets.pop(key, None)

    def close(self, limiter: Any) -> None:
        limiter.bucket_factory.buckets.clear()
        limiter.close()


_PYRATE_NOTE = (
    "one bucket per key through the per-key `BucketFactory` of its documentation, created "
    "without the background Leaker thread (which would trim old items every 10 s, also while "
    "other libraries are timed); the call path is the same"
)


class PyrateLog(_Pyrate):
    name = "pyrate-limiter InMemoryBucket"
    algorithm = "sliding window log (one item per hit)"
    notes = (_PYRATE_NOTE, "keeps one item per admitted hit until leaked")

    def bucket(self, pyrate: Any, rate: Any) -> Any:
        return pyrate.InMemoryBucket([rate])


class PyrateTokenBucket(_Pyrate):
    name = "pyrate-limiter TokenBucket"
    algorithm = "token bucket (StateBucket)"
    notes = (_PYRATE_NOTE,)

    def load(self) -> None:
        pyrate = _pyrate()
        pyrate.StateBucket, pyrate.TokenBucket  # noqa: B018  (added in 4.x)
        _per_name_factory()

    def bucket(self, pyrate: Any, rate: Any) -> Any:
        return pyrate.StateBucket([rate], algorithm=pyrate.TokenBucket())


#: Every rate limiter compared, in table order. The first is the ratio's base.
LIMITERS: tuple[LimiterAdapter, ...] = (
    TokenBucketSafe(),
    TokenBucketUnsafe(),
    LimitsMoving(),
    LimitsFixed(),
    LimitsSlidingCounter(),
    PyrateLog(),
    PyrateTokenBucket(),
)

#: The limiter every ratio is taken against.
LIMITER_BASELINE = TokenBucketSafe.name
