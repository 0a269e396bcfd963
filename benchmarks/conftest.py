"""Fixtures of the pytest-benchmark suites: a throwaway redis-server for the Redis round trips.

Without ``redis-server`` (or redis-py) the Redis benchmarks skip with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ttlstore.testing import RedisServer, RedisServerError


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("redis-py is not installed (pip install 'ttlstore[redis]')")
    try:
        server = RedisServer().start()
    except RedisServerError as error:
        pytest.skip(str(error))
    try:
        yield server
    finally:
        server.close()
