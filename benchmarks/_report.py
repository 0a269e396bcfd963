"""Output of ``python -m benchmarks.compare``: Markdown tables, the JSON file, the PNG plot.

Everything here reads the JSON-ready report dict built by :func:`benchmarks.compare.run`, so the
tables and the plot can be rebuilt from ``latest.json`` alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import _asgi

Report = dict[str, Any]

FIFO_MARK = "†"
REFERENCE_MARK = "‡"


def _ns(value: float) -> str:
    if value < 10:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    ratio = value / base
    if ratio < 10:
        return f"{ratio:.2f}x"
    if ratio < 100:
        return f"{ratio:.1f}x"
    return f"{ratio:,.0f}x"


def _size(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def _label(lib: dict[str, Any]) -> str:
    label = f"`{lib['name']}`"
    if lib["reference"]:
        label += f" {REFERENCE_MARK}"
    elif not lib["read_refreshes"]:
        label += f" {FIFO_MARK}"
    return label


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "—"
    if cell["status"] == "ok":
        return f"{_ns(cell['median'])} ({_ns(cell['min'])}-{_ns(cell['max'])})"
    return {"missing": "missing", "skipped": "skip", "error": "error"}[cell["status"]]


def _table(header: list[str], align: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def markdown(report: Report) -> str:
    meta = report["meta"]
    libs = report["libraries"]
    base = report["baseline"]
    sizes: list[int] = meta["sizes"]
    cells = {(c["workload"], c["library"], c["n"]): c for c in report["results"]}
    overhead: dict[str, float] = meta["loop_overhead_ns"]
    out: list[str] = [
        "# ttlstore against its peers",
        "",
        f"`{meta['command']}` on {meta['date']} · {meta['platform']} · "
        f"{meta['cpu_count']} CPUs · {meta['python_implementation']} {meta['python_version']} · "
        f"ran {meta['duration_s']:.0f} s.",
        "",
        f"Each cell: median ns/op over {meta['repeats']} repeats interleaved across libraries "
        "(min-max in brackets). "
        f"**vs {base}**: that median divided by `{base}`'s at the same n (above 1x: slower "
        f"than {base}). The timing loop itself costs about "
        + ", ".join(f"{_ns(v)} ns (n = {_size(int(n))})" for n, v in overhead.items())
        + " per op, included in every figure.",
        "",
        "## Libraries",
        "",
    ]
    lib_rows = []
    for lib in libs:
        status = "ok" if lib["status"] == "ok" else f"**missing**: {lib['error']}"
        lib_rows.append(
            [
                _label(lib),
                lib["version"] or "—",
                lib["policy"],
                "yes" if lib["read_refreshes"] else "**no**",
                "yes" if lib["threadsafe"] else "no",
                "yes" if lib["injectable_clock"] else "no",
                status,
            ]
        )
    out += _table(
        ["library", "version", "eviction", "read refreshes", "thread-safe", "clock", "status"],
        ["---", "---", "---", "---", "---", "---", "---"],
        lib_rows,
    )
    out += [
        "",
        f"{FIFO_MARK} a read does not refresh recency (FIFO-like eviction): cheaper reads, a "
        f"weaker policy. {REFERENCE_MARK} reference point, not a store: `dict` has no bound and "
        "no expiry; the inline floor is an `OrderedDict` + `move_to_end` + one "
        "`time.monotonic()` per call, written in the loop itself.",
    ]
    out += _targets_table(report.get("targets") or [])
    out += _metrics_section(report, cells)
    for workload in report["workloads"]:
        out += ["", f"## {workload['name']}: {workload['title']}", ""]
        out += _workload_table(
            cells, workload["name"], [(lib["name"], _label(lib)) for lib in libs], sizes, base, "n"
        )
    memory = report.get("memory")
    if memory:
        out += _memory_table(memory, libs, base)
    notes = [(lib["name"], note) for lib in libs for note in lib["notes"]]
    if notes:
        out += ["", "## Notes on the peers", ""]
        out += [f"- `{name}`: {note}" for name, note in notes]
    missing = [lib["name"] for lib in libs if lib["status"] != "ok"]
    if missing:
        out += ["", "Missing (failed to import): " + ", ".join(f"`{m}`" for m in missing) + "."]
    limiters = report.get("limiters")
    if limiters:
        out += _limiter_section(limiters)
    out += _redis_section(report.get("redis"))
    out += _asgi.markdown(report.get("asgi"))
    out += _memoize_section(report.get("memoize"))
    return "\n".join(out) + "\n"


METRICS_LIBRARY = "ttlstore + metrics"
CONTROL_LIBRARY = "ttlstore (A/A control)"
METRICS_PEER = "cachetools.TTLCache"


def _metrics_section(
    report: Report, cells: dict[tuple[str, str, int], dict[str, Any]]
) -> list[str]:
    """``--metrics``: each workload's ratio to cachetools with and without metrics registered."""
    base = report["baseline"]
    names = {lib["name"] for lib in report["libraries"]}
    if not {METRICS_LIBRARY, CONTROL_LIBRARY} <= names:
        return []
    out = [
        "",
        "## Metrics registered (`--metrics`)",
        "",
        f"`{base}`, the same store registered with `ttlstore.metrics` (`{METRICS_LIBRARY}`) and "
        f"the plain store once more (`{CONTROL_LIBRARY}`), each as a ratio to `{METRICS_PEER}` "
        f"in this run; each change is against `{base}` (target for metrics: within 5 %). The "
        "control's change is what two identical stores differ by in this run: noise.",
        "",
    ]
    rows = []
    changes: dict[str, list[float]] = {METRICS_LIBRARY: [], CONTROL_LIBRARY: []}
    libraries = (base, METRICS_LIBRARY, CONTROL_LIBRARY)
    for workload in report["workloads"]:
        for n in report["meta"]["sizes"]:
            found = [cells.get((workload["name"], lib, n)) for lib in (*libraries, METRICS_PEER)]
            medians = [c["median"] for c in found if c is not None and c["status"] == "ok"]
            if len(medians) != len(found):
                continue
            plain, metered, control = (median / medians[-1] for median in medians[:-1])
            changes[METRICS_LIBRARY].append(metered / plain - 1)
            changes[CONTROL_LIBRARY].append(control / plain - 1)
            rows.append(
                [
                    workload["name"],
                    _size(n),
                    f"{plain:.3f}x",
                    f"{metered:.3f}x",
                    f"{metered / plain - 1:+.1%}",
                    f"{control:.3f}x",
                    f"{control / plain - 1:+.1%}",
                ]
            )
    out += _table(
        ["workload", "n", base, METRICS_LIBRARY, "change", CONTROL_LIBRARY, "change"],
        ["---", "---:", "---:", "---:", "---:", "---:", "---:"],
        rows,
    )
    for name, seen in changes.items():
        if seen:
            worst = max(seen, key=abs)
            median = sorted(seen)[len(seen) // 2]
            out += ["", f"`{name}`: largest change {worst:+.1%}, median {median:+.1%}."]
    return out


def _redis_section(redis: dict[str, Any] | None) -> list[str]:
    """The "Redis round trips" section: one row per case, or why it was skipped."""
    if redis is None:
        return []
    out = ["", "## Redis round trips (loopback redis-server)", ""]
    if redis["status"] != "ok":
        return [*out, f"Not measured ({redis['status']})."]
    out += ["| case | calls/s | µs/call |", "|---|---:|---:|"]
    out += [
        f"| {row['case']} | {row['calls_per_second']:,.0f} | {row['us_per_call']:.1f} |"
        for row in redis["rows"]
    ]
    return out


def _calls(count: float) -> str:
    return f"{count:.0f} call" + ("" if count == 1 else "s")


def _memoize_section(section: dict[str, Any] | None) -> list[str]:
    """The "Memoization" section: decorator hit/miss costs, stampede calls, targets."""
    if section is None:
        return []
    libs = section["libraries"]
    cells = {(c["workload"], c["library"]): c for c in section["results"]}
    out = [
        "",
        f"## Memoization: decorators (n = {_size(section['n'])})",
        "",
        "Each library memoizes `ident(k) -> k` with room for n entries (TTL one hour where it "
        "takes one). **hit**: `f(k)` / `await f(k)` over n cached keys; **miss**: a new key on "
        "a full cache (compute, store, evict). Median ns per call over the interleaved repeats "
        "(min-max in brackets), the timing loop included.",
        "",
    ]
    workloads = section["workloads"]
    rows = []
    for lib in libs:
        status = "" if lib["status"] == "ok" else f" (**missing**: {lib['error']})"
        row = [f"`{lib['name']}` {lib['version'] or ''}{status}".rstrip()]
        for workload in workloads:
            cell = cells.get((workload["name"], lib["name"]))
            row.append("—" if cell is None or cell["status"] == "skipped" else _cell(cell))
        rows.append(row)
    out += _table(
        ["library", *(w["name"] for w in workloads)],
        ["---"] + ["---:"] * len(workloads),
        rows,
    )
    stampede = {(r["library"], r["kind"]): r for r in section["stampede"]}
    threads = next((r["callers"] for r in section["stampede"] if r["kind"] == "threads"), 0)
    tasks = next((r["callers"] for r in section["stampede"] if r["kind"] == "tasks"), 0)
    out += [
        "",
        f"### Stampede: calls of the body when {threads} threads / {tasks} tasks miss one key "
        f"at once (the body takes {section['stampede_seconds'] * 1000:.0f} ms)",
        "",
    ]

    def calls(row: dict[str, Any] | None) -> str:
        if row is None or row["status"] == "skipped":
            return "—"
        if row["status"] != "ok":
            return row["status"]
        return str(row["calls"]) if row["calls"] == 1 else f"**{row['calls']}**"

    out += _table(
        ["library", f"{threads} threads", f"{tasks} tasks"],
        ["---", "---:", "---:"],
        (
            [
                f"`{lib['name']}`",
                calls(stampede.get((lib["name"], "threads"))),
                calls(stampede.get((lib["name"], "tasks"))),
            ]
            for lib in libs
        ),
    )
    targets = section.get("targets") or []
    if targets:
        out += ["", "### Targets of issue 10 (ratio = ttlstore's median / the peer's)", ""]
        out += _table(
            ["target", "measured", "limit", "met"],
            ["---", "---:", "---:", "---"],
            (
                [
                    row["target"],
                    _calls(row["ratio"]) if row["peer"] is None else f"{row['ratio']:.2f}x",
                    f"{row['limit']:.0f} call" if row["peer"] is None else f"{row['limit']:.2f}x",
                    "yes" if row["met"] else "**no**",
                ]
                for row in targets
            ),
        )
    notes = [(lib["name"], note) for lib in libs for note in lib["notes"]]
    if notes:
        out += [""]
        out += [f"- `{name}`: {note}" for name, note in notes]
    return out


def _workload_table(
    cells: dict[tuple[str, str, int], dict[str, Any]],
    workload: str,
    libs: list[tuple[str, str]],
    sizes: list[int],
    base: str,
    size_name: str,
) -> list[str]:
    """One row per ``(name, label)`` of ``libs``: median (min-max) and ratio to ``base``."""
    header = ["library"]
    for n in sizes:
        header += [f"{size_name} = {_size(n)}", f"vs {base}"]
    rows = []
    skipped: dict[str, str] = {}
    for lib, label in libs:
        row = [label]
        for n in sizes:
            cell = cells.get((workload, lib, n))
            base_cell = cells.get((workload, base, n))
            row.append(_cell(cell))
            ok = cell is not None and cell["status"] == "ok"
            base_ok = base_cell is not None and base_cell["status"] == "ok"
            row.append(
                _ratio(cell["median"], base_cell["median"])
                if ok and base_ok and cell is not None and base_cell is not None
                else "—"
            )
            if cell is not None and cell["status"] in ("skipped", "error"):
                skipped.setdefault(lib, f"{cell['status']}: {cell['reason']}")
        rows.append(row)
    out = _table(header, ["---"] + ["---:"] * (2 * len(sizes)), rows)
    if skipped:
        out += ["", "Not run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + "."]
    return out


def _limiter_section(section: dict[str, Any]) -> list[str]:
    """The "Rate limiters" section: acquire cost per call, one table per workload."""
    libs = section["libraries"]
    base = section["baseline"]
    cells = {(c["workload"], c["library"], c["n"]): c for c in section["results"]}
    out = [
        "",
        "## Rate limiters",
        "",
        "The cost of one acquire (cost 1) per call, timed as above: median ns/op over the "
        f"interleaved repeats (min-max in brackets); **vs {base}**: that median divided by "
        f"`{base}`'s. Every library holds each key to the same quota, *c* requests per *p* "
        "seconds (a token bucket of burst *c* refilled at *c*/*p* per second, or a window of "
        "*p* seconds admitting *c*), in its in-memory storage.",
        "",
    ]
    rows = []
    for lib in libs:
        status = "ok" if lib["status"] == "ok" else f"**missing**: {lib['error']}"
        rows.append(
            [
                f"`{lib['name']}`",
                lib["version"] or "—",
                lib["algorithm"],
                "yes" if lib["threadsafe"] else "no",
                status,
            ]
        )
    out += _table(
        ["library", "version", "algorithm", "thread-safe", "status"],
        ["---", "---", "---", "---", "---"],
        rows,
    )
    labels = [(lib["name"], f"`{lib['name']}`") for lib in libs]
    for workload in section["workloads"]:
        out += ["", f"### {workload['name']}: {workload['title']}", ""]
        out += _workload_table(cells, workload["name"], labels, workload["sizes"], base, "keys")
    notes = [(lib["name"], note) for lib in libs for note in lib["notes"]]
    if notes:
        out += ["", "### Notes on the rate limiters", ""]
        out += [f"- `{name}`: {note}" for name, note in notes]
    missing = [lib["name"] for lib in libs if lib["status"] != "ok"]
    if missing:
        out += ["", "Missing (failed to import): " + ", ".join(f"`{m}`" for m in missing) + "."]
    return out


def _targets_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [
        "",
        "## Targets (issue 4; issue 16 for the compiled build)",
        "",
        "Ratio = subject's median / peer's median in this run (worst case over the target's "
        "workloads and peers); met when at most the limit.",
        "",
    ]
    out += _table(
        ["target", "subject", "n", "ratio (where)", "limit", "met"],
        ["---", "---", "---:", "---", "---:", "---"],
        (
            [
                row["target"],
                f"`{row['subject']}`",
                _size(row["n"]),
                f"{row['ratio']:.2f}x ({row['workload']} vs `{row['peer']}`)",
                f"{row['limit']:.2f}x",
                "yes" if row["met"] else "**no**",
            ]
            for row in rows
        ),
    )
    return out


def _memory_table(memory: dict[str, Any], libs: list[dict[str, Any]], base: str) -> list[str]:
    rows_by_lib = {m["library"]: m for m in memory["results"]}
    base_row = rows_by_lib.get(base) or {}
    out = [
        "",
        f"## Memory per entry (n = {_size(memory['n'])}, str keys, small int values)",
        "",
        "**traced**: bytes tracemalloc sees allocated while one store is filled (keys allocated "
        "before). **RSS**: resident-set growth while a fresh process fills the same store "
        "(allocator overhead included, native memory included).",
        "",
    ]
    rows = []
    for lib in libs:
        row = rows_by_lib.get(lib["name"])
        if row is None:
            continue
        if row["status"] != "ok":
            rows.append([_label(lib), f"{row['status']}: {row['reason']}", "—", "—", "—"])
            continue
        traced = f"{row['bytes_per_entry']:.0f}" + (" *" if lib["native"] else "")
        rss = row["rss_bytes_per_entry"]
        if rss is not None:
            rss_text = f"{rss:.0f}"
        elif row["rss_error"]:
            rss_text = "error"
        else:
            rss_text = "—"
        rows.append(
            [
                _label(lib),
                traced,
                _ratio(row["bytes_per_entry"], base_row.get("bytes_per_entry")),
                rss_text,
                _ratio(rss, base_row.get("rss_bytes_per_entry")),
            ]
        )
    out += _table(
        ["library", "traced B/entry", f"vs {base}", "RSS B/entry", f"vs {base}"],
        ["---", "---:", "---:", "---:", "---:"],
        rows,
    )
    out += [
        "",
        "\\* part of the store lives in native (Rust) memory, which tracemalloc does not see: "
        "a lower bound; the RSS column sees it.",
    ]
    errors = [f"`{r['library']}`: {r['rss_error']}" for r in memory["results"] if r["rss_error"]]
    if errors:
        out += ["", "RSS not measured: " + "; ".join(errors) + "."]
    return out


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def plot(report: Report, path: Path) -> str:
    """Draw ns/op against n for the plotted workloads; return a message saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'ttlstore[bench]')"
    meta = report["meta"]
    workloads = [w for w in report["workloads"] if w["plotted"]]
    libs = report["libraries"]
    cells = {(c["workload"], c["library"], c["n"]): c for c in report["results"]}
    cols = 3
    rows = (len(workloads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    # One hue per package (tab20 pairs a dark and a light shade): variants share the hue.
    cmap = plt.get_cmap("tab20")
    families: dict[str, list[str]] = {}
    for lib in libs:
        families.setdefault(lib["module"], []).append(lib["name"])
    colors = {}
    for family_index, names in enumerate(families.values()):
        for shade, name in enumerate(names):
            colors[name] = cmap((2 * family_index + min(shade, 1)) % 20)
    handles: dict[str, Any] = {}
    for ax, workload in zip(axes.flat, workloads, strict=False):
        for lib in libs:
            points = [
                (n, cells[(workload["name"], lib["name"], n)]["median"])
                for n in meta["sizes"]
                if cells.get((workload["name"], lib["name"], n), {}).get("status") == "ok"
            ]
            if not points:
                continue
            is_ours = lib["name"].startswith("ttlstore")
            (line,) = ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                linewidth=2.8 if is_ours else 1.2,
                linestyle=":" if lib["reference"] else "-",
                color=colors[lib["name"]],
                label=lib["name"],
            )
            handles.setdefault(lib["name"], line)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(workload["name"])
        ax.set_xlabel("n (entries)")
        ax.set_ylabel("ns/op (median)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize="small")
    fig.suptitle(
        f"ttlstore vs peers · {meta['platform']} · {meta['cpu_count']} CPUs · "
        f"{meta['python_implementation']} {meta['python_version']} · {meta['date']}",
        fontsize="medium",
    )
    legend_rows = (len(handles) + 3) // 4
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
