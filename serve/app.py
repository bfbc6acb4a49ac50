"""The REST ingress (FastAPI) and its Ray Serve deployment.

Every endpoint but ``/healthz`` and ``/readyz`` needs a bearer token; the
token's tenant scopes every read. ``build_app`` gives the FastAPI app (tests
drive it directly); ``deployment`` wraps it for Ray Serve with the configured
autoscaling.
"""

from __future__ import annotations

import gzip  # noqa: F401  (GZipMiddleware answers Accept-Encoding: gzip)
import hashlib
import json
from typing import Optional

import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse

from serve.auth import AuthError, Authenticator, Principal
from serve.config import ServeConfig
from serve.query import BadQuery, catalog, query_windows

__all__ = ["build_app", "deployment"]


def build_app(cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="raystream", version="1", description="Closed windows, pipelines and schemas of raystream")
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    auth = Authenticator(cfg.auth.jwks_file, cfg.auth.issuer, cfg.auth.audience, cfg.auth.tenant_claim,
                         cfg.auth.hs256_secret.get_secret_value() if cfg.auth.hs256_secret else None)
    windows = catalog(cfg.specs())
    dsn = cfg.postgres_dsn.get_secret_value()
    pools: dict = {}

    def pg():
        """A pooled connection (the pool is made in the process that serves: it does not pickle)."""
        if "pool" not in pools:
            from psycopg_pool import ConnectionPool

            pools["pool"] = ConnectionPool(dsn, min_size=1, max_size=16, kwargs={"connect_timeout": 5}, open=True)
        return pools["pool"].connection(timeout=10)
    limiter = None
    if cfg.rate_limit is not None:
        from serve.ratelimit import RateLimiter

        rl = cfg.rate_limit
        limiter = RateLimiter(rl.redis_url.get_secret_value(), rl.capacity, rl.per_second, endpoints=dict(rl.endpoints))

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return JSONResponse({"detail": f"request body over {cfg.max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    def principal(request: Request, authorization: Optional[str] = Header(default=None)) -> Principal:
        try:
            who = auth.verify(authorization)
        except AuthError as exc:
            raise HTTPException(exc.status, str(exc), headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        if limiter is not None:
            route = request.scope.get("route")
            endpoint = getattr(route, "name", None) or request.url.path
            ok, retry = limiter.check(who.tenant, endpoint)
            if not ok:
                raise HTTPException(429, f"rate limit of {endpoint} reached for this tenant", headers={"Retry-After": str(int(retry) or 1)})
        return who

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> Response:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("select 1")
        except psycopg.Error as exc:
            return JSONResponse({"status": "not ready", "postgres": str(exc).splitlines()[0]}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/aggregates/{pipeline}/{window}", tags=["aggregates"])
    def aggregates(
        pipeline: str, window: str, request: Request,
        start: Optional[int] = Query(None, description="window_start >= start (epoch ms)"),
        end: Optional[int] = Query(None, description="window_start < end (epoch ms)"),
        order: str = Query("asc", pattern="^(asc|desc)$"),
        fields: Optional[str] = Query(None, description="comma-separated columns"),
        limit: int = Query(100, ge=1, le=cfg.max_page_size),
        cursor: Optional[str] = Query(None, max_length=4096),
        include_open: bool = Query(False, description="also the windows still open, read live from the workers"),
        if_none_match: Optional[str] = Header(default=None),
        who: Principal = Depends(principal),
    ) -> Response:
        """Closed windows of the caller's tenant; filter on any group key with ``key=value`` query parameters."""
        info = windows.get((pipeline, window))
        if info is None:
            raise HTTPException(404, f"no window {window!r} in pipeline {pipeline!r}")
        reserved = {"start", "end", "order", "fields", "limit", "cursor", "include_open"}
        filters = {k: v for k, v in request.query_params.items() if k not in reserved}
        try:
            with pg() as conn:
                rows, nxt = query_windows(conn, cfg.table_prefix, info, cfg.tenant_key, who.tenant, filters, start, end, order,
                                          fields.split(",") if fields else None, limit, cursor)
        except BadQuery as exc:
            raise HTTPException(exc.status, str(exc))
        except psycopg.errors.UndefinedTable:
            rows, nxt = [], None  # nothing emitted yet
        except psycopg.OperationalError as exc:
            raise HTTPException(503, f"store unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        result: dict = {"items": rows, "next_cursor": nxt}
        if include_open:
            result["open"] = _open_windows(info, cfg.tenant_key, who.tenant, filters, start, end, fields)
        body = json.dumps(result, default=str, separators=(",", ":")).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag, "Cache-Control": "private, no-cache"})

    @app.get("/v1/pipelines", tags=["pipelines"])
    def pipelines(who: Principal = Depends(principal)) -> dict:
        return {"pipelines": [{"name": s, "windows": [w for (p, w) in windows if p == s]} for s in sorted({p for p, _ in windows})]}

    @app.get("/v1/pipelines/{name}", tags=["pipelines"])
    def pipeline_status(name: str, who: Principal = Depends(principal)) -> dict:
        if name not in {p for p, _ in windows}:
            raise HTTPException(404, f"no pipeline {name!r}")
        try:
            from actors.control import pipeline_status as status

            return status(name, timeout_s=5)
        except Exception as exc:  # not running here, or Ray unreachable
            raise HTTPException(503, f"pipeline {name!r} is not running: {type(exc).__name__}")

    # -- schemas ---------------------------------------------------------------
    from pipeline.io.registry import Incompatible, Registry, UnknownVersion
    from pipeline.schemas import Schema

    registry = Registry(dsn)

    @app.get("/v1/schemas", tags=["schemas"])
    def subjects(who: Principal = Depends(principal)) -> dict:
        return {"subjects": [{**s, "latest": s["latest"]} for s in registry.subjects()]}

    @app.get("/v1/schemas/{subject}/versions/{version}", tags=["schemas"])
    def schema_version(subject: str, version: str, who: Principal = Depends(principal)) -> dict:
        if version != "latest" and not version.isdigit():
            raise HTTPException(400, "version is a number or 'latest'")
        try:
            v, schema = registry.get(subject, version)
        except UnknownVersion as exc:
            raise HTTPException(404, str(exc))
        return {"subject": subject, "version": v, "type": schema.kind, "schema": schema.doc if schema.kind == "json" else schema.text,
                "message": schema.message}

    @app.post("/v1/schemas/{subject}", tags=["schemas"], status_code=201)
    def register_schema(subject: str, body: dict, who: Principal = Depends(principal)) -> dict:
        """Register a version (needs the ``schemas:write`` scope); 409 with the problems when incompatible."""
        if "schemas:write" not in who.scopes:
            raise HTTPException(403, "registering schemas needs the schemas:write scope")
        kind = body.get("type", "json")
        try:
            text = json.dumps(body["schema"]) if kind == "json" else str(body["schema"])
            schema = Schema(kind, text, body.get("message"))
            version = registry.register(subject, schema, actor=f"api:{who.subject}@{who.tenant}")
        except Incompatible as exc:
            return JSONResponse({"detail": str(exc), "problems": exc.problems, "compatibility": exc.mode}, status_code=409)
        except (KeyError, ValueError) as exc:
            raise HTTPException(400, f"bad schema: {exc}")
        return {"subject": subject, "version": version}

    if cfg.ingest is not None:
        _ingest_routes(app, cfg, principal, registry)
    if cfg.stream is not None:
        from serve.stream import add_stream_route

        add_stream_route(app, cfg, auth, windows)
    return app


def _ingest_routes(app: FastAPI, cfg: ServeConfig, principal, registry) -> None:
    """POST /v1/events: JSON array or NDJSON; each record validated, tenant-checked, produced keyed by tenant."""
    import threading

    import fastjsonschema

    ing = cfg.ingest
    state: dict = {"producer": None, "validators": {}}
    lock = threading.Lock()

    def validator():
        if ing.schema_file:
            key = "file"
            if key not in state["validators"]:
                with open(ing.schema_file) as f:
                    state["validators"][key] = (fastjsonschema.compile(json.load(f)), ing.schema_file)
            return state["validators"][key]
        if "cache" not in state:
            from pipeline.io.registry import SchemaCache

            state["cache"] = SchemaCache(registry, ing.subject, ttl_s=5.0)  # a new version is followed within 5 s
        v, schema = state["cache"].get("latest")
        if v not in state["validators"]:
            state["validators"][v] = (fastjsonschema.compile(schema.doc), f"{ing.subject}/{v}")
        return state["validators"][v]

    def producer():
        with lock:
            if state["producer"] is None:
                from confluent_kafka import Producer

                state["producer"] = Producer({"bootstrap.servers": ing.bootstrap_servers, "enable.idempotence": True,
                                              "acks": "all", "linger.ms": 2, "message.timeout.ms": 10_000})
            return state["producer"]

    def close_producer() -> None:
        if state["producer"] is not None:
            state["producer"].flush(5)
            state["producer"] = None

    app.router.on_shutdown.append(close_producer)

    @app.post("/v1/events", tags=["ingest"])
    async def ingest(request: Request, who: Principal = Depends(principal)) -> Response:
        raw = await request.body()
        ctype = request.headers.get("content-type", "")
        try:
            if "ndjson" in ctype or "jsonlines" in ctype:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                records = json.loads(raw)
                if isinstance(records, dict):
                    records = [records]
        except ValueError as exc:
            raise HTTPException(400, f"body is not JSON or NDJSON: {exc}")
        if not isinstance(records, list):
            raise HTTPException(400, "body is a JSON array of records, one record, or NDJSON")
        if len(records) > ing.max_records:
            raise HTTPException(413, f"more than {ing.max_records} records")
        check, label = validator()
        results: list[dict] = []
        to_send: list[tuple[int, bytes]] = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                results.append({"index": i, "status": "rejected", "reason": "not_an_object"})
                continue
            tenant = rec.setdefault(ing.tenant_field, who.tenant)
            if tenant != who.tenant:
                results.append({"index": i, "status": "rejected", "reason": "tenant_mismatch",
                                "detail": f"{ing.tenant_field} names another tenant than the token"})
                continue
            try:
                check(rec)
            except fastjsonschema.JsonSchemaValueException as exc:
                results.append({"index": i, "status": "rejected", "reason": f"schema_violation:{exc.rule}",
                                "detail": f"{exc.name}: {exc.message}", "schema": label})
                continue
            results.append({"index": i, "status": "accepted"})
            to_send.append((i, json.dumps(rec, separators=(",", ":")).encode()))
        if to_send:
            p = producer()
            failed: dict[int, str] = {}
            for i, value in to_send:
                p.produce(ing.topic, value=value, key=who.tenant.encode(), headers=[("raystream.schema", label.encode())],
                          on_delivery=lambda err, _m, i=i: failed.__setitem__(i, str(err)) if err is not None else None)
            import asyncio

            left = await asyncio.get_running_loop().run_in_executor(None, p.flush, 15)
            for r in results:
                if r["status"] == "accepted" and (r["index"] in failed or left):
                    r.update(status="rejected", reason="broker_unavailable", detail=failed.get(r["index"], "not acknowledged"))
        accepted = sum(1 for r in results if r["status"] == "accepted")
        status = 200 if accepted == len(results) else 207 if accepted else 422
        return JSONResponse({"accepted": accepted, "rejected": len(results) - accepted, "results": results}, status_code=status)


def _open_windows(info, tenant_key: str, tenant: str, filters: dict, start, end, fields) -> list[dict]:
    """Open windows of the tenant from the running pipeline's workers (queryable state)."""
    import ray

    from actors.runtime import NAMESPACE, actor_name

    if not ray.is_initialized():
        raise HTTPException(503, "include_open needs the serving layer to run on the pipeline's Ray cluster")
    try:
        coord = ray.get_actor(actor_name(info.pipeline, "coordinator"), namespace=NAMESPACE)
        rows = ray.get(coord.open_windows.remote(info.window, {**filters, tenant_key: tenant}), timeout=20)
    except ValueError:
        raise HTTPException(503, f"pipeline {info.pipeline!r} is not running: no open windows to read")
    rows = [r for r in rows if str(r.get(tenant_key)) == tenant
            and (start is None or r["window_start"] >= start) and (end is None or r["window_start"] < end)]
    rows.sort(key=lambda r: (r["window_start"], str([r.get(k) for k in info.keys]), r["partition"]))
    if fields:
        rows = [{k: r.get(k) for k in fields.split(",")} for r in rows]
    return rows


def deployment(cfg: ServeConfig):
    """The Serve application: the FastAPI ingress with the configured autoscaling."""
    from ray import serve

    app = build_app(cfg)

    @serve.deployment(
        name="raystream-api",
        autoscaling_config={"min_replicas": cfg.autoscaling.min_replicas, "max_replicas": cfg.autoscaling.max_replicas,
                            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests},
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=64,  # requests mostly wait on PostgreSQL: one replica overlaps many
    )
    @serve.ingress(app)
    class Api:
        """The FastAPI app above, one instance per Serve replica."""

    return Api.bind()
