"""R-10: a whole ``raystream run`` whose wall clock is one hour off, idle-partition advance on.

Processing time never decides window membership, timeouts run on the monotonic clock, and the
future-timestamp guard compares event time with the broker's record timestamp: the windows equal the
reference whatever the process's clock says.

The clock is shifted inside the Python process (``time.time``/``time_ns``, before raystream is imported):
libfaketime cannot do it here, since it makes librdkafka's timed waits hang (its condition variables mix
clocks), which would test libfaketime rather than raystream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.io.kafka import produce_all
from pipeline.io.sinks.parquet import read_windows
from pipeline.synthetic import events
from tests import reference
from tests.services import sigterm_and_wait

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("skew_s", [3600, -3600])
def test_whole_run_under_a_skewed_clock_equals_the_reference(broker, tmp_path, topic_name, pipeline_name, skew_s):
    # event times around the real now: a guard that compared them with the skewed clock (-1 h) would take them
    # for records from the future (max_future 30 m) and reject them
    t0 = (int(time.time() * 1000) - 30_000) // 1000 * 1000
    values, keys, cols = events(6_000, t0, 1000, tenants=8, max_disorder_ms=400, seed=7)
    df = pd.DataFrame(cols)
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % 4)
    # partition 3 falls silent after 2 s of event time: only idleness lets the others' windows close
    keep = ~((df["partition"] == 3) & (df["ts"] > t0 + 2_000))
    df = df[keep].reset_index(drop=True)
    values = [v for v, k in zip(values, keep) if k]
    keys = [x for x, k in zip(keys, keep) if k]
    df["offset"] = df.groupby("partition").cumcount()
    broker.extra["broker"].create_topic(topic_name, 4)
    produce_all(broker.address, topic_name, values, keys, df["partition"].tolist())
    out = f"file://{tmp_path}/out"
    spec = {"name": pipeline_name, "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
            "event_time": {"field": "ts", "max_out_of_orderness": "500ms", "idle_timeout": "1s", "max_future": "30m"},
            "windows": [{"name": "t", "type": "tumbling", "size": "1s", "group_by": ["tenant_id", "event_type"],
                         "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]}],
            "sinks": [{"parquet": {"uri": out}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    want, late = reference.windows(df, "tumbling", ["tenant_id", "event_type"], 500, 0, size=1_000)
    assert late.empty
    # once every partition is quiet and caught up, the watermark follows the most advanced one
    closed = want[want["window_end"] <= df["ts"].max() - 500]
    started = time.time()
    # the wall clock is off; the monotonic clock is the machine's own (it has no time of day to be wrong about)
    launcher = (f"import sys, time; _t, _n = time.time, time.time_ns; time.time = lambda: _t() + {skew_s}; "
                f"time.time_ns = lambda: _n() + {skew_s} * 10**9; "
                "sys.argv = ['raystream', '--log-format', 'json', 'run', sys.argv[1], '--inline', '-q']; "
                "from pipeline.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(tmp_path / "spec.yaml")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    got = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                got = read_windows(out, pipeline_name, "t")
            except Exception:  # nothing written yet
                got = None
            if got is not None and got.num_rows >= len(closed):
                break
            time.sleep(0.5)
        time.sleep(1.5)  # nothing more may close: the rest waits for records that never come
    finally:
        err = sigterm_and_wait(proc)
    assert proc.returncode == 0, err[-3000:]
    # the process really ran an hour off: its log stamps say so
    first = next(json.loads(line) for line in err.splitlines() if line.startswith("{"))
    logged = time.mktime(time.strptime(first["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(logged - started - skew_s) < 120, (first["time"], started)
    got = read_windows(out, pipeline_name, "t").to_pandas()
    assert len(got) == len(closed), (len(got), len(closed))
    reference.compare(got, closed, ["tenant_id", "event_type"])
