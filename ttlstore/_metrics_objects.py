"""The named objects a ``ttlstore.metrics.Metrics`` exports: held weakly, read at export time.

Both exporters read through :meth:`WeakObjects.readings`: one ``stats()`` call per live object,
a failing one left out and logged. Imports nothing optional.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from ttlstore._metrics_families import kind_of

__all__ = ["ERROR_LOG_INTERVAL", "Entry", "Reading", "WeakObjects", "prepare"]

logger = logging.getLogger("ttlstore")

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log lines about one object's failing ``stats()``."""


class Entry:
    """One registered object: its name, kind and a weak reference."""

    __slots__ = ("kind", "logged_at", "name", "ref")

    def __init__(self, name: str, kind: str, ref: weakref.ref[Any]) -> None:
        self.name = name
        self.kind = kind
        self.ref = ref
        self.logged_at = -ERROR_LOG_INTERVAL


class Reading(NamedTuple):
    """One live object as read for one export: its entry, the object, and its ``stats()``."""

    entry: Entry
    obj: object
    snapshot: object


def prepare(objects: Mapping[str, object]) -> list[Entry]:
    """Check every (name, object) of ``objects``; TypeError naming the first bad one."""
    if not isinstance(objects, Mapping):
        raise TypeError(f"objects must be a mapping of names to objects, got {objects!r}")
    prepared: list[Entry] = []
    for name, obj in objects.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics names must be non-empty str, got {name!r}")
        kind = kind_of(name, obj)
        try:
            ref = weakref.ref(obj)
        except TypeError:
            raise TypeError(f"metrics for {name!r}: {obj!r} cannot be weakly referenced") from None
        prepared.append(Entry(name, kind, ref))
    return prepared


class WeakObjects:
    """Named objects held through weak references, in registration order. Thread-safe.

    A collected object is forgotten the next time the table is read or written.
    """

    __slots__ = ("_closed", "_entries", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._closed = False

    def insert(self, prepared: list[Entry]) -> None:
        """Register checked entries, all or none: ValueError on a name or object in use."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this Metrics was closed; make a new one")
            self._prune()
            held = {id(entry.ref()): entry.name for entry in self._entries.values()}
            for entry in prepared:
                if entry.name in self._entries:
                    raise ValueError(f"metrics name {entry.name!r} is already registered")
                obj = entry.ref()
                if id(obj) in held:
                    raise ValueError(
                        f"metrics for {entry.name!r}: {obj!r} is already registered as "
                        f"{held[id(obj)]!r}"
                    )
                held[id(obj)] = entry.name
            for entry in prepared:
                self._entries[entry.name] = entry

    def remove(self, name: str) -> bool:
        """Forget ``name``; whether it was registered (and alive). O(1)."""
        with self._lock:
            entry = self._entries.pop(name, None)
            return entry is not None and entry.ref() is not None

    def __contains__(self, name: object) -> bool:
        entry = self._entries.get(name) if isinstance(name, str) else None
        return entry is not None and entry.ref() is not None

    def close(self) -> None:
        """Forget every object and refuse new ones."""
        with self._lock:
            self._closed = True
            self._entries.clear()

    def _prune(self) -> None:
        """Forget objects that were collected. Under ``_lock``."""
        for name in [name for name, entry in self._entries.items() if entry.ref() is None]:
            del self._entries[name]

    def live(self, kind: str | None = None) -> list[tuple[Entry, Any]]:
        """(entry, object) for every live object (of ``kind``), as strong references."""
        with self._lock:
            self._prune()
            found = [(entry, entry.ref()) for entry in self._entries.values()]
        return [(e, obj) for e, obj in found if obj is not None and kind in (None, e.kind)]

    def readings(self, kind: str | None = None) -> Iterator[Reading]:
        """A :class:`Reading` of every live object (of ``kind``) whose ``stats()`` answers.

        Lazy: the table is read when iteration starts. O(objects) ``stats()`` calls.
        """
        for entry, obj in self.live(kind):
            snapshot = _snapshot(entry, obj)
            if snapshot is not None:
                yield Reading(entry, obj, snapshot)


def _snapshot(entry: Entry, obj: Any) -> object | None:
    """``obj.stats()``, or None (logged, at most once a minute per object) if it raised."""
    try:
        snapshot: object = obj.stats()
    except Exception:
        now = time.monotonic()
        if now - entry.logged_at >= ERROR_LOG_INTERVAL:
            entry.logged_at = now
            logger.exception("metrics: stats() of %r (%r) failed", entry.name, obj)
        return None
    return snapshot
