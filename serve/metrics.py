"""API metrics of a Serve replica (or a direct server): requests by route, method and status, latency, refusals.

Recorded through Ray's metrics API when the process is part of a Ray cluster
(a Serve replica is), so they appear on the node's metrics port next to the
pipelines'; nowhere otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from starlette.routing import Match

from pipeline.metrics import Metrics, TenantCap

__all__ = ["Measure", "ServeMetrics", "serve_metrics"]

log = logging.getLogger("raystream.api")


def serve_metrics() -> Metrics:
    try:
        import ray

        if ray.is_initialized():
            from actors.metrics import RayBackend

            return Metrics(RayBackend())
    except ImportError:  # serving without Ray installed: no metrics
        pass
    return Metrics()


class ServeMetrics:
    """What the API layers report: a request, a rate-limit refusal, a subscriber more or less."""

    def __init__(self, metrics: Metrics | None = None, max_tenants: int = 100):
        self.m = metrics or serve_metrics()
        self.tenants = TenantCap(max_tenants)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.subscribers = 0

    def request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        self.m.inc("raystream_api_requests", 1, route=route, method=method, status=status)
        self.m.observe("raystream_api_request_seconds", seconds, route=route, method=method)

    def rate_limited(self, tenant: str) -> None:
        self.m.inc("raystream_api_rate_limited", 1, tenant=self.tenants(tenant))

    def subscriber(self, delta: int) -> None:
        self.subscribers = max(0, self.subscribers + delta)
        self.m.set("raystream_api_subscribers", self.subscribers, replica=self.replica)


class Measure:
    """Outermost ASGI middleware: every HTTP request's status and latency, labelled by its route template
    (``/v1/aggregates/{pipeline}/{window}``, never the raw path: bounded cardinality)."""

    def __init__(self, app, routes, metrics: ServeMetrics):
        self.app, self.routes, self.metrics = app, routes, metrics
        self._flat: list | None = None

    def route(self, scope) -> str:
        if self._flat is None:
            from serve.guard import _flat_routes

            self._flat = _flat_routes(self.routes)
        for route in self._flat:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", None) or "unmatched"
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route, seconds = self.route(scope), time.perf_counter() - t0
            self.metrics.request(route, scope.get("method", "GET"), status, seconds)
            if status >= 400:  # refusals and failures, with the caller when it was verified
                who = (scope.get("state") or {}).get("principal")
                log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s -> %d (%.1f ms)",
                        scope.get("method", "GET"), route, status, seconds * 1000,
                        extra={"tenant": getattr(who, "tenant", None), "route": route, "status": status})
