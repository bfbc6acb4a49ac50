"""The raystream command as an operator runs it: SIGTERM stops cleanly, the demo runs by itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq

from pipeline.io.kafka import produce_all
from pipeline.io.sinks.parquet import read_windows
from pipeline.synthetic import events
from tests import reference
from tests.services import sigterm_and_wait

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "clicks.yaml")


def test_sigterm_writes_closed_windows_and_exits_zero(broker, tmp_path, topic_name):
    values, keys, cols = events(30_000, 1_760_000_000_000, 1000, tenants=8, seed=3)
    df = pd.DataFrame(cols)
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % 4)
    df["offset"] = df.groupby("partition").cumcount()
    broker.extra["broker"].create_topic(topic_name, 4)
    produce_all(broker.address, topic_name, values, keys, df["partition"].tolist())
    out = tmp_path / "out"
    env = {**os.environ, "KAFKA_BOOTSTRAP": broker.address, "TOPIC": topic_name,
           "OUT_URI": f"file://{out}", "LATE_URI": f"file://{tmp_path}/late"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", EXAMPLE, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not list(out.rglob("*.parquet")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        time.sleep(3)  # let it consume everything: 30 s of event time, 3 windows per key still open
    finally:
        err = sigterm_and_wait(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: flushing and stopping" in err
    got = read_windows(f"file://{out}", "clicks", "tenant_type_10s").to_pandas()
    want, _ = reference.windows(df, "tumbling", ["tenant_id", "event_type"], 2000, 0, size=10_000)
    # every window the watermark closed is written, complete; the still-open ones are not
    max_ts = df["ts"].max()
    closed = want[want["window_end"] <= max_ts - 2000]
    assert len(closed) and len(got) == len(closed)
    reference.compare(got.drop(columns=["p95_value"]), closed, ["tenant_id", "event_type"])


def test_demo_runs_for_a_duration_and_writes_windows(tmp_path):
    """The demo with its serving layer: while it runs, the printed REST endpoint answers with the
    printed token, and what it serves equals the windows the Parquet sink wrote."""
    import time

    import httpx

    from pipeline.io.broker import free_port

    port, gport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", "--duration", "35", "--rate", "3000",
                             "--out", str(tmp_path), "--http-port", str(port), "--grpc-port", str(gport)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served: list[dict] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not served:
            token = tmp_path / "serve" / "token"
            if token.exists():
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/v1/aggregates/clicks/tenant_type_10s", params={"limit": 1000},
                                  headers={"Authorization": f"Bearer {token.read_text()}"}, timeout=10)
                    if r.status_code == 200:
                        served = r.json()["items"]
                except httpx.HTTPError:
                    pass  # not up yet
            time.sleep(1)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert f"http://127.0.0.1:{port}/docs" in err and f"127.0.0.1:{gport}" in err and "direct" in err
    files = list((tmp_path / "windows").rglob("*.parquet"))
    assert files, err[-2000:]
    df = pd.concat([pq.read_table(f).to_pandas() for f in files])
    assert len(df) > 0
    assert "done" in err and "records" in err
    assert served and {x["tenant_id"] for x in served} == {"tenant-000"}
    df["window_start"] = (pd.to_datetime(df["window_start"], utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta("1ms")
    assert "partition" not in df.columns and all("partition" not in x for x in served)  # one row per group
    latest = df.sort_values("revision").drop_duplicates(["window_start", "tenant_id", "event_type"], keep="last")
    by_key = latest.set_index(["window_start", "tenant_id", "event_type"])
    for x in served:
        row = by_key.loc[(x["window_start"], x["tenant_id"], x["event_type"])]
        assert int(row["count"]) == x["count"] and abs(float(row["sum_value"]) - x["sum_value"]) <= 1e-9 * max(1.0, abs(x["sum_value"]))
