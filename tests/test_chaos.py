"""``raystream chaos run``: an experiment with faults that come together, its report, and the exactness check."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pipeline.chaos import Experiment, Fault, Sample, compare, impact, reference_windows, run_experiment
from pipeline.spec import parse_spec


@pytest.mark.drill  # CI runs it; -m 'not drill' skips it while iterating
def test_experiment_with_five_faults_reports_impact_and_exact_output(postgres, ray_local, tmp_path):
    spec = {"name": "chaosx", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events",
                                                   "max_batch_records": 250, "max_rate": 1000}},
            "event_time": {"field": "ts", "max_out_of_orderness": "1s", "idle_timeout": "30s"},
            "windows": [{"name": "t", "type": "tumbling", "size": "2s", "group_by": ["tenant_id", "event_type"],
                         "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
                        {"name": "s", "type": "session", "gap": "1s", "group_by": ["tenant_id"], "aggregations": ["count"]}],
            "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}},
                      {"postgres": {"dsn": postgres.extra["dsn"], "connect_timeout": "1s"}, "retry_backoff": "100ms"}],
            "checkpoint": {"uri": f"file://{tmp_path}/chk", "interval": "1s"},
            "health": {"heartbeat_timeout": "4s", "stall_timeout": "20s"}, "workers": 2}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    exp = {"name": "five", "pipeline": "p.yaml", "input": {"events": 16_000, "rate_per_s": 2000, "partitions": 4},
           "proxies": [{"name": "pg", "sink": 1}],
           "schedule": [{"at": "1s", "fault": "kill-worker", "index": 0},
                        {"at": "2.5s", "fault": "store-outage", "store": "pg", "for": "4s"},
                        {"at": "3s", "fault": "kill-coordinator"},
                        {"at": "7.5s", "fault": "broker-pause", "for": "2s"},
                        {"at": "10s", "fault": "store-slow", "store": "pg", "delay": "20ms", "for": "2s"}]}
    (tmp_path / "five.yaml").write_text(yaml.safe_dump(exp))
    summary = run_experiment(tmp_path / "five.yaml", tmp_path / "report", on_progress=print)
    faults = {r["fault"]: r for r in summary["faults"]}
    assert set(faults) == {"kill-worker", "store-outage", "kill-coordinator", "broker-pause", "store-slow"}
    assert all(r["recovered_after_s"] is not None for r in summary["faults"]), [(r["fault"], r["recovered_after_s"]) for r in summary["faults"]]
    # the worker's replacement may be launched by the coordinator that is killed right after: the new one adopts it
    assert "fence" in faults["kill-worker"]["actions"], (summary["faults"], summary["actions"])
    assert "resume" in {a["action"] for a in summary["actions"]}
    assert faults["store-outage"]["recovered_after_s"] >= 4  # nothing recovers before the store is back
    assert summary["windows"]["t"] == "equal to the reference", summary["windows"]
    assert summary["windows"]["s"].startswith("not checked")  # sessions are outside the reference
    assert summary["exact"] and summary["checked"] and not summary["not_injected"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| kill-worker |" in report and "Verdict: **exact**" in report
    assert (tmp_path / "report" / "timeline.png").stat().st_size > 10_000


def test_reference_check_catches_a_wrong_window():
    spec = parse_spec({"name": "r", "source": {"kafka": {"bootstrap_servers": "x:1", "topic": "t"}},
                       "windows": [{"name": "w", "type": "tumbling", "size": "10s", "group_by": ["k"],
                                    "aggregations": ["count", "sum(v)"]}],
                       "sinks": [{"parquet": {"uri": "file:///tmp/x"}}]})
    w = spec.windows[0]
    df = pd.DataFrame({"ts": [0, 5_000, 12_000, 13_000], "k": ["a", "a", "a", "b"], "v": [1.0, 2.0, 3.0, 4.0]})
    want = reference_windows(df, w)
    assert want.to_dict("records") == [{"window_start": 0, "k": "a", "count": 2, "sum_v": 3.0},
                                       {"window_start": 10_000, "k": "a", "count": 1, "sum_v": 3.0},
                                       {"window_start": 10_000, "k": "b", "count": 1, "sum_v": 4.0}]
    assert compare(want.copy(), want, w) is None
    wrong = want.copy()
    wrong.loc[1, "sum_v"] = 3.5
    assert compare(wrong, want, w) == "1 windows differ in sum_v"
    assert compare(want.iloc[:2], want, w) == "1 windows missing, 0 unexpected"


def test_impact_recovery_is_measured_from_the_samples():
    f = Fault.model_validate({"at": "1s", "fault": "store-outage", "store": "pg", "for": "2s"})
    samples = [Sample(t=t, lag=lag, records=rec, running=2, workers=2, store_wait=wait, restarts=0)
               for t, lag, rec, wait in [(0.5, 10, 100, False), (1.5, 50, 100, True), (3.0, 90, 100, True),
                                         (3.5, 90, 100, False), (4.0, 40, 150, False), (4.5, 0, 200, False)]]
    (row,) = impact(samples, [(f, 1.0, 3.0)], [{"t": 1.2, "action": "degrade"}, {"t": 9.0, "action": "restart"}])
    assert row["lag_before"] == 10 and row["lag_peak"] == 90 and row["recovered_after_s"] == 3.0
    assert row["actions"] == ["degrade"]


def test_experiment_files_are_checked():
    with pytest.raises(ValueError, match="names store"):
        Experiment.model_validate({"name": "x", "pipeline": "p.yaml", "schedule": [
            {"at": "1s", "fault": "store-outage", "store": "nope", "for": "1s"}]})
    with pytest.raises(ValueError, match="needs `for`"):
        Fault.model_validate({"at": "1s", "fault": "broker-pause"})
