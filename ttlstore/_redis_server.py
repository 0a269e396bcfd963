"""A throwaway redis-server for tests (public through :mod:`ttlstore.testing`), and a minimal
RESP client so that the helpers need no redis-py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import BinaryIO

__all__ = ["RedisServer", "RedisServerError", "call", "free_port", "ping", "pipeline"]


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

    Use it as a context manager (or :meth:`start` and :meth:`close`); its files, the log
    included, live in a temporary folder removed on close. :meth:`pause` and :meth:`resume`
    freeze and thaw it (SIGSTOP/SIGCONT), to test what a service does while Redis stops
    answering; :meth:`kill` crashes it (SIGKILL) and :meth:`restart` starts it again on the
    same port.

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
            # A log into a pipe nobody reads would block the server once the pipe is full.
            "--logfile",
            self.log_path,
            *self.args,
        ]

    @property
    def log_path(self) -> str:
        """The server's log file (in its folder)."""
        return os.path.join(self.dir.name, "redis.log")

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log, for error messages."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> RedisServer:
        """Start on a free port and wait until it answers PING; retries a port lost to a race."""
        error = ""
        for _ in range(3):
            self.port = self.choose_port()
            error = self._launch()
            if not error:
                return self
        raise RedisServerError(f"redis-server did not start: {error}")

    def restart(self) -> RedisServer:
        """Start a stopped or killed server again on the same port, with the same folder."""
        if self.process is not None:
            raise RedisServerError(f"redis-server on port {self.port} is still running")
        if not self.port:
            raise RedisServerError("the server was never started: call start()")
        error = self._launch()
        if error:
            raise RedisServerError(f"redis-server did not restart: {error}")
        return self

    def choose_port(self) -> int:
        """The port :meth:`start` tries next: a free one (a subclass may ask for more)."""
        return free_port()

    def _launch(self) -> str:
        """Start the process on :attr:`port`; empty once it answers PING, else why not."""
        self.process = subprocess.Popen(
            self.command(self.port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        error = self._wait_for_ping()
        if error:
            self.stop()
        return error

    def _wait_for_ping(self) -> str:
        """Empty once the server answers PING, else why it did not."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                return (
                    f"exited with {self.process.returncode}: "
                    f"{output.decode(errors='replace')}{self.log_tail()}"
                )
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

    @property
    def running(self) -> bool:
        """Whether the process was started and has not been stopped or killed."""
        return self.process is not None

    def kill(self) -> None:
        """Kill the process at once (SIGKILL): a crash, with no chance to save or hand over."""
        process, self.process = self.process, None
        if process is None:
            return
        process.kill()
        process.wait(5)
        if process.stdout is not None:
            process.stdout.close()

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


def call(port: int, *args: str | bytes | int, timeout: float = 2.0) -> object:
    """One command to the Redis server on 127.0.0.1:``port`` and its reply (RESP2), without
    redis-py. An error reply raises :class:`RedisServerError`."""
    return pipeline(port, args, timeout=timeout)[0]


def pipeline(
    port: int, *commands: tuple[str | bytes | int, ...], timeout: float = 2.0
) -> list[object]:
    """Several commands on one connection, and their replies."""
    request = b""
    for args in commands:
        parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
        request += b"*%d\r\n" % len(parts)
        request += b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        with sock.makefile("rb") as stream:
            return [reply(stream) for _ in commands]


def reply(stream: BinaryIO) -> object:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("the Redis server closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisServerError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [reply(stream) for _ in range(size)]
    raise ConnectionError(f"unexpected reply from Redis: {line!r}")
