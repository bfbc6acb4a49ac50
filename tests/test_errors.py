"""Bad specs, an unreachable broker, a missing topic and non-JSON messages: clear errors, no hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.driver import run_pipeline
from pipeline.io.broker import free_port
from pipeline.io.kafka import BrokerUnavailable, TopicMissing, produce_all
from pipeline.spec import parse_spec

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "clicks.yaml")


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _spec(bootstrap, topic, tmp_path, timeout="3s"):
    return parse_spec({
        "name": "errs", "source": {"kafka": {"bootstrap_servers": bootstrap, "topic": topic, "connect_timeout": timeout}},
        "windows": [{"name": "w", "type": "tumbling", "size": "10s", "aggregations": ["count"]}],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
    })


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda t: t.replace("size: 10s", "size: 10 parsecs"), "windows[0].size: '10 parsecs' is not a duration"),
        (lambda t: t.replace("type: tumbling ", "type: hopping "), "windows[0].type: Input should be 'tumbling', 'sliding' or 'session'"),
        (lambda t: t.replace("workers: 2", "workers: 0"), "workers: Input should be greater than or equal to 1"),
        (lambda t: t.replace("workers: 2", "workers: 2\nwokers: 3"), "wokers: unknown field"),
        (lambda t: t.replace("p95(value)", "p95(value), median(value)"), "windows[0].aggregations[6]: 'median(value)': unknown aggregation"),
        (lambda t: t.replace("${OUT_URI:-file://./out}", "ftp://x"), "sinks[0].parquet.uri: 'ftp://x' must start with file:// or s3://"),
        (lambda t: t.replace("name: clicks", "name: [unclosed"), "(yaml): not valid YAML"),
        (lambda t: t.replace("${TOPIC:-events}", "${NO_SUCH_VAR_X}"), "source.kafka.topic: environment variable NO_SUCH_VAR_X is not set"),
    ],
)
def test_bad_spec_names_field_and_exits_2(tmp_path, edit, expected):
    text = open(EXAMPLE).read()
    bad = tmp_path / "bad.yaml"
    bad.write_text(edit(text))
    proc = _cli("run", str(bad), "--until-end", "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert expected in " ".join(proc.stderr.split()), proc.stderr


def test_unreachable_broker_fails_fast_with_clear_error(tmp_path):
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"cannot reach the Kafka broker at 127.0.0.1:{port}"):
        run_pipeline(_spec(f"127.0.0.1:{port}", "events", tmp_path), until_end=True, inline=True)
    assert time.monotonic() - t0 < 30
    proc = _cli("run", EXAMPLE, "--until-end", "--quiet", env={"KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "OUT_URI": f"file://{tmp_path}/o", "LATE_URI": f"file://{tmp_path}/l"})
    assert proc.returncode == 1 and "cannot reach the Kafka broker" in proc.stderr


def test_missing_topic_is_reported(broker, tmp_path, topic_name):
    with pytest.raises(TopicMissing, match=f"topic '{topic_name}' does not exist"):
        run_pipeline(_spec(broker.address, topic_name, tmp_path), until_end=True, inline=True)


def test_non_json_messages_are_rejected_and_counted(broker, tmp_path, topic_name):
    from confluent_kafka import Consumer, TopicPartition

    broker.extra["broker"].create_topic(topic_name, 1)
    good = [b'{"ts": 1760000000000, "value": 1}', b'{"ts": 1760000001000, "value": 2}']
    bad = [b"\x00\x01binary", b"plain text", b'{"ts": 1760000000500, "value": 3']
    produce_all(broker.address, topic_name, [good[0], bad[0], bad[1], good[1], bad[2]], None, [0] * 5)
    report = run_pipeline(_spec(broker.address, topic_name, tmp_path), until_end=True, inline=True)
    assert (report.records, report.rejected) == (5, 3)
    c = Consumer({"bootstrap.servers": broker.address, "group.id": "x", "enable.auto.commit": False})
    c.assign([TopicPartition(f"{topic_name}.dlq", 0, 0)])
    got, deadline = [], time.monotonic() + 15
    while len(got) < 3 and time.monotonic() < deadline:
        got += [m for m in c.consume(10, 0.5) if m.error() is None]
    c.close()
    assert sorted(m.value() for m in got) == sorted(bad)
    for m in got:
        h = dict(m.headers())
        assert h["raystream.reason"] == b"decode_error" and h["raystream.pipeline"] == b"errs"
        assert h["raystream.source"].startswith(f"{topic_name}/0/".encode())


@pytest.mark.parametrize("policy", ["fail", "earliest", "latest"])
def test_checkpointed_offsets_the_broker_no_longer_has(broker, tmp_path, topic_name, policy):
    """A pipeline resumed onto a topic that was recreated with fewer records: its checkpointed positions
    are past the end. ``fail`` names each partition and the range; the other policies move on, counted."""
    import json as _json

    other = f"{topic_name}-new"
    for t, n in ((topic_name, 50), (other, 20)):
        broker.extra["broker"].create_topic(t, 2)
        produce_all(broker.address, t, [_json.dumps({"ts": 1_700_000_000_000 + i}).encode() for i in range(n)],
                    None, [i % 2 for i in range(n)])
    d = _spec(broker.address, topic_name, tmp_path).model_dump(mode="json", exclude_none=True)
    d["checkpoint"] = {"uri": f"file://{tmp_path}/chk", "interval": "1h"}
    d["source"]["kafka"]["on_offset_out_of_range"] = policy
    first = run_pipeline(parse_spec(d), until_end=True, inline=True)
    assert first.records == 50
    d["source"]["kafka"]["topic"] = other  # "recreated": same pipeline and checkpoints, 10 records per partition
    if policy == "fail":
        with pytest.raises(Exception, match=rf"{other}\[0\]: checkpointed offset 25 is past the end offset 10") as exc:
            run_pipeline(parse_spec(d), until_end=True, inline=True)
        assert f"{other}[1]" in str(exc.value) and "on_offset_out_of_range" in str(exc.value)
        return
    report = run_pipeline(parse_spec(d), until_end=True, inline=True)
    w = report.workers[0]
    assert w["offset_resets"] == 2
    assert [(r["partition"], r["from"], r["to"]) for r in w["offset_reset_detail"]] == \
        [(0, 25, 0 if policy == "earliest" else 10), (1, 25, 0 if policy == "earliest" else 10)]
    assert report.records == (20 if policy == "earliest" else 0)


def test_resolve_positions_names_the_lost_range():
    from pipeline.io.kafka import OffsetOutOfRange
    from pipeline.io.loop import resolve_positions

    with pytest.raises(OffsetOutOfRange, match=r"ev\[3\]: checkpointed offset 100 was deleted \(the broker keeps 250\.\.900\); "
                                               r"records 100\.\.249 are lost"):
        resolve_positions({3: 100, 4: 300}, {3: (250, 900), 4: (0, 900)}, "fail", "ev")
    moved, resets = resolve_positions({3: 100, 4: 300}, {3: (250, 900), 4: (0, 900)}, "earliest", "ev")
    assert moved == {3: 250} and resets[0]["skipped"] == 150
    assert resolve_positions({4: 900}, {4: (0, 900)}, "fail", "ev") == ({}, [])
