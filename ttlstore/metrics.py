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

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

try:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as error:  # the extra is missing
    raise ImportError(
        "ttlstore.metrics needs prometheus-client and opentelemetry-api: install them with "
        "pip install 'ttlstore[metrics]'"
    ) from error
from prometheus_client.registry import REGISTRY, CollectorRegistry

__all__ = ["FAMILIES", "Family", "Metrics", "register"]

logger = logging.getLogger("ttlstore")

Instrument = Literal["counter", "updown", "gauge"]

_ERROR_LOG_INTERVAL = 60.0  # seconds between two log lines about one object's failing stats()


@dataclass(frozen=True, slots=True)
class Family:
    """One exported figure: its names in both systems and where its values come from.

    ``values`` pairs a label value (``""`` when the family has no ``label``) with the attribute
    that holds the figure: an attribute of the ``stats()`` snapshot, or of the object itself when
    ``of_object`` (a bound such as ``maxsize``, which is configuration, not a counter).
    """

    kind: str
    """What is measured: ``store``, ``sweeper``, ``limiter`` or ``idempotency``."""
    key: str
    """The name within the kind, dotted: ``hits``, ``last_tick.duration``."""
    instrument: Instrument
    """``counter`` (monotonic), ``updown`` (a count that goes up and down) or ``gauge``."""
    unit: str
    """The OpenTelemetry unit (UCUM): ``s``, or an annotation such as ``{entry}``."""
    help: str
    values: tuple[tuple[str, str], ...]
    label: str = ""
    of_object: bool = False

    @property
    def otel_name(self) -> str:
        """``ttlstore.store.hits``."""
        return f"ttlstore.{self.kind}.{self.key}"

    @property
    def prometheus_name(self) -> str:
        """``ttlstore_store_hits_total``: dots to underscores, then the unit and type suffixes."""
        name = f"ttlstore_{self.kind}_{self.key.replace('.', '_')}"
        if self.unit == "s":
            name += "_seconds"
        return name + "_total" if self.instrument == "counter" else name


def _one(field: str) -> tuple[tuple[str, str], ...]:
    return (("", field),)


#: Every figure exported, by kind. A kind is recognised by the fields of ``stats()`` listed in
#: :data:`_SIGNATURES`; a family's value an object's stats do not have is skipped for it.
FAMILIES: tuple[Family, ...] = (
    # -- TTLStore
    Family("store", "hits", "counter", "{hit}", "Reads that found a live entry.", _one("hits")),
    Family("store", "misses", "counter", "{miss}", "Reads that found none.", _one("misses")),
    Family("store", "writes", "counter", "{write}", "Entries written.", _one("writes")),
    Family(
        "store",
        "removals",
        "counter",
        "{entry}",
        "Entries removed, by cause: expired (TTL), evicted (a bound), deleted, replaced.",
        (
            ("expired", "expirations"),
            ("evicted", "evictions"),
            ("deleted", "deletions"),
            ("replaced", "replacements"),
        ),
        label="cause",
    ),
    Family("store", "entries", "updown", "{entry}", "Live entries held now.", _one("size")),
    Family(
        "store",
        "entries.limit",
        "gauge",
        "{entry}",
        "The most entries the store holds (maxsize).",
        _one("maxsize"),
        of_object=True,
    ),
    # -- Sweeper, AsyncSweeper
    Family("sweeper", "ticks", "counter", "{tick}", "Sweeps completed.", _one("ticks")),
    Family(
        "sweeper", "reclaimed", "counter", "{entry}", "Due entries reclaimed.", _one("reclaimed")
    ),
    Family(
        "sweeper",
        "errors",
        "counter",
        "{error}",
        "Exceptions caught and logged by sweeps.",
        _one("errors"),
    ),
    Family(
        "sweeper",
        "last_tick.duration",
        "gauge",
        "s",
        "How long the last sweep took.",
        _one("last_tick_duration"),
    ),
    Family(
        "sweeper",
        "last_tick.longest_slice",
        "gauge",
        "s",
        "The longest single lock hold (one expire call) of the last sweep.",
        _one("last_tick_longest_slice"),
    ),
    Family(
        "sweeper",
        "last_tick.timestamp",
        "gauge",
        "s",
        "Unix time at which the last sweep ended; 0 before the first.",
        _one("last_tick_time"),
    ),
    # -- TokenBucketLimiter, RedisTokenBucketLimiter, AsyncRedisTokenBucketLimiter
    Family(
        "limiter",
        "requests",
        "counter",
        "{request}",
        "Rate-limit decisions, by outcome: allowed, denied, or degraded (the backend failed "
        "and on_error answered).",
        (("allowed", "allowed"), ("denied", "denied"), ("degraded", "degraded")),
        label="outcome",
    ),
    Family(
        "limiter",
        "fail_open_evictions",
        "counter",
        "{bucket}",
        "Buckets in debt evicted by maxsize: each of those clients started afresh.",
        _one("fail_open_evictions"),
    ),
    Family(
        "limiter",
        "buckets",
        "updown",
        "{bucket}",
        "Buckets held now (those in debt).",
        _one("size"),
    ),
    Family(
        "limiter",
        "buckets.limit",
        "gauge",
        "{bucket}",
        "The most buckets held at once (maxsize).",
        _one("maxsize"),
        of_object=True,
    ),
    Family(
        "limiter",
        "backend.errors",
        "counter",
        "{error}",
        "Faults of the shared backend (Redis).",
        _one("errors"),
    ),
    # -- IdempotencyStore, RedisIdempotencyStore, AsyncRedisIdempotencyStore
    Family(
        "idempotency",
        "requests",
        "counter",
        "{request}",
        "begin() answers, by outcome: started, replayed, in_progress (409), mismatch (422), "
        "busy (in-flight table full).",
        (
            ("started", "claims"),
            ("replayed", "replays"),
            ("in_progress", "conflicts"),
            ("mismatch", "mismatches"),
            ("busy", "busy"),
        ),
        label="outcome",
    ),
    Family(
        "idempotency",
        "claims.ended",
        "counter",
        "{claim}",
        "Claims ended, by cause: completed (result stored), released, lease_expired.",
        (
            ("completed", "completions"),
            ("released", "releases"),
            ("lease_expired", "lease_expiries"),
        ),
        label="cause",
    ),
    Family(
        "idempotency",
        "stale_tokens",
        "counter",
        "{call}",
        "complete/release calls refused because their token no longer owned the key.",
        _one("stale"),
    ),
    Family(
        "idempotency",
        "records.evicted",
        "counter",
        "{record}",
        "Records dropped by maxsize before their TTL ran out.",
        _one("evictions"),
    ),
    Family("idempotency", "records", "updown", "{record}", "Records held now.", _one("records")),
    Family(
        "idempotency",
        "records.limit",
        "gauge",
        "{record}",
        "The most records kept (maxsize).",
        _one("maxsize"),
        of_object=True,
    ),
    Family("idempotency", "claims", "updown", "{claim}", "Claims running now.", _one("inflight")),
    Family(
        "idempotency",
        "claims.limit",
        "gauge",
        "{claim}",
        "The most claims held at once (max_inflight).",
        _one("max_inflight"),
        of_object=True,
    ),
    Family(
        "idempotency",
        "backend.errors",
        "counter",
        "{error}",
        "Calls that failed because the shared backend (Redis) did.",
        _one("errors"),
    ),
)

# The fields of stats() that tell the kinds apart, tried in this order.
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("idempotency", frozenset({"claims", "replays", "conflicts", "mismatches"})),
    ("limiter", frozenset({"allowed", "denied"})),
    ("sweeper", frozenset({"ticks", "reclaimed", "errors"})),
    ("store", frozenset({"hits", "misses", "writes", "expirations", "evictions", "size"})),
)


def _kind_of(name: str, obj: object) -> str:
    """The kind of ``obj`` from its ``stats()``; TypeError naming ``name`` if it has none."""
    stats = getattr(obj, "stats", None)
    if not callable(stats):
        raise TypeError(
            f"metrics for {name!r}: {obj!r} has no stats() method; register a TTLStore, a "
            "Sweeper or AsyncSweeper, a rate limiter or an idempotency store"
        )
    snapshot = stats()
    for kind, fields in _SIGNATURES:
        if all(hasattr(snapshot, field) for field in fields):
            return kind
    raise TypeError(
        f"metrics for {name!r}: {obj!r}.stats() returned {snapshot!r}, which is none of a "
        "store's, a sweeper's, a limiter's or an idempotency store's stats"
    )


class _Entry:
    """One registered object: its name, kind and a weak reference."""

    __slots__ = ("kind", "logged_at", "name", "ref")

    def __init__(self, name: str, kind: str, ref: weakref.ref[Any]) -> None:
        self.name = name
        self.kind = kind
        self.ref = ref
        self.logged_at = -_ERROR_LOG_INTERVAL


# (label value, figure) pairs of one family for one object.
_Values = list[tuple[str, float]]


def _read(family: Family, obj: object, snapshot: object) -> _Values:
    source = obj if family.of_object else snapshot
    found: _Values = []
    for label, attribute in family.values:
        value = getattr(source, attribute, None)
        if value is not None:
            found.append((label, float(value)))
    return found


def _prepare(objects: Mapping[str, object]) -> list[_Entry]:
    """Check every (name, object) of ``objects``; TypeError naming the first bad one."""
    if not isinstance(objects, Mapping):
        raise TypeError(f"objects must be a mapping of names to objects, got {objects!r}")
    prepared: list[_Entry] = []
    for name, obj in objects.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics names must be non-empty str, got {name!r}")
        kind = _kind_of(name, obj)
        try:
            ref = weakref.ref(obj)
        except TypeError:
            raise TypeError(f"metrics for {name!r}: {obj!r} cannot be weakly referenced") from None
        prepared.append(_Entry(name, kind, ref))
    return prepared


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
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._closed = False
        self._registry: CollectorRegistry | None = None
        self._insert(_prepare({} if objects is None else objects))
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
                self._instrument(meter, family)

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
        self._insert(_prepare(objects))

    def _insert(self, prepared: list[_Entry]) -> None:
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
        """Stop exporting ``name``; whether it was registered (and alive). O(1)."""
        with self._lock:
            entry = self._entries.pop(name, None)
            return entry is not None and entry.ref() is not None

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the registered objects still alive, in registration order."""
        return tuple(entry.name for entry, _ in self._live())

    def __contains__(self, name: object) -> bool:
        entry = self._entries.get(name) if isinstance(name, str) else None
        return entry is not None and entry.ref() is not None

    def close(self) -> None:
        """Leave the registry and stop answering OpenTelemetry; forget every object.

        OpenTelemetry has no way to remove an instrument: after ``close`` they observe nothing.
        """
        with self._lock:
            self._closed = True
            self._entries.clear()
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.unregister(self)

    def __repr__(self) -> str:
        return f"<Metrics names={list(self.names)!r}>"

    def _prune(self) -> None:
        """Forget objects that were collected. Under ``_lock``."""
        for name in [name for name, entry in self._entries.items() if entry.ref() is None]:
            del self._entries[name]

    def _live(self, kind: str | None = None) -> list[tuple[_Entry, Any]]:
        """(entry, object) for every live object (of ``kind``), as strong references."""
        with self._lock:
            self._prune()
            found = [(entry, entry.ref()) for entry in self._entries.values()]
        return [(e, obj) for e, obj in found if obj is not None and kind in (None, e.kind)]

    def _snapshot(self, entry: _Entry, obj: Any) -> object | None:
        """``obj.stats()``, or None (logged, at most once a minute per object) if it raised."""
        try:
            snapshot: object = obj.stats()
        except Exception:
            now = time.monotonic()
            if now - entry.logged_at >= _ERROR_LOG_INTERVAL:
                entry.logged_at = now
                logger.exception("metrics: stats() of %r (%r) failed", entry.name, obj)
            return None
        return snapshot

    # ------------------------------------------------------------------ Prometheus

    def describe(self) -> list[Metric]:
        """Every family this collector may export (prometheus_client's collector protocol)."""
        return [_prometheus_family(family) for family in FAMILIES]

    def collect(self) -> Iterator[Metric]:
        """The families of every live object, one ``stats()`` call per object. O(objects)."""
        samples: dict[Family, list[tuple[str, str, float]]] = {}
        for entry, obj in self._live():
            snapshot = self._snapshot(entry, obj)
            if snapshot is None:
                continue
            for family in _BY_KIND[entry.kind]:
                for label, value in _read(family, obj, snapshot):
                    samples.setdefault(family, []).append((entry.name, label, value))
        for family in FAMILIES:
            found = samples.get(family)
            if not found:
                continue
            metric = _prometheus_family(family)
            for name, label, value in found:
                metric.add_metric([name, label] if family.label else [name], value)
            yield metric

    # ------------------------------------------------------------------ OpenTelemetry

    def _instrument(self, meter: Meter, family: Family) -> None:
        create: Callable[..., object] = {
            "counter": meter.create_observable_counter,
            "updown": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }[family.instrument]
        create(
            family.otel_name,
            callbacks=[self._callback(family)],
            unit=family.unit,
            description=family.help,
        )

    def _callback(self, family: Family) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            found: list[Observation] = []
            for entry, obj in self._live(family.kind):
                snapshot = self._snapshot(entry, obj)
                if snapshot is None:
                    continue
                for label, value in _read(family, obj, snapshot):
                    attributes = {"name": entry.name}
                    if family.label:
                        attributes[family.label] = label
                    found.append(Observation(value, attributes))
            return found

        return observe


_BY_KIND: dict[str, tuple[Family, ...]] = {
    kind: tuple(f for f in FAMILIES if f.kind == kind) for kind, _ in _SIGNATURES
}


def _prometheus_family(family: Family) -> CounterMetricFamily | GaugeMetricFamily:
    labels = ["name", family.label] if family.label else ["name"]
    if family.instrument == "counter":
        return CounterMetricFamily(family.prometheus_name, family.help, labels=labels)
    return GaugeMetricFamily(family.prometheus_name, family.help, labels=labels)


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
