"""Backfill vs stream: the same spec over the same 3M events, as a streaming run and as two Ray Data backfills.

1. generate N events (as ``bench/throughput.py``: 4 partitions, 100 tenants, up to 2 s out of order) and
   produce them to an embedded broker;
2. ``raystream run SPEC --until-end`` (2 workers, the example spec's windows) with an ``archive`` sink;
3. ``raystream backfill SPEC --from kafka:earliest..latest`` and ``--from parquet:<archive>``, into other
   folders;
4. check the three outputs are equal (every window row and revision, every late record) and write
   ``bench/results/backfill.json`` and ``backfill.png``.

Usage: ``python bench/backfill.py [--events 3000000]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.io.broker import EmbeddedBroker  # noqa: E402
from pipeline.io.kafka import produce_all  # noqa: E402
from pipeline.io.sinks.parquet import read_windows  # noqa: E402
from pipeline.io.storage import open_location  # noqa: E402
from throughput import _cpu, _generate  # noqa: E402

console = Console()
RAYSTREAM = str(ROOT / ".venv" / "bin" / "raystream")


def _spec(work: Path, bootstrap: str, tag: str, archive: bool) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "clicks.yaml").read_text())
    spec["source"]["kafka"].update({"bootstrap_servers": bootstrap, "topic": "bench"})
    spec["sinks"] = [{"parquet": {"uri": f"file://{work}/{tag}/out"}}]
    if archive:
        spec["sinks"].append({"archive": {"uri": f"file://{work}/archive"}})
    spec["late_output"] = {"parquet": {"uri": f"file://{work}/{tag}/late"}}
    spec["workers"] = 2
    spec["worker_cpus"] = 0.95
    path = work / f"spec-{tag}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _command(args: list[str], report: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([RAYSTREAM, *args, "--report", str(report)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"raystream {args[0]} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    out["command_s"] = time.perf_counter() - t0
    return out


def _same(work: Path, a: str, b: str, windows: list[str]) -> bool:
    """Every row equal: exactly, except float sums and means, which may differ in the last bits (a float sum
    depends on how the records were cut into batches; 1e-12 relative)."""
    import numpy as np

    for w in windows:
        x = read_windows(f"file://{work}/{a}/out", "clicks", w).to_pandas()
        y = read_windows(f"file://{work}/{b}/out", "clicks", w).to_pandas()
        keys = ["window_start", "tenant_id", "event_type"]
        x, y = x.sort_values(keys).reset_index(drop=True), y.sort_values(keys).reset_index(drop=True)[x.columns]
        if len(x) != len(y):
            return False
        for c in x.columns:
            if c.startswith(("sum_", "mean_")):
                if not np.allclose(x[c], y[c], rtol=1e-12, atol=0):
                    return False
            elif not x[c].equals(y[c]):
                return False
    la = open_location(f"file://{work}/{a}/late").read_parquet("clicks/late")
    lb = open_location(f"file://{work}/{b}/late").read_parquet("clicks/late")
    if (la is None) != (lb is None):
        return False
    if la is not None:
        order = [("partition", "ascending"), ("offset", "ascending"), ("window", "ascending")]
        return la.sort_by(order).select(lb.column_names).equals(lb.sort_by(order))
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=3_000_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raystream-backfill-"))
    values, keys, parts = _generate(args.events)
    results: dict = {"events": args.events, "runs": []}
    with EmbeddedBroker() as broker:
        broker.create_topic("bench", 4)
        t0 = time.perf_counter()
        produce_all(broker.bootstrap, "bench", values, keys, parts)
        console.print(f"produced {args.events:,} events in {time.perf_counter() - t0:.1f}s")
        del values, keys, parts
        runs = [("stream", ["run", str(_spec(work, broker.bootstrap, "stream", True)), "--until-end", "--quiet"]),
                ("backfill kafka", ["backfill", str(_spec(work, broker.bootstrap, "kafka", False)), "--from",
                                    "kafka:earliest..latest"]),
                ("backfill parquet", ["backfill", str(_spec(work, broker.bootstrap, "parquet", False)), "--from",
                                      f"parquet:file://{work}/archive"])]
        for label, cmd in runs:
            rep = _command(cmd, work / f"report-{label.replace(' ', '-')}.json")
            records = rep["records"] if "records" in rep else sum(w["records"] for w in rep["workers"])
            wall = rep["wall_s"]
            run = {"label": label, "records": records, "wall_s": wall, "command_s": rep["command_s"],
                   "events_per_s": records / wall, "events_per_s_command": records / rep["command_s"]}
            results["runs"].append(run)
            console.print(f"{label}: {records:,} records in {wall:.1f}s ({run['events_per_s']:,.0f} ev/s; "
                          f"{rep['command_s']:.1f}s with start-up)")
        windows = [w["name"] for w in yaml.safe_load((ROOT / "examples" / "clicks.yaml").read_text())["windows"]]
        results["equal"] = {tag: _same(work, "stream", tag, windows) for tag in ("kafka", "parquet")}
        console.print(f"outputs equal to the stream's: {results['equal']}")
    results["archive_bytes"] = sum(f.stat().st_size for f in (work / "archive").rglob("*.parquet"))
    results["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    (args.out / "backfill.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / "backfill.png")
    console.print(f"wrote {args.out}/backfill.json and backfill.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["label"] for r in runs]
    a.bar(labels, [r["events_per_s"] for r in runs], color=["tab:blue", "tab:orange", "tab:green"])
    a.set_ylabel("events/s (wall time of the run)")
    a.set_title(f"{results['events']:,} events, {results['machine']['cores']} cores")
    b.bar(labels, [r["command_s"] for r in runs], color=["tab:blue", "tab:orange", "tab:green"])
    b.set_ylabel("seconds, command start to exit")
    b.set_title("outputs equal: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in results["equal"].items()))
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
