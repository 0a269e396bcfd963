"""Helpers for testing services built on ttlstore: a fake clock, a throwaway redis-server and a
throwaway Redis Cluster.

Nothing here is imported by ``import ttlstore``; the project's own tests and benchmarks use
these same helpers.

::

    clock = FakeClock()
    store = TTLStore(100, ttl=60, clock=clock)
    clock.advance(61)  # every entry written before is now expired

    with RedisServer() as server:  # needs redis-server on PATH
        limiter = RedisTokenBucketLimiter.from_url(server.url, 10, 20)

    with RedisCluster() as cluster:  # 3 masters, 1 replica each; needs redis-cli too
        limiter = RedisTokenBucketLimiter.from_url(cluster.url, 10, 20, cluster=True)
        cluster.kill_master()  # its replica takes over within a few seconds
"""

from __future__ import annotations

import math

from ttlstore._redis_cluster import RedisCluster
from ttlstore._redis_server import RedisServer, RedisServerError, free_port, ping

__all__ = [
    "FakeClock",
    "RedisCluster",
    "RedisServer",
    "RedisServerError",
    "free_port",
    "ping",
]


class FakeClock:
    """A monotonic clock that moves only when told to: pass it as ``clock=`` to any ttlstore type.

    Calling it returns :attr:`now` (seconds as a float); :meth:`advance` moves it forward.
    """

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        if (
            isinstance(start, bool)
            or not isinstance(start, (int, float))
            or not math.isfinite(start)
        ):
            raise TypeError(f"start must be a finite number, got {start!r}")
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward; ``ValueError`` for a negative or NaN step."""
        if not seconds >= 0:
            raise ValueError(
                f"seconds must be >= 0 (a monotonic clock never goes back), got {seconds!r}"
            )
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"
