"""Start the Serve application on a Ray cluster (``raystream serve``, ``raystream demo``)."""

from __future__ import annotations

from serve.config import ServeConfig

__all__ = ["start_serve", "stop_serve"]

APP_NAME = "raystream"


def start_serve(cfg: ServeConfig, address: str | None = None) -> str:
    """Deploy the REST ingress; returns its base URL. Starts a loopback-only local Ray without ``address``."""
    from actors.runtime import ensure_ray, local_ray_env

    if address is None:
        local_ray_env()
    ensure_ray(address)
    from ray import serve

    from serve.app import deployment

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(deployment(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"


def stop_serve() -> None:
    from ray import serve

    serve.shutdown()
