"""Reading metrics back in tests: a Prometheus text exposition and OpenTelemetry data points,
both as one dict keyed by the Prometheus name and the label set, so the two can be compared."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint, Sum
from prometheus_client.parser import text_string_to_metric_families

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_exposition(text: str) -> Figures:
    """Every sample of a text exposition, parsed with prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def observe(reader: InMemoryMetricReader) -> Figures:
    """Every OpenTelemetry data point, under the name Prometheus would give it."""
    figures: Figures = {}
    data = reader.get_metrics_data()
    if data is None:  # nothing observed at all
        return figures
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                name = metric.name.replace(".", "_")
                if metric.unit == "s":
                    name += "_seconds"
                if isinstance(metric.data, Sum) and metric.data.is_monotonic:
                    name += "_total"
                for point in metric.data.data_points:
                    assert isinstance(point, NumberDataPoint)
                    labels = frozenset((k, str(v)) for k, v in (point.attributes or {}).items())
                    figures[name, labels] = float(point.value)
    return figures
