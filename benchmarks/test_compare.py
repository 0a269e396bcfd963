"""The comparison command (benchmarks/compare.py) in a tiny mode: correctness, not timing."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _memoize, _targets, compare
from benchmarks._limiters import LIMITERS, ROOMY, TIGHT, LimiterAdapter, TokenBucketSafe
from benchmarks._memory import rss_bytes_per_entry
from benchmarks._peers import ADAPTERS, BASELINE, Adapter, Op
from benchmarks._workloads import WORKLOADS, KeyData, LimiterWorkload, Stream, Workload

N = 200
STORE_WORKLOADS = [w for w in WORKLOADS if w.kind == "store"]
LIMITER_WORKLOADS = [w for w in WORKLOADS if isinstance(w, LimiterWorkload)]


class _Missing(Adapter):
    name = "nosuchlib.Cache"
    module = "nosuchlib_ttlstore_test_absent"
    distribution = "nosuchlib"
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("c[k] = v")


class _MissingLimiter(LimiterAdapter):
    name = "nosuchlib.Limiter"
    module = "nosuchlib_ttlstore_test_absent"
    distribution = "nosuchlib"
    algorithm = "none"
    acquire_op = Op("acquire(k)", "acquire = c.acquire")


class _AlwaysRefuses(TokenBucketSafe):
    """A limiter adapter whose limiter refuses everything: the workloads must notice."""

    name = "ttlstore refusing"

    def make(self, quota: Any, keys: int) -> Any:
        return super().make(TIGHT, keys)

    def loop(self) -> Any:
        loop = super().loop()

        def drained(c: Any, keys: Any, writes: Any, v: int) -> int:
            c.acquire("spent")
            return int(loop(c, keys, writes, v))

        return drained


def _tiny(out: Path, adapters: tuple[Adapter, ...]) -> compare.Config:
    return replace(
        compare.QUICK,
        sizes=(N,),
        repeats=1,
        target_ms=0.2,
        min_ops=4,
        max_ops=2_000,
        memory_n=N,
        rss=False,
        out=out,
        adapters=adapters,
        limiters=(*LIMITERS, _MissingLimiter()),
        redis_seconds=0.02,
        stampede=(8, 30),
        command="test",
    )


def _present(adapters: Any = ADAPTERS) -> list[Any]:
    present = []
    for adapter in adapters:
        try:
            adapter.load()
        except Exception:
            continue
        present.append(adapter)
    return present


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("compare")
    config = _tiny(out, (*ADAPTERS, _Missing()))
    log = io.StringIO()
    report = compare.run(config, log=log)
    compare.write(report, out, plot=True, log=log)
    return report, out


def test_every_library_and_workload_is_reported(
    tiny_report: tuple[dict[str, Any], Path],
) -> None:
    _, out = tiny_report
    report = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    names = [a.name for a in (*ADAPTERS, _Missing())]
    assert [lib["name"] for lib in report["libraries"]] == names
    cells = {(c["workload"], c["library"], c["n"]): c for c in report["results"]}
    assert {c["workload"] for c in report["results"]} == {w.name for w in STORE_WORKLOADS}
    for workload in STORE_WORKLOADS:
        for name in names:
            assert (workload.name, name, N) in cells, (workload.name, name)
    errors = [c for c in report["results"] if c["status"] == "error"]
    assert not errors, errors
    for cell in report["results"]:
        if cell["status"] == "ok":
            assert cell["median"] > 0
            assert cell["min"] <= cell["median"] <= cell["max"]
            assert len(cell["samples_ns_per_op"]) == 1
        elif cell["status"] == "skipped":
            assert cell["reason"]
    meta = report["meta"]
    for key in ("platform", "cpu_count", "python_version", "date", "versions"):
        assert meta[key], key
    assert [m["library"] for m in report["memory"]["results"]] == names


def test_missing_peer_is_reported_not_fatal(tiny_report: tuple[dict[str, Any], Path]) -> None:
    report, out = tiny_report
    (lib,) = [lib for lib in report["libraries"] if lib["name"] == _Missing.name]
    assert lib["status"] == "missing"
    assert "ModuleNotFoundError" in lib["error"]
    mine = [c for c in report["results"] if c["library"] == _Missing.name]
    assert len(mine) == len(STORE_WORKLOADS)
    assert all(c["status"] == "missing" for c in mine)
    text = (out / "latest.md").read_text(encoding="utf-8")
    assert f"`{_Missing.name}`" in text
    assert "Missing (failed to import)" in text


def test_present_libraries_run_their_workloads(tiny_report: tuple[dict[str, Any], Path]) -> None:
    report, _ = tiny_report
    cells = {(c["workload"], c["library"]): c for c in report["results"]}
    for adapter in _present():
        for workload in ("get-hit", "get-miss", "set-update", "mixed"):
            assert cells[(workload, adapter.name)]["status"] == "ok", (workload, adapter.name)
        evict = cells[("set-evict", adapter.name)]["status"]
        assert evict == ("ok" if adapter.bounded else "skipped"), adapter.name
        expire = cells[("expire", adapter.name)]
        assert expire["status"] == ("ok" if adapter.injectable_clock else "skipped"), adapter.name


def test_markdown_has_a_table_per_workload(tiny_report: tuple[dict[str, Any], Path]) -> None:
    _, out = tiny_report
    text = (out / "latest.md").read_text(encoding="utf-8")
    for workload in STORE_WORKLOADS:
        assert f"\n## {workload.name}:" in text
    for adapter in ADAPTERS:
        assert f"`{adapter.name}`" in text
    assert "## Memory per entry" in text
    assert "†" in text  # FIFO peers are marked


def test_rate_limiters_are_reported(tiny_report: tuple[dict[str, Any], Path]) -> None:
    _, out = tiny_report
    report = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    section = report["limiters"]
    names = [a.name for a in (*LIMITERS, _MissingLimiter())]
    assert [lib["name"] for lib in section["libraries"]] == names
    assert section["baseline"] == "ttlstore.TokenBucketLimiter"
    sizes = {w["name"]: w["sizes"] for w in section["workloads"]}
    assert sizes == {"acquire-allowed": [1], "acquire-refused": [1], "acquire-keys": [N]}
    cells = {(c["workload"], c["library"], c["n"]): c for c in section["results"]}
    assert len(cells) == len(section["results"]) == 3 * len(names)
    present = {a.name for a in _present(LIMITERS)}
    assert {"ttlstore.TokenBucketLimiter", "ttlstore.TokenBucketLimiter(threadsafe=False)"} <= (
        present
    )
    for (workload, name, n), cell in cells.items():
        assert n in sizes[workload]
        if name in present:
            assert cell["status"] == "ok", cell
            assert cell["min"] <= cell["median"] <= cell["max"]
        else:
            assert cell["status"] == "missing", cell
    (lib,) = [lib for lib in section["libraries"] if lib["name"] == _MissingLimiter.name]
    assert (lib["status"], lib["version"]) == ("missing", None)
    assert "ModuleNotFoundError" in lib["error"]
    text = (out / "latest.md").read_text(encoding="utf-8")
    rates = text[text.index("\n## Rate limiters\n") :]
    for workload in LIMITER_WORKLOADS:
        assert f"\n### {workload.name}:" in rates
    for name in names:
        assert f"`{name}`" in rates
    assert "keys = 1 |" in rates
    # Without the bench extra, real peers are missing too: the line lists them all.
    missing_line = next(line for line in rates.splitlines() if line.startswith("Missing"))
    assert missing_line.startswith("Missing (failed to import): ")
    assert f"`{_MissingLimiter.name}`" in missing_line


def test_redis_round_trips_are_reported_or_said_to_be_skipped(
    tiny_report: tuple[dict[str, Any], Path],
) -> None:
    _, out = tiny_report
    redis = json.loads((out / "latest.json").read_text(encoding="utf-8"))["redis"]
    text = (out / "latest.md").read_text(encoding="utf-8")
    assert "\n## Redis round trips (loopback redis-server)\n" in text
    if shutil.which("redis-server") is None and os.environ.get("CI") != "true":
        assert redis["status"].startswith("skipped") and "Not measured" in text
        return
    assert redis["status"] == "ok"
    cases = [row["case"] for row in redis["rows"]]
    assert any("RedisTokenBucketLimiter.acquire" in case for case in cases)
    if importlib.util.find_spec("limits") is not None:  # only with the bench extra
        assert any(case.startswith("limits ") for case in cases)
    assert all(row["calls_per_second"] > 0 for row in redis["rows"])
    for case in cases:
        assert f"| {case} |" in text


def test_a_limiter_that_does_not_answer_as_the_workload_says_is_an_error(
    tmp_path: Path,
) -> None:
    workloads: tuple[Workload, ...] = tuple(LIMITER_WORKLOADS)
    config = replace(
        _tiny(tmp_path, ()),
        workloads=workloads,
        memory_n=None,
        limiters=(TokenBucketSafe(), _AlwaysRefuses()),
        memoizers=(),
    )
    log = io.StringIO()
    report = compare.run(config, log=log)
    status = {(c["workload"], c["library"]): c for c in report["limiters"]["results"]}
    assert status[("acquire-refused", "ttlstore refusing")]["status"] == "ok"
    for workload in ("acquire-allowed", "acquire-keys"):
        assert status[(workload, "ttlstore.TokenBucketLimiter")]["status"] == "ok"
        cell = status[(workload, "ttlstore refusing")]
        assert cell["status"] == "error"
        assert "allowed" in cell["reason"]
    assert "error: ttlstore refusing" in log.getvalue()
    assert report["results"] == [] and report["memory"] is None
    assert report["memoize"] is None


@pytest.mark.parametrize("adapter", _present(LIMITERS), ids=lambda a: a.name)
def test_limiter_adapters_do_what_they_say(adapter: LimiterAdapter) -> None:
    keys = KeyData.present_keys(20, seed=3)
    roomy = adapter.make(ROOMY, len(keys))
    try:
        assert adapter.loop()(roomy, keys * 5, (), 1) >= 0
        assert all(adapter.allowed(roomy, key) for key in keys)
        adapter.reset(roomy, keys[0])
        adapter.settle(roomy)
    finally:
        adapter.close(roomy)
    tight = adapter.make(TIGHT, 1)
    try:
        assert adapter.allowed(tight, "client")
        assert adapter.loop()(tight, ["client"] * 10, (), 1) >= 0
        assert not adapter.allowed(tight, "client")
        assert adapter.allowed(tight, "other")  # keys are independent
        adapter.reset(tight, "client")
        assert adapter.allowed(tight, "client")  # a reset key starts afresh
    finally:
        adapter.close(tight)


def test_plot_written(tiny_report: tuple[dict[str, Any], Path]) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed")
    _, out = tiny_report
    assert (out / "latest.png").stat().st_size > 0


@pytest.mark.parametrize("adapter", _present(), ids=lambda a: a.name)
def test_adapter_loops_do_what_they_say(adapter: Adapter) -> None:
    data = KeyData.generate(50, seed=7)
    store = adapter.make(50)
    try:
        adapter.fill(store, data.present)
        assert len(store) == 50
        for which in ("get", "set", "mixed"):
            keys, writes = Stream(data.mixed_keys, data.mixed_writes).take(100)
            assert adapter.loop(which)(store, keys, writes, 1) >= 0
        if adapter.bounded:
            keys, _ = Stream(data.universe, start=50).take(200)
            adapter.loop("set")(store, keys, [], 1)
            assert len(store) <= 50
    finally:
        adapter.close(store)


def test_cli_runs_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--sizes", "100", "--repeats", "1", "--target-ms", "0.2", "--memory-n", "0"]
    argv += ["--redis-seconds", "0"]
    assert compare.main([*argv, "--no-plot", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "## get-hit:" in printed
    assert "## Rate limiters" in printed
    assert (tmp_path / "latest.md").read_text(encoding="utf-8") == printed
    assert json.loads((tmp_path / "latest.json").read_text(encoding="utf-8"))["memory"] is None


def test_metrics_option_times_the_registered_store_beside_the_plain_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--sizes", "100", "--repeats", "1", "--target-ms", "0.2", "--memory-n", "0"]
    argv += ["--redis-seconds", "0", "--no-plot", "--out", str(tmp_path), "--metrics"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "latest.json").read_text(encoding="utf-8"))
    names = [lib["name"] for lib in report["libraries"]]
    assert names[:3] == [BASELINE, "ttlstore + metrics", "ttlstore (A/A control)"]
    for name in names[1:3]:
        cells = [c for c in report["results"] if c["library"] == name]
        assert len(cells) == len(STORE_WORKLOADS)
        assert all(c["status"] == "ok" for c in cells), cells
    section = printed.split("## Metrics registered (`--metrics`)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "%" in line]
    # One size: one row per workload, when the peer the ratios are taken to is installed.
    peer = importlib.util.find_spec("cachetools") is not None
    assert len(rows) == (len(STORE_WORKLOADS) if peer else 0)
    assert "`ttlstore + metrics`: largest change" in section or not peer


def test_quick_and_full_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--full"])


def test_rss_child_measures_a_store() -> None:
    (dict_adapter,) = [a for a in ADAPTERS if a.name == "dict"]
    value = rss_bytes_per_entry(dict_adapter, 2_000, seed=3)
    assert value is None or value >= 0


def test_targets_report_worst_ratio() -> None:
    def cell(workload: str, library: str, median: float) -> dict[str, Any]:
        return {
            "workload": workload,
            "library": library,
            "n": 1_000,
            "status": "ok",
            "median": median,
        }

    report = {
        "results": [
            cell("get-hit", "ttlstore", 100.0),
            cell("get-miss", "ttlstore", 100.0),
            cell("mixed", "ttlstore", 100.0),
            cell("get-hit", "cachetools.TTLCache", 400.0),
            cell("get-miss", "cachetools.TTLCache", 250.0),  # only 2.5x: not met
            cell("mixed", "cachetools.TTLCache", 900.0),
        ],
        "memory": None,
    }
    rows = [r for r in _targets.check(report) if r["target"].startswith("at least 3x")]
    assert len(rows) == 1
    (row,) = rows
    assert row["workload"] == "get-miss"
    assert row["ratio"] == pytest.approx(0.4)
    assert row["met"] is False


def test_memoize_section_is_reported(tiny_report: tuple[dict[str, Any], Path]) -> None:
    _, out = tiny_report
    section = json.loads((out / "latest.json").read_text(encoding="utf-8"))["memoize"]
    names = [m.name for m in _memoize.MEMOIZERS]
    assert [lib["name"] for lib in section["libraries"]] == names
    assert section["n"] == N
    cells = {(c["workload"], c["library"]): c for c in section["results"]}
    present = {lib["name"] for lib in section["libraries"] if lib["status"] == "ok"}
    assert {"ttlstore.cached", "functools.lru_cache"} <= present
    for memoizer in _memoize.MEMOIZERS:
        for workload, _, is_async in _memoize.WORKLOADS:
            cell = cells[(workload, memoizer.name)]
            if memoizer.name not in present:
                assert cell["status"] == "missing"
            elif memoizer.async_ if is_async else memoizer.sync:
                assert cell["status"] == "ok", cell
                assert cell["min"] <= cell["median"] <= cell["max"]
            else:
                assert cell["status"] == "skipped"
    stampede = {(r["library"], r["kind"]): r for r in section["stampede"]}
    assert stampede[("ttlstore.cached", "threads")]["calls"] == 1
    assert stampede[("ttlstore.cached", "tasks")]["calls"] == 1
    assert stampede[("ttlstore.cached", "tasks")]["callers"] == 30
    assert stampede[("functools.lru_cache", "tasks")]["status"] == "skipped"
    assert {row["target"] for row in section["targets"]} >= {
        "sync hit within 5x of functools.lru_cache",
        "stampede of 8 threads: 1 call",
        "stampede of 30 tasks: 1 call",
    }
    text = (out / "latest.md").read_text(encoding="utf-8")
    memo = text[text.index("\n## Memoization: decorators (n = 200)\n") :]
    assert "### Stampede: calls of the body when 8 threads / 30 tasks" in memo
    assert "### Targets of issue 10" in memo
    for name in names:
        assert f"`{name}`" in memo


def test_memoize_targets_are_ratios_of_medians() -> None:
    def cell(workload: str, library: str, median: float) -> dict[str, Any]:
        return {"workload": workload, "library": library, "status": "ok", "median": median}

    section = {
        "n": 1_000,
        "results": [
            cell("sync-hit", "ttlstore.cached", 200.0),
            cell("sync-hit", "functools.lru_cache", 50.0),  # 4x: met
            cell("sync-hit", "cachetools.cached+TTLCache", 500.0),  # 2.5x faster: not met
        ],
        "stampede": [
            {
                "library": "ttlstore.cached",
                "kind": "tasks",
                "callers": 10,
                "calls": 2,
                "status": "ok",
            },
        ],
    }
    rows = {row["target"]: row for row in _memoize.targets(section)}
    assert rows["sync hit within 5x of functools.lru_cache"]["met"] is True
    assert rows["sync hit within 5x of functools.lru_cache"]["ratio"] == pytest.approx(4.0)
    assert rows["sync hit at least 3x faster than cachetools.cached+TTLCache"]["met"] is False
    assert rows["stampede of 10 tasks: 1 call"]["met"] is False
    assert "async hit faster than async_lru" not in rows  # not measured: not reported
