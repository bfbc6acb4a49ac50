"""Start or connect Ray safely (loopback-only when raystream starts it)."""

from __future__ import annotations

import os

NAMESPACE = "raystream"

__all__ = ["NAMESPACE", "actor_name", "ensure_ray", "local_ray_env"]


def local_ray_env() -> None:
    """Environment for a one-machine Ray; must run before ``ray`` is first imported.

    Ray reads ``RAY_AUTH_MODE`` at import time; token mode protects the local
    cluster's control plane (the token is kept in ~/.ray/auth_token).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def actor_name(pipeline: str, role: str) -> str:
    return f"{pipeline}:{role}"


def ensure_ray(address: str | None = None, num_cpus: int | None = None, metrics_port: int | None = None) -> None:
    """Connect to ``address``, or start a one-machine Ray bound to 127.0.0.1.

    ``metrics_port``: where the started Ray's metrics agent serves every actor's
    Prometheus metrics (a cluster's nodes have their own, ``--metrics-export-port``).

    Without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes the machine's
    network address and listens on every interface; with it every listener is
    on 127.0.0.1.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return
    local_ray_env()
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        **({"_metrics_export_port": metrics_port} if metrics_port else {}),
    )
