"""Helpers for testing services built on ttlstore: a fake clock and a throwaway redis-server.

Nothing here is imported by ``import ttlstore``; the project's own tests and benchmarks use
these same helpers.

::

    clock = FakeClock()
    store = TTLStore(100, ttl=60, clock=clock)
    clock.advance(61)  # every entry written before is now expired

    with RedisServer() as server:  # needs redis-server on PATH
        limiter = RedisTokenBucketLimiter.from_url(server.url, 10, 20)
"""

from __future__ import annotations

import math
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

__all__ = ["FakeClock", "RedisServer", "RedisServerError", "free_port", "ping"]


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


class RedisServerError(RuntimeError):
    """A throwaway redis-server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One throwaway ``redis-server`` on a free loopback port, without persistence.

    Use it as a context manager (or :meth:`start` and :meth:`close`); its files live in a
    temporary folder removed on close. :meth:`pause` and :meth:`resume` freeze and thaw it
    (SIGSTOP/SIGCONT), to test what a service does while Redis stops answering.

    :param binary: the ``redis-server`` executable; found on ``PATH`` when None.
    :param args: extra ``redis-server`` arguments, e.g. ``("--maxmemory", "10mb")``.
    :param start_timeout: seconds to wait for the first PING answer.
    """

    def __init__(self, binary: str | None = None, *args: str, start_timeout: float = 10.0) -> None:
        found = binary if binary is not None else shutil.which("redis-server")
        if found is None:
            raise RedisServerError("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = found
        self.args = args
        self.start_timeout = start_timeout
        self.dir = tempfile.TemporaryDirectory(prefix="ttlstore-redis-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, port: int) -> list[str]:
        """The command line that starts the server on ``port``."""
        return [
            self.binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir.name,
            *self.args,
        ]

    def start(self) -> RedisServer:
        """Start on a free port and wait until it answers PING; retries a port lost to a race."""
        error = ""
        for _ in range(3):
            self.port = free_port()
            self.process = subprocess.Popen(
                self.command(self.port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            error = self._wait_for_ping()
            if not error:
                return self
            self.stop()
        raise RedisServerError(f"redis-server did not start: {error}")

    def _wait_for_ping(self) -> str:
        """Empty once the server answers PING, else why it did not."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                return f"exited with {self.process.returncode}: {output.decode(errors='replace')}"
            if ping(self.port):
                return ""
            time.sleep(0.02)
        return f"no PONG on port {self.port} within {self.start_timeout} s"

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted, nothing is answered."""
        assert self.process is not None, "the server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused process (SIGCONT)."""
        assert self.process is not None, "the server is not running"
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
        """Stop the server and remove its folder."""
        self.stop()
        self.dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server on 127.0.0.1:``port`` answers PING now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
