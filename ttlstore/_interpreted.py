"""Bodies of the hottest TTLStore methods for the interpreted build, one per lock mode.

:class:`~ttlstore._core.StoreCore` serves both lock modes with one body per method, shaped for
mypyc (no ``return`` inside ``try``: compiled, a return through a ``finally`` costs more than
the rest of a hit). Interpreted, that shape and the lock test cost the pure build 6-8 % on
reads against the two-class store it replaced (in-process A/B, medians of 25 rounds, n = 1 000,
CPython 3.11). So when the core runs interpreted, :class:`~ttlstore.store.TTLStore` takes these
bodies instead: a locked store tests its lock first and returns from inside its ``try`` (free
in CPython 3.11), skipping the callback check on a hit; an unlocked store reads through a fast
path set up at construction (no ``sliding``; for writes, no ``weigher`` and no ``on_remove``),
whose one test replaces the lock, sliding and weigher tests. With these, every row of that A/B
is within 2.5 % of the old store (get-hit unlocked -1.6 %, set-update unlocked -5.8 %).
The compiled build never uses this module.
"""

from __future__ import annotations

from types import FunctionType
from typing import TYPE_CHECKING, Any, SupportsFloat

from ttlstore._checks import ttl_or_none
from ttlstore._core import StoreCore
from ttlstore._steps import MISSING, drop_expired, flush, read, weigh
from ttlstore._types import DEFAULT_TTL, StoreDefault
from ttlstore._writes import write

if TYPE_CHECKING:
    from ttlstore.store import TTLStore

__all__ = ["INTERPRETED", "METHODS"]

INTERPRETED = isinstance(StoreCore.__dict__["get"], FunctionType)
"""Whether the core runs interpreted (then TTLStore takes :data:`METHODS`)."""


def get(self: TTLStore[Any, Any], key: Any, default: Any = None) -> Any:
    lock = self._lock
    if lock is not None:
        # The body of _steps.read(), written out: calling it cost a locked read 18 % more
        # instructions (valgrind, per [] hit: 4 490 against 3 814 written out).
        lock.acquire()
        try:
            entry = self._lookup(key)
            if entry is not None:
                now = self._clock()
                if entry.deadline > now:
                    self._to_end(key)
                    self._hits += 1
                    if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
                        # Never earlier (a clock stepping back): the index item must stay
                        # due no later than the entry.
                        entry.deadline = now + entry.ttl
                    # Only a miss can have queued a removal (an expired entry).
                    return entry.value
                drop_expired(self, entry)
            self._misses += 1
        finally:
            lock.release()
        if self._pending:
            flush(self)
        return default
    # _plain_get is the store's dict lookup when it has no sliding (and no lock), else None.
    lookup = self._plain_get
    if lookup is None:
        return read(self, key, default)
    entry = lookup(key)
    if entry is not None:
        if entry.deadline > self._clock():
            self._to_end(key)
            self._hits += 1
            return entry.value
        drop_expired(self, entry)
        self._misses += 1
        if self._pending:
            flush(self)
        return default
    self._misses += 1
    return default


def getitem(self: TTLStore[Any, Any], key: Any) -> Any:
    lock = self._lock
    if lock is not None:
        # As in get(): the locked read written out.
        lock.acquire()
        try:
            entry = self._lookup(key)
            if entry is not None:
                now = self._clock()
                if entry.deadline > now:
                    self._to_end(key)
                    self._hits += 1
                    if self._sliding and entry.ttl is not None and now + entry.ttl > entry.deadline:
                        entry.deadline = now + entry.ttl
                    return entry.value
                drop_expired(self, entry)
            self._misses += 1
        finally:
            lock.release()
        if self._pending:
            flush(self)
        raise KeyError(key)
    lookup = self._plain_get
    if lookup is not None:
        entry = lookup(key)
        if entry is not None and entry.deadline > self._clock():
            self._to_end(key)
            self._hits += 1
            return entry.value
    value = read(self, key, MISSING)
    if value is MISSING:
        raise KeyError(key)
    return value


def set_(
    self: TTLStore[Any, Any],
    key: Any,
    value: Any,
    ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
) -> None:
    ttl = self._ttl if ttl is DEFAULT_TTL else ttl_or_none("ttl", ttl)
    if self._plain_set:
        write(self, key, value, ttl, 0.0, False)
        return
    weight = 0.0 if self._weigher is None else weigh(self, key, value)
    lock = self._lock
    if lock is None:
        write(self, key, value, ttl, weight, False)
    else:
        lock.acquire()
        try:
            write(self, key, value, ttl, weight, False)
        finally:
            lock.release()
    if self._pending:
        flush(self)


def setitem(self: TTLStore[Any, Any], key: Any, value: Any) -> None:
    if self._plain_set:
        write(self, key, value, self._ttl, 0.0, False)
        return
    weight = 0.0 if self._weigher is None else weigh(self, key, value)
    lock = self._lock
    if lock is None:
        write(self, key, value, self._ttl, weight, False)
    else:
        lock.acquire()
        try:
            write(self, key, value, self._ttl, weight, False)
        finally:
            lock.release()
    if self._pending:
        flush(self)


def _as(name: str, body: Any) -> Any:
    """``body`` dressed as StoreCore's method ``name`` (docstring, qualified name)."""
    body.__name__ = name
    body.__qualname__ = f"TTLStore.{name}"
    body.__doc__ = StoreCore.__dict__[name].__doc__
    return body


METHODS: dict[str, Any] = {
    name: _as(name, body)
    for name, body in (
        ("get", get),
        ("__getitem__", getitem),
        ("set", set_),
        ("__setitem__", setitem),
    )
}
"""What TTLStore puts in place of StoreCore's methods when the core runs interpreted."""
