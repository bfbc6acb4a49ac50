"""PipelineSpec: the one validated description of a pipeline.

A spec comes from YAML (``load_spec``) or from Python (``pipeline.api``); both
end in ``PipelineSpec.model_validate`` so they are validated the same way.
Durations are stored as integer milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "Aggregation",
    "PipelineSpec",
    "SpecError",
    "WindowSpec",
    "expand_spec",
    "load_spec",
    "read_spec_data",
    "parse_duration",
    "parse_spec",
]

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class SpecError(ValueError):
    """A spec that cannot be used; ``problems`` holds one ``path: reason`` per fault."""

    def __init__(self, problems: list[str]):
        from pipeline.redact import redact_text

        self.problems = problems = [redact_text(p) for p in problems]
        super().__init__("invalid pipeline spec:\n  " + "\n  ".join(problems))


def parse_duration(value: Any) -> int:
    """Parse ``"10s"``, ``"500ms"``, ``"1.5m"``, ``"2h"``, ``"1d"`` (or a number of seconds) to ms."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. '10s')")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration: it is negative")
        return int(round(value * 1000))
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(round(float(match.group(1)) * _UNITS_MS[match.group(2)]))
    raise ValueError(f"{value!r} is not a duration (use e.g. '500ms', '10s', '5m', '1h')")


# stored as ms; dumped as "<n>ms" so that a dumped spec validates back to the same spec
Duration = Annotated[int, BeforeValidator(parse_duration), PlainSerializer(lambda v: f"{v}ms", return_type=str)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- aggregations -----------------------------------------------------------

_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
_BUILTIN = {"count", "sum", "min", "max", "mean", "count_distinct", "first", "last"}
_AGG = re.compile(
    r"^\s*(?P<fn>[A-Za-z_][\w.]*:[A-Za-z_]\w*|[A-Za-z_]\w*)"
    r"\s*(?:\(\s*(?P<field>[^()\s]*)\s*\))?\s*(?:\s+as\s+(?P<alias>[A-Za-z_]\w*))?\s*$"
)


class Aggregation(_Model):
    """One aggregation of a window: ``fn(field)`` producing the column ``column``."""

    fn: str = Field(description="count, sum, min, max, mean, count_distinct, first, last, pNN or module:function")
    field: str | None = Field(default=None, description="input field; None for count(*)")
    column: str = Field(description="output column name")
    quantile: float | None = Field(default=None, description="for pNN: NN / 100")

    @property
    def is_udf(self) -> bool:
        return ":" in self.fn

    @classmethod
    def parse(cls, text: str) -> "Aggregation":
        """Parse ``count``, ``sum(value)``, ``p95(value)``, ``mymod:spread(value) as spread``."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not an aggregation (use e.g. 'sum(value)')")
        match = _AGG.match(text)
        if not match:
            raise ValueError(f"{text!r} is not an aggregation (use e.g. 'count', 'sum(value)', 'p95(value)')")
        fn, field, alias = match.group("fn"), match.group("field") or None, match.group("alias")
        quantile = None
        pmatch = _PERCENTILE.match(fn)
        if pmatch:
            quantile = float(pmatch.group(1)) / 100.0
            if not 0.0 < quantile < 1.0:
                raise ValueError(f"{text!r}: percentile must be between p1 and p99.9")
        elif ":" not in fn and fn not in _BUILTIN:
            known = ", ".join(sorted(_BUILTIN)) + ", p50/p90/p95/p99, module:function"
            raise ValueError(f"{text!r}: unknown aggregation {fn!r} (known: {known})")
        if fn == "count":
            if field in (None, "*"):
                field = None
        elif field in (None, "*"):
            raise ValueError(f"{text!r}: {fn} needs a field, e.g. {fn}(value)")
        if alias:
            column = alias
        elif fn == "count" and field is None:
            column = "count"
        else:
            base = fn.split(":")[-1].replace(".", "_")
            column = f"{base}_{field}"
        return cls(fn=fn, field=field, column=column, quantile=quantile)


def _parse_aggregations(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    out = []
    for i, item in enumerate(value):
        if isinstance(item, Aggregation):
            out.append(item)
            continue
        if isinstance(item, dict):
            out.append(Aggregation.model_validate(item))
            continue
        try:
            out.append(Aggregation.parse(item))
        except ValueError as exc:
            raise ValueError(f"[{i}] {exc}") from None
    return out


# --- spec sections ----------------------------------------------------------


class KafkaSource(_Model):
    bootstrap_servers: str = Field(description="host:port[,host:port] of the Kafka brokers")
    topic: str = Field(min_length=1, description="topic to read")
    format: Literal["json", "protobuf"] = Field(
        default="json", description="record value encoding; protobuf decodes with the registered descriptor of validate.subject")
    client: Literal["confluent", "kafka-python"] = Field(
        default="confluent", description="Kafka client library (confluent-kafka is the fast path)"
    )
    group_id: str | None = Field(default=None, description="consumer group for offset commits; default raystream-<name>")
    max_batch_records: int = Field(default=100_000, ge=1, le=5_000_000, description="records per poll")
    max_message_bytes: int = Field(default=1_048_576, ge=16, description="larger record values are dead-lettered as 'oversized'")
    max_rate: float | None = Field(default=None, gt=0, description="records/s cap per worker (throttled backfills, drills); none by default")
    on_offset_out_of_range: Literal["fail", "earliest", "latest"] = Field(default="fail", description=(
        "a checkpointed position the broker no longer has (deleted by retention, or past the end of a recreated "
        "topic): fail naming the partition and the lost range, or jump to the earliest/latest offset (counted and "
        "reported as offset_resets and records_skipped)"))
    key_fields: list[str] = Field(default_factory=list, description=(
        "record fields the topic is keyed (partitioned) by; a window grouped by all of them has each group in one "
        "partition, so its rows need no merge across partitions"))
    poll_timeout: Duration = Field(default=200, description="how long one poll waits for records")
    connect_timeout: Duration = Field(default=10_000, description="how long to wait for the broker before failing")
    config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra client settings (librdkafka names for confluent)"
    )


class Source(_Model):
    kafka: KafkaSource = Field(description="Kafka source settings")


class EventTime(_Model):
    field: str = Field(default="ts", description="event-time field of each record")
    format: Literal["auto", "epoch_ms", "epoch_s", "iso8601"] = Field(
        default="auto",
        description="auto: numbers are epoch seconds below 1e11 and epoch ms above; strings are ISO-8601",
    )
    max_out_of_orderness: Duration = Field(default=0, description="watermark = max event time seen - this")
    allowed_lateness: Duration = Field(default=0, description="how long after its end a window still accepts updates")
    idle_timeout: Duration = Field(default=5000, description="a partition with no records for this long stops holding the watermark")
    max_future: Duration = Field(
        default=3_600_000,
        description="a record whose event time is this far past its broker timestamp is rejected (timestamp_out_of_range)",
    )


def _duration_label(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


class Rollup(_Model):
    """A coarser tumbling window computed from a window's merged states (no records, no sink re-read)."""

    size: Duration = Field(description="length of the coarser window: a multiple of the level below")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="window name of this level; default <window>_<size> (e.g. clicks_1m)")
    retention: Duration | None = Field(default=None, description="how long its rows are kept where the sink can expire them")


def _parse_rollups(value: Any) -> Any:
    if isinstance(value, list):
        return [{"size": v} if isinstance(v, (str, int)) else v for v in value]
    return value


class WindowSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="window name, used in output paths and rows")
    type: Literal["tumbling", "sliding", "session"] = Field(description="window type")
    size: Duration | None = Field(default=None, description="window length (tumbling, sliding)")
    slide: Duration | None = Field(default=None, description="distance between window starts (sliding)")
    gap: Duration | None = Field(default=None, description="inactivity gap that closes a session (session)")
    group_by: list[str] = Field(default_factory=list, description="key fields: one row per (window, window start, group keys) over all partitions")
    per_partition: bool = Field(default=False, description=(
        "keep one row per source partition (rows carry a 'partition' column) instead of merging the partitions' "
        "partial states into one row per group"))
    rollups: Annotated[list[Rollup], BeforeValidator(_parse_rollups)] = Field(default_factory=list, description=(
        "coarser levels of a tumbling window, e.g. [1m, 1h] or [{size: 1h, retention: 30d}]: each a window of its own "
        "(<name>_<size>), merged from the finer level's states"))
    retention: Duration | None = Field(default=None, description=(
        "how long this window's rows are kept where the sink can expire them (Redis TTL, PostgreSQL rows older "
        "than the newest window_end - retention)"))
    rollup_of: str | None = Field(default=None, description="set on the levels a 'rollups' entry adds: the window below (not set by hand)")
    aggregations: Annotated[list[Aggregation], BeforeValidator(_parse_aggregations)] = Field(
        min_length=1, description="e.g. [count, sum(value), p95(value)]"
    )

    @model_validator(mode="after")
    def _shape(self) -> "WindowSpec":
        if self.type in ("tumbling", "sliding"):
            if not self.size:
                raise ValueError(f"{self.type} windows need 'size' > 0")
            if self.gap is not None:
                raise ValueError(f"'gap' belongs to session windows, not {self.type}")
        if self.type == "tumbling" and self.slide is not None:
            raise ValueError("'slide' belongs to sliding windows; use type: sliding")
        if self.type == "sliding":
            if not self.slide:
                raise ValueError("sliding windows need 'slide' > 0")
            if self.slide > self.size:
                raise ValueError(f"slide ({self.slide} ms) must not exceed size ({self.size} ms)")
            if self.size // self.slide > 1000:
                raise ValueError("size / slide must be at most 1000 (each record joins that many windows)")
        if self.type == "session":
            if not self.gap:
                raise ValueError("session windows need 'gap' > 0")
            if self.size is not None or self.slide is not None:
                raise ValueError("session windows take 'gap', not 'size'/'slide'")
        if self.rollups:
            if self.type != "tumbling":
                raise ValueError("rollups are coarser tumbling windows: the window must be tumbling")
            if self.per_partition:
                raise ValueError("rollups are merged from the groups' states across partitions: not with per_partition")
            below = self.size
            for r in self.rollups:
                if r.size <= below or r.size % below:
                    raise ValueError(f"rollup size {_duration_label(r.size)} must be a multiple of, and larger than, "
                                     f"the level below ({_duration_label(below)})")
                below = r.size
        columns = [a.column for a in self.aggregations]
        dup = {c for c in columns if columns.count(c) > 1}
        if dup:
            raise ValueError(f"aggregations produce the same column twice: {sorted(dup)} (use 'as <name>')")
        if "partition" in self.group_by:
            raise ValueError("'partition' is not a group key: set per_partition: true for one row per source partition")
        clash = set(columns) & (set(self.group_by) | {"window", "window_start", "window_end", "revision", "partition"})
        if clash:
            raise ValueError(f"aggregation columns clash with key/reserved columns: {sorted(clash)}")
        return self


class ParquetSink(_Model):
    uri: str = Field(description="file://path or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    s3_region: str | None = Field(default=None, description="S3 region (default: $AWS_REGION or us-east-1)")

    _scheme = field_validator("uri")(classmethod(lambda cls, v: _check_uri(v)))


def _check_uri(v: str) -> str:
    if not (v.startswith("file://") or v.startswith("s3://")):
        raise ValueError(f"{v!r} must start with file:// or s3://")
    return v


class PostgresSink(_Model):
    dsn: SecretStr = Field(description="PostgreSQL connection string")
    table_prefix: str = Field(
        default="raystream_", pattern=r"^[a-z_][a-z0-9_]{0,30}$",
        description="tables are <prefix><pipeline>_<window> (one per window), created on first use",
    )
    connect_timeout: Duration = Field(default=5_000, description="connection timeout")


class RedisSink(_Model):
    url: SecretStr = Field(description="Redis URL, e.g. redis://127.0.0.1:6379/0")
    ttl: Duration = Field(default=86_400_000, description="expiry of each window hash")
    prefix: str | None = Field(default=None, description="key prefix; default raystream:<pipeline>:")
    channel: str | None = Field(default=None, description="pub/sub channel of window updates; default <prefix>updates")
    tenant_key: str | None = Field(default="tenant_id", description=(
        "group key with an index per value (<prefix><window>:tenant:<len>:<value>), so the serving layer resumes "
        "a session from that tenant's windows alone; null: none"))


class InfluxSink(_Model):
    url: str = Field(description="InfluxDB (or VictoriaMetrics) base URL, e.g. http://127.0.0.1:8086")
    token: SecretStr = Field(default=SecretStr(""), description="API token")
    org: str = Field(default="raystream", description="organisation")
    bucket: str = Field(default="raystream", description="bucket (database)")
    measurement_prefix: str = Field(default="", description="measurement = <prefix><window name>")
    timeout: Duration = Field(default=10_000, description="HTTP timeout of one write")


class KafkaSink(_Model):
    topic: str = Field(description="output topic (created when missing); values are JSON rows keyed by window identity")
    bootstrap_servers: str | None = Field(default=None, description="default: the source's bootstrap servers")
    config: dict[str, str | int | float | bool] = Field(default_factory=dict, description="extra producer settings")


class ArchiveSink(_Model):
    uri: str = Field(description=(
        "file://path or s3://bucket/prefix; accepted raw records under <uri>/<pipeline>/date=<YYYY-MM-DD>/hour=<HH>/ "
        "(broker timestamp, UTC), replayable with 'raystream backfill --from parquet:<uri>'"))
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    s3_region: str | None = Field(default=None, description="S3 region (default: $AWS_REGION or us-east-1)")

    _scheme = field_validator("uri")(classmethod(lambda cls, v: _check_uri(v)))


_SINK_KINDS = ("parquet", "postgres", "redis", "influxdb", "kafka", "archive")


class SinkSpec(_Model):
    """Exactly one destination; every sink is idempotent on the window identity."""

    parquet: ParquetSink | None = Field(default=None, description="Parquet files on file:// or s3://")
    postgres: PostgresSink | None = Field(default=None, description="upserts into PostgreSQL")
    redis: RedisSink | None = Field(default=None, description="one Redis hash per window and group, plus pub/sub")
    influxdb: InfluxSink | None = Field(default=None, description="InfluxDB line protocol (tags = group keys)")
    kafka: KafkaSink | None = Field(default=None, description="JSON rows to a Kafka topic")
    archive: ArchiveSink | None = Field(default=None, description="the accepted raw records, as Parquet by date and hour")
    retries: int | None = Field(default=None, ge=0, description=(
        "write attempts after the first before the worker fails; none (the default): retry until the sink is back, "
        "pausing consumption (backpressure)"))
    retry_backoff: Duration = Field(default=200, description="first retry delay, doubled each time (with jitter), at most 10 s")
    max_outage: Duration | None = Field(default=None, description=(
        "how long one write may keep failing before the worker fails (and, past health.max_restarts, the pipeline "
        "degrades with this reason); none (the default): wait for the sink"))

    @model_validator(mode="after")
    def _one(self) -> "SinkSpec":
        given = [k for k in _SINK_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a sink names exactly one of {', '.join(_SINK_KINDS)} (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _SINK_KINDS if getattr(self, k) is not None)


class RegistryRef(_Model):
    dsn: SecretStr = Field(description="PostgreSQL holding the schema registry")


class ValidateSpec(_Model):
    """Validation of every record against a JSON Schema, from the registry or a file."""

    subject: str | None = Field(default=None, description="registry subject")
    version: int | Literal["latest"] = Field(default="latest", description="pinned version, or latest (followed as it changes)")
    registry: RegistryRef | None = Field(default=None, description="where the registry lives (with subject)")
    schema_file: str | None = Field(default=None, description="a JSON Schema file, for a run without a registry")
    cache_ttl: Duration = Field(default=30_000, description="how long a worker trusts its copy of the subject's versions")
    version_header: str = Field(default="raystream.schema_version", description="Kafka header carrying a record's schema version")

    @model_validator(mode="after")
    def _one(self) -> "ValidateSpec":
        if (self.subject is None) == (self.schema_file is None):
            raise ValueError("give exactly one of 'subject' (with 'registry') or 'schema_file'")
        if self.subject is not None and self.registry is None:
            raise ValueError("'subject' needs 'registry: {dsn: ...}'")
        return self


class DedupSpec(_Model):
    field: str = Field(description="event id field: a record whose id its partition already delivered is dead-lettered as 'duplicate'")
    horizon: Duration = Field(default=3_600_000, description="ids are remembered until the partition's watermark is this far past them")


class CheckpointSpec(_Model):
    uri: str = Field(description="file://path or s3://bucket/prefix; checkpoints go under <uri>/<pipeline>/chk-<id>/")
    interval: Duration = Field(default=10_000, description="time between checkpoints")
    keep: int = Field(default=3, ge=1, le=1000, description="completed checkpoints kept")
    timeout: Duration = Field(default=60_000, description="a checkpoint not complete by then is abandoned")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    s3_region: str | None = Field(default=None, description="S3 region")

    _scheme = field_validator("uri")(classmethod(lambda cls, v: _check_uri(v)))


class HealthSpec(_Model):
    heartbeat_timeout: Duration = Field(default=5_000, description="a worker that does not answer for this long is restarted")
    stall_timeout: Duration = Field(default=30_000, description="a worker whose offsets do not move while input waits is restarted")
    max_restarts: int = Field(default=5, ge=0, description="restarts of one worker within restart_window before the pipeline is degraded")
    restart_window: Duration = Field(default=300_000, description="window for max_restarts")


class AutoscaleSpec(_Model):
    """Lag-driven worker count (see ``pipeline.autoscale``): the coordinator rescales through a checkpoint."""

    min_workers: int = Field(default=1, ge=1, le=256, description="never fewer workers")
    max_workers: int = Field(ge=1, le=256, description="never more workers (nor more than partitions)")
    target_lag: int = Field(default=10_000, ge=0, description="records waiting that need no more workers")
    catch_up: Duration = Field(default=60_000, description="lag above target_lag is planned to drain within this")
    target_utilization: float = Field(default=0.7, gt=0.05, le=1.0, description=(
        "share of a worker's measured capacity planned for (headroom for spikes)"))
    metrics_window: Duration = Field(default=20_000, description="rates are averaged over this")
    stabilization: Duration = Field(default=10_000, description="metrics this soon after a rescale are not used")
    scale_out_cooldown: Duration = Field(default=15_000, description="at least this between two scale-outs")
    scale_in_delay: Duration = Field(default=60_000, description=(
        "fewer workers must have sufficed, lag within target, for this long before scaling in"))
    resources_timeout: Duration = Field(default=300_000, description=(
        "how long a scale-out waits for the Ray cluster to have the CPUs (its autoscaler adding nodes) before giving up"))

    @model_validator(mode="after")
    def _range(self) -> "AutoscaleSpec":
        if self.min_workers > self.max_workers:
            raise ValueError("autoscale: min_workers is above max_workers")
        return self

    def config(self):
        from pipeline.autoscale import AutoscaleConfig

        return AutoscaleConfig(self.min_workers, self.max_workers, self.target_lag, self.catch_up / 1000.0,
                               self.target_utilization, self.metrics_window / 1000.0, self.stabilization / 1000.0,
                               self.scale_out_cooldown / 1000.0, self.scale_in_delay / 1000.0)


class NotifySpec(_Model):
    webhook: str = Field(pattern=r"^https?://", description=(
        "Slack-compatible webhook (POST of JSON {\"text\": ...}) told of every recovery action the coordinator takes"))
    timeout: Duration = Field(default=5_000, description="per notification; a slow receiver never blocks recovery")


class TracingSpec(_Model):
    otlp_endpoint: str = Field(pattern=r"^https?://", description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces")
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0, description="share of traces kept (parent-based: ingest decides)")


class ObservabilitySpec(_Model):
    metrics: bool = Field(default=True, description="export Prometheus metrics (through Ray's metrics API on Ray)")
    tenant_field: str | None = Field(default=None, description="record field whose value labels per-tenant record counts")
    max_tenants: int = Field(default=100, ge=1, le=10_000, description=(
        "tenants that get a label of their own per worker; later ones are counted as _other (cardinality cap)"))
    notify: NotifySpec | None = Field(default=None, description="where recovery actions are announced")
    tracing: TracingSpec | None = Field(default=None, description="OpenTelemetry spans of batches, window emits and sink writes")


class DeadLetter(_Model):
    topic: str | None = Field(default=None, description="dead-letter topic; default <source topic>.dlq")


_FIELD_TYPES = {"string", "int64", "float64", "bool"}


def _check_field_types(v: dict[str, str]) -> dict[str, str]:
    for name, kind in v.items():
        if kind not in _FIELD_TYPES:
            raise ValueError(f"field {name!r}: type {kind!r} is not one of {sorted(_FIELD_TYPES)}")
    return v


class L1Cache(_Model):
    max_entries: int = Field(default=100_000, ge=1, description="entries kept per worker (least recently used go first)")
    ttl: Duration = Field(default=60_000, description="how long an L1 entry is trusted")


class L2Cache(_Model):
    url: SecretStr = Field(description="Redis URL, e.g. redis://127.0.0.1:6379/0")
    ttl: Duration = Field(default=600_000, description="expiry of L2 entries")
    prefix: str | None = Field(default=None, description="key prefix; default raystream:<pipeline>:<enricher>:")


class PostgresSource(_Model):
    dsn: SecretStr = Field(description="PostgreSQL connection string")
    table: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$", description="table holding the key and the fields")
    query: str | None = Field(
        default=None,
        description="instead of table: a query returning the key column(s) and the fields, with %(keys)s for the key list",
    )
    key_columns: list[str] | None = Field(default=None, description="table columns matching 'key' (default: the same names)")
    warm_query: str | None = Field(default=None, description="query returning the hottest rows, loaded into L1 at worker start")
    connect_timeout: Duration = Field(default=5_000, description="connection timeout")

    @model_validator(mode="after")
    def _one(self) -> "PostgresSource":
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of 'table' or 'query'")
        if self.query is not None and "%(keys)s" not in self.query:
            raise ValueError("'query' must contain %(keys)s where the key list goes")
        return self


class EnrichSource(_Model):
    postgres: PostgresSource = Field(description="the L3 store")


class Enricher(_Model):
    """Adds fields to every record from a lookup keyed by record fields."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="enricher name (metrics, reasons)")
    type: Literal["lookup", "ip"] = Field(default="lookup", description="lookup: key -> row; ip: address -> CIDR range row")
    key: list[str] = Field(min_length=1, description="record field(s) forming the key (ip: one field with the address)")
    fields: dict[str, str] = Field(min_length=1, description="fields added, with their types (string, int64, float64, bool)")
    source: EnrichSource = Field(description="where the data lives")
    l1: L1Cache = Field(default_factory=L1Cache, description="in-memory cache per worker (ip: the range table refresh)")
    l2: L2Cache | None = Field(default=None, description="Redis cache shared by workers (lookup only)")
    negative_ttl: Duration = Field(default=5_000, description="how long a key known to be missing is not looked up again")
    on_miss: Literal["null", "default", "dead_letter"] = Field(default="null", description="what a record without a match gets")
    defaults: dict[str, str | int | float | bool | None] = Field(default_factory=dict, description="values for on_miss: default")
    invalidation_channel: str | None = Field(
        default=None, description="Redis channel whose messages (keys) drop entries from every worker's L1; default <prefix>invalidate"
    )
    retries: int | None = Field(default=None, ge=0, description=(
        "PostgreSQL attempts after the first before the miss policy applies to the keys it could not resolve; "
        "none (the default): the batch waits until the store is back (the worker's partitions pause)"))
    retry_backoff: Duration = Field(default=200, description="first retry delay, doubled each time (with jitter), at most 10 s")
    max_outage: Duration | None = Field(default=None, description=(
        "how long a lookup may keep failing before the miss policy applies (detail 'lookup store unavailable'); "
        "none (the default): wait for the store"))

    _types = field_validator("fields")(classmethod(lambda cls, v: _check_field_types(v)))

    @model_validator(mode="after")
    def _shape(self) -> "Enricher":
        if self.type == "ip" and len(self.key) != 1:
            raise ValueError("an ip enricher takes one key field (the address)")
        if self.type == "ip" and self.source.postgres.table is None:
            raise ValueError("an ip enricher reads a table with a 'network' (cidr) column")
        if self.on_miss == "default":
            missing = set(self.fields) - set(self.defaults)
            if missing:
                raise ValueError(f"on_miss: default needs defaults for {sorted(missing)}")
        cols = self.source.postgres.key_columns
        if cols is not None and len(cols) != len(self.key):
            raise ValueError("key_columns must name one column per key field")
        return self


class PipelineSpec(_Model):
    """A whole pipeline: source, event time, windows, sinks and late output."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="pipeline name (lower case, digits, - and _)")
    source: Source = Field(description="where records come from")
    event_time: EventTime = Field(default_factory=EventTime, description="event-time and watermark settings")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="types of record fields (string, int64, float64, bool); keys default to string, aggregated fields to float64",
    )
    windows: list[WindowSpec] = Field(min_length=1, description="window definitions")
    sinks: list[SinkSpec] = Field(min_length=1, description="where closed windows are written")
    late_output: SinkSpec | None = Field(default=None, description="where records for freed windows go (parquet)")
    validate_: ValidateSpec | None = Field(default=None, alias="validate", description="JSON Schema validation of every record")
    dedup: DedupSpec | None = Field(default=None, description="drop records whose event id was already seen (per partition)")
    checkpoint: CheckpointSpec | None = Field(default=None, description="periodic snapshots of state and offsets; enables recovery")
    health: HealthSpec = Field(default_factory=HealthSpec, description="worker health checks and restart limits")
    dead_letter: DeadLetter = Field(default_factory=DeadLetter, description="where rejected records go")
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec, description="metrics, notifications, traces")
    enrich: list[Enricher] = Field(default_factory=list, description="lookups that add fields before windowing")
    workers: int = Field(default=1, ge=1, le=256, description="number of PartitionWorker actors")
    worker_cpus: float = Field(default=0.5, gt=0, le=64, description="CPU request of each worker actor")
    worker_resources: dict[str, float] = Field(default_factory=dict, description=(
        "custom Ray resources each worker asks for (pins workers to the nodes that offer them, e.g. "
        "{stream_node: 1} with ray start --resources)"))
    autoscale: AutoscaleSpec | None = Field(default=None, description=(
        "let the coordinator choose the worker count from the lag (workers is the starting count)"))
    merge_owners: int | None = Field(default=None, ge=1, le=256, description=(
        "actors merging the partitions' partial window states (a group's owner is a stable hash of window and group "
        "keys); default: as many as workers. Fixed for the life of a checkpoint directory"))

    _field_types = field_validator("fields")(classmethod(lambda cls, v: _check_field_types(v)))

    @model_validator(mode="before")
    @classmethod
    def _rollup_levels(cls, data: Any) -> Any:
        """Each ``rollups`` entry becomes a window of its own after its base (tumbling, same keys and
        aggregations, ``rollup_of`` naming the level below)."""
        if not isinstance(data, dict) or not isinstance(data.get("windows"), list):
            return data
        present = {w.get("name") if isinstance(w, dict) else getattr(w, "name", None) for w in data["windows"]}
        out = []
        for w in data["windows"]:
            if isinstance(w, WindowSpec):
                w = w.model_dump(mode="json")
            out.append(w)
            if not isinstance(w, dict) or not w.get("rollups") or w.get("rollup_of"):
                continue
            below = w.get("name")
            for r in _parse_rollups(w["rollups"]):
                if not isinstance(r, dict):
                    continue
                size = parse_duration(r.get("size"))
                level = {"name": r.get("name") or f"{w.get('name')}_{_duration_label(size)}", "type": "tumbling",
                         "size": f"{size}ms", "group_by": w.get("group_by", []), "aggregations": w.get("aggregations"),
                         "rollup_of": below}
                if r.get("retention") is not None:
                    level["retention"] = r["retention"]
                if level["name"] not in present:  # a dumped spec already lists its levels
                    out.append(level)
                below = level["name"]
        return {**data, "windows": out}

    @model_validator(mode="after")
    def _windows(self) -> "PipelineSpec":
        names = [w.name for w in self.windows]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"window names must be unique, repeated: {sorted(dup)}")
        if self.source.kafka.format == "protobuf" and (self.validate_ is None or self.validate_.subject is None):
            raise ValueError("format: protobuf needs validate: {subject: ..., registry: ...} naming the message's schema")
        if not self.window_sinks:
            raise ValueError("sinks: at least one sink for the windows is needed besides archive")
        if self.late_output is not None and self.late_output.parquet is None:
            raise ValueError("late_output takes a parquet sink")
        bad = {k: v for k, v in self.worker_resources.items() if not v > 0}
        if bad:
            raise ValueError(f"worker_resources: amounts must be positive, got {bad}")
        if self.autoscale is not None and self.checkpoint is None:
            raise ValueError("autoscale moves partitions and their state through checkpoints: add a checkpoint section")
        enames = [e.name for e in self.enrich]
        if len(set(enames)) != len(enames):
            raise ValueError("enricher names must be unique")
        added: dict[str, str] = {}
        for e in self.enrich:
            for f in e.fields:
                if f in added or f in self.fields or f == self.event_time.field:
                    raise ValueError(f"enrich {e.name}: field {f!r} is already a record field or added by {added.get(f, 'the record')}")
                added[f] = e.name
        return self

    def window_mode(self, window: str) -> str:
        """How the rows of ``window`` are formed: ``partition`` (one row per source partition), ``local`` (grouped
        by the Kafka key: every group lives in one partition, rows need no merge) or ``merge`` (partial states
        merged across partitions by the merge owners)."""
        w = next(w for w in self.windows if w.name == window)
        if w.per_partition:
            return "partition"
        if w.rollups or w.rollup_of:
            return "merge"  # levels are merged from the merged states of the level below
        keyed = self.source.kafka.key_fields
        if keyed and set(keyed) <= set(w.group_by):
            return "local"
        return "merge"

    @property
    def merged_windows(self) -> list[str]:
        """Windows whose partial states are shuffled to merge owners."""
        return [w.name for w in self.windows if self.window_mode(w.name) == "merge"]

    @property
    def owners(self) -> int:
        """Number of merge owners (0 when no window needs a merge)."""
        return (self.merge_owners or self.workers) if self.merged_windows else 0

    @property
    def window_sinks(self) -> list[SinkSpec]:
        """The sinks closed windows go to (all but ``archive``)."""
        return [s for s in self.sinks if s.kind != "archive"]

    @property
    def archives(self) -> list[SinkSpec]:
        """The ``archive`` sinks (accepted raw records)."""
        return [s for s in self.sinks if s.kind == "archive"]

    @property
    def dead_letter_topic(self) -> str:
        return self.dead_letter.topic or f"{self.source.kafka.topic}.dlq"

    @property
    def group_id(self) -> str:
        return self.source.kafka.group_id or f"raystream-{self.name}"


# --- loading ----------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, path: str, problems: list[str], env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), problems, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", problems, env) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set and has no default (${{{name}:-default}})")
            return ""

        return _ENV.sub(sub, node)
    return node


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("str", "int", "float"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(spec)"


def _message(err: dict) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (not part of the spec)"
    if err["type"] == "missing":
        msg = "required field is missing"
    return msg


def parse_spec(data: Any, env: dict[str, str] | None = None) -> PipelineSpec:
    """Validate a spec given as plain data (dict); expands ``${VAR:-default}`` first.

    Raises SpecError listing every problem as ``field.path: reason``.
    """
    data = expand_spec(data, env)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = list(err["loc"])
            # our aggregation parser reports the list index inside the message: "[i] ..."
            msg = _message(err)
            m = re.match(r"^\[(\d+)\] (.*)$", msg, re.S)
            path = _loc(tuple(loc))
            if m:
                path, msg = f"{path}[{m.group(1)}]", m.group(2)
            lines.append(f"{path}: {msg}")
        raise SpecError(lines) from None


def expand_spec(data: Any, env: dict[str, str] | None = None) -> dict:
    """``data`` with ``${VAR:-default}`` expanded from ``env`` (default: the environment); SpecError on a
    missing variable. What a job submission sends, so the cluster runs the spec validated here."""
    if not isinstance(data, dict):
        raise SpecError([f"(spec): expected a mapping at the top level, got {type(data).__name__}"])
    problems: list[str] = []
    out = _expand(data, "", problems, dict(os.environ) if env is None else env)
    if problems:
        raise SpecError(problems)
    return out


def load_spec(path: str | Path, env: dict[str, str] | None = None) -> PipelineSpec:
    """Read and validate a YAML spec file; raises SpecError with field paths on any problem.

    ``env:NAME`` reads the spec (JSON or YAML) from environment variable ``NAME`` instead (Ray jobs carry
    their spec in ``runtime_env``)."""
    return parse_spec(read_spec_data(path), env)


def read_spec_data(path: str | Path) -> Any:
    """The plain data of a YAML spec file (or of ``env:NAME``), not validated."""
    if str(path).startswith("env:"):
        name = str(path)[4:]
        if name not in os.environ:
            raise SpecError([f"(env): environment variable {name} holding the spec is not set"])
        text = os.environ[name]
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError([f"(env): {name} is not valid YAML or JSON: {getattr(exc, 'problem', exc)}"]) from None
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError([f"(file): cannot read {p}: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"(yaml): not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return data
