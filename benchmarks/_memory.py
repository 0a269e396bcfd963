"""Memory per entry, two ways.

* :func:`traced_bytes_per_entry`: tracemalloc, in this process. Exact for what goes through
  Python's allocator, blind to native (Rust) allocations.
* :func:`rss_bytes_per_entry`: growth of the resident set while a fresh child process
  (``python -m benchmarks._memory NAME N SEED``) fills one store. Sees everything, allocator
  overhead included, to page granularity: the figure that compares a Rust store with a
  pure-Python one.

In both, the keys exist before the measurement starts (same keys as the timing workloads), so
only the store's own structures count, including per-entry deadlines and nodes.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

from benchmarks._peers import ADAPTERS, Adapter
from benchmarks._workloads import KeyData

_ROOT = Path(__file__).resolve().parent.parent


def traced_bytes_per_entry(adapter: Adapter, keys: list[str]) -> float:
    """Bytes traced by tracemalloc per entry for a store holding ``keys``."""
    adapter.loop("set")  # compile outside the traced region
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = adapter.make(len(keys))
        try:
            adapter.fill(store, keys)
            after = tracemalloc.get_traced_memory()[0]
        finally:
            adapter.close(store)
    finally:
        tracemalloc.stop()
    return (after - before) / len(keys)


def _rss() -> int | None:
    """Resident set size in bytes (current on Linux, else peak), or ``None`` if unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes_per_entry(
    adapter: Adapter, n: int, seed: int, timeout: float = 300.0
) -> float | None:
    """RSS growth per entry of a store of ``n`` keys, measured in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._memory", adapter.name, str(n), str(seed)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
        raise RuntimeError(f"child failed: {lines[-1]}")
    answer = proc.stdout.strip()
    return None if answer == "None" else float(answer)


def _child(argv: Sequence[str]) -> int:
    name, n, seed = argv[0], int(argv[1]), int(argv[2])
    (adapter,) = [a for a in ADAPTERS if a.name == name]
    adapter.load()
    keys = KeyData.present_keys(n, seed)
    adapter.loop("set")
    adapter.close(adapter.make(16))  # import and first-use costs before the baseline
    gc.collect()
    before = _rss()
    store = adapter.make(n)
    adapter.fill(store, keys)
    after = _rss()
    if before is None or after is None:
        print("None")
    else:
        print((after - before) / n)
    adapter.close(store)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
