"""``/v1/pipelines``: the served pipelines, their status (redacted for tenants) and rescaling."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from serve.auth import Principal
from serve.errors import ApiError
from serve.models import ScaleRequest, errors
from serve.routes import caller, known_query
from serve.tenancy import pipeline_view

__all__ = ["router"]


def router(core) -> APIRouter:
    r = APIRouter(tags=["pipelines"], dependencies=[Depends(known_query)])
    windows = core.windows

    def known(name: str) -> None:
        if name not in {p for p, _ in windows}:
            raise ApiError(404, f"no pipeline {name!r}")

    @r.get("/v1/pipelines", responses=errors(400, 401, 403, 429))
    async def pipelines(who: Principal = Depends(caller)) -> dict:
        return {"pipelines": [{"name": s, "windows": [w for (p, w) in windows if p == s]} for s in sorted({p for p, _ in windows})]}

    @r.get("/v1/pipelines/{name}", responses=errors(400, 401, 403, 404, 429, 503))
    async def pipeline_status(name: str, who: Principal = Depends(caller)) -> dict:
        """The pipeline's status: all of it with the ``operator`` scope, a redacted summary for a tenant."""
        known(name)
        from actors.control import pipeline_status as status

        try:
            st = await asyncio.to_thread(status, name, 5)
        except Exception:  # not running here, or Ray unreachable
            raise ApiError(503, f"pipeline {name!r} is not running") from None
        return pipeline_view(who, st)

    @r.post("/v1/pipelines/{name}/scale", responses=errors(400, 401, 403, 404, 413, 429, 503))
    async def scale_pipeline(name: str, body: ScaleRequest, who: Principal = Depends(caller)) -> dict:
        """Move the running pipeline's partitions (with their state) onto ``workers`` workers (scope ``pipelines:write``);
        the change, and a refused one, is written to the audit table with the caller."""
        actor = f"api:{who.subject}@{who.tenant}"
        if "pipelines:write" not in who.scopes:
            await asyncio.to_thread(core.registry.record, actor, "scale_pipeline_denied", name, {"to": body.workers})
            raise ApiError(403, "changing pipelines needs the pipelines:write scope")
        known(name)
        from actors import control

        try:
            before = len((await asyncio.to_thread(control.pipeline_status, name, 5))["workers"])
        except Exception:  # not running here, or Ray unreachable
            raise ApiError(503, f"pipeline {name!r} is not running") from None
        try:
            plan = await asyncio.to_thread(control.scale, name, body.workers)
        except Exception as exc:  # no checkpoint section, not enough CPUs, not running
            cause = getattr(exc, "cause", None) or exc
            raise ApiError(503, f"cannot scale {name!r}: {type(cause).__name__}") from None
        await asyncio.to_thread(core.registry.record, actor, "scale_pipeline", name, {"from": before, "to": body.workers})
        return {"pipeline": name, "from": before, "to": body.workers, "plan": plan}

    return r
