"""Start the Serve application on a Ray cluster (``raystream serve``, ``raystream demo``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from serve.config import ServeConfig
from serve.guard import CALLBACK, GATE_ENV, gate_settings

__all__ = ["gate_env", "serve_config_v2", "start_serve", "stop_serve"]

APP_NAME = "raystream"


def gate_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment that installs the ProxyGate in Serve's HTTP proxies (set here and returned, for a cluster's nodes).

    Serve's proxy reads request bodies ahead of the replica; with this, tokens and body sizes are checked in the
    proxy too. The settings (with the development HS256 secret, if any) go to a file only this user can read.
    """
    fd, path = tempfile.mkstemp(prefix="raystream-gate-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(gate_settings(cfg), f)
    Path(path).chmod(0o600)
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, GATE_ENV: path}
    os.environ.update(env)
    return env


def start_serve(cfg: ServeConfig, address: str | None = None) -> dict[str, str]:
    """Deploy the application; returns its endpoints (``http``, ``ws``, ``docs``, ``grpc``, ``direct``) and whether
    the proxy gate is on (``proxy_gate``).

    Starts a loopback-only local Ray without ``address`` (and none is connected), with the ProxyGate in its
    HTTP proxy; on a cluster, set ``gate_env``'s variables on the nodes (the KubeRay manifests do).
    """
    from actors.runtime import ensure_ray, local_ray_env

    gate = False
    if address is None:
        local_ray_env()
        import ray

        if not ray.is_initialized():
            gate_env(cfg)  # read by the proxy when it starts: only a Ray started from here gets it
            gate = True
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
    urls["proxy_gate"] = "on" if gate or os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == CALLBACK else "off"
    if cfg.direct_port is not None:
        urls["direct"] = f"http://{cfg.host}:{cfg.direct_port}"
        urls["ws_direct"] = f"ws://{cfg.host}:{cfg.direct_port}/v1/stream"
    return urls


def stop_serve() -> None:
    from ray import serve

    serve.shutdown()


def serve_config_v2(cfg: ServeConfig, config_path: str) -> dict:
    """The RayService ``serveConfigV2`` (Ray's ServeDeploySchema) deploying what ``raystream serve --config`` does
    with ``cfg``, read from ``config_path`` inside the pods; the deployment's autoscaling is the config's (Serve
    applies the same values the code sets, shown here for operators). Serve's gRPC proxy appears only with
    ``grpc_proxy``: by default each replica serves gRPC on ``grpc_port`` itself, and a proxy on every node
    would take the same port."""
    a = cfg.autoscaling
    deployment = {"name": "raystream-api", "max_ongoing_requests": a.max_ongoing_requests,
                  "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}}
    doc: dict = {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port},
                 "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "serve.app:app_builder",
                                   "args": {"config": config_path}, "deployments": [deployment]}]}
    if cfg.grpc_port is not None and cfg.grpc_proxy:
        from serve.grpc_api import GRPC_SERVICER

        doc["grpc_options"] = {"port": cfg.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    return doc
