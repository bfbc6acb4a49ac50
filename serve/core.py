"""What REST, gRPC and WebSocket share in one serving process.

``Core`` holds the token verifier, the window catalog, the PostgreSQL pools,
the rate limiter, the schema registry and the ingestor, and answers the
protocol-neutral questions (who is calling, may they, what are the windows).
Each protocol maps ``ApiError`` to its own status (HTTP code, gRPC code,
WebSocket close code). In a Serve replica the REST app and the gRPC methods
use the same ``Core`` (``shared_core``): one set of pools per replica.
"""

from __future__ import annotations

import asyncio
import threading

from serve.auth import AuthError, Authenticator, Principal
from serve.metrics import ServeMetrics
from serve.config import ServeConfig
from serve.errors import ApiError
from serve.query import MAX_MS, aquery_windows, catalog
from serve.tenancy import scope_filters, visible_rows

__all__ = ["ApiError", "Core", "shared_core"]


class Core:
    """Auth, catalog, stores and limits of one serving process (pools are opened lazily where they are used)."""

    def __init__(self, cfg: ServeConfig):
        from pipeline.io.registry import Registry

        self.cfg = cfg
        self.auth = Authenticator(cfg.auth.jwks, cfg.auth.issuer, cfg.auth.audience, cfg.auth.tenant_claim,
                                  cfg.auth.hs256_secret.get_secret_value() if cfg.auth.hs256_secret else None,
                                  refresh_min_s=cfg.auth.jwks_refresh_min_s)

        self.windows = catalog(cfg.specs())
        self.dsn = cfg.postgres_dsn.get_secret_value()
        self.registry = Registry(self.dsn)
        self.limiter = None
        self.metrics = ServeMetrics()
        if cfg.rate_limit is not None:
            from serve.ratelimit import RateLimiter

            rl = cfg.rate_limit
            self.limiter = RateLimiter(rl.redis_url.get_secret_value(), rl.capacity, rl.per_second, endpoints=dict(rl.endpoints))
        self.ingestor = None
        if cfg.ingest is not None:
            from serve.ingest import Ingestor

            from pipeline.tracing import make_tracer

            self.ingestor = Ingestor(cfg.ingest, self.registry, make_tracer(cfg.tracing, "raystream-api"))
        self._pool = None
        self._apools: dict[int, tuple] = {}
        self._lock = threading.Lock()

    # -- PostgreSQL ----------------------------------------------------------------
    def pg(self):
        """A pooled synchronous connection (context manager)."""
        with self._lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(self.dsn, min_size=1, max_size=16, kwargs={"connect_timeout": 5}, open=True)
        return self._pool.connection(timeout=10)

    async def apg(self):
        """The async pool of the running event loop (an async pool belongs to the loop that opened it)."""
        loop = asyncio.get_running_loop()
        entry = self._apools.get(id(loop))
        if entry is None or entry[0] is not loop:
            from psycopg_pool import AsyncConnectionPool

            # forget pools of loops that are gone (a test client runs a loop per request)
            self._apools = {k: v for k, v in self._apools.items() if not v[0].is_closed()}
            entry = (loop, AsyncConnectionPool(self.dsn, min_size=1, max_size=32, kwargs={"connect_timeout": 5}, open=False))
            self._apools[id(loop)] = entry
            await entry[1].open()
        return entry[1]

    # -- callers ----------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization`` header value; ApiError 401/403 (an unknown key refetches the JWKS)."""
        try:
            return await self.auth.averify(authorization)
        except AuthError as exc:
            raise ApiError(exc.status, str(exc)) from None

    async def admit(self, who: Principal, endpoint: str) -> None:
        """The tenant's token bucket for ``endpoint``: ApiError 429 with the wait when empty."""
        if self.limiter is None:
            return
        import redis

        try:
            ok, retry = await self.limiter.acheck(who.tenant, endpoint)
        except (redis.RedisError, OSError):  # fail closed: without the shared buckets no tenant's bound can be kept
            raise ApiError(503, "rate limiter unavailable", retry_after=1) from None
        if not ok:
            self.metrics.rate_limited(who.tenant)
            raise ApiError(429, f"rate limit of {endpoint} reached for this tenant", retry_after=int(retry) or 1)

    def window(self, pipeline: str, window: str):
        info = self.windows.get((pipeline, window))
        if info is None:
            raise ApiError(404, f"no window {window!r} in pipeline {pipeline!r}")
        return info

    # -- reads --------------------------------------------------------------------------
    async def query(self, who: Principal, pipeline: str, window: str, filters: dict[str, str], start: int | None = None,
                    end: int | None = None, order: str = "asc", fields: list[str] | None = None, limit: int = 100,
                    cursor: str | None = None, include_open: bool = False) -> dict:
        """One page of the tenant's closed windows (and its open ones with ``include_open``)."""
        import psycopg

        info = self.window(pipeline, window)
        if not isinstance(limit, int) or not 1 <= limit <= self.cfg.max_page_size:
            raise ApiError(400, f"limit is between 1 and {self.cfg.max_page_size}", parameter="limit")
        for name, v in (("start", start), ("end", end)):
            if v is not None and not (isinstance(v, int) and 0 <= v <= MAX_MS):
                raise ApiError(400, f"{name} is epoch milliseconds between 0 and {MAX_MS}", parameter=name)
        if order not in ("asc", "desc"):
            raise ApiError(400, "order is asc or desc", parameter="order")
        filters = scope_filters(who, filters, self.cfg.tenant_key, info.identity)
        try:
            pool = await self.apg()
            async with pool.connection(timeout=10) as conn:
                rows, nxt = await aquery_windows(conn, self.cfg.table_prefix, info, self.cfg.tenant_key, who.tenant, filters,
                                                 start, end, order, fields, limit, cursor)
        except psycopg.errors.DataError:  # a cursor value of the wrong type for its column
            raise ApiError(400, "cursor is not one this API gave out", parameter="cursor") from None
        except psycopg.errors.UndefinedTable:
            rows, nxt = [], None  # nothing emitted yet
        except (psycopg.OperationalError, TimeoutError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ApiError(503, f"store unavailable: {first}") from None
        result: dict = {"items": rows, "next_cursor": nxt}
        if include_open:
            result["open"] = await asyncio.to_thread(open_windows, info, self.cfg.tenant_key, who, filters, start, end,
                                                     fields)
        return result

    def close(self) -> None:
        if self.ingestor is not None:
            self.ingestor.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def open_windows(info, tenant_key: str, who: Principal, filters: dict, start, end, fields) -> list[dict]:
    """Open windows of the caller's tenant from the running pipeline's workers (queryable state)."""
    import ray

    from actors.runtime import NAMESPACE, actor_name

    if not ray.is_initialized():
        raise ApiError(503, "include_open needs the serving layer to run on the pipeline's Ray cluster")
    try:
        coord = ray.get_actor(actor_name(info.pipeline, "coordinator"), namespace=NAMESPACE)
        rows = ray.get(coord.open_windows.remote(info.window, {**filters, tenant_key: who.tenant}), timeout=20)
    except ValueError:
        raise ApiError(503, f"pipeline {info.pipeline!r} is not running: no open windows to read") from None
    rows = [r for r in visible_rows(who, rows, tenant_key)
            if (start is None or r["window_start"] >= start) and (end is None or r["window_start"] < end)]
    rows.sort(key=lambda r: (r["window_start"], str([r.get(k) for k in info.keys]), r.get("partition", -1)))
    if fields:
        rows = [{k: r.get(k) for k in fields} for r in rows]
    return rows


def _reveal(v):
    from pydantic import SecretStr

    if isinstance(v, SecretStr):
        return v.get_secret_value()
    if isinstance(v, dict):
        return sorted((k, _reveal(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return [_reveal(x) for x in v]
    return v


_SHARED: dict[str, Core] = {}
_SHARED_LOCK = threading.Lock()


def shared_core(cfg: ServeConfig) -> Core:
    """The one Core of this process for ``cfg`` (REST app and gRPC methods of a replica share it)."""
    key = repr(_reveal(cfg.model_dump()))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Core(cfg)
        return _SHARED[key]
