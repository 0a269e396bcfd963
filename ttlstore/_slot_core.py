"""The compiled half of a compute() Slot: its state, its methods, and the Plan they fill in.

A store keeps one Slot and one Plan and fills them in for each compute() (under its lock, so
one call at a time): building two objects per call cost the rate limiter's refused acquire
about a third more, measured against this. A compute() nested in another one's function on
the same unlocked store gets fresh ones.

mypyc compiles this module with the core, so the store sets a Slot's fields and reads its Plan
natively, and the rate limiter's compiled step files its write through :func:`set_until`
without an interpreted frame (compiled ``acquire``: 15.8 k instructions with the interpreted
Slot, 14.3 k with this class, callgrind). The
typed, generic face users see is :class:`ttlstore._slot.Slot`, an interpreted subclass: a
compiled ``Generic`` class would get mypyc's weak-reference slot, which CPython 3.11's
collector mis-traverses (see :mod:`ttlstore._core`).
"""

from __future__ import annotations

from typing import Any, Final, SupportsFloat

from ttlstore._checks import finite_seconds, ttl_or_none
from ttlstore._deadlines import INF
from ttlstore._mypyc import mypyc_attr
from ttlstore._types import DEFAULT_TTL, StoreDefault

__all__ = ["KEEP", "REMOVE", "WRITE", "Plan", "SlotCore", "set_until"]

# What a Slot asks compute() to do once its function has returned.
KEEP: Final = 0
WRITE: Final = 1
REMOVE: Final = 2


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


# Subclassed by the interpreted, generic Slot (see the module's docstring).
@mypyc_attr(allow_interpreted_subclasses=True)
class SlotCore:
    """One key of a store as :meth:`TTLStore.compute` shows it; see :class:`ttlstore.Slot`."""

    __slots__ = ("_plan", "found", "key", "now", "value")

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.key: Any = None
        self.found = False
        self.value: Any = None
        self.now = 0.0

    def get(self, default: Any = None) -> Any:
        """The live value, or ``default`` if the key holds none."""
        return self.value if self.found else default

    def set(
        self,
        value: Any,
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
            _refuse()
        checked_ttl: float | StoreDefault | None = DEFAULT_TTL
        checked_deadline: float | None = None
        if deadline is not None:
            if ttl is not DEFAULT_TTL:
                raise TypeError(f"give ttl or deadline, not both (got ttl={ttl!r})")
            # A finite float, the rate limiter's every call, skips the call to the check.
            if type(deadline) is float and -INF < deadline < INF:
                checked_deadline = deadline
            else:
                checked_deadline = finite_seconds("deadline", deadline)
        elif ttl is not DEFAULT_TTL:
            checked_ttl = ttl_or_none("ttl", ttl)
        plan.op = WRITE
        plan.value = value
        plan.ttl = checked_ttl
        plan.deadline = checked_deadline

    def remove(self) -> None:
        """Remove the live entry when the function returns (cause ``DELETED``)."""
        plan = self._plan
        if not plan.busy:
            _refuse()
        plan.op = REMOVE

    def __repr__(self) -> str:
        held = f"value={self.value!r}" if self.found else "absent"
        return f"<Slot {self.key!r} {held}>"


def set_until(slot: SlotCore, value: Any, deadline: float) -> None:
    """``slot.set(value, deadline=deadline)`` for a finite float ``deadline``. O(1).

    For the rate limiter's compiled step: a plain function is called natively, where a
    method of a class that allows interpreted subclasses goes through a Python-level call
    (its glue and argument parsing showed about 1.4 k instructions of a 14.3 k acquire in
    callgrind, compiled).
    """
    plan = slot._plan  # noqa: RUF100, SLF001 - this module's own class
    if not plan.busy:
        _refuse()
    plan.op = WRITE
    plan.value = value
    plan.ttl = DEFAULT_TTL
    plan.deadline = deadline


def _refuse() -> None:
    raise RuntimeError("a Slot is only valid inside the compute() call that passed it")
