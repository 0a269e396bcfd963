"""Shared fixtures: a fake clock (no test sleeps for correctness) and real redis-servers.

``redis_server`` (session scope) is one server shared by every test that asks for it;
``fresh_redis_server`` starts a private one per test, for tests that stop or pause it.
``redis_cluster`` (session scope) is one Redis Cluster of three masters with a replica each,
started once (about 3 s); a test that kills a node restarts it before it ends. Without the
``redis-server`` or ``redis-cli`` binary (or redis-py) those tests skip with the reason; with
``CI=true`` in the environment they fail instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ttlstore.testing import FakeClock, RedisCluster, RedisServer, RedisServerError


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI: a Redis test that cannot run must not pass there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the Redis tests must run)", pytrace=False)
    pytest.skip(reason)


def _need_redis_py() -> None:
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("redis-py is not installed (pip install 'ttlstore[redis]')")


def _serving() -> Iterator[RedisServer]:
    """A started server, closed when the fixture ends."""
    _need_redis_py()
    try:
        server = RedisServer().start()
    except RedisServerError as error:
        _unavailable(str(error))
        raise
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The suite's shared server; each test uses fresh keys or flushes what it needs."""
    yield from _serving()


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A private server for one test, which may stop or pause it."""
    yield from _serving()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """The suite's shared Redis Cluster: 3 masters with one replica each, node timeout 2 s."""
    _need_redis_py()
    try:
        cluster = RedisCluster().start()
    except RedisServerError as error:
        _unavailable(str(error))
        raise
    try:
        yield cluster
    finally:
        cluster.close()
