"""Kafka sink: closed windows as JSON values on an output topic.

The message key is the window identity (JSON), so the topic is a changelog:
the output topic is created compacted, and a reader that keeps the highest
``revision`` per key (what compaction converges to) sees each window once,
however often a replay re-sent it.
"""

from __future__ import annotations

import json
import zlib

import pyarrow as pa

from pipeline.io.kafka import ensure_topic, topic_partitions
from pipeline.io.sinks.common import SinkContext, identity_columns, identity_key, row_dicts
from pipeline.spec import KafkaSink as KafkaSinkSpec, PipelineSpec

__all__ = ["KafkaSink"]


class KafkaSink:
    """Produces closed windows to a topic, keyed by window identity."""

    def __init__(self, ctx: "SinkContext | PipelineSpec", cfg: KafkaSinkSpec):
        from confluent_kafka import Producer

        self.ctx = ctx = SinkContext.of(ctx)
        self.cfg = cfg
        self.name = f"kafka:{cfg.topic}"
        self.servers = cfg.bootstrap_servers or ctx.source_bootstrap
        timeout = ctx.connect_timeout_s
        ensure_topic(self.servers, cfg.topic, len(topic_partitions(self.servers, ctx.source_topic, timeout)), timeout,
                     config={"cleanup.policy": "compact"})
        conf = {"bootstrap.servers": self.servers, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                "message.timeout.ms": 60_000, **{k: v for k, v in cfg.config.items()}}
        self.producer = Producer(conf)
        self.errors: list[str] = []

    def _ack(self, err, _msg) -> None:
        if err is not None:
            self.errors.append(str(err))

    def write(self, table: pa.Table) -> int:
        if table is None or table.num_rows == 0:
            return 0
        window = table.column("window")[0].as_py()
        ident = identity_columns(self.ctx, window)
        self.errors.clear()
        for row in row_dicts(table):
            key = identity_key(self.ctx.pipeline, row, ident)
            value = json.dumps({"pipeline": self.ctx.pipeline, **row}, separators=(",", ":"))
            while True:
                try:
                    # a window row's key always goes to the same output partition (compaction needs it)
                    part = int(row["partition"]) if "partition" in row else zlib.crc32(key.encode())
                    self.producer.produce(self.cfg.topic, value=value.encode(), key=key.encode(),
                                          partition=part % self._partitions(), on_delivery=self._ack)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        left = self.producer.flush(60)
        if left or self.errors:
            raise RuntimeError(f"kafka sink {self.cfg.topic}: {left} undelivered, errors: {self.errors[:3]}")
        return 1

    def _partitions(self) -> int:
        if not hasattr(self, "_nparts"):
            self._nparts = len(topic_partitions(self.servers, self.cfg.topic, self.ctx.connect_timeout_s))
        return self._nparts

    def close(self) -> None:
        try:
            self.producer.flush(10)
        finally:
            self.producer.close()


def read_changelog(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[dict]:
    """The topic read to its end, keeping the highest revision per key (the compacted view)."""
    from pipeline.io.kafka import read_to_end

    latest: dict[bytes, dict] = {}
    for m in read_to_end(bootstrap, topic, timeout_s, deadline_s=60):
        row = json.loads(m.value())
        if m.key() not in latest or latest[m.key()]["revision"] < row["revision"]:
            latest[m.key()] = row
    return list(latest.values())
