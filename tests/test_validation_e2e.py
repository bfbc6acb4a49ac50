"""Validation end to end: registry in PostgreSQL, records through the broker and
Ray, dead letters with their headers, and counts that add up exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.driver import run_pipeline
from pipeline.io.registry import Registry
from pipeline.io.sinks.parquet import read_windows
from pipeline.schemas import schema_of
from pipeline.spec import parse_spec

T0 = 1_766_000_000_000
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tenant_id", "ts", "value"],
          "properties": {"tenant_id": {"type": "string", "minLength": 2}, "ts": {"type": "integer"},
                         "value": {"type": "number", "minimum": 0}, "kind": {"type": "string", "enum": ["a", "b"]}}}


def _records():
    good, bad = [], []
    out = []
    for i in range(3000):
        p = i % 3
        rec = {"tenant_id": f"t{p}x", "ts": T0 + i * 10, "value": float(i % 50), "kind": "a"}
        why = None
        if i % 97 == 5:
            rec["value"] = -1.0
            why = "schema_violation:minimum"
        elif i % 101 == 7:
            rec["extra"] = 1
            why = "schema_violation:additionalProperties"
        elif i % 103 == 11:
            rec["kind"] = "zzz"
            why = "schema_violation:enum"
        value = json.dumps(rec).encode()
        headers = None
        if i % 211 == 13:
            headers, why = [("raystream.schema_version", b"9")], "unknown_schema_version"
        elif i % 223 == 17:
            value, why = b"{not json", "decode_error"
        out.append((p, value, headers, why))
        (bad if why else good).append((p, rec, why))
    return out, good, bad


def test_registry_validation_through_broker_and_ray(broker, postgres, ray_local, tmp_path, topic_name, pipeline_name):
    dsn = postgres.extra["dsn"]
    subject = f"{topic_name}-value"
    reg = Registry(dsn)
    assert reg.register(subject, schema_of(SCHEMA)) == 1
    # the CLI sees the same registry, and refuses an incompatible version naming the field
    cli = [sys.executable, "-m", "pipeline.cli", "schema"]
    incompatible = tmp_path / "v2.json"
    incompatible.write_text(json.dumps({**SCHEMA, "properties": {**SCHEMA["properties"], "value": {"type": "string"}}}))
    out = subprocess.run([*cli, "register", subject, str(incompatible), "--dsn", dsn], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "field 'value'" in out.stderr and "BACKWARD" in out.stderr
    out = subprocess.run([*cli, "list", "--dsn", dsn], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and subject in out.stdout

    broker.extra["broker"].create_topic(topic_name, 3)
    recs, good, bad = _records()
    prod = Producer({"bootstrap.servers": broker.address})
    for p, value, headers, _ in recs:
        prod.produce(topic_name, value=value, partition=p, headers=headers)
    prod.flush(30)
    spec = parse_spec({
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
        "event_time": {"field": "ts", "format": "epoch_ms", "max_out_of_orderness": "0s"},
        "windows": [{"name": "w", "type": "tumbling", "size": "5s", "group_by": ["tenant_id"], "aggregations": ["count", "sum(value)"]}],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
        "validate": {"subject": subject, "registry": {"dsn": dsn}},
        "dead_letter": {"topic": f"{topic_name}.bad"},
        "workers": 2,
    })
    report = run_pipeline(spec, until_end=True)
    assert report.records == len(recs) and report.rejected == len(bad) and report.late == 0
    # every good record is in a window, every bad one in the dead-letter topic with its reason
    rows = read_windows(f"file://{tmp_path}/out", pipeline_name, "w").to_pandas()
    assert int(rows["count"].sum()) == len(good)
    assert abs(rows["sum_value"].sum() - sum(r["value"] for _, r, _ in good)) < 1e-6
    c = Consumer({"bootstrap.servers": broker.address, "group.id": "dlq-e2e", "enable.auto.commit": False})
    c.assign([TopicPartition(f"{topic_name}.bad", 0, 0)])
    got, deadline = [], time.monotonic() + 20
    while len(got) < len(bad) and time.monotonic() < deadline:
        got += [m for m in c.consume(1000, 0.5) if m.error() is None]
    got += [m for m in c.consume(1000, 1.0) if m.error() is None]
    c.close()
    assert len(got) == len(bad)
    want = {}
    for p, value, _, why in recs:
        if why:
            want.setdefault(why, 0)
            want[why] += 1
    reasons = {}
    for m in got:
        h = dict(m.headers())
        reasons[h["raystream.reason"].decode()] = reasons.get(h["raystream.reason"].decode(), 0) + 1
        assert h["raystream.pipeline"].decode() == pipeline_name and h["raystream.source"].decode().startswith(topic_name)
        if h["raystream.reason"].startswith(b"schema_violation"):
            assert h["raystream.schema"].decode() == f"{subject}/1" and b"field" in h["raystream.detail"]
    assert reasons == want


def test_dlq_inspect_and_replay_after_a_schema_fix(broker, postgres, tmp_path, topic_name, pipeline_name):
    import yaml

    dsn = postgres.extra["dsn"]
    subject = f"{topic_name}-v"
    reg = Registry(dsn)
    strict = {**SCHEMA, "properties": {**SCHEMA["properties"], "kind": {"type": "string", "enum": ["a"]}}}
    reg.register(subject, schema_of(strict))
    broker.extra["broker"].create_topic(topic_name, 1)
    prod = Producer({"bootstrap.servers": broker.address})
    kinds = ["a", "b", "a", "b", "c"] * 20  # 'b' and 'c' break the strict enum
    for i, k in enumerate(kinds):
        prod.produce(topic_name, value=json.dumps({"tenant_id": "t1", "ts": T0 + i, "value": 1.0, "kind": k}).encode(), partition=0)
    prod.produce(topic_name, value=b"{broken", partition=0)
    prod.flush(30)
    d = {
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
        "event_time": {"field": "ts", "format": "epoch_ms"},
        "windows": [{"name": "w", "type": "tumbling", "size": "5s", "group_by": ["tenant_id"], "aggregations": ["count"]}],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
        "validate": {"subject": subject, "registry": {"dsn": dsn}},
    }
    report = run_pipeline(parse_spec(d), until_end=True, inline=True)
    assert report.rejected == 61
    cli = [sys.executable, "-m", "pipeline.cli", "dead-letter"]
    dlq = f"{topic_name}.dlq"
    out = subprocess.run([*cli, "inspect", dlq, "--bootstrap", broker.address, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    groups = {g["reason"]: g for g in json.loads(out.stdout)}
    assert groups["schema_violation:enum"]["count"] == 60 and groups["decode_error"]["count"] == 1
    assert groups["schema_violation:enum"]["schemas"] == {f"{subject}/1": 60}
    # the fix: a new (backward compatible) version accepts 'b'
    reg.register(subject, schema_of({**SCHEMA, "properties": {**SCHEMA["properties"], "kind": {"type": "string", "enum": ["a", "b"]}}}))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    first = subprocess.run([*cli, "replay", dlq, "--spec", str(spec_file), "--json"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert r1["total"] == 61 and r1["replayed"] == 40
    assert r1["still_failing"] == {"schema_violation:enum": 20, "decode_error": 1}
    second = subprocess.run([*cli, "replay", dlq, "--spec", str(spec_file), "--json"], capture_output=True, text=True, timeout=120)
    r2 = json.loads(second.stdout)
    assert r2["already_replayed"] == 40 and r2["replayed"] == 0  # not counted (nor re-fed) twice
    # the replayed records are back in the source topic, once each, marked with where they came from
    from pipeline.io.dead_letter import read_topic

    back = [r for r in read_topic(broker.address, topic_name) if "raystream.replay_of" in r.headers]
    assert len(back) == 40 and len({r.headers["raystream.replay_of"] for r in back}) == 40
    assert all(json.loads(r.value)["kind"] == "b" for r in back)


def test_protobuf_topic_decodes_with_the_registered_descriptor(broker, postgres, tmp_path, topic_name, pipeline_name):
    from google.protobuf import message_factory
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

    from tests.pipeline.test_schemas import _proto

    schema = _proto([("tenant_id", 1, F.TYPE_STRING, F.LABEL_OPTIONAL), ("ts", 2, F.TYPE_INT64, F.LABEL_OPTIONAL),
                     ("value", 3, F.TYPE_DOUBLE, F.LABEL_OPTIONAL)])
    subject = f"{topic_name}-proto"
    Registry(postgres.extra["dsn"]).register(subject, schema)
    Event = message_factory.GetMessageClass(schema.descriptor())
    broker.extra["broker"].create_topic(topic_name, 1)
    prod = Producer({"bootstrap.servers": broker.address})
    total = {}
    for i in range(300):
        tenant = f"t{i % 3}"
        prod.produce(topic_name, value=Event(tenant_id=tenant, ts=T0 + i * 10, value=float(i)).SerializeToString(), partition=0)
        total[tenant] = total.get(tenant, 0.0) + i
    for junk in (b"\xff\xff\xff", b"\x0a\x05ab"):  # not a message; a truncated field
        prod.produce(topic_name, value=junk, partition=0)
    prod.flush(30)
    spec = parse_spec({
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "format": "protobuf"}},
        "event_time": {"field": "ts", "format": "epoch_ms"},
        "windows": [{"name": "w", "type": "tumbling", "size": "1h", "group_by": ["tenant_id"], "aggregations": ["count", "sum(value)"]}],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
        "validate": {"subject": subject, "registry": {"dsn": postgres.extra["dsn"]}},
    })
    report = run_pipeline(spec, until_end=True, inline=True)
    assert report.records == 302 and report.rejected == 2
    rows = read_windows(f"file://{tmp_path}/out", pipeline_name, "w").to_pandas().groupby("tenant_id")["sum_value"].sum()
    assert rows.to_dict() == total


def test_bad_input_matrix_through_the_broker(broker, tmp_path, topic_name, pipeline_name):
    """Every row of the matrix, produced to a real topic: each record ends where the matrix says, with its reason."""
    import pyarrow.parquet as pq  # noqa: F401  (late output is Parquet)

    from pipeline.io.dead_letter import read_topic
    from pipeline.io.storage import open_location
    from tests.pipeline.test_validate import MATRIX, SCHEMA as MSCHEMA, T0 as MT0, _enc, _ok

    rows = []
    for i, (name, value, want) in enumerate(MATRIX):
        # a distinct event id per record (the matrix reuses one), so only the duplicate row is a duplicate
        if value.startswith(b"{") and b'"event_id": "e1"' in value:
            value = value.replace(b'"event_id": "e1"', f'"event_id": "e{100 + i}"'.encode())
        rows.append((name, value, want))
    rows += [("udf raises (its own group)", _enc(_ok(event_id="e900", tenant_id="unlucky", value=13.0, ts=MT0 + 20)),
              "udf_error:tests.pipeline.udfs:fragile"),
             ("duplicate id", _enc(_ok(event_id="e100", ts=MT0 + 30)), "duplicate")]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(MSCHEMA))
    broker.extra["broker"].create_topic(topic_name, 1)
    prod = Producer({"bootstrap.servers": broker.address})
    for _, value, _ in rows:
        prod.produce(topic_name, value=value, partition=0, timestamp=MT0)
    prod.flush(30)
    spec = parse_spec({
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "max_message_bytes": 4096}},
        "event_time": {"field": "ts", "format": "epoch_ms"},
        "windows": [{"name": "w", "type": "tumbling", "size": "1h", "group_by": ["tenant_id"],
                     "aggregations": ["count", "tests.pipeline.udfs:fragile(value) as total"]}],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
        "late_output": {"parquet": {"uri": f"file://{tmp_path}/late"}},
        "validate": {"schema_file": str(schema_file)},
        "dedup": {"field": "event_id"},
    })
    report = run_pipeline(spec, until_end=True, inline=True)
    where: dict[int, list[str]] = {}
    for r in read_topic(broker.address, f"{topic_name}.dlq"):
        offset = int(r.source.rsplit("/", 1)[1])
        where.setdefault(offset, []).append(r.reason)
    late = open_location(f"file://{tmp_path}/late").read_parquet(f"{pipeline_name}/late")
    for off in (late["offset"].to_pylist() if late is not None else []):
        where.setdefault(off, []).append("late")
    for i, (name, _, want) in enumerate(rows):
        if want is None:
            assert i not in where, f"{name}: {where.get(i)}"
        else:
            assert where.get(i) == [want], f"{name}: got {where.get(i)}, want {want}"
    n_dead = sum(1 for _, _, w in rows if w not in (None, "late", "udf_error:tests.pipeline.udfs:fragile"))
    assert report.records == len(rows) and report.rejected == n_dead and report.late == 1
    assert report.workers[0]["udf_errors"] >= 1
