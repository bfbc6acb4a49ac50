"""Operator controls for a running pipeline: status, scale, chaos drills.

``raystream run`` records where its Ray cluster is in
``~/.raystream/pipelines/<name>.json`` (``$RAYSTREAM_HOME`` overrides the
folder), so ``raystream status|scale|chaos`` started from another terminal on
the same machine find it without flags; ``--address`` reaches any cluster.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

__all__ = ["connect", "forget_pipeline", "kill_coordinator", "kill_worker", "pipeline_status", "record_pipeline", "scale"]


def _home() -> Path:
    return Path(os.environ.get("RAYSTREAM_HOME") or Path.home() / ".raystream") / "pipelines"


def record_pipeline(name: str, address: str) -> None:
    """Remember where pipeline ``name`` runs (called by the driver)."""
    folder = _home()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"address": address, "driver_pid": os.getpid(), "started": time.time()}))


def forget_pipeline(name: str) -> None:
    (_home() / f"{name}.json").unlink(missing_ok=True)


def connect(pipeline: str, address: str | None = None) -> None:
    """Connect this process to the Ray cluster running ``pipeline``."""
    from actors.runtime import NAMESPACE, local_ray_env

    local_ray_env()
    import ray

    if ray.is_initialized():
        return
    if address is None:
        rec = _home() / f"{pipeline}.json"
        if rec.exists():
            address = json.loads(rec.read_text())["address"]
        else:
            address = "auto"
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise LookupError(f"no Ray cluster for pipeline {pipeline!r} at {address}: {exc}") from None


def _coordinator(pipeline: str):
    import ray

    from actors.runtime import NAMESPACE, actor_name

    try:
        return ray.get_actor(actor_name(pipeline, "coordinator"), namespace=NAMESPACE)
    except ValueError:
        raise LookupError(f"pipeline {pipeline!r} is not running on this cluster") from None


def pipeline_status(pipeline: str, timeout_s: float = 30.0) -> dict:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(_coordinator(pipeline).status.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the coordinator is restarting


def scale(pipeline: str, workers: int) -> dict:
    import ray

    return ray.get(_coordinator(pipeline).scale.remote(workers), timeout=300)


def kill_worker(pipeline: str, index: int | None = None) -> dict:
    """SIGKILL one worker's process (the first live one unless ``index``); returns what was killed."""
    st = pipeline_status(pipeline)
    live = [w for w in st["workers"] if not w.get("given_up") and w.get("pid")]
    if index is not None:
        live = [w for w in live if w["index"] == index]
    if not live:
        raise LookupError(f"pipeline {pipeline!r} has no live worker" + (f" {index}" if index is not None else ""))
    w = live[0]
    _kill(w["pid"], st)
    return {"index": w["index"], "pid": w["pid"], "partitions": w["partitions"], "killed_at": time.time()}


def kill_coordinator(pipeline: str) -> dict:
    """SIGKILL the coordinator's process; Ray restarts it and it adopts the workers."""
    st = pipeline_status(pipeline)
    _kill(st["coordinator_pid"], st)
    return {"pid": st["coordinator_pid"], "killed_at": time.time()}


def _kill(pid: int, st: dict) -> None:
    try:
        os.kill(int(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone: the drill's effect is there
    except PermissionError as exc:
        raise RuntimeError(f"cannot signal pid {pid}: run the drill on the node that hosts it ({exc})") from None
