"""Observability end to end: a real Prometheus scrapes a running pipeline on Ray, its numbers equal what the
run did; the shipped alert rules fire through Alertmanager to a Slack-compatible webhook when a sink stops
and resolve when it is back; recovery actions reach the webhook; dashboards name only scraped metrics."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path


from actors import control
from pipeline.driver import run_pipeline
from pipeline.io.kafka import produce_all
from pipeline.io.storage import open_location
from pipeline.metrics import CATALOGUE, series_names
from pipeline.spec import parse_spec
from tests.dashboards import DASHBOARDS, check_dashboards
from tests.services import TcpProxy, prom_query, prom_value, sigterm_and_wait
from pipeline.synthetic import events
from tests.test_end_to_end import BASE_MS, PARTITIONS, _dataset, _read_dlq, _users_table

ROOT = Path(__file__).resolve().parents[1]


def _wait(pred, timeout_s: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _later(n: int, seed: int, minutes: int) -> tuple[list, list, list]:
    """``n`` in-order events ``minutes`` after the first data set (none late), partitioned like it."""
    values, keys, cols = events(n, BASE_MS + minutes * 60_000, rate_per_s=2000, tenants=12, max_disorder_ms=500, seed=seed)
    return values, keys, [int(t.split("-")[1]) % PARTITIONS for t in cols["tenant_id"]]


def _sum(prom, expr: str) -> float:
    return prom_value(prom, f"sum({expr})") or 0.0


def test_catalogue_names_are_what_rules_and_dashboards_use():
    """Rules and dashboards name catalogue series only (a typo there would be an alert that never fires)."""
    known = set(series_names())
    texts = [(ROOT / "cluster/monitoring/rules/raystream.rules.yml").read_text()]
    texts += [p.read_text() for p in DASHBOARDS.glob("*.json")]
    used = {m for t in texts for m in re.findall(r"\bray_raystream_[a-z0-9_]+", t)}
    assert used and used <= known, used - known
    assert len(CATALOGUE) >= 30


def test_prometheus_sees_what_the_run_did_alerts_fire_and_resolve(broker, postgres, ray_local, monitoring, tmp_path,
                                                                    topic_name, pipeline_name):
    prom, receiver = monitoring["prometheus"], monitoring["receiver"]
    values, keys, parts, df, bad_offsets, _ = _dataset(12_000, seed=21, bad=30)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    _, users_table = _users_table(postgres, pipeline_name)
    pg_port = int(postgres.extra["dsn"].rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(pg_port)
    late_uri = f"file://{tmp_path}/late"
    spec = parse_spec({
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "max_batch_records": 2000}},
        "event_time": {"field": "ts", "max_out_of_orderness": "2s", "allowed_lateness": "1s", "idle_timeout": "5s"},
        "windows": [{"name": "tumble", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "event_type"],
                     "aggregations": ["count", "sum(value)", "p95(value)"]}],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}},
                  {"postgres": {"dsn": postgres.extra["dsn"].replace(f":{pg_port}/", f":{proxy.port}/"),
                                "connect_timeout": "1s"}, "retry_backoff": "100ms"}],
        "late_output": {"parquet": {"uri": late_uri}},
        "checkpoint": {"uri": f"file://{tmp_path}/chk", "interval": "1s"},
        # a loaded machine may take seconds for the first batch (enrichment, owners starting): no false stalls
        "health": {"heartbeat_timeout": "5s", "stall_timeout": "30s"},
        "enrich": [{"name": "users", "key": ["user_id"], "fields": {"tier": "string"},
                    "source": {"postgres": {"dsn": postgres.extra["dsn"], "table": users_table}},
                    "on_miss": "default", "defaults": {"tier": "unknown"}}],
        "observability": {"tenant_field": "tenant_id", "max_tenants": 5,
                          "notify": {"webhook": f"{receiver.url}/notify", "timeout": "2s"}},
        "workers": 2,
    })
    name = spec.name
    sel = f'{{pipeline="{name}"}}'
    stop = threading.Event()
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(report=run_pipeline(spec, stop=stop)), daemon=True)
    runner.start()
    try:
        # 1. every record was counted once, and the counts agree with each other and with the run
        _wait(lambda: _sum(prom, f"ray_raystream_records_in_total{sel}") == len(values), 90, "records_in = produced")
        time.sleep(2.5)  # the same batches' other series are in the same export; one more scrape for certainty
        assert _sum(prom, f"ray_raystream_records_in_total{sel}") == len(values)
        by_part = {r["metric"]["partition"]: float(r["value"][1])
                   for r in prom_query(prom, f"sum by (partition) (ray_raystream_records_in_total{sel})")}
        assert by_part == {str(p): float(parts.count(p)) for p in range(PARTITIONS)}
        rejected = {r["metric"]["reason"]: float(r["value"][1])
                    for r in prom_query(prom, f"sum by (reason) (ray_raystream_records_rejected_total{sel})")}
        late = _sum(prom, f"ray_raystream_records_late_total{sel}")
        accepted = _sum(prom, f"ray_raystream_records_accepted_total{sel}")
        dead = _sum(prom, f"ray_raystream_records_dead_lettered_total{sel}")
        assert sum(rejected.values()) == 30 and dead == 30
        assert accepted + late + 30 == len(values) and late > 0
        tenants = {r["metric"]["tenant"]: float(r["value"][1])
                   for r in prom_query(prom, f"sum by (tenant) (ray_raystream_tenant_records_total{sel})")}
        assert sum(tenants.values()) == len(values) - 30
        # the cap: 5 names per worker, the rest counted as _other; every named tenant's count is exact
        assert "_other" in tenants and len(tenants) <= 2 * 5 + 1
        for t, n in tenants.items():
            if t != "_other":
                assert n == float((df["tenant_id"] == t).sum()), t
        # watermarks: Prometheus shows what the workers report
        before = {str(w["index"]): w["watermark"] for w in control.pipeline_status(name)["workers"]}
        time.sleep(2.5)
        prom_wm = {r["metric"]["worker"]: float(r["value"][1])
                   for r in prom_query(prom, f"ray_raystream_watermark_seconds{sel}")}
        after = {str(w["index"]): w["watermark"] for w in control.pipeline_status(name)["workers"]}
        # (a watermark only grows: what Prometheus holds lies between the two reports around its scrape)
        assert set(prom_wm) == set(before) and all(b is not None for b in before.values()), (prom_wm, before)
        assert all(before[i] / 1000.0 - 1e-3 <= prom_wm[i] <= after[i] / 1000.0 + 1e-3 for i in before), \
            (before, prom_wm, after, prom_query(prom, f"ray_raystream_watermark_seconds{sel}"))
        _wait(lambda: prom_value(prom, f"max(ray_raystream_consumer_lag{sel})") == 0, 20, "consumer lag 0")
        assert _sum(prom, f"ray_raystream_checkpoints_total{sel}") >= 1
        assert time.time() - prom_value(prom, f"max(ray_raystream_checkpoint_last_success_timestamp{sel})") < 30
        assert _sum(prom, f"ray_raystream_checkpoint_bytes{sel}") > 0
        assert _sum(prom, f'ray_raystream_sink_write_seconds_count{{pipeline="{name}",sink="postgres"}}') > 0
        emitted = _sum(prom, f"ray_raystream_windows_emitted_total{sel}")
        assert emitted > 0
        tiers = {r["metric"]["tier"] for r in prom_query(prom, f"sum by (tier) (ray_raystream_enrich_lookups_total{sel})")}
        assert tiers & {"l1", "l3"}, tiers

        # 2. the sink stops: the backpressure alert fires, reaches the webhook through Alertmanager, and resolves
        proxy.set_broken(True)
        more, more_keys, more_parts = _later(4_000, 22, minutes=10)
        produce_all(broker.address, topic_name, more, more_keys, more_parts)

        def alert(status):
            return lambda item: (item["path"] == "/slack" and f"RaystreamSinkBackpressure {name}" in
                                 json.dumps(item["body"]) and status in json.dumps(item["body"]))
        fired = receiver.wait_for(alert("FIRING"), 60, "the backpressure alert")
        assert "waiting on postgres" in json.dumps(fired["body"])
        assert prom_value(prom, f'max(ray_raystream_backpressure{{pipeline="{name}",store="postgres"}})') == 1
        proxy.set_broken(False)
        receiver.wait_for(alert("RESOLVED"), 60, "the alert resolved")
        _wait(lambda: _sum(prom, f"ray_raystream_records_in_total{sel}") >= len(values) + len(more), 60,
              "the records after the outage")
        actions = [e for e in control.pipeline_status(name)["events"] if e.get("action")]
        Path("/tmp/obs-events.json").write_text(json.dumps(control.pipeline_status(name), indent=1, default=str))
        assert not actions, actions  # waiting on a sink is backpressure: nobody was restarted
        assert _sum(prom, f"ray_raystream_records_in_total{sel}") == len(values) + len(more), \
            (_sum(prom, f"ray_raystream_records_in_total{sel}"), json.dumps(control.pipeline_status(name)["events"]))
        assert _sum(prom, f'ray_raystream_sink_errors_total{{pipeline="{name}",sink="postgres"}}') > 0
        _wait(lambda: _sum(prom, f'ray_raystream_backpressure_seconds_total{{pipeline="{name}",store="postgres"}}') > 0,
              20, "time in backpressure counted")

        # 2b. the checkpoint store breaks (its folder is a file now): failures counted, the alert fires, then it heals
        chk = tmp_path / "chk" / name
        chk.rename(tmp_path / "chk-away")
        chk.write_text("not a folder")
        try:
            receiver.wait_for(lambda i: i["path"] == "/slack" and f"RaystreamCheckpointFailing {name}" in json.dumps(i["body"])
                              and "FIRING" in json.dumps(i["body"]), 60, "the checkpoint alert")
            assert _sum(prom, f"ray_raystream_checkpoint_failures_total{sel}") >= 3
        finally:
            chk.unlink()
            (tmp_path / "chk-away").rename(chk)
        committed = _sum(prom, f"ray_raystream_checkpoints_total{sel}")
        _wait(lambda: _sum(prom, f"ray_raystream_checkpoints_total{sel}") > committed, 30, "checkpoints again")

        # 3. a worker killed: fence and restart are counted, logged in status, and announced on the webhook
        killed = control.kill_worker(name, 0)
        for action in ("fence", "restart"):
            note = receiver.wait_for(lambda i, a=action: i["path"] == "/notify" and i["body"]["raystream"]["pipeline"] == name
                                     and i["body"]["raystream"]["action"] == a, 60, f"a {action} notification")
            assert "worker 0" in note["body"]["text"] and note["body"]["raystream"]["reason"]
        _wait(lambda: _sum(prom, f'ray_raystream_recovery_actions_total{{pipeline="{name}",action="restart"}}') >= 1,
              30, "the restart counted")
        assert _sum(prom, f'ray_raystream_worker_restarts_total{{pipeline="{name}",worker="0"}}') >= 1
        events = control.pipeline_status(name)["events"]
        assert any(e.get("action") == "restart" and "worker 0" in e["event"] for e in events)
        assert killed["pid"]
        # the restarted worker replays from its checkpoint and consumes again: recovery time observed
        more2, k2, p2 = _later(500, 23, minutes=20)
        produce_all(broker.address, topic_name, more2, k2, p2)
        _wait(lambda: _sum(prom, f"ray_raystream_recovery_seconds_count{sel}") >= 1, 60, "a recovery time")

        # 4. the pipeline dashboards parse and name only series this scrape returned
        check_dashboards(prom, ["raystream-overview.json", "raystream-pipeline.json"])
    finally:
        stop.set()
        runner.join(120)
        proxy.close()
    assert not runner.is_alive()
    # late records counted = late rows written; rejected by reason = dead letters by reason
    late_t = open_location(late_uri).read_parquet(f"{name}/late")
    assert late == len(set(zip(late_t["partition"].to_pylist(), late_t["offset"].to_pylist())))
    dlq = _read_dlq(broker.address, spec.dead_letter_topic, 30)
    by_reason: dict[str, int] = {}
    for source in {dict(m.headers())["raystream.source"]: m for m in dlq}.values():  # a replay may repeat one
        fam = dict(source.headers())["raystream.reason"].decode().split(":", 1)[0]
        by_reason[fam] = by_reason.get(fam, 0) + 1
    assert by_reason == {k: int(v) for k, v in rejected.items()}
    assert len(bad_offsets) == 30
    print("redelivered", [w.get("redelivered") for w in box["report"].workers])


def test_alert_rules_pass_their_promtool_unit_tests_and_configs_are_valid():
    """``promtool test rules`` runs the rules' own unit tests (each alert fires when it should and not before);
    the example Prometheus and Alertmanager configurations pass their tools' checks."""
    import subprocess

    mon = ROOT / "cluster" / "monitoring"
    for cmd in (["promtool", "check", "rules", "rules/raystream.rules.yml"],
                ["promtool", "test", "rules", "rules/raystream.rules.test.yml"],
                ["promtool", "check", "config", "--syntax-only", "prometheus.yml"],
                ["amtool", "check-config", "alertmanager.yml"]):
        out = subprocess.run(cmd, cwd=mon, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    tested = set(re.findall(r"alertname: (\w+)", (mon / "rules/raystream.rules.test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (mon / "rules/raystream.rules.yml").read_text()))
    assert defined == tested, defined ^ tested  # every rule has a unit test


def _scrape(url: str) -> dict[str, float]:
    """Sum of each series name over its labels, from a /metrics text page."""
    from prometheus_client.parser import text_string_to_metric_families

    with __import__("urllib.request").request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_inline_run_serves_metrics_and_writes_json_logs(broker, tmp_path, topic_name, pipeline_name):
    """``raystream --log-format json run --inline --metrics-port P``: the process serves the same series
    (prometheus_client) and logs one JSON object a line with the pipeline, worker and partitions."""
    import os
    import subprocess
    import sys

    import yaml

    from pipeline.io.broker import free_port

    values, keys, parts, df, _, _ = _dataset(3_000, seed=31, bad=7)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    spec = {"name": pipeline_name, "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
            "event_time": {"field": "ts", "max_out_of_orderness": "2s", "idle_timeout": "5s"},
            "windows": [{"name": "tumble", "type": "tumbling", "size": "10s", "group_by": ["tenant_id"],
                         "aggregations": ["count", "sum(value)"]}],
            "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--log-format", "json", "run", str(tmp_path / "spec.yaml"),
                             "--inline", "--metrics-port", str(port), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 60
        got: dict = {}
        while time.monotonic() < deadline and got.get("ray_raystream_records_in_total") != len(values):
            try:
                got = _scrape(url)
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.3)
        assert got.get("ray_raystream_records_in_total") == len(values), got
        assert got["ray_raystream_records_rejected_total"] == 7
        assert got["ray_raystream_records_accepted_total"] + got["ray_raystream_records_late_total"] == len(values) - 7
        assert got["ray_raystream_batch_seconds_count"] >= 1
    finally:
        err = sigterm_and_wait(proc)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    ours = [x for x in lines if x.get("logger", "").startswith("raystream.")]
    assert ours, err
    for x in ours:
        assert x["pipeline"] == pipeline_name and {"time", "level", "message"} <= set(x), x
    start = next(x for x in ours if x["message"].startswith("consuming partitions"))
    assert start["partition"] == list(range(PARTITIONS)) and start["worker"] == "0"
    done = next(x for x in ours if x["message"].startswith("finished"))
    assert f"{len(values)} records (7 rejected" in done["message"]
