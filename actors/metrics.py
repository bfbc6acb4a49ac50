"""Ray's metrics API as a ``pipeline.metrics`` backend: every actor's series on its node's metrics port."""

from __future__ import annotations

from pipeline.metrics import MetricDef, Metrics

__all__ = ["RayBackend", "ray_metrics"]


class RayBackend:
    gauges_fade = True  # a gauge not set since the last export is not exported again (``Metrics`` re-sets them)

    def instrument(self, d: MetricDef):
        from ray.util import metrics as rm

        if d.kind == "counter":
            return _RayInstrument(rm.Counter(d.name, description=d.help, tag_keys=d.labels))
        if d.kind == "gauge":
            return _RayInstrument(rm.Gauge(d.name, description=d.help, tag_keys=d.labels))
        return _RayInstrument(rm.Histogram(d.name, description=d.help, boundaries=list(d.buckets), tag_keys=d.labels))


class _RayInstrument:
    def __init__(self, metric):
        self.metric = metric

    def inc(self, value, labels):
        self.metric.inc(value, tags=labels)

    def set(self, value, labels):
        self.metric.set(value, tags=labels)

    def observe(self, value, labels):
        self.metric.observe(value, tags=labels)


def ray_metrics(enabled: bool = True) -> Metrics:
    """Metrics recorded through Ray (off: recorded nowhere)."""
    return Metrics(RayBackend() if enabled else None)
