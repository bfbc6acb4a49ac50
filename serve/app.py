"""The REST ingress (FastAPI) and its Ray Serve deployment.

``build_app`` puts the routers (``serve/routes``) behind the ``Guard`` (token,
rate limit and body limit before any body is read) and maps every refusal to
one error shape (``serve.errors``). Every endpoint but ``/healthz`` and
``/readyz`` needs a bearer token; the token's tenant scopes every read
(``serve.tenancy``). ``deployment`` wraps the app for Ray Serve; each replica
can also answer REST/WebSocket on ``direct_port`` and gRPC on ``grpc_port``
itself, bound to the configured host.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse

from serve.config import ServeConfig
from serve.core import Core, shared_core
from serve.errors import ApiError, http_headers, problem
from serve.guard import Guard
from serve.metrics import Measure

__all__ = ["app_builder", "build_app", "deployment"]

log = logging.getLogger("raystream.serve")


def _parameter(err: dict) -> str:
    loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "header", "body")]
    return ".".join(loc) or "body"


def build_app(cfg: ServeConfig, core: Core | None = None) -> FastAPI:
    """The FastAPI app over ``core`` (a new one for ``cfg`` when not given)."""
    from serve.routes import health, ingest, pipelines, schemas, windows

    core = core or Core(cfg)
    app = FastAPI(title="raystream", version="1", description="Closed windows, pipelines, schemas and ingest of raystream")
    app.state.core = core

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(problem(exc), status_code=exc.status, headers=http_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_value(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # one shape for every refusal: 400 naming the parameter, never FastAPI's 422 list
        first = (exc.errors() or [{}])[0]
        name = _parameter(first)
        return JSONResponse(problem(ApiError(400, f"{name}: {first.get('msg', 'invalid value')}", parameter=name)), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the log under an id; the client gets the id only
        cid = uuid.uuid4().hex[:16]
        log.error("unexpected error %s: %s", cid, type(exc).__name__, exc_info=exc)
        return JSONResponse({"detail": "internal error", "correlation_id": cid}, status_code=500)

    for area in (health, windows, pipelines, schemas):
        app.include_router(area.router(core))
    if core.ingestor is not None:
        app.include_router(ingest.router(core))
    if cfg.stream is not None:
        from serve.stream import add_stream_route

        add_stream_route(app, core)
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    # outermost but for Starlette's own error middleware: nothing inside reads a body the Guard has not admitted
    app.add_middleware(Guard, core=core, routes=app.router.routes, limit=cfg.max_body_bytes)
    app.add_middleware(Measure, routes=app.router.routes, metrics=core.metrics)  # outermost: sees the Guard's refusals
    app.router.on_shutdown.append(core.close)
    return app


def start_direct(app: FastAPI, host: str, port: int, ws_max_size: int = 1 << 16):
    """Serve ``app`` from this process on ``port`` too (``direct_port``), on its own event loop in a thread.

    Serve's proxy relays every request and every WebSocket message to the replica
    over Ray; here the replica answers the socket itself. The port is bound with
    SO_REUSEPORT so every replica on a node listens on it and the kernel spreads
    connections. The app shares the replica's Core (its pools are per event loop).
    """
    import asyncio
    import gc
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    # lifespan off: shutting this server down must not close the Core the Serve app still uses
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws_max_size=ws_max_size))
    # what exists now (Ray, Serve, the app) lives as long as the replica: keep it out of every collection
    gc.freeze()
    t = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="raystream-direct", daemon=True)
    t.start()
    return server


def deployment(cfg: ServeConfig):
    """The Serve application: the FastAPI ingress plus the gRPC methods, with the configured autoscaling."""
    from ray import serve

    from serve.grpc_api import GrpcMethods

    def replica_app() -> FastAPI:
        # a builder is evaluated in each replica: the app and the gRPC methods share the replica's Core
        return build_app(cfg, shared_core(cfg))

    @serve.deployment(
        name="raystream-api",
        autoscaling_config={"min_replicas": cfg.autoscaling.min_replicas, "max_replicas": cfg.autoscaling.max_replicas,
                            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests},
        ray_actor_options={"num_cpus": 0.1},
        # handlers are async and mostly wait on PostgreSQL/Redis, and every open subscription is one
        max_ongoing_requests=cfg.autoscaling.max_ongoing_requests,
    )
    @serve.ingress(replica_app)
    class Api(GrpcMethods):
        """The FastAPI app (HTTP, WebSocket) and the gRPC service, one instance per Serve replica."""

        async def __init__(self):
            GrpcMethods.__init__(self, shared_core(cfg))
            ws_max = cfg.stream.max_message_bytes if cfg.stream is not None else 1 << 16
            if cfg.direct_port is not None:
                start_direct(build_app(cfg, self.core), cfg.host, cfg.direct_port, ws_max)
            if cfg.grpc_port is not None and not cfg.grpc_proxy:
                from serve.grpc_api import start_grpc

                # on the replica's own event loop, bound to cfg.host (Serve's gRPC proxy binds [::])
                self._grpc = await start_grpc(self, cfg.host, cfg.grpc_port, cfg.max_body_bytes)

    return Api.bind()


def app_builder(args: dict):
    """Serve's application builder for a RayService (``import_path: serve.app:app_builder``, ``args: {config: PATH}``):
    the application ``raystream serve --config PATH`` deploys, from the same file."""
    from serve.config import load_config

    return deployment(load_config(args["config"]))
