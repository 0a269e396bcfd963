"""The comparison command (benchmarks/compare.py) in a tiny mode: correctness, not timing."""

from __future__ import annotations

import importlib.util
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _targets, compare
from benchmarks._memory import rss_bytes_per_entry
from benchmarks._peers import ADAPTERS, Adapter, Op
from benchmarks._workloads import WORKLOADS, KeyData, Stream

N = 200


class _Missing(Adapter):
    name = "nosuchlib.Cache"
    module = "nosuchlib_ttlstore_test_absent"
    distribution = "nosuchlib"
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("c[k] = v")


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
        command="test",
    )


def _present() -> list[Adapter]:
    present = []
    for adapter in ADAPTERS:
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
    for workload in WORKLOADS:
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
    assert len(mine) == len(WORKLOADS)
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
    for workload in WORKLOADS:
        assert f"## {workload.name}:" in text
    for adapter in ADAPTERS:
        assert f"`{adapter.name}`" in text
    assert "## Memory per entry" in text
    assert "†" in text  # FIFO peers are marked


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
    assert compare.main([*argv, "--no-plot", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "## get-hit:" in printed
    assert (tmp_path / "latest.md").read_text(encoding="utf-8") == printed
    assert json.loads((tmp_path / "latest.json").read_text(encoding="utf-8"))["memory"] is None


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
