"""Kafka sources and producers behind one small interface (no Ray here).

``ConfluentSource`` (confluent-kafka, the hot path) and ``KafkaPythonSource``
(kafka-python) both take partitions by manual ``assign`` and return a
``pipeline.process.Batch`` per poll. Offsets are never auto-committed.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from pipeline.process import Batch
from pipeline.spec import KafkaSource

__all__ = [
    "OffsetOutOfRange",
    "BrokerUnavailable",
    "DeadLetterProducer",
    "KafkaFailure",
    "Source",
    "TopicMissing",
    "end_offsets",
    "ensure_topic",
    "make_source",
    "produce_all",
    "topic_partitions",
]


class KafkaFailure(RuntimeError):
    """A Kafka problem the operator must fix; the message says what and where."""


class BrokerUnavailable(KafkaFailure):
    """The broker did not answer within the connect timeout."""


class OffsetOutOfRange(KafkaFailure):
    """A position the broker no longer has (retention deleted it, or the topic was recreated)."""


class TopicMissing(KafkaFailure):
    """The source topic does not exist."""


def _admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    # one quick attempt per call: callers decide how long to keep trying
    return AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 3000, "log_level": 0, "logger": _quiet_logger()})


def _quiet_logger():
    import logging

    log = logging.getLogger("raystream.kafka")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


def topic_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[int]:
    """Partition ids of ``topic``; BrokerUnavailable or TopicMissing with a clear message."""
    from confluent_kafka import KafkaException

    admin = _admin(bootstrap)
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"cannot reach the Kafka broker at {bootstrap} within {timeout_s:.0f}s ({exc.args[0].str() if exc.args else exc})"
        ) from None
    if topic not in md.topics:
        known = ", ".join(sorted(t for t in md.topics if not t.startswith("__"))[:10]) or "none"
        raise TopicMissing(f"topic {topic!r} does not exist on {bootstrap} (topics there: {known})")
    meta = md.topics[topic]
    if meta.error is not None:
        raise KafkaFailure(f"topic {topic!r} on {bootstrap}: {meta.error.str()}")
    return sorted(meta.partitions)


def ensure_topic(bootstrap: str, topic: str, partitions: int = 1, timeout_s: float = 10.0, config: dict | None = None) -> None:
    """Create ``topic`` (with topic ``config``) if it does not exist yet."""
    from confluent_kafka.admin import NewTopic

    admin = _admin(bootstrap)
    md = admin.list_topics(timeout=timeout_s)
    if topic in md.topics:
        return
    futures = admin.create_topics([NewTopic(topic, partitions, 1, config=config or {})], operation_timeout=timeout_s)
    for fut in futures.values():
        try:
            fut.result(timeout=timeout_s)
        except Exception as exc:  # already created by a concurrent caller is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise KafkaFailure(f"cannot create topic {topic!r} on {bootstrap}: {exc}") from None


def end_offsets(bootstrap: str, topic: str, partitions: list[int], timeout_s: float = 10.0) -> dict[int, int]:
    """High watermark of each partition (the offset a bounded run consumes up to)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "raystream-probe", "enable.auto.commit": False})
    try:
        out = {}
        for p in partitions:
            try:
                _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            except KafkaException as exc:
                raise BrokerUnavailable(f"cannot read end offsets of {topic}[{p}] from {bootstrap}: {exc}") from None
            out[p] = int(high)
        return out
    finally:
        c.close()


class Source(Protocol):
    """What a worker needs from a Kafka client."""

    def assign(self, positions: dict[int, int]) -> None: ...

    def poll(self, max_records: int, timeout_s: float) -> Batch: ...

    def commit(self, positions: dict[int, int]) -> None: ...

    def end_offsets(self, partitions: list[int], timeout_s: float) -> dict[int, int]: ...

    def offset_range(self, partitions: list[int], timeout_s: float) -> dict[int, tuple[int, int]]: ...

    def close(self) -> None: ...


class ConfluentSource:
    """confluent-kafka consumer with manual assignment; returns whole fetched batches."""

    def __init__(self, cfg: KafkaSource, group_id: str):
        from confluent_kafka import Consumer

        conf = {
            "bootstrap.servers": cfg.bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            # librdkafka waits 1000 ms by default before refetching a partition whose
            # queue it just filled; a consumer that works on big batches stalls on it
            "fetch.queue.backoff.ms": 10,
            "queued.max.messages.kbytes": 262144,
            "fetch.max.bytes": 104857600,
            "max.partition.fetch.bytes": 16777216,
            # never a silent jump: an out-of-range position is an error (or the spec's explicit policy)
            "auto.offset.reset": "error" if cfg.on_offset_out_of_range == "fail" else cfg.on_offset_out_of_range,
            "socket.connection.setup.timeout.ms": 5000,
            "logger": _quiet_logger(),
        }
        conf.update({k: v for k, v in cfg.config.items()})
        self.topic = cfg.topic
        self.consumer = Consumer(conf)
        self.version_header: str | None = None
        self.trace_header = False  # collect the records' traceparent headers (tracing on)

    def assign(self, positions: dict[int, int], from_beginning: set[int] = frozenset()) -> None:
        """Consume each partition from its position; those in ``from_beginning`` from the earliest offset the broker has."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING if p in from_beginning else max(0, o))
                              for p, o in positions.items()])

    def offset_range(self, partitions: list[int], timeout_s: float) -> dict[int, tuple[int, int]]:
        """(earliest, end) offset of each partition on the broker."""
        from confluent_kafka import KafkaException, TopicPartition

        out = {}
        for p in partitions:
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s, cached=False)
            except KafkaException as exc:
                raise BrokerUnavailable(f"cannot read the offsets of {self.topic}[{p}]: {exc}") from None
            out[int(p)] = (int(low), int(high))
        return out

    def poll(self, max_records: int, timeout_s: float) -> Batch:
        from confluent_kafka import KafkaError, KafkaException, Message

        msgs = self.consumer.consume(num_messages=max_records, timeout=timeout_s)
        if msgs:
            errors = [e for e in map(Message.error, msgs) if e is not None]
            if errors:
                fatal = [e for e in errors if e.code() != KafkaError._PARTITION_EOF]
                reset = [m for m in msgs if m.error() is not None and m.error().code() == KafkaError._AUTO_OFFSET_RESET]
                if reset:
                    m = reset[0]
                    raise OffsetOutOfRange(f"{self.topic}[{m.partition()}]: the position is no longer on the broker "
                                           f"({m.error().str()}); source.kafka.on_offset_out_of_range is 'fail'")
                if fatal:
                    raise KafkaException(fatal[0])
                msgs = [m for m in msgs if m.error() is None]
        # one pass per attribute through C accessors: ~40 ns per record each
        values = list(map(Message.value, msgs))
        partitions = np.fromiter(map(Message.partition, msgs), dtype=np.int32, count=len(msgs))
        offsets = np.fromiter(map(Message.offset, msgs), dtype=np.int64, count=len(msgs))
        stamps = np.fromiter((t[1] for t in map(Message.timestamp, msgs)), dtype=np.int64, count=len(msgs))
        keys = list(map(Message.key, msgs))
        batch = Batch(self.topic, values, partitions, offsets, stamps, keys)
        if self.version_header:
            batch.schema_versions = header_versions(map(Message.headers, msgs), self.version_header, len(msgs))
        if self.trace_header and msgs:
            batch.traceparents = header_values(map(Message.headers, msgs), "traceparent")
        return batch

    def commit(self, positions: dict[int, int]) -> None:
        from confluent_kafka import TopicPartition

        if positions:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in positions.items()], asynchronous=False)

    def end_offsets(self, partitions: list[int], timeout_s: float) -> dict[int, int]:
        """The broker's end offset of each partition; partitions it did not answer for are left out."""
        from confluent_kafka import KafkaException, TopicPartition

        out = {}
        for p in partitions:
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s, cached=False)
            except KafkaException:
                continue  # unknown: the partition keeps holding the watermark
            if high >= 0:
                out[int(p)] = int(high)
        return out

    def pause(self) -> None:
        """Stop fetching (the client's prefetch queue stops growing) while a sink is failing."""
        self.consumer.pause(self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(self.consumer.assignment())

    def close(self) -> None:
        self.consumer.close()


class KafkaPythonSource:
    """kafka-python consumer with manual assignment (a supported, slower client)."""

    def __init__(self, cfg: KafkaSource, group_id: str):
        from kafka import KafkaConsumer

        extra = {k: v for k, v in cfg.config.items()}
        self.topic = cfg.topic
        self.version_header: str | None = None
        self.trace_header = False  # collect the records' traceparent headers (tracing on)
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers.split(","),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="none" if cfg.on_offset_out_of_range == "fail" else cfg.on_offset_out_of_range,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=100 * 1024 * 1024,
            request_timeout_ms=max(30000, cfg.connect_timeout + 1000),
            **extra,
        )

    def assign(self, positions: dict[int, int], from_beginning: set[int] = frozenset()) -> None:
        from kafka import TopicPartition

        tps = {p: TopicPartition(self.topic, p) for p in positions}
        self.consumer.assign(list(tps.values()))
        begin = [tps[p] for p in positions if p in from_beginning]
        if begin:
            self.consumer.seek_to_beginning(*begin)
        for p, o in positions.items():
            if p not in from_beginning:
                self.consumer.seek(tps[p], max(0, o))

    def offset_range(self, partitions: list[int], timeout_s: float) -> dict[int, tuple[int, int]]:
        from kafka import TopicPartition

        tps = [TopicPartition(self.topic, p) for p in partitions]
        try:
            low, high = self.consumer.beginning_offsets(tps), self.consumer.end_offsets(tps)
        except Exception as exc:  # kafka-python raises several types for an unreachable broker
            raise BrokerUnavailable(f"cannot read the offsets of {self.topic}: {exc}") from None
        return {tp.partition: (int(low[tp]), int(high[tp])) for tp in tps}

    def poll(self, max_records: int, timeout_s: float) -> Batch:
        from kafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError

        try:
            got = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except (OffsetOutOfRangeError, NoOffsetForPartitionError) as exc:
            raise OffsetOutOfRange(f"{self.topic}: a position is no longer on the broker ({exc}); "
                                   "source.kafka.on_offset_out_of_range is 'fail'") from None
        recs = [r for tp in sorted(got, key=lambda tp: tp.partition) for r in got[tp]]
        batch = Batch(
            self.topic,
            [r.value for r in recs],
            np.fromiter((r.partition for r in recs), dtype=np.int32, count=len(recs)),
            np.fromiter((r.offset for r in recs), dtype=np.int64, count=len(recs)),
            np.fromiter((r.timestamp if r.timestamp is not None else -1 for r in recs), dtype=np.int64, count=len(recs)),
            [r.key for r in recs],
        )
        if self.version_header:
            batch.schema_versions = header_versions((r.headers for r in recs), self.version_header, len(recs))
        if self.trace_header and recs:
            batch.traceparents = header_values((r.headers for r in recs), "traceparent")
        return batch

    def commit(self, positions: dict[int, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if positions:
            self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in positions.items()})

    def end_offsets(self, partitions: list[int], timeout_s: float) -> dict[int, int]:
        """The broker's end offset of each partition; empty when the broker does not answer."""
        from kafka import TopicPartition

        try:
            got = self.consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        except Exception:  # kafka-python raises several types for an unreachable broker: unknown, keep holding
            return {}
        return {int(tp.partition): int(o) for tp, o in got.items() if o is not None}

    def pause(self) -> None:
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(*self.consumer.assignment())

    def close(self) -> None:
        self.consumer.close()


def header_values(headers, name: str, limit: int = 32) -> list[bytes]:
    """The first ``limit`` distinct values of header ``name`` over the records' headers."""
    key, out, seen = name.encode(), [], set()
    for hs in headers:
        for k, v in hs or ():
            if (k.encode() if isinstance(k, str) else k) == key and v not in seen:
                seen.add(v)
                out.append(v)
                if len(out) >= limit:
                    return out
    return out


def header_versions(headers, name: str, n: int) -> np.ndarray:
    """Schema version per record from header ``name``: -1 without it, -2 when it is not a number."""
    out = np.full(n, -1, np.int64)
    key = name.encode()
    for i, hs in enumerate(headers):
        if not hs:
            continue
        for k, v in hs:
            if k == name or k == key:
                try:
                    out[i] = int(v)
                except (TypeError, ValueError):
                    out[i] = -2
    return out


def make_source(cfg: KafkaSource, group_id: str) -> Source:
    """The configured client behind the Source interface."""
    if cfg.client == "kafka-python":
        return KafkaPythonSource(cfg, group_id)
    return ConfluentSource(cfg, group_id)


class DeadLetterProducer:
    """Writes rejected records to the dead-letter topic with their reason in headers."""

    def __init__(self, bootstrap: str, topic: str, pipeline: str):
        from confluent_kafka import Producer

        self.topic = topic
        self.pipeline = pipeline
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": False,
                                  "message.timeout.ms": 60_000, "logger": _quiet_logger()})
        self.retried = 0

    def write(self, rejects, retries: int = 8, backoff_s: float = 0.2, max_total_s: float = 120.0) -> int:
        """Produce every row of a reject table; returns how many.

        Rows whose delivery failed are produced again by the shared
        ``RetryPolicy`` (exponential backoff with jitter, bounded in attempts
        and time); the loop waits meanwhile (backpressure). Raises
        ``KafkaFailure`` when rows are still undelivered.
        """
        if rejects is None or rejects.num_rows == 0:
            return 0
        from pipeline.retry import GaveUp, RetryPolicy, call_with_retries

        now = str(int(time.time() * 1000)).encode()
        rows = rejects.to_pylist()  # rejects are rare; headers are per record
        pending = list(range(len(rows)))
        t0 = time.monotonic()
        # one list for the whole call: a message still queued after a flush reports here later
        failed: list[int] = []
        errors: list[str] = []

        def ack(i):
            return lambda err, _msg: (failed.append(i), errors.append(str(err))) if err is not None else None

        def attempt() -> int:
            nonlocal pending
            for i in pending:
                row = rows[i]
                headers = [
                    ("raystream.reason", row["reason"].encode()),
                    ("raystream.detail", row["detail"].encode("utf-8", "replace")),
                    ("raystream.source", f"{row['topic']}/{row['partition']}/{row['offset']}".encode()),
                    ("raystream.pipeline", self.pipeline.encode()),
                    ("raystream.time", now),
                ]
                if row.get("schema"):
                    headers.append(("raystream.schema", row["schema"].encode()))
                while True:
                    try:
                        self.producer.produce(self.topic, value=row["value"], key=row["key"], headers=headers, on_delivery=ack(i))
                        break
                    except BufferError:
                        self.producer.poll(0.1)
                self.producer.poll(0)
            remaining = self.producer.flush(30)
            while remaining and time.monotonic() - t0 < max_total_s:
                remaining = self.producer.flush(5)  # queued messages end delivered or failed (message.timeout.ms)
            if not remaining and not failed:
                return rejects.num_rows
            # undelivered after flush's timeout are still queued in the client: only resend the failed ones
            err = errors[0] if errors else f"{remaining} records not delivered in 30s"
            pending = sorted(set(failed))
            failed.clear()
            raise KafkaFailure(err)

        def retried(_attempt: int, _exc: BaseException, _since: float) -> None:
            self.retried += 1

        try:
            return call_with_retries(attempt, RetryPolicy(retries, backoff_s, 10.0, max_total_s),
                                     f"dead-letter topic {self.topic}", on_retry=retried, retry_on=(KafkaFailure,))
        except GaveUp as exc:
            raise KafkaFailure(str(exc)) from exc.__cause__

    def close(self) -> None:
        try:
            self.producer.flush(10)
        finally:
            self.producer.close()  # librdkafka's threads and broker connections end here, not at garbage collection


def produce_all(
    bootstrap: str,
    topic: str,
    values: list,
    keys: list | None = None,
    partitions=None,
    timestamps=None,
    single_last: bool = True,
) -> int:
    """Produce records in order (to explicit partitions when given) and wait for delivery.

    With ``single_last`` the last record of every partition goes alone in its
    own request, so a broker that reports the high watermark as the base offset
    of the last record batch + 1 still reports the true end.
    """
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 2_097_151,
                  "logger": _quiet_logger()})
    failed: list[str] = []

    def cb(err, _msg):
        if err is not None:
            failed.append(str(err))

    n = len(values)
    last: dict[int, int] = {}
    if single_last and partitions is not None:
        for i in range(n):
            last[int(partitions[i])] = i
    held = set(last.values())
    for i in range(n):
        if i in held:
            continue
        kw = {}
        if partitions is not None:
            kw["partition"] = int(partitions[i])
        if timestamps is not None:
            kw["timestamp"] = int(timestamps[i])
        while True:
            try:
                p.produce(topic, value=values[i], key=keys[i] if keys is not None else None, on_delivery=cb, **kw)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    p.flush(60)
    for i in sorted(held):
        kw = {"partition": int(partitions[i])}
        if timestamps is not None:
            kw["timestamp"] = int(timestamps[i])
        p.produce(topic, value=values[i], key=keys[i] if keys is not None else None, on_delivery=cb, **kw)
        p.flush(30)
    p.close()
    if failed:
        raise KafkaFailure(f"{len(failed)} records were not delivered to {topic}: {failed[0]}")
    return n


def commit_offsets(bootstrap: str, group_id: str, topic: str, offsets: dict[int, int], timeout_s: float = 10.0) -> None:
    """Commit ``offsets`` (next offset to read, per partition) for ``group_id``, so lag tools show progress."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False,
                  "socket.timeout.ms": int(timeout_s * 1000)})
    try:
        tps = [TopicPartition(topic, int(p), int(o)) for p, o in sorted(offsets.items())]
        try:
            result = c.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            raise KafkaFailure(f"committing offsets of {group_id} on {topic}: {exc}") from None
        bad = [tp for tp in result or [] if tp.error is not None]
        if bad:
            raise KafkaFailure(f"committing offsets of {group_id} on {topic}: {bad[0].error}")
    finally:
        c.close()


def committed_offsets(bootstrap: str, group_id: str, topic: str, partitions: list[int], timeout_s: float = 10.0) -> dict[int, int]:
    """The group's committed offset per partition (-1 where none)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, int(p)) for p in partitions], timeout=timeout_s)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 10.0, deadline_s: float = 120.0) -> list:
    """Every message of ``topic`` up to its end offsets at the call (confluent ``Message`` objects)."""
    from confluent_kafka import Consumer, TopicPartition

    parts = topic_partitions(bootstrap, topic, timeout_s)
    ends = end_offsets(bootstrap, topic, parts, timeout_s)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "raystream-reader", "enable.auto.commit": False})
    out = []
    try:
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        remaining = {p for p in parts if ends.get(p, 0) > 0}
        deadline = time.monotonic() + deadline_s
        while remaining and time.monotonic() < deadline:
            for m in c.consume(10_000, 1.0):
                if m.error() is not None:
                    continue
                out.append(m)
                if m.offset() + 1 >= ends[m.partition()]:
                    remaining.discard(m.partition())
    finally:
        c.close()
    return out
