"""The OpenTelemetry side of ``ttlstore.metrics``: one observable instrument per family.

Imported only by ``ttlstore.metrics``, which names the extra when opentelemetry-api is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from ttlstore._metrics_families import Family, read
from ttlstore._metrics_objects import Reading

__all__ = ["instrument"]

#: Where a callback reads its objects: the live readings of one kind.
Readings = Callable[[str], Iterator[Reading]]


def instrument(meter: Meter, family: Family, readings: Readings) -> None:
    """Create ``family``'s observable instrument on ``meter``, observing ``readings``.

    OpenTelemetry calls each instrument's callback on its own: one ``stats()`` call per object
    of the family's kind and collection.
    """
    create: Callable[..., object] = {
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }[family.instrument]
    create(
        family.otel_name,
        callbacks=[_callback(family, readings)],
        unit=family.unit,
        description=family.help,
    )


def _callback(
    family: Family, readings: Readings
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        found: list[Observation] = []
        for entry, obj, snapshot in readings(family.kind):
            for label, value in read(family, obj, snapshot):
                attributes = {"name": entry.name}
                if family.label:
                    attributes[family.label] = label
                found.append(Observation(value, attributes))
        return found

    return observe
