"""``/healthz`` (the process answers) and ``/readyz`` (PostgreSQL answers): no token."""

from __future__ import annotations

import psycopg
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

__all__ = ["router"]


def router(core) -> APIRouter:
    r = APIRouter(tags=["health"])  # probes may add what they like

    @r.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @r.get("/readyz", responses={503: {"description": "PostgreSQL is not reachable"}})
    async def readyz() -> Response:
        try:
            pool = await core.apg()
            async with pool.connection(timeout=2) as conn:
                await conn.execute("select 1")
        except (psycopg.Error, TimeoutError) as exc:
            return JSONResponse({"status": "not ready", "postgres": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    return r
