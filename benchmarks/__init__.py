"""Benchmarks for ttlstore.

* ``bench_*.py``: pytest-benchmark suites (``pytest benchmarks --benchmark-only``).
* ``compare.py``: the side-by-side comparison with peer libraries
  (``python -m benchmarks.compare --help``); its parts live in ``_peers.py`` (one adapter per
  library), ``_workloads.py`` (one class per workload) and ``_report.py`` (Markdown, JSON, PNG).
"""
