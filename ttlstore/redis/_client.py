"""Plumbing both Redis backends share: the client, key names, fault logging, ``from_url``.

Names here are public to the ``ttlstore.redis`` package only (the module is private).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from importlib import resources
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ttlstore._checks import positive_seconds

logger = logging.getLogger("ttlstore")

C = TypeVar("C")  # the redis-py client type
S = TypeVar("S")  # the redis-py script type
S_co = TypeVar("S_co", covariant=True)
T = TypeVar("T", bound="Connected[Any, Any]")

FAILURES = (RedisError, OSError)  # redis-py wraps socket errors; OSError for the odd one out
# Error replies that say "not now" rather than "never": the failure policies apply to these.
# Any other error reply (WRONGTYPE on a foreign key, a script bug) is raised as it is, since
# failing open on it would hide it forever.
TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


def script_source(name: str) -> str:
    """The text of the Lua script ``name`` shipped beside this module."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def text(value: object) -> str:
    """A reply element as str, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_bytes(value: object) -> bytes:
    """A reply element as bytes, whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected a bulk string reply from Redis, got {value!r}")


def describe(error: BaseException) -> str:
    """``Type: message`` (redis-py 8's exception repr drops the message)."""
    return f"{type(error).__name__}: {error}"


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r}")
    if not prefix or "{" in prefix or "}" in prefix:
        # A brace in the prefix would become every key's hash tag: one Cluster slot for all.
        raise ValueError(f"prefix must be a non-empty str without braces, got {prefix!r}")
    return prefix


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {key!r}")
    return key


def hash_tag(key: str) -> str:
    """``key`` with its braces escaped (injectively), so that the whole key is the Cluster hash
    tag: a ``}`` in it would otherwise end the tag early and skew keys onto one slot. The empty
    key becomes ``\\e``, which no other key escapes to: an empty tag ``{}`` is no tag at all
    (Redis would hash the whole name, and each key of one logical key would get its own slot).
    """
    if "{" not in key and "}" not in key and "\\" not in key:
        return key or "\\e"  # an escaped key always holds a backslash, this one none
    return key.replace("\\", "\\\\").replace("{", "\\(").replace("}", "\\)")


def millis(name: str, seconds: object) -> int:
    """Positive finite ``seconds`` as whole milliseconds, rounded up; errors name ``name``."""
    return max(1, math.ceil(positive_seconds(name, seconds) * 1000))


# What a node connection of a sync RedisCluster reads with when none was given: redis.Redis's
# default (None before redis-py 6, 5 s since).
_DEFAULT_SOCKET_TIMEOUT = inspect.signature(redis.Redis).parameters["socket_timeout"].default


def _unbounded(client: object) -> bool:
    """Whether ``client`` says it reads without a timeout (False when it does not say)."""
    get = getattr(client, "get_connection_kwargs", None)  # every redis-py client has it
    try:
        kwargs = get() if callable(get) else None
    except Exception:
        return False
    if not isinstance(kwargs, dict):
        return False
    if "socket_timeout" in kwargs:
        return kwargs["socket_timeout"] is None
    # A sync RedisCluster lists only the arguments it was given.
    return isinstance(client, redis.cluster.RedisCluster) and _DEFAULT_SOCKET_TIMEOUT is None


class Tally:
    """Counts of named events, safe to bump from several threads: what ``stats()`` reports."""

    __slots__ = ("_counts", "_lock")

    def __init__(self, *names: str) -> None:
        self._counts = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Scripting(Protocol[S_co]):
    """A redis-py client (sync or asyncio, standalone or Cluster): it can register scripts."""

    def register_script(self, script: str) -> S_co: ...


class Connected(Generic[C, S]):
    """What both backends share: the client, the key prefix, and ``from_url``."""

    _ASYNC: ClassVar[bool]
    _SUFFIX: ClassVar[str]
    # __weakref__: ttlstore.metrics holds registered backends weakly.
    __slots__ = ("__weakref__", "_client", "_prefix")

    def __init__(self, client: C, prefix: str) -> None:
        if not callable(getattr(client, "register_script", None)):
            raise TypeError(f"client must be a redis-py client, got {client!r}")
        self._client = client
        self._prefix = check_prefix(prefix)
        if _unbounded(client):
            logger.warning(
                "%s: the Redis client has no socket_timeout, so a server that stops answering "
                "blocks every call; pass socket_timeout= and socket_connect_timeout=",
                type(self).__name__,
            )

    def _register(self, source: str) -> S:
        return cast("Scripting[S]", self._client).register_script(source)

    def _key(self, key: str) -> str:
        return f"{self._prefix}:{{{hash_tag(check_key(key))}}}:{self._SUFFIX}"

    @property
    def client(self) -> C:
        """The redis-py client (close it when done if ``from_url`` made it)."""
        return self._client

    @property
    def prefix(self) -> str:
        """The prefix of every key written."""
        return self._prefix

    @classmethod
    def from_url(
        cls: type[T],
        url: str,
        *args: Any,
        timeout: float = 0.25,
        retries: int = 1,
        cluster: bool = False,
        **kwargs: Any,
    ) -> T:
        """An instance on a new client for ``url`` with bounded timeouts.

        The client gets ``socket_timeout`` and ``socket_connect_timeout`` of ``timeout``
        seconds and ``retries`` immediate retries (one covers a pooled connection the server
        closed), so a failing call surfaces within about ``(retries + 1) * 2 * timeout``.
        With ``cluster=True`` the client is a ``redis.cluster.RedisCluster`` (asyncio:
        ``redis.asyncio.cluster.RedisCluster``) that discovers the Cluster from the node at
        ``url``; the sync one connects at once, so an unreachable Cluster raises here. On a
        Cluster a failing call may also spend a topology refresh per attempt. ``args`` and
        ``kwargs`` go to the constructor. The caller closes :attr:`client`.
        """
        timeout = positive_seconds("timeout", timeout)
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be a non-negative int, got {retries!r}")
        if retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        if not isinstance(cluster, bool):
            raise TypeError(f"cluster must be a bool, got {cluster!r}")
        bounds: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        client: Any
        if cls._ASYNC:
            retry: Any = redis.asyncio.retry.Retry(NoBackoff(), retries)
            factory: Any = redis.asyncio.cluster.RedisCluster if cluster else redis.asyncio.Redis
        else:
            retry = redis.retry.Retry(NoBackoff(), retries)
            factory = redis.cluster.RedisCluster if cluster else redis.Redis
        client = factory.from_url(url, retry=retry, **bounds)
        return cls(client, *args, **kwargs)
