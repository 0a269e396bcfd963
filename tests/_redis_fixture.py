"""A real redis-server on a loopback port, started and stopped by the test suite.

``redis_server`` (session scope) is one server shared by every module that imports it: the
fixture functions are per module, so the server itself is kept here and stopped when pytest
ends. ``fresh_redis_server`` starts a private one per test, for tests that stop or pause it.

Without the ``redis-server`` binary (or redis-py) the tests that use them skip with the reason;
with ``CI=true`` in the environment a missing binary fails them instead, so CI cannot pass by
skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

BINARY = "redis-server"
START_TIMEOUT = 10.0


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI: a Redis test that cannot run must not pass there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the Redis tests must run)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, without persistence."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = tempfile.TemporaryDirectory(prefix="ttlstore-redis-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start on a free port and wait until it answers PING; retries a port lost to a race."""
        error = ""
        for _ in range(3):
            self.port = _free_port()
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir.name,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            error = self._wait_for_ping()
            if not error:
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not start: {error}")

    def _wait_for_ping(self) -> str:
        """Empty once the server answers PING, else why it did not."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                return f"exited with {self.process.returncode}: {output.decode(errors='replace')}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return ""
            except OSError:
                pass
            time.sleep(0.02)
        return f"no PONG on port {self.port} within {START_TIMEOUT} s"

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the process (if it is paused too) and wait for it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process.stdout is not None:
            process.stdout.close()

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()


def _binary() -> str:
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("redis-py is not installed (pip install 'ttlstore[redis]')")
    binary = shutil.which(BINARY)
    if binary is None:
        _unavailable(f"{BINARY} is not on PATH (apt-get install redis-server)")
    assert binary is not None
    return binary


_shared: RedisServer | None = None


@pytest.fixture(scope="session")
def redis_server(pytestconfig: pytest.Config) -> RedisServer:
    """The suite's shared server; each test flushes what it needs (use fresh keys)."""
    global _shared
    if _shared is None:
        server = RedisServer(_binary()).start()
        pytestconfig.add_cleanup(server.close)
        _shared = server

        def forget() -> None:
            global _shared
            _shared = None

        pytestconfig.add_cleanup(forget)
    return _shared


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A private server for one test, which may stop or pause it."""
    server = RedisServer(_binary()).start()
    try:
        yield server
    finally:
        server.close()
