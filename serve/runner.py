"""Start the Serve application on a Ray cluster (``raystream serve``, ``raystream demo``)."""

from __future__ import annotations

from serve.config import ServeConfig

__all__ = ["start_serve", "stop_serve"]

APP_NAME = "raystream"


def start_serve(cfg: ServeConfig, address: str | None = None) -> dict[str, str]:
    """Deploy the application; returns its endpoints (``http``, ``ws``, ``docs``, ``grpc``).

    Starts a loopback-only local Ray without ``address`` (and none is connected).
    """
    from actors.runtime import ensure_ray, local_ray_env

    if address is None:
        local_ray_env()
    ensure_ray(address)
    from ray import serve

    from serve.app import deployment
    from serve.grpc_api import GRPC_SERVICER

    grpc_options = None
    if cfg.grpc_port is not None and cfg.grpc_proxy:  # off by default: Serve's gRPC proxy binds [::] whatever host says
        grpc_options = {"host": cfg.host, "port": cfg.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, grpc_options=grpc_options)
    serve.run(deployment(cfg), name=APP_NAME, route_prefix="/")
    base = f"http://{cfg.host}:{cfg.port}"
    urls = {"http": base, "docs": f"{base}/docs", "ws": f"ws://{cfg.host}:{cfg.port}/v1/stream"}
    if cfg.grpc_port is not None:
        urls["grpc"] = f"{cfg.host}:{cfg.grpc_port}"
    if cfg.direct_port is not None:
        urls["direct"] = f"http://{cfg.host}:{cfg.direct_port}"
        urls["ws_direct"] = f"ws://{cfg.host}:{cfg.direct_port}/v1/stream"
    return urls


def stop_serve() -> None:
    from ray import serve

    serve.shutdown()
