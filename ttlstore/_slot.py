"""Slot: what TTLStore.compute() shows its function, and the plan that function fills in."""

from __future__ import annotations

from typing import Any, Generic, SupportsFloat, TypeVar

from ttlstore._checks import finite_seconds, ttl_or_none
from ttlstore._types import DEFAULT_TTL, StoreDefault

__all__ = ["KEEP", "REMOVE", "WRITE", "Plan", "Slot"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

# What a Slot asks compute() to do once its function has returned.
KEEP, WRITE, REMOVE = 0, 1, 2


class Plan:
    """What a compute() function asked for: filled in through its Slot, read by the store."""

    __slots__ = ("deadline", "done", "op", "ttl", "value")

    def __init__(self) -> None:
        self.op = KEEP
        self.done = False
        self.value: Any = None
        self.ttl: float | StoreDefault | None = DEFAULT_TTL
        self.deadline: float | None = None


class Slot(Generic[K, V]):
    """One key of a store as :meth:`TTLStore.compute` shows it to its function.

    ``found`` tells whether the key holds a live entry and ``value`` is its value (a
    ``KeyError`` when not found). :meth:`set` and :meth:`remove` say what to do once the
    function returns; the last call wins, and nothing is done if the function raises. ``now``
    is the store's clock reading for this call, for computing a ``deadline``.
    """

    __slots__ = ("_plan", "_value", "found", "key", "now")

    def __init__(self, key: K, found: bool, value: Any, now: float, plan: Plan) -> None:
        self.key = key
        self.found = found
        self._value = value
        self.now = now
        self._plan = plan

    @property
    def value(self) -> V:
        """The live value; ``KeyError`` if the key holds none."""
        if not self.found:
            raise KeyError(self.key)
        return self._value  # type: ignore[no-any-return]

    def get(self, default: D | None = None) -> V | D | None:
        """The live value, or ``default`` if the key holds none."""
        return self._value if self.found else default

    def set(
        self,
        value: V,
        ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
        *,
        deadline: SupportsFloat | None = None,
    ) -> None:
        """Store ``value`` when the function returns, as the most recently used entry.

        ``ttl`` as in :meth:`TTLStore.set` (omitted: the store's default, ``None``: no
        expiry), or ``deadline``: an absolute instant on the store's clock (see :attr:`now`).
        A deadline already passed stores nothing and removes a live entry as expired.
        """
        plan = self._plan
        self._check_open(plan)
        checked_ttl: float | StoreDefault | None = DEFAULT_TTL
        checked_deadline: float | None = None
        if deadline is not None:
            if ttl is not DEFAULT_TTL:
                raise TypeError(f"give ttl or deadline, not both (got ttl={ttl!r})")
            checked_deadline = finite_seconds("deadline", deadline)
        elif ttl is not DEFAULT_TTL:
            checked_ttl = ttl_or_none("ttl", ttl)
        plan.op = WRITE
        plan.value = value
        plan.ttl = checked_ttl
        plan.deadline = checked_deadline

    def remove(self) -> None:
        """Remove the live entry when the function returns (cause ``DELETED``)."""
        self._check_open(self._plan)
        self._plan.op = REMOVE

    def _check_open(self, plan: Plan) -> None:
        if plan.done:
            raise RuntimeError(f"the Slot of {self.key!r} was used after compute() returned")

    def __repr__(self) -> str:
        held = f"value={self._value!r}" if self.found else "absent"
        return f"<Slot {self.key!r} {held}>"
