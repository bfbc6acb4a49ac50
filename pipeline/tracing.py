"""OpenTelemetry traces: ingest -> Kafka headers -> the worker's batch -> window emit -> sink write.

The ingest span (REST or gRPC) puts its W3C ``traceparent`` on every record it
produces. A worker's batch holds records of many requests, so its ``batch``
span *links* to their contexts (the messaging convention for batch consumers)
instead of picking one parent; ``window emit`` and ``sink write`` are its
children, also when a merge owner writes them (the batch's context travels
with the partial states). Sampling: a span with a parent follows it; a batch
is kept when any record it links to was kept, else with ``sample_ratio``.
Spans leave over OTLP/HTTP (protobuf) in batches, off the hot path.

No Ray here; with tracing off every call is a no-op.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

__all__ = ["HEADER", "NOOP", "Tracer", "make_tracer"]

HEADER = "traceparent"
MAX_LINKS = 32  # per batch span: contexts of the first distinct ingest requests in the batch


class Tracer:
    """Spans through one SDK provider (``enabled``), or nothing at all."""

    def __init__(self, provider=None):
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("raystream") if provider is not None else None

    @contextlib.contextmanager
    def span(self, name: str, attributes: dict | None = None, parent: str | bytes | None = None,
             links: Iterable[str | bytes] = (), kind: str = "internal") -> Iterator[object]:
        """A span as the current one; ``parent``/``links`` are W3C traceparent values."""
        if not self.enabled:
            yield None
            return
        from opentelemetry import trace

        ctx = _context(parent) if parent else None
        span_links = []
        for tp in links:
            sc = trace.get_current_span(_context(tp)).get_span_context()
            if sc.is_valid:
                span_links.append(trace.Link(sc))
            if len(span_links) >= MAX_LINKS:
                break
        with self._tracer.start_as_current_span(name, context=ctx, kind=_KINDS[kind], links=span_links,
                                                attributes={k: v for k, v in (attributes or {}).items() if v is not None}) as s:
            yield s

    def current(self) -> str | None:
        """The current span's traceparent (to carry it in a header or a call), None when not sampled or off."""
        if not self.enabled:
            return None
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return carrier.get(HEADER)

    def flush(self, timeout_ms: int = 5000) -> None:
        if self.provider is not None:
            self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


NOOP = Tracer()


def _context(traceparent: str | bytes):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tp = traceparent.decode("latin-1") if isinstance(traceparent, bytes) else traceparent
    return TraceContextTextMapPropagator().extract({HEADER: tp})


def _kinds():
    from opentelemetry.trace import SpanKind

    return {"internal": SpanKind.INTERNAL, "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER,
            "server": SpanKind.SERVER, "client": SpanKind.CLIENT}


class _Kinds(dict):
    def __missing__(self, key):
        self.update(_kinds())
        return dict.__getitem__(self, key)


_KINDS = _Kinds()


def _sampler(ratio: float):
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased

    class LinkedOrRatio(Sampler):
        """Root spans: kept when a linked context was kept (a batch of sampled requests), else by ratio."""

        def __init__(self):
            self.ratio = TraceIdRatioBased(ratio)

        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
            if any(link.context.trace_flags.sampled for link in links or ()):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return self.ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"LinkedOrRatio{{{ratio}}}"

    return ParentBased(root=LinkedOrRatio())


_LOCK = threading.Lock()
_PROVIDERS: dict[tuple, Tracer] = {}


def make_tracer(cfg, service: str) -> Tracer:
    """The process's tracer for ``cfg`` (a ``TracingSpec``-like object with ``otlp_endpoint`` and ``sample_ratio``);
    ``NOOP`` when ``cfg`` is None. One provider per (endpoint, ratio, service) and process."""
    if cfg is None:
        return NOOP
    key = (cfg.otlp_endpoint, cfg.sample_ratio, service)
    with _LOCK:
        if key not in _PROVIDERS:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=_sampler(cfg.sample_ratio))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint, timeout=5),
                                                           schedule_delay_millis=1000))
            _PROVIDERS[key] = Tracer(provider)
        return _PROVIDERS[key]
