"""Benchmarks for ttlstore.

* ``bench_*.py``: pytest-benchmark suites (``pytest benchmarks --benchmark-only``): the store,
  the sweepers, the rate limiter, the idempotency store and middleware, the Redis backends.
* ``compare.py``: the side-by-side comparison with peer libraries
  (``python -m benchmarks.compare --help``); its parts live in ``_peers.py`` (one adapter per
  store library), ``_limiters.py`` (one adapter per rate-limiter library), ``_workloads.py`` (one
  class per workload), ``_memory.py`` (bytes per entry), ``_targets.py`` (the ratio targets of
  the benchmark issue) and ``_report.py`` (Markdown, JSON, PNG). Redis round trips come from
  ``bench_redis.measure`` against a loopback ``redis-server``.
"""
