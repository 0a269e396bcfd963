"""TTLStore: a bounded mapping with per-entry TTL, LRU eviction and removal callbacks.

Layout: an ``OrderedDict`` from key to one small :class:`~ttlstore._deadlines.Entry` keeps the
recency order (least recently used first), and a :class:`~ttlstore._deadlines.DeadlineIndex`
finds due entries without scanning. Reads check the entry's own deadline, so the index only
decides *when memory is reclaimed*, never what is visible.

This module holds the constructor (argument checks, the real signature) and the class users
see; every method is :class:`~ttlstore._core.StoreCore`'s, which mypyc compiles (see
``ttlstore.compiled``); this module always runs interpreted. One class serves both
``threadsafe=True`` and ``False``: ``__init__`` picks the lock, or none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from typing import TYPE_CHECKING, Any, SupportsFloat, TypeVar, overload

from ttlstore._checks import positive_int, ttl_or_none
from ttlstore._core import StoreCore
from ttlstore._interpreted import INTERPRETED, METHODS
from ttlstore._slot import Slot
from ttlstore._types import (
    DEFAULT_TTL,
    RemovalCause,
    RemovalListener,
    StoreDefault,
    StoreStats,
)
from ttlstore._views import StoreItemsView, StoreValuesView

__all__ = [
    "DEFAULT_TTL",
    "RemovalCause",
    "RemovalListener",
    "Slot",
    "StoreDefault",
    "StoreStats",
    "TTLStore",
]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")
R = TypeVar("R")


class TTLStore(StoreCore, MutableMapping[K, V]):
    """A bounded mapping whose entries expire after a TTL and are evicted least recently used.

    ``len(store) <= maxsize`` always; with ``weigher``, the total weight stays ``<= maxweight``.
    An entry at or past its deadline is invisible to every method, reclaimed or not.

    :param maxsize: the most entries held at once (a positive int).
    :param ttl: default seconds an entry lives after it is written; ``None`` for no expiry.
    :param sliding: a successful read renews the entry's deadline (time-to-idle); needs ``ttl``.
    :param maxweight: bound on the sum of ``weigher(key, value)`` over all entries.
    :param weigher: the weight of one entry, a non-negative number; needs ``maxweight``.
    :param clock: seconds as a float from a monotonic source; inject a fake one in tests.
    :param on_remove: called as ``on_remove(key, value, cause)`` for every removal, after the
        store's lock is released; an exception in it is logged on logger ``ttlstore``.
    :param threadsafe: every public method is atomic under one lock (also without a GIL).
        ``False`` drops the lock, for use from one thread or one event loop.

    TTLStore is final (its compiled build cannot be subclassed): wrap it instead.
    """

    # The weak reference slot lives here, not in the compiled StoreCore (see there). The
    # other two serve the interpreted build's fast paths (ttlstore._interpreted).
    __slots__ = ("__weakref__", "_plain_get", "_plain_set")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The compiled build refuses subclasses; the pure one says so too, so both behave alike.
        raise TypeError("TTLStore is not designed for subclassing; wrap it instead")

    def __init__(
        self,
        maxsize: int,
        ttl: SupportsFloat | None = None,
        *,
        sliding: bool = False,
        maxweight: float | None = None,
        weigher: Callable[[K, V], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_remove: RemovalListener[K, V] | None = None,
        threadsafe: bool = True,
    ) -> None:
        maxsize = positive_int("maxsize", maxsize)
        seconds = ttl_or_none("ttl", ttl)
        if sliding and seconds is None:
            raise ValueError(
                f"sliding={sliding!r} needs a ttl to renew (got ttl=None): give ttl=seconds, "
                "or per-entry TTLs with set(..., ttl=...) and no sliding"
            )
        if (weigher is None) != (maxweight is None):
            raise ValueError(
                f"weigher and maxweight go together, got weigher={weigher!r}, "
                f"maxweight={maxweight!r}"
            )
        if maxweight is not None:
            if isinstance(maxweight, bool) or not isinstance(maxweight, (int, float)):
                raise TypeError(f"maxweight must be a positive number, got {maxweight!r}")
            if not maxweight > 0:
                raise ValueError(f"maxweight must be a positive number, got {maxweight!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        if on_remove is not None and not callable(on_remove):
            raise TypeError(f"on_remove must be callable or None, got {on_remove!r}")
        if not isinstance(threadsafe, bool):
            raise TypeError(f"threadsafe must be a bool, got {threadsafe!r}")
        super().__init__(
            maxsize, seconds, bool(sliding), maxweight, weigher, clock, on_remove, threadsafe
        )
        self._plain_get = None if threadsafe or sliding else self._lookup
        self._plain_set = not threadsafe and weigher is None and on_remove is None

    if not TYPE_CHECKING and INTERPRETED:
        # The interpreted build's faster bodies (see ttlstore._interpreted).
        get = METHODS["get"]
        __getitem__ = METHODS["__getitem__"]
        set = METHODS["set"]
        __setitem__ = METHODS["__setitem__"]

    if TYPE_CHECKING:
        # The typed API, for type checkers only: at run time every method is StoreCore's,
        # which is not Generic (see ttlstore._core) and documents each one.

        def get(self, key: K, default: D | None = None) -> V | D | None: ...  # type: ignore[override]
        def __getitem__(self, key: K) -> V: ...
        def peek(self, key: K, default: D | None = None) -> V | D | None: ...
        def set(
            self, key: K, value: V, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL
        ) -> None: ...
        def __setitem__(self, key: K, value: V) -> None: ...
        def add(
            self, key: K, value: V, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL
        ) -> bool: ...
        def setdefault(  # type: ignore[override]
            self, key: K, default: V, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL
        ) -> V: ...
        def compute(self, key: K, fn: Callable[[Slot[K, V]], R]) -> R: ...
        def __delitem__(self, key: K) -> None: ...
        @overload  # type: ignore[override]
        def pop(self, key: K) -> V: ...
        @overload
        def pop(self, key: K, default: V) -> V: ...
        @overload
        def pop(self, key: K, default: D) -> V | D: ...
        def pop(self, key: K, default: Any = ...) -> Any: ...
        def popitem(self) -> tuple[K, V]: ...
        def touch(self, key: K, ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL) -> bool: ...
        def ttl(self, key: K) -> float | None: ...
        # The core takes any object and checks it at run time, naming it.
        def expire(self, limit: int | None = None) -> int: ...  # type: ignore[override]
        def get_or_set(
            self,
            key: K,
            factory: Callable[[], V],
            ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
        ) -> V: ...
        def __iter__(self) -> Iterator[K]: ...

    def keys(self) -> KeysView[K]:
        """A view of the live keys; iteration takes a snapshot. O(1), O(n) to iterate."""
        return KeysView(self)

    def items(self) -> ItemsView[K, V]:
        """A view of the live items, iterated from a snapshot without touching recency.

        O(1), O(n) to iterate; ``(k, v) in items`` is O(1).
        """
        return StoreItemsView(self, self._snapshot_items, self.peek)

    def values(self) -> ValuesView[V]:
        """A view of the live values, iterated from a snapshot without touching recency.

        O(1), O(n) to iterate or to test membership.
        """
        return StoreValuesView(self, self._snapshot_items)
