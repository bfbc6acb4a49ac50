"""What the multi-node benchmarks share: tearing a local cluster down and saving a result with its plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from rich.console import Console

RESULTS = Path(__file__).resolve().parent / "results"


def teardown(cluster, broker) -> None:
    """Disconnect this process from Ray (if it connected), then stop the cluster and the broker."""
    try:
        import ray

        ray.shutdown()
    except Exception:  # never connected
        pass
    cluster.stop()
    broker.stop()


def save(name: str, result: dict, plot: Callable[[dict, Path], None], console: Console) -> None:
    """``results/<name>.json`` and ``results/<name>.png``, then the result on the console."""
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")
    console.print_json(json.dumps(result))
