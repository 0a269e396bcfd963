"""get_or_set()'s single flight: one factory call per missing key, shared by its callers.

Functions of the store rather than methods, for the reason given in :mod:`ttlstore._steps`.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeAlias

from ttlstore._steps import hit, live, run, weigh
from ttlstore._writes import write

if TYPE_CHECKING:
    from ttlstore._core import StoreCore

__all__ = ["Flight"]

# Keys and values as the compiled core sees them (see ttlstore._steps).
K: TypeAlias = Any
V: TypeAlias = Any

_ASYNC_FACTORY = (
    "get_or_set() needs a plain factory, but {factory!r} returned an awaitable ({value!r}); "
    "for an async factory use `await ttlstore.memo.aget_or_set(store, key, factory)`"
)


class Flight:
    """One get_or_set() factory call in progress, which other callers of the key wait on."""

    __slots__ = ("done", "error", "owner", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.owner = threading.get_ident()
        self.value: Any = None
        self.error: BaseException | None = None


def claim(self: StoreCore, key: K) -> tuple[V | None, Flight | None, bool]:
    """Look ``key`` up for get_or_set: (value, None, _) on a hit, else its flight."""
    entry = live(self, key)
    if entry is not None:
        return hit(self, entry), None, False
    self._misses += 1
    flight = self._flights.get(key)
    if flight is not None:
        return None, flight, False
    flight = self._flights[key] = Flight()
    return None, flight, True


def land(self: StoreCore, key: K, flight: Flight) -> None:
    if self._flights.get(key) is flight:
        del self._flights[key]


def single_flight(self: StoreCore, key: K, factory: Callable[[], V], ttl: float | None) -> V:
    """The body of get_or_set(), with ``ttl`` checked: O(1) plus the one factory call."""
    found, flight, owner = run(self, claim, key)
    if flight is None:
        return found
    if not owner:
        if flight.owner == threading.get_ident():
            raise RuntimeError(f"get_or_set factory for {key!r} asked for its own key")
        flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value
    try:
        value = factory()
        if isinstance(value, Awaitable):
            if isinstance(value, Coroutine):
                value.close()  # never awaited by anyone: close it, so no warning leaks
            raise TypeError(_ASYNC_FACTORY.format(factory=factory, value=value))
        run(self, write, key, value, ttl, weigh(self, key, value), False)
    except BaseException as exc:
        flight.error = exc
        raise
    else:
        flight.value = value
        return value
    finally:
        run(self, land, key, flight)
        flight.done.set()
