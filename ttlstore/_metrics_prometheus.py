"""The Prometheus side of ``ttlstore.metrics``: the families as prometheus_client metrics.

Imported only by ``ttlstore.metrics``, which names the extra when prometheus-client is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ttlstore._metrics_families import BY_KIND, FAMILIES, Family, read
from ttlstore._metrics_objects import Reading

__all__ = ["collect", "describe", "prometheus_family"]


def prometheus_family(family: Family) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty prometheus_client family for ``family``, labelled ``name`` (and its label)."""
    labels = ["name", family.label] if family.label else ["name"]
    if family.instrument == "counter":
        return CounterMetricFamily(family.prometheus_name, family.help, labels=labels)
    return GaugeMetricFamily(family.prometheus_name, family.help, labels=labels)


def describe() -> list[Metric]:
    """Every family a collector may export, empty (prometheus_client's ``describe``)."""
    return [prometheus_family(family) for family in FAMILIES]


def collect(readings: Iterable[Reading]) -> Iterator[Metric]:
    """The families with at least one sample among ``readings``, in :data:`FAMILIES` order.

    O(readings x families of their kinds).
    """
    samples: dict[Family, list[tuple[str, str, float]]] = {}
    for entry, obj, snapshot in readings:
        for family in BY_KIND[entry.kind]:
            for label, value in read(family, obj, snapshot):
                samples.setdefault(family, []).append((entry.name, label, value))
    for family in FAMILIES:
        found = samples.get(family)
        if not found:
            continue
        metric = prometheus_family(family)
        for name, label, value in found:
            metric.add_metric([name, label] if family.label else [name], value)
        yield metric
