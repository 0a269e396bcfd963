"""Slot: what TTLStore.compute() shows its function, and the plan that function fills in.

A store keeps one Slot and one Plan and fills them in for each compute() (under its lock, so
one call at a time): building two objects per call cost the rate limiter's refused acquire
about a third more, measured against this. A compute() nested in another one's function on
the same unlocked store gets fresh ones.
"""

from __future__ import annotations

from typing import Any, Generic, SupportsFloat, TypeVar, cast

from ttlstore._checks import finite_seconds, ttl_or_none
from ttlstore._types import DEFAULT_TTL, StoreDefault

__all__ = ["KEEP", "REMOVE", "WRITE", "Plan", "Slot"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

_INF = float("inf")

# What a Slot asks compute() to do once its function has returned.
KEEP, WRITE, REMOVE = 0, 1, 2


class Plan:
    """What a compute() function asked for: filled in through its Slot, read by the store.

    ``busy`` while the function runs; the Slot refuses requests at any other time.
    """

    __slots__ = ("busy", "deadline", "op", "ttl", "value")

    def __init__(self) -> None:
        self.op = KEEP
        self.busy = False
        self.value: Any = None
        self.ttl: float | StoreDefault | None = DEFAULT_TTL
        self.deadline: float | None = None


class Slot(Generic[K, V]):
    """One key of a store as :meth:`TTLStore.compute` shows it to its function.

    ``found`` tells whether the key holds a live entry, ``value`` is its value (``None`` when
    not found; :meth:`get` takes a default) and ``now`` the store's clock reading for this
    call, for computing a ``deadline``. :meth:`set` and :meth:`remove` say what to do once the
    function returns; the last call wins, and nothing is done if the function raises. A Slot
    is valid only while that function runs: the store reuses it for its next call.
    """

    __slots__ = ("_plan", "found", "key", "now", "value")

    key: K
    value: V

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.key = cast(K, None)
        self.found = False
        self.value = cast(V, None)
        self.now = 0.0

    def get(self, default: D | None = None) -> V | D | None:
        """The live value, or ``default`` if the key holds none."""
        return self.value if self.found else default

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
        if not plan.busy:
            self._check_busy(plan)
        checked_ttl: float | StoreDefault | None = DEFAULT_TTL
        if deadline is not None:
            if ttl is not DEFAULT_TTL:
                raise TypeError(f"give ttl or deadline, not both (got ttl={ttl!r})")
            # A finite float, the rate limiter's every call, skips the call to the check.
            if type(deadline) is not float or not -_INF < deadline < _INF:
                deadline = finite_seconds("deadline", deadline)
        elif ttl is not DEFAULT_TTL:
            checked_ttl = ttl_or_none("ttl", ttl)
        plan.op = WRITE
        plan.value = value
        plan.ttl = checked_ttl
        plan.deadline = deadline

    def remove(self) -> None:
        """Remove the live entry when the function returns (cause ``DELETED``)."""
        plan = self._plan
        self._check_busy(plan)
        plan.op = REMOVE

    def _check_busy(self, plan: Plan) -> None:
        if not plan.busy:
            raise RuntimeError("a Slot is only valid inside the compute() call that passed it")

    def __repr__(self) -> str:
        held = f"value={self.value!r}" if self.found else "absent"
        return f"<Slot {self.key!r} {held}>"
