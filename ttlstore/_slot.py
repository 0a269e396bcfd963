"""Slot: what TTLStore.compute() shows its function, and the plan that function fills in.

The state and methods are :class:`ttlstore._slot_core.SlotCore`'s, which mypyc compiles with
the core; this module, always interpreted, gives them their generic, typed face.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, SupportsFloat, TypeVar

from ttlstore._slot_core import KEEP, REMOVE, WRITE, Plan, SlotCore
from ttlstore._types import DEFAULT_TTL, StoreDefault

__all__ = ["KEEP", "REMOVE", "WRITE", "Plan", "Slot"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class Slot(SlotCore, Generic[K, V]):
    """One key of a store as :meth:`TTLStore.compute` shows it to its function.

    ``found`` tells whether the key holds a live entry, ``value`` is its value (``None`` when
    not found; :meth:`get` takes a default) and ``now`` the store's clock reading for this
    call, for computing a ``deadline``. :meth:`set` and :meth:`remove` say what to do once the
    function returns; the last call wins, and nothing is done if the function raises. A Slot
    is valid only while that function runs: the store reuses it for its next call.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        # The typed signatures; the bodies are SlotCore's.
        key: K
        value: V

        def get(self, default: D | None = None) -> V | D | None: ...

        def set(
            self,
            value: V,
            ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
            *,
            deadline: SupportsFloat | None = None,
        ) -> None: ...
