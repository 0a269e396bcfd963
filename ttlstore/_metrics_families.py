"""What ``ttlstore.metrics`` exports: one table of figure families, and how objects map onto it.

Shared by the Prometheus and OpenTelemetry exporters; imports neither (nor anything optional).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BY_KIND", "FAMILIES", "SIGNATURES", "Family", "Instrument", "Values", "kind_of", "read"]

Instrument = Literal["counter", "updown", "gauge"]


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
#: :data:`SIGNATURES`; a family's value an object's stats do not have is skipped for it.
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
SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("idempotency", frozenset({"claims", "replays", "conflicts", "mismatches"})),
    ("limiter", frozenset({"allowed", "denied"})),
    ("sweeper", frozenset({"ticks", "reclaimed", "errors"})),
    ("store", frozenset({"hits", "misses", "writes", "expirations", "evictions", "size"})),
)


def kind_of(name: str, obj: object) -> str:
    """The kind of ``obj`` from its ``stats()``; TypeError naming ``name`` if it has none."""
    stats = getattr(obj, "stats", None)
    if not callable(stats):
        raise TypeError(
            f"metrics for {name!r}: {obj!r} has no stats() method; register a TTLStore, a "
            "Sweeper or AsyncSweeper, a rate limiter or an idempotency store"
        )
    snapshot = stats()
    for kind, fields in SIGNATURES:
        if all(hasattr(snapshot, field) for field in fields):
            return kind
    raise TypeError(
        f"metrics for {name!r}: {obj!r}.stats() returned {snapshot!r}, which is none of a "
        "store's, a sweeper's, a limiter's or an idempotency store's stats"
    )


BY_KIND: dict[str, tuple[Family, ...]] = {
    kind: tuple(f for f in FAMILIES if f.kind == kind) for kind, _ in SIGNATURES
}
"""The families of each kind, in :data:`FAMILIES` order."""

Values = list[tuple[str, float]]
"""(label value, figure) pairs of one family for one object."""


def read(family: Family, obj: object, snapshot: object) -> Values:
    """``family``'s figures for ``obj`` from its ``stats()`` ``snapshot``; missing ones left out."""
    source = obj if family.of_object else snapshot
    found: Values = []
    for label, attribute in family.values:
        value = getattr(source, attribute, None)
        if value is not None:
            found.append((label, float(value)))
    return found
