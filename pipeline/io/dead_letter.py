"""Dead-letter tooling: inspect a dead-letter topic, replay its records after a fix.

``replay`` checks each dead-lettered record with the spec's own decoder and
validator (the same code the workers run); records that now pass are produced
to the source topic again (original key and value, header
``raystream.replay_of=<topic/partition/offset>``) and recorded in the ledger
topic ``<dead-letter topic>.replayed`` (compacted, keyed by that source id), so
replaying the same records again skips them instead of counting them twice.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.io.kafka import ensure_topic, read_to_end
from pipeline.spec import PipelineSpec

__all__ = ["DeadLetter", "ReplayReport", "inspect", "read_topic", "replay"]

NOT_REPLAYABLE = ("late",)


@dataclass
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers.get("raystream.reason", "?")

    @property
    def source(self) -> str:
        return self.headers.get("raystream.source", f"?/{self.partition}/{self.offset}")


def read_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[DeadLetter]:
    """Every record of ``topic`` up to its current end."""
    out = []
    for m in read_to_end(bootstrap, topic, timeout_s):
        hs = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for k, v in (m.headers() or [])}
        out.append(DeadLetter(m.partition(), m.offset(), m.key(), m.value(), hs))
    return out


def inspect(records: list[DeadLetter]) -> list[dict]:
    """Records grouped by reason: count, an example detail and source, pipelines."""
    groups: dict[str, dict] = {}
    for r in records:
        g = groups.setdefault(r.reason, {"reason": r.reason, "count": 0, "example_detail": r.headers.get("raystream.detail", ""),
                                         "example_source": r.source, "pipelines": Counter(), "schemas": Counter()})
        g["count"] += 1
        g["pipelines"][r.headers.get("raystream.pipeline", "?")] += 1
        if r.headers.get("raystream.schema"):
            g["schemas"][r.headers["raystream.schema"]] += 1
    out = sorted(groups.values(), key=lambda g: -g["count"])
    for g in out:
        g["pipelines"], g["schemas"] = dict(g["pipelines"]), dict(g["schemas"])
    return out


@dataclass
class ReplayReport:
    total: int = 0
    already_replayed: int = 0
    not_replayable: int = 0
    replayed: int = 0
    still_failing: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def replay(spec: PipelineSpec, dlq_topic: str | None = None, dry_run: bool = False) -> ReplayReport:
    """Re-check the dead letters of ``spec``'s source with its current decoder and schema; re-feed the passing ones."""
    from confluent_kafka import Producer

    from pipeline.process import Batch, PipelineState, process_batch

    kafka = spec.source.kafka
    timeout = kafka.connect_timeout / 1000.0
    topic = dlq_topic or spec.dead_letter_topic
    ledger = f"{topic}.replayed"
    ensure_topic(kafka.bootstrap_servers, ledger, 1, timeout, config={"cleanup.policy": "compact"})
    done = {(r.key or b"").decode() for r in read_topic(kafka.bootstrap_servers, ledger, timeout)}
    records = read_topic(kafka.bootstrap_servers, topic, timeout)
    report = ReplayReport(total=len(records))
    todo = []
    for r in records:
        if r.source in done:
            report.already_replayed += 1
        elif r.reason in NOT_REPLAYABLE:
            report.not_replayable += 1
        else:
            todo.append(r)
    if not todo:
        return report
    validation = None
    schema_fields, keep = None, False
    if spec.validate_ is not None:
        from pipeline.io.validation import SchemaSource

        validation = SchemaSource(spec)
        v = validation.default()[0]
        schema_fields, keep = v.decoder_fields(), v.closed
    state = PipelineState(spec, [0], schema_fields=schema_fields, keep_unexpected=keep)
    values = [r.value for r in todo]
    # the broker timestamp of the original record is not kept: the max_future check is skipped (-1)
    batch = Batch.of(kafka.topic, values, [0] * len(todo), range(len(todo)), timestamps=[-1] * len(todo),
                     keys=[r.key for r in todo])
    result = process_batch(spec, state, batch, None, validation)
    failing = np.zeros(len(todo), bool)
    if result.rejects is not None:
        for off, reason in zip(result.rejects["offset"].to_pylist(), result.rejects["reason"].to_pylist()):
            failing[off] = True
            report.still_failing[reason] = report.still_failing.get(reason, 0) + 1
    passing = [r for r, bad in zip(todo, failing.tolist()) if not bad]
    if dry_run or not passing:
        report.replayed = len(passing)  # with dry_run: how many would pass
        return report
    prod = Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": True, "acks": "all"})
    errors: list[str] = []
    ack = lambda err, _m: errors.append(str(err)) if err is not None else None  # noqa: E731
    for r in passing:
        prod.produce(kafka.topic, key=r.key, value=r.value, headers=[("raystream.replay_of", r.source.encode())], on_delivery=ack)
        prod.poll(0)
    if prod.flush(60) or errors:
        raise RuntimeError(f"replay to {kafka.topic} failed: {errors[:3]}")
    # the ledger entry is written after the record itself: a crash in between replays it once more at worst
    for r in passing:
        prod.produce(ledger, key=r.source.encode(), value=str(int(time.time() * 1000)).encode(), on_delivery=ack)
    if prod.flush(60) or errors:
        raise RuntimeError(f"replay ledger {ledger} not written: {errors[:3]}")
    report.replayed = len(passing)
    return report
