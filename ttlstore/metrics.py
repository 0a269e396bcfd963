"""Prometheus and OpenTelemetry export of stores, sweepers, rate limiters and idempotency stores.

Install with ``pip install 'ttlstore[metrics]'`` (prometheus-client, opentelemetry-api); the core
(``import ttlstore``) never imports this module.

One call registers any number of named objects::

    metrics = register({"records": store, "api": limiter, "sweeper": sweeper})
    metrics = register({...}, registry=None, meter=provider.get_meter("ttlstore"))  # OTel only

Nothing is counted on the hot path: every figure is read at scrape (or OpenTelemetry collection)
time from the object's own ``stats()``, so registering costs a store's readers and writers
nothing. Objects are held through weak references: an object that is dropped disappears from
the next scrape and is garbage-collected as if it had never been registered.

What an object is follows from what its ``stats()`` answers: a ``StoreStats`` (``TTLStore``), a
``SweeperStats`` (``Sweeper``, ``AsyncSweeper``), a limiter's (``TokenBucketLimiter`` and the Redis
limiters) or an idempotency store's (``IdempotencyStore`` and the Redis ones). A figure an object's
stats do not have (a Redis limiter holds no buckets in this process) is left out for that object.

Names follow each system's conventions, derived from one table: the OpenTelemetry instrument
``ttlstore.store.hits`` (unit ``{hit}``) is the Prometheus counter ``ttlstore_store_hits_total``,
``ttlstore.sweeper.last_tick.duration`` (unit ``s``) the gauge
``ttlstore_sweeper_last_tick_duration_seconds``: the names OpenTelemetry's own Prometheus exporter
would give. Every series has a ``name`` label (the registered name); removals have a ``cause``
label, request counters an ``outcome`` label.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

try:
    from opentelemetry.metrics import Meter
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as error:  # the extra is missing
    raise ImportError(
        "ttlstore.metrics needs prometheus-client and opentelemetry-api: install them with "
        "pip install 'ttlstore[metrics]'"
    ) from error

# The table of figures and the two exporters live in private modules; this one is the API.
from ttlstore._metrics_families import FAMILIES, Family
from ttlstore._metrics_objects import WeakObjects, prepare
from ttlstore._metrics_otel import instrument
from ttlstore._metrics_prometheus import collect as collect_families
from ttlstore._metrics_prometheus import describe as describe_families

__all__ = ["FAMILIES", "Family", "Metrics", "register"]


class Metrics:
    """Named objects, held weakly, exported to Prometheus and OpenTelemetry at read time.

    ``Metrics(objects={}, *, registry=REGISTRY, meter=None)``: ``objects`` maps names to
    stores, sweepers, limiters and idempotency stores. With a ``registry`` (prometheus_client's
    global one by default, which ``prometheus_client.make_asgi_app()`` serves; ``None`` for
    none) it registers itself there as a collector; with a ``meter`` it creates one observable
    instrument per figure on it. Bad input raises before anything is registered anywhere.
    :meth:`add` and :meth:`update` register more objects later.

    A scrape costs one ``stats()`` call per registered object; an OpenTelemetry collection one
    per object and instrument (OpenTelemetry calls each instrument's callback on its own).
    An object whose ``stats()`` raises is left out of that read and logged on logger
    ``ttlstore`` at most once a minute.
    """

    def __init__(
        self,
        objects: Mapping[str, object] | None = None,
        /,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        meter: Meter | None = None,
    ) -> None:
        self._objects = WeakObjects()
        self._registry: CollectorRegistry | None = None
        self._objects.insert(prepare({} if objects is None else objects))
        if registry is not None:
            try:
                registry.register(self)
            except ValueError as error:
                raise ValueError(
                    f"registry already exports ttlstore metrics ({error}); add objects to the "
                    "Metrics registered there, or use another registry"
                ) from None
            self._registry = registry
        if meter is not None:
            for family in FAMILIES:
                # The instruments hold the objects' table, not this Metrics: close() empties it.
                instrument(meter, family, self._objects.readings)

    # ------------------------------------------------------------------ registration

    def add(self, name: str, obj: object) -> None:
        """Export ``obj``'s stats under ``name``; held weakly. O(objects).

        ``TypeError`` for a name that is not a non-empty str, an object without ``stats()`` or
        with stats of no known kind, or one that cannot be weakly referenced; ``ValueError`` for
        a name already in use or an object already registered. Nothing is registered then.
        """
        self.update({name: obj})

    def update(self, objects: Mapping[str, object]) -> None:
        """:meth:`add` each of ``objects`` (name to object): all of them, or none on an error."""
        self._objects.insert(prepare(objects))

    def remove(self, name: str) -> bool:
        """Stop exporting ``name``; whether it was registered (and alive). O(1)."""
        return self._objects.remove(name)

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the registered objects still alive, in registration order."""
        return tuple(entry.name for entry, _ in self._objects.live())

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def close(self) -> None:
        """Leave the registry and stop answering OpenTelemetry; forget every object.

        OpenTelemetry has no way to remove an instrument: after ``close`` they observe nothing.
        """
        self._objects.close()
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.unregister(self)

    def __repr__(self) -> str:
        return f"<Metrics names={list(self.names)!r}>"

    # ------------------------------------------------------------------ Prometheus

    def describe(self) -> list[Metric]:
        """Every family this collector may export (prometheus_client's collector protocol)."""
        return describe_families()

    def collect(self) -> Iterator[Metric]:
        """The families of every live object, one ``stats()`` call per object. O(objects)."""
        return collect_families(self._objects.readings())


def register(
    objects: Mapping[str, object],
    /,
    *,
    registry: CollectorRegistry | None = REGISTRY,
    meter: Meter | None = None,
) -> Metrics:
    """Export ``objects`` (name to store, sweeper, limiter or idempotency store) in one call.

    To Prometheus through ``registry`` (prometheus_client's global registry by default;
    ``None`` for none) and to OpenTelemetry through ``meter`` when one is given. Returns the
    :class:`Metrics`, to add more objects later or ``close()`` it. Bad input (a name that is
    not a non-empty str or is given twice, an object without ``stats()`` or registered twice)
    raises ``TypeError``/``ValueError`` naming it, before anything is registered.
    """
    return Metrics(objects, registry=registry, meter=meter)
