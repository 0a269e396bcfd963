"""The items and values views of a TTLStore: iterated from one atomic snapshot."""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, Mapping, ValuesView
from typing import Any, TypeVar

from ttlstore._core import MISSING

__all__ = ["StoreItemsView", "StoreValuesView"]

K = TypeVar("K")
V = TypeVar("V")


class StoreItemsView(ItemsView[K, V]):
    """Items of a TTLStore: iterated from an atomic snapshot, checked with ``peek``."""

    def __init__(
        self,
        store: Mapping[K, V],
        snapshot: Callable[[], list[tuple[K, V]]],
        peek: Callable[[K, Any], Any],
    ) -> None:
        super().__init__(store)
        self._snapshot = snapshot
        self._peek = peek

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return iter(self._snapshot())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        found = self._peek(key, MISSING)
        return found is not MISSING and (found is value or found == value)


class StoreValuesView(ValuesView[V]):
    """Values of a TTLStore: iterated from an atomic snapshot, touching no recency."""

    def __init__(self, store: Mapping[Any, V], snapshot: Callable[[], list[tuple[Any, V]]]) -> None:
        super().__init__(store)
        self._snapshot = snapshot

    def __iter__(self) -> Iterator[V]:
        return (value for _, value in self._snapshot())

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self)
