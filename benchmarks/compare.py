"""Compare ttlstore with the stores a user would pick instead, in one process.

    python -m benchmarks.compare [--quick | --full] [--sizes N ...] [--repeats R]
                                 [--out DIR | --refresh] [--metrics]

Times get-hit, get-miss, set-update, set-with-eviction, a mixed 80/20 zipf-like workload and bulk
expiry for every library in :data:`benchmarks._peers.ADAPTERS`, at each size, on the same
pre-generated keys; measures memory per entry with tracemalloc; times a rate limiter's acquire
(allowed, refused, and over n keys) for every limiter in :data:`benchmarks._limiters.LIMITERS`;
writes ``latest.md``, ``latest.json`` and ``latest.png`` to ``--out`` (default ``.bench/``, which
git ignores; ``--refresh`` writes the committed ``benchmarks/results`` instead) and prints the
Markdown. Progress goes to stderr.

Method: for each (size, workload) every library gets its own store, filled with the same keys.
Each store is first run once to warm up and to fix how many operations one sample takes (about
``--target-ms``). Then samples are taken round-robin, one per library per round, the starting
library rotating each round, so drift in the machine's speed spreads over every library. Objects
present before the rounds are frozen out of the cyclic GC (``gc.freeze``) so one library's
collections do not walk another library's store. The figure per cell is the median ns/op over
the rounds, with its min and max.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

from benchmarks import _asgi, _memoize, _report, _targets
from benchmarks._limiters import LIMITER_BASELINE, LIMITERS, LimiterAdapter
from benchmarks._memory import rss_bytes_per_entry, traced_bytes_per_entry
from benchmarks._peers import (
    ADAPTERS,
    BASELINE,
    EMPTY_LOOP,
    METRICS_ADAPTERS,
    VALUE,
    Adapter,
    Library,
    Unsupported,
)
from benchmarks._workloads import (
    WORKLOADS,
    Budget,
    KeyData,
    LimiterKeys,
    LimiterWorkload,
    Stream,
    Trial,
    Workload,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Where a run writes unless told otherwise: ignored by git, so a run leaves the tree clean.
SCRATCH_DIR = Path(__file__).resolve().parent.parent / ".bench"


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = (1_000, 100_000)
    repeats: int = 5
    #: Wall time one sample should take.
    target_ms: float = 40.0
    min_ops: int = 16
    max_ops: int = 400_000
    #: Size of the memory measurement (``None``: skip it).
    memory_n: int | None = 100_000
    #: Also measure resident-set growth per entry, one fresh child process per library.
    rss: bool = True
    out: Path = SCRATCH_DIR
    plot: bool = True
    seed: int = 1_234
    mode: str = "default"
    command: str = "python -m benchmarks.compare"
    adapters: Sequence[Adapter] = ADAPTERS
    workloads: Sequence[Workload] = WORKLOADS
    baseline: str = BASELINE
    limiters: Sequence[LimiterAdapter] = LIMITERS
    limiter_baseline: str = LIMITER_BASELINE
    #: Seconds per case of the Redis round-trip measurement (0: skip it).
    redis_seconds: float = 1.0
    #: Requests per sample of the ASGI middleware section (0: skip it).
    asgi_requests: int = 5_000
    #: The memoize section (decorators, at the smallest size): its libraries, or () to skip.
    memoizers: Sequence[_memoize.Memoizer] = _memoize.MEMOIZERS
    #: Callers of the memoize stampede: (threads, tasks).
    stampede: tuple[int, int] = (100, 1_000)

    @property
    def budget(self) -> Budget:
        return Budget(int(self.target_ms * 1e6), self.min_ops, self.max_ops)


QUICK = Config(
    sizes=(1_000, 10_000),
    repeats=5,
    target_ms=10.0,
    min_ops=8,
    max_ops=100_000,
    mode="quick",
    redis_seconds=0.3,
    asgi_requests=1_000,
)
DEFAULT = Config()
FULL = Config(sizes=(1_000, 100_000, 1_000_000), repeats=5, mode="full")


@dataclass
class Cell:
    """One library, one workload, one size."""

    workload: str
    library: str
    n: int
    status: str = "ok"  # ok | skipped | missing | error
    reason: str | None = None
    ops_per_sample: int = 0
    ns_per_op: list[float] = field(default_factory=list)

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "workload": self.workload,
            "library": self.library,
            "n": self.n,
            "status": self.status,
            "reason": self.reason,
        }
        if self.status == "ok" and self.ns_per_op:
            samples = sorted(self.ns_per_op)
            q1, _, q3 = (
                statistics.quantiles(samples, n=4, method="inclusive")
                if len(samples) > 1
                else (samples[0],) * 3
            )
            data.update(
                ops_per_sample=self.ops_per_sample,
                samples_ns_per_op=self.ns_per_op,
                median=statistics.median(samples),
                min=samples[0],
                max=samples[-1],
                q1=q1,
                q3=q3,
            )
        return data


class Progress:
    def __init__(self, stream: TextIO, total: int) -> None:
        self._stream = stream
        self._total = total
        self._done = 0
        self._t0 = time.perf_counter()

    def step(self, message: str) -> None:
        self._done += 1
        elapsed = time.perf_counter() - self._t0
        width = len(str(self._total))
        print(
            f"[{self._done:>{width}}/{self._total}] {elapsed:6.1f}s  {message}",
            file=self._stream,
            flush=True,
        )

    def note(self, message: str) -> None:
        print(f"{'':{2 * len(str(self._total)) + 12}}{message}", file=self._stream, flush=True)


class _Named(Protocol):
    """What the runner needs of an adapter of either kind."""

    @property
    def name(self) -> str: ...

    def load(self) -> None: ...


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 160 else text[:157] + "..."


def _load(adapter: _Named) -> str | None:
    try:
        adapter.load()
    except Exception as exc:
        return _describe(exc)
    return None


def _load_all(adapters: Sequence[_Named], log: TextIO) -> dict[str, str]:
    """Why each adapter that does not load is missing, by name."""
    missing: dict[str, str] = {}
    for adapter in adapters:
        error = _load(adapter)
        if error is not None:
            missing[adapter.name] = error
            print(f"missing: {adapter.name} ({error})", file=log, flush=True)
    return missing


def _loop_overhead(data: KeyData, budget: Budget) -> float:
    keys, _ = Stream(data.hit_order).take(budget.max_ops)
    runs = [EMPTY_LOOP(None, keys, (), VALUE) / len(keys) for _ in range(5)]
    return statistics.median(runs)


def _prepare(
    workload: Workload,
    data: KeyData | LimiterKeys,
    adapters: Sequence[_Named],
    missing: dict[str, str],
    budget: Budget,
    cells: dict[str, Cell],
    trials: dict[str, Trial],
) -> None:
    """Build and calibrate one trial per library into ``trials``; record why others are out."""
    for adapter in adapters:
        cell = cells[adapter.name]
        if adapter.name in missing:
            cell.fail("missing", missing[adapter.name])
            continue
        try:
            trial = workload.prepare(adapter, data)
        except Unsupported as exc:
            cell.fail("skipped", str(exc))
            continue
        except Exception as exc:
            cell.fail("error", _describe(exc))
            continue
        trials[adapter.name] = trial
        try:
            trial.calibrate(budget)
        except Exception as exc:
            cell.fail("error", _describe(exc))
            trials.pop(adapter.name).close()


def _sample_rounds(
    trials: dict[str, Trial], cells: dict[str, Cell], repeats: int, progress: Progress | None
) -> None:
    """One sample per library per round; the first library rotates from round to round."""
    for round_ in range(repeats):
        if progress is not None:
            progress.note(f"round {round_ + 1}/{repeats}")
        names = list(trials)
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            try:
                elapsed, ops = trials[name].sample()
            except Exception as exc:
                cells[name].fail("error", _describe(exc))
                trials.pop(name).close()
                continue
            cells[name].ops_per_sample = ops
            cells[name].ns_per_op.append(elapsed / ops)


def _run_group(
    workload: Workload,
    data: KeyData | LimiterKeys,
    adapters: Sequence[_Named],
    missing: dict[str, str],
    config: Config,
    progress: Progress,
) -> list[Cell]:
    """Every library on one workload at one size, samples interleaved round-robin."""
    cells = {a.name: Cell(workload.name, a.name, data.n) for a in adapters}
    trials: dict[str, Trial] = {}
    chatty = data.n >= 100_000
    budget = config.budget
    budget = replace(budget, min_ops=max(budget.min_ops, workload.min_ops))
    try:
        _prepare(workload, data, adapters, missing, budget, cells, trials)
        if chatty:
            progress.note(f"n={data.n:,} {workload.name}: {len(trials)} stores ready")
        # Freeze what exists now out of the cyclic GC: one library's collections then do not
        # walk the other libraries' stores.
        gc.collect()
        gc.freeze()
        try:
            _sample_rounds(trials, cells, config.repeats, progress if chatty else None)
        finally:
            gc.unfreeze()
    finally:
        for trial in trials.values():
            trial.close()
        trials.clear()
        gc.collect()
    return list(cells.values())


def _memory(
    config: Config, n: int, adapters: Sequence[Adapter], missing: dict[str, str]
) -> dict[str, Any]:
    keys = KeyData.present_keys(n, config.seed)
    rows = []
    for adapter in adapters:
        row: dict[str, Any] = {
            "library": adapter.name,
            "native": adapter.native,
            "status": "ok",
            "reason": None,
            "bytes_per_entry": None,
            "rss_bytes_per_entry": None,
            "rss_error": None,
        }
        rows.append(row)
        if adapter.name in missing:
            row.update(status="missing", reason=missing[adapter.name])
            continue
        try:
            row["bytes_per_entry"] = traced_bytes_per_entry(adapter, keys)
        except Exception as exc:
            row.update(status="error", reason=_describe(exc))
            continue
        if config.rss:
            try:
                row["rss_bytes_per_entry"] = rss_bytes_per_entry(adapter, n, config.seed)
            except Exception as exc:
                row["rss_error"] = _describe(exc)
    return {"n": n, "rss": config.rss, "results": rows}


def _machine() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "python_build": sys.version,
    }


def run(config: Config, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the comparison and return the report (JSON-ready); writes nothing."""
    started = time.perf_counter()
    adapters = [a for a in config.adapters if a.kind == "store"]
    workloads = [w for w in config.workloads if w.kind == "store"]
    limiters = [a for a in config.limiters if a.kind == "limiter"]
    limiter_workloads = [w for w in config.workloads if isinstance(w, LimiterWorkload)]
    missing = _load_all(adapters, log)
    limiters_missing = _load_all(limiters, log) if limiter_workloads else {}
    memory_steps = 1 if config.memory_n else 0
    limiter_steps = sum(len(w.sizes(config.sizes)) for w in limiter_workloads)
    progress = Progress(log, len(config.sizes) * len(workloads) + limiter_steps + memory_steps)
    width = max((len(w.name) for w in config.workloads), default=10)

    def step(n: int, workload: Workload, group: list[Cell], t0: float) -> None:
        ok = sum(cell.status == "ok" for cell in group)
        progress.step(
            f"n={n:<9,} {workload.name:<{width}} {ok}/{len(group)} libraries "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        for cell in group:
            if cell.status == "error":
                progress.note(f"error: {cell.library}: {cell.reason}")

    results: list[Cell] = []
    overhead: dict[str, float] = {}
    for n in config.sizes:
        data = KeyData.generate(n, config.seed)
        overhead[str(n)] = _loop_overhead(data, config.budget)
        for workload in workloads:
            t0 = time.perf_counter()
            group = _run_group(workload, data, adapters, missing, config, progress)
            results += group
            step(n, workload, group, t0)
        del data
    limiter_results: list[Cell] = []
    for limiter_workload in limiter_workloads:
        for n in limiter_workload.sizes(config.sizes):
            t0 = time.perf_counter()
            keys = LimiterKeys.generate(n, config.seed)
            group = _run_group(limiter_workload, keys, limiters, limiters_missing, config, progress)
            limiter_results += group
            step(n, limiter_workload, group, t0)
    memory: dict[str, Any] | None = None
    if config.memory_n:
        t0 = time.perf_counter()
        memory = _memory(config, config.memory_n, adapters, missing)
        progress.step(f"memory n={config.memory_n:,} ({time.perf_counter() - t0:.1f}s)")
    meta = _machine()
    meta.update(
        command=config.command,
        mode=config.mode,
        sizes=list(config.sizes),
        repeats=config.repeats,
        target_ms=config.target_ms,
        seed=config.seed,
        loop_overhead_ns=overhead,
        versions={a.name: a.version() for a in adapters if a.name not in missing},
        duration_s=time.perf_counter() - started,
    )
    report: dict[str, Any] = {
        "schema": 1,
        "meta": meta,
        "baseline": config.baseline,
        "libraries": [
            {
                **_presence(a, missing),
                "policy": a.policy,
                "read_refreshes": a.read_refreshes,
                "threadsafe": a.threadsafe,
                "native": a.native,
                "reference": a.reference,
                "bounded": a.bounded,
                "injectable_clock": a.injectable_clock,
                "notes": list(a.notes),
            }
            for a in adapters
        ],
        "workloads": [
            {"name": w.name, "title": w.title, "kind": w.kind, "plotted": w.plotted}
            for w in workloads
        ],
        "results": [cell.to_json() for cell in results],
        "memory": memory,
        "limiters": _limiter_report(
            config, limiters, limiter_workloads, limiters_missing, limiter_results
        ),
    }
    report["redis"] = _redis_round_trips(config.redis_seconds, log)
    report["asgi"] = _asgi_section(config, log)
    report["memoize"] = _memoize_section(config, log)
    report["targets"] = _targets.check(report)
    return report


def _redis_round_trips(seconds: float, log: TextIO) -> dict[str, Any] | None:
    """Round trips per second of the Redis backends (and ``limits``' Redis storage), measured
    against a loopback ``redis-server`` started here; None, with a note, if there is none."""
    if not seconds:
        return None
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis round trips: skipped (no redis-server on PATH)", file=log)
        return {"status": "skipped: no redis-server on PATH", "rows": []}
    try:
        from benchmarks import bench_redis
        from ttlstore.testing import RedisServer
    except ImportError as error:  # redis-py missing: the bench extra brings it
        print(f"redis round trips: skipped ({error})", file=log)
        return {"status": f"skipped: {error}", "rows": []}
    server = RedisServer(binary).start()
    try:
        rows = bench_redis.measure(server.url, seconds)
    finally:
        server.close()
    print(f"redis round trips: {len(rows)} cases measured", file=log)
    return {"status": "ok", "rows": [dataclasses.asdict(row) for row in rows]}


def _asgi_section(config: Config, log: TextIO) -> dict[str, Any] | None:
    """µs per request of each ASGI middleware stack, ttlstore's and its peers' (see _asgi)."""
    if not config.asgi_requests:
        return None
    t0 = time.perf_counter()
    section = _asgi.measure(config.asgi_requests, config.repeats, log=log)
    print(f"asgi middlewares: measured ({time.perf_counter() - t0:.1f}s)", file=log, flush=True)
    return section


def _memoize_section(config: Config, log: TextIO) -> dict[str, Any] | None:
    """The memoize section (see ``benchmarks/_memoize.py``), at the smallest size."""
    if not config.memoizers:
        return None
    budget = config.budget
    settings = _memoize.Settings(
        n=min(config.sizes),
        repeats=config.repeats,
        target_ns=budget.target_ns,
        min_ops=budget.min_ops,
        max_ops=budget.max_ops,
        threads=config.stampede[0],
        tasks=config.stampede[1],
    )
    return _memoize.run(settings, log, config.memoizers)


def _presence(library: Library, missing: dict[str, str]) -> dict[str, Any]:
    """What the report says of any library: name, module, version, and whether it loaded."""
    return {
        "name": library.name,
        "module": library.module,
        "version": library.version() if library.name not in missing else None,
        "status": "missing" if library.name in missing else "ok",
        "error": missing.get(library.name),
    }


def _limiter_report(
    config: Config,
    limiters: Sequence[LimiterAdapter],
    workloads: Sequence[LimiterWorkload],
    missing: dict[str, str],
    results: list[Cell],
) -> dict[str, Any] | None:
    """The "Rate limiters" part of the report (None when no limiter workload ran)."""
    if not workloads:
        return None
    return {
        "baseline": config.limiter_baseline,
        "libraries": [
            {
                **_presence(a, missing),
                "algorithm": a.algorithm,
                "threadsafe": a.threadsafe,
                "notes": list(a.notes),
            }
            for a in limiters
        ],
        "workloads": [
            {"name": w.name, "title": w.title, "kind": w.kind, "sizes": list(w.sizes(config.sizes))}
            for w in workloads
        ],
        "results": [cell.to_json() for cell in results],
    }


def write(report: dict[str, Any], out: Path, plot: bool, log: TextIO = sys.stderr) -> str:
    """Write ``latest.md``, ``latest.json`` and (if asked) ``latest.png`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = _report.markdown(report)
    (out / "latest.md").write_text(text, encoding="utf-8")
    _report.write_json(report, out / "latest.json")
    print(f"wrote {out / 'latest.md'} and {out / 'latest.json'}", file=log)
    if plot:
        print(_report.plot(report, out / "latest.png"), file=log)
    return text


def _parse(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=(
            "Compare ttlstore with peer TTL caches (ns/op, memory per entry) and rate limiters "
            "(ns per acquire)."
        ),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="n = 1 000 and 10 000, short samples (for CI)"
    )
    mode.add_argument("--full", action="store_true", help="add n = 1 000 000 (needs ~4 GB RAM)")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="N", help="sizes to run")
    parser.add_argument("--repeats", type=int, metavar="R", help="interleaved rounds per cell")
    parser.add_argument("--target-ms", type=float, metavar="MS", help="duration of one sample")
    parser.add_argument(
        "--memory-n", type=int, metavar="N", help="size of the memory measurement (0: skip it)"
    )
    parser.add_argument(
        "--redis-seconds",
        type=float,
        metavar="S",
        help="budget per Redis round-trip case (0: skip; needs redis-server on PATH)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, default=SCRATCH_DIR, help="output directory (default: .bench/)"
    )
    where.add_argument(
        "--refresh",
        action="store_true",
        help=f"write the committed results in {RESULTS_DIR.parent.name}/{RESULTS_DIR.name}/",
    )
    parser.add_argument(
        "--asgi-requests",
        type=int,
        metavar="N",
        help="requests per sample of the ASGI middleware section (0: skip it)",
    )
    parser.add_argument(
        "--no-rss", action="store_true", help="skip the resident-set measurement (child processes)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw latest.png")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also time the store registered with ttlstore.metrics, and the plain one again",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL if args.full else DEFAULT
    changes: dict[str, Any] = {
        "out": RESULTS_DIR if args.refresh else args.out,
        "plot": not args.no_plot,
        "rss": not args.no_rss,
        "command": " ".join(["python -m benchmarks.compare", *argv]),
    }
    if args.sizes:
        if any(n < 1 for n in args.sizes):
            parser.error("--sizes must be positive")
        changes["sizes"] = tuple(args.sizes)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        changes["repeats"] = args.repeats
    if args.target_ms is not None:
        changes["target_ms"] = args.target_ms
    if args.redis_seconds is not None:
        if args.redis_seconds < 0:
            parser.error("--redis-seconds must not be negative")
        changes["redis_seconds"] = args.redis_seconds
    if args.memory_n is not None:
        changes["memory_n"] = args.memory_n or None
    if args.asgi_requests is not None:
        if args.asgi_requests < 0:
            parser.error("--asgi-requests must not be negative")
        changes["asgi_requests"] = args.asgi_requests
    if args.metrics:
        at = [a.name for a in config.adapters].index(config.baseline) + 1
        changes["adapters"] = (*config.adapters[:at], *METRICS_ADAPTERS, *config.adapters[at:])
    return replace(config, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    config = _parse(sys.argv[1:] if argv is None else argv)
    report = run(config)
    text = write(report, config.out, config.plot)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
