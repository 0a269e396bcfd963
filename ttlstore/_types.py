"""The small public types of a TTLStore: removal causes, stats, the default-TTL marker."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["DEFAULT_TTL", "RemovalCause", "RemovalListener", "StoreDefault", "StoreStats"]

K = TypeVar("K")
V = TypeVar("V")


class RemovalCause(enum.Enum):
    """Why an entry left the store, as passed to ``on_remove``."""

    EXPIRED = "expired"
    """Its deadline passed."""
    EVICTED = "evicted"
    """It made room under ``maxsize`` or ``maxweight``."""
    DELETED = "deleted"
    """Removed explicitly: ``del``, ``pop``, ``popitem``, ``clear``, ``Slot.remove``."""
    REPLACED = "replaced"
    """Overwritten by a write to the same key."""


RemovalListener = Callable[[K, V, RemovalCause], object]
"""``on_remove(key, value, cause)``; its return value is ignored."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """An immutable snapshot of a store's counters, taken without reclaiming anything."""

    hits: int
    misses: int
    writes: int
    expirations: int
    evictions: int
    deletions: int
    replacements: int
    size: int
    """Live entries (due ones not yet reclaimed are not counted)."""
    weight: float
    """Total weight stored (due entries not yet reclaimed still count against ``maxweight``)."""


class StoreDefault(enum.Enum):
    """The type of :data:`DEFAULT_TTL`, the ``ttl`` of a write that gives none.

    ``ttl=None`` already means "no expiry", so "not given" needs a marker of its own. A wrapper
    that passes a TTL through can default to ``DEFAULT_TTL`` and let the store decide.
    """

    TTL = "store default"

    def __repr__(self) -> str:
        return "<store default>"


DEFAULT_TTL = StoreDefault.TTL
"""``ttl`` not given: the store's default TTL applies."""
