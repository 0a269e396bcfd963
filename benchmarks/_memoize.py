"""The memoize section of ``python -m benchmarks.compare``: decorators side by side.

Every library caches the same one-argument function, ``ident(k) -> k``, with room for ``n``
entries and a TTL of an hour where it takes one. Three timed workloads, measured as the store
workloads are (one sample per library per round, the first library rotating each round, the
median over the rounds, the timing loop included in every figure):

- **hit**: ``f(k)`` (or ``await f(k)``) over ``n`` keys already cached;
- **miss**: ``f(k)`` over keys never seen, the cache full, so each call computes, stores and
  evicts one entry;
- and a **stampede**: ``threads`` threads (sync) or ``tasks`` tasks (async) call ``f("k")`` at
  once on an empty cache while the body takes a while; the table shows how many times the body
  ran (1 is single flight).

A library that does not import is reported as missing. Libraries that offer both kinds are run
for both; ``functools.lru_cache`` (C) is the floor for sync hits.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import importlib.metadata
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, TextIO

TTL = 3600.0
#: How long the stampede body takes: long enough for every caller to arrive while it runs.
STAMPEDE_SECONDS = 0.05


class Memoizer:
    """How one library memoizes. Subclasses set the class attributes and :meth:`wrap`."""

    name: ClassVar[str]
    module: ClassVar[str]
    distribution: ClassVar[str | None] = None
    sync: ClassVar[bool] = True
    async_: ClassVar[bool] = True
    notes: ClassVar[tuple[str, ...]] = ()

    def load(self) -> None:
        importlib.import_module(self.module)

    def version(self) -> str:
        if self.distribution is None:
            import platform

            return platform.python_version()
        return importlib.metadata.version(self.distribution)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        """``func`` (sync or async) memoized with room for ``maxsize`` entries."""
        raise NotImplementedError


class Ttlstore(Memoizer):
    name = "ttlstore.cached"
    module = "ttlstore"
    distribution = "ttlstore"

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        from ttlstore import cached

        return cached(maxsize, ttl=TTL)(func)


class LruCache(Memoizer):
    name = "functools.lru_cache"
    module = "functools"
    async_ = False
    notes = ("C; no TTL, no single flight (the floor for a hit).",)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        import functools

        return functools.lru_cache(maxsize)(func)


class CachetoolsTTL(Memoizer):
    name = "cachetools.cached+TTLCache"
    module = "cachetools"
    distribution = "cachetools"
    async_ = False
    notes = ("no lock: not thread-safe (also in the stampede).",)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        import cachetools

        return cachetools.cached(cachetools.TTLCache(maxsize, TTL))(func)


class CachetoolsCondition(Memoizer):
    name = "cachetools.cached+TTLCache(condition)"
    module = "cachetools"
    distribution = "cachetools"
    async_ = False
    notes = ("with a threading.Condition: cachetools' own stampede protection.",)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        import cachetools

        return cachetools.cached(
            cachetools.TTLCache(maxsize, TTL), condition=threading.Condition()
        )(func)


class Cachebox(Memoizer):
    name = "cachebox.cached+TTLCache"
    module = "cachebox"
    distribution = "cachebox"
    notes = ("Rust store; the wrapper is Python.",)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        import cachebox

        return cachebox.cached(cachebox.TTLCache(maxsize, TTL))(func)  # type: ignore[no-any-return]


class Theine(Memoizer):
    name = "theine.Memoize"
    module = "theine"
    distribution = "theine"
    notes = ("Rust core (TinyLFU); auto-key mode.",)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        from theine import Memoize

        return Memoize(maxsize, timedelta(seconds=TTL))(func)  # type: ignore[no-any-return]


class AsyncLru(Memoizer):
    name = "async_lru.alru_cache"
    module = "async_lru"
    distribution = "async-lru"
    sync = False

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        from async_lru import alru_cache

        return alru_cache(maxsize, ttl=TTL)(func)


class Aiocache(Memoizer):
    name = "aiocache.cached (memory)"
    module = "aiocache"
    distribution = "aiocache"
    sync = False
    notes = ("no size bound: maxsize is not an option of its memory backend.",)

    def wrap(self, func: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
        from aiocache import SimpleMemoryCache, cached

        return cached(ttl=int(TTL), cache=SimpleMemoryCache)(func)  # type: ignore[no-any-return]


MEMOIZERS: tuple[Memoizer, ...] = (
    Ttlstore(),
    LruCache(),
    CachetoolsTTL(),
    CachetoolsCondition(),
    Cachebox(),
    Theine(),
    AsyncLru(),
    Aiocache(),
)
SUBJECT = Ttlstore.name

WORKLOADS = (
    ("sync-hit", "a hit, f(k) over n cached keys", False),
    ("sync-miss", "a miss, f(k) on a full cache: compute, store, evict", False),
    ("async-hit", "a hit, await f(k) over n cached keys", True),
    ("async-miss", "a miss, await f(k) on a full cache: compute, store, evict", True),
)


def _ident(k: str) -> str:
    return k


async def _aident(k: str) -> str:
    return k


def _sync_loop(f: Callable[[str], Any], keys: Sequence[str]) -> int:
    t0 = time.perf_counter_ns()
    for k in keys:
        f(k)
    return time.perf_counter_ns() - t0


async def _async_loop(f: Callable[[str], Any], keys: Sequence[str]) -> int:
    t0 = time.perf_counter_ns()
    for k in keys:
        await f(k)
    return time.perf_counter_ns() - t0


@dataclass(frozen=True)
class Settings:
    n: int
    repeats: int
    target_ns: int
    min_ops: int
    max_ops: int
    threads: int = 100
    tasks: int = 1000


class _Trial:
    """One library on one workload: a memoized function, its keys, and its samples."""

    def __init__(
        self, memoizer: Memoizer, workload: str, settings: Settings, loop: asyncio.AbstractEventLoop
    ) -> None:
        is_async = workload.startswith("async")
        self.loop = loop
        self.is_async = is_async
        self.f = memoizer.wrap(_aident if is_async else _ident, settings.n)
        self.miss = workload.endswith("miss")
        self.keys = [f"key-{i}" for i in range(settings.n)]
        self.fresh = 0
        self.ops = settings.min_ops
        self.samples: list[float] = []
        for key in self.keys:  # warm: every key cached (and, for misses, the cache full)
            self._call(key)

    def _call(self, key: str) -> None:
        if self.is_async:
            self.loop.run_until_complete(self.f(key))
        else:
            self.f(key)

    def _stream(self, ops: int) -> list[str]:
        if self.miss:
            start, self.fresh = self.fresh, self.fresh + ops
            return [f"new-{i}" for i in range(start, start + ops)]
        keys = self.keys
        return [keys[i % len(keys)] for i in range(ops)]

    def run(self, ops: int) -> int:
        keys = self._stream(ops)
        if self.is_async:
            return self.loop.run_until_complete(_async_loop(self.f, keys))
        return _sync_loop(self.f, keys)

    def calibrate(self, settings: Settings) -> None:
        elapsed = self.run(self.ops)
        while elapsed < settings.target_ns and self.ops < settings.max_ops:
            self.ops = min(settings.max_ops, self.ops * 4)
            elapsed = self.run(self.ops)
        self.ops = max(settings.min_ops, min(settings.max_ops, self.ops))


def _timed(
    settings: Settings, memoizers: Sequence[Memoizer], missing: dict[str, str], log: TextIO
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    try:
        for workload, _, is_async in WORKLOADS:
            trials: dict[str, _Trial] = {}
            for memoizer in memoizers:
                row: dict[str, Any] = {
                    "workload": workload,
                    "library": memoizer.name,
                    "n": settings.n,
                    "status": "ok",
                    "reason": None,
                }
                rows.append(row)
                if memoizer.name in missing:
                    row.update(status="missing", reason=missing[memoizer.name])
                    continue
                if not (memoizer.async_ if is_async else memoizer.sync):
                    row.update(status="skipped", reason="no " + ("async" if is_async else "sync"))
                    continue
                try:
                    trial = _Trial(memoizer, workload, settings, loop)
                    trial.calibrate(settings)
                except Exception as exc:
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:160])
                    continue
                trials[memoizer.name] = trial
            gc.collect()
            gc.freeze()
            try:
                names = list(trials)
                for round_ in range(settings.repeats):
                    shift = round_ % len(names) if names else 0
                    for name in names[shift:] + names[:shift]:
                        trial = trials[name]
                        trial.samples.append(trial.run(trial.ops) / trial.ops)
            finally:
                gc.unfreeze()
            for row in rows:
                trial_ = trials.get(row["library"])
                if row["workload"] == workload and trial_ is not None:
                    samples = sorted(trial_.samples)
                    row.update(
                        ops_per_sample=trial_.ops,
                        samples_ns_per_op=trial_.samples,
                        median=statistics.median(samples),
                        min=samples[0],
                        max=samples[-1],
                    )
            print(f"memoize: {workload} done ({len(trials)} libraries)", file=log, flush=True)
            trials.clear()
            gc.collect()
    finally:
        loop.close()
    return rows


def _stampede_sync(memoizer: Memoizer, threads: int) -> int:
    calls = []

    def body(k: str) -> str:
        calls.append(k)
        time.sleep(STAMPEDE_SECONDS)
        return k

    f = memoizer.wrap(body, 16)
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait(30)
            f("k")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return len(calls)


def _stampede_async(memoizer: Memoizer, tasks: int) -> int:
    calls = []

    async def body(k: str) -> str:
        calls.append(k)
        await asyncio.sleep(STAMPEDE_SECONDS)
        return k

    f = memoizer.wrap(body, 16)

    async def burst() -> None:
        await asyncio.gather(*(f("k") for _ in range(tasks)))

    asyncio.run(burst())
    return len(calls)


def _stampedes(
    settings: Settings, memoizers: Sequence[Memoizer], missing: dict[str, str]
) -> list[dict[str, Any]]:
    rows = []
    for memoizer in memoizers:
        for kind, callers, supported, run in (
            ("threads", settings.threads, memoizer.sync, _stampede_sync),
            ("tasks", settings.tasks, memoizer.async_, _stampede_async),
        ):
            row: dict[str, Any] = {
                "library": memoizer.name,
                "kind": kind,
                "callers": callers,
                "calls": None,
                "status": "ok",
                "reason": None,
            }
            rows.append(row)
            if memoizer.name in missing:
                row.update(status="missing", reason=missing[memoizer.name])
            elif not supported:
                row.update(
                    status="skipped", reason="no " + ("sync" if kind == "threads" else "async")
                )
            else:
                try:
                    row["calls"] = run(memoizer, callers)
                except Exception as exc:
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:160])
    return rows


def _ratio(rows: list[dict[str, Any]], workload: str, a: str, b: str) -> float | None:
    medians = {
        r["library"]: r["median"] for r in rows if r["workload"] == workload and r["status"] == "ok"
    }
    if a in medians and b in medians and medians[b]:
        return float(medians[a] / medians[b])
    return None


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The memoize targets of issue 10, as ratios of medians measured in this run."""
    rows = section["results"]
    checks = [
        (
            "sync hit at least 3x faster than cachetools.cached+TTLCache",
            "sync-hit",
            CachetoolsTTL.name,
            1 / 3,
        ),
        ("sync hit within 5x of functools.lru_cache", "sync-hit", LruCache.name, 5.0),
        ("async hit faster than async_lru", "async-hit", AsyncLru.name, 1.0),
        ("async hit at least 3x faster than aiocache", "async-hit", Aiocache.name, 1 / 3),
    ]
    out = []
    for text, workload, peer, limit in checks:
        ratio = _ratio(rows, workload, SUBJECT, peer)
        if ratio is not None:
            out.append(
                {
                    "target": text,
                    "workload": workload,
                    "peer": peer,
                    "n": section["n"],
                    "ratio": ratio,
                    "limit": limit,
                    "met": ratio <= limit,
                }
            )
    out.extend(
        {
            "target": f"stampede of {row['callers']} {row['kind']}: 1 call",
            "workload": "stampede",
            "peer": None,
            "n": row["callers"],
            "ratio": float(row["calls"]),
            "limit": 1.0,
            "met": row["calls"] == 1,
        }
        for row in section["stampede"]
        if row["library"] == SUBJECT and row["status"] == "ok"
    )
    return out


def run(
    settings: Settings, log: TextIO, memoizers: Sequence[Memoizer] = MEMOIZERS
) -> dict[str, Any]:
    """The memoize section of the report (JSON-ready)."""
    missing: dict[str, str] = {}
    for memoizer in memoizers:
        try:
            memoizer.load()
        except Exception as exc:
            missing[memoizer.name] = f"{type(exc).__name__}: {exc}"[:160]
            print(f"missing: {memoizer.name} ({missing[memoizer.name]})", file=log, flush=True)
    started = time.perf_counter()
    results = _timed(settings, memoizers, missing, log)
    stampede = _stampedes(settings, memoizers, missing)
    print(f"memoize: stampedes done ({time.perf_counter() - started:.1f}s)", file=log, flush=True)
    section: dict[str, Any] = {
        "n": settings.n,
        "subject": SUBJECT,
        "libraries": [
            {
                "name": m.name,
                "version": None if m.name in missing else m.version(),
                "status": "missing" if m.name in missing else "ok",
                "error": missing.get(m.name),
                "sync": m.sync,
                "async": m.async_,
                "notes": list(m.notes),
            }
            for m in memoizers
        ],
        "workloads": [{"name": w, "title": t} for w, t, _ in WORKLOADS],
        "results": results,
        "stampede": stampede,
        "stampede_seconds": STAMPEDE_SECONDS,
    }
    section["targets"] = targets(section)
    return section
