"""The notebook API: build a spec in Python, run it, read its windows.

>>> p = (Pipeline("clicks")
...      .kafka("127.0.0.1:9092", "events")
...      .event_time("ts", max_out_of_orderness="2s")
...      .tumbling("by_tenant", "10s", group_by=["tenant_id"], aggregations=["count", "p95(value)"])
...      .parquet("file://./out"))
>>> p.preview(n=5000).plot()                # doctest: +SKIP
>>> report = p.run(until_end=True)          # doctest: +SKIP
>>> p.read("by_tenant").to_pandas()         # doctest: +SKIP
>>> job = p.submit("http://head:8265")      # doctest: +SKIP

Every section of the spec has a method (sinks: ``parquet``, ``postgres``, ``redis``, ``influxdb``,
``kafka_sink``, ``archive``; checks: ``validate``, ``dedup``, ``enrich``; operations: ``checkpoint``,
``health``, ``observability``, ``workers``, ``autoscale``, ``merge_owners``). ``spec()`` validates exactly like
a YAML file (same ``PipelineSpec``, same field-path errors). Each method returns a new builder.
"""

from __future__ import annotations

import copy
from typing import Any

import pyarrow as pa

from pipeline.spec import PipelineSpec, parse_spec

__all__ = ["Pipeline"]

_SINK_ENTRY = ("retries", "retry_backoff", "max_outage")


class Pipeline:
    """A fluent builder over the spec's plain data."""

    def __init__(self, name: str):
        self._data: dict[str, Any] = {"name": name, "windows": [], "sinks": []}

    @classmethod
    def from_dict(cls, data: dict) -> "Pipeline":
        """A builder holding the spec ``data`` (plain data, as YAML gives it), to run, preview or extend."""
        new = cls.__new__(cls)
        new._data = {"windows": [], "sinks": [], **copy.deepcopy(data)}
        return new

    @classmethod
    def from_yaml(cls, path) -> "Pipeline":
        """A builder holding the spec of a YAML file (``${VAR}`` expanded when the spec is built)."""
        from pipeline.spec import read_spec_data

        return cls.from_dict(read_spec_data(path))

    def _set(self, **kw) -> "Pipeline":
        new = Pipeline.__new__(Pipeline)
        new._data = copy.deepcopy(self._data)
        new._data.update(kw)
        return new

    def kafka(self, bootstrap_servers: str, topic: str, **options) -> "Pipeline":
        """Source topic; options as in ``source.kafka`` (client, max_batch_records, config, …)."""
        return self._set(source={"kafka": {"bootstrap_servers": bootstrap_servers, "topic": topic, "format": "json", **options}})

    def event_time(self, field: str, **options) -> "Pipeline":
        """Event-time field and watermark options (max_out_of_orderness, allowed_lateness, idle_timeout, …)."""
        return self._set(event_time={"field": field, **options})

    def fields(self, **types: str) -> "Pipeline":
        """Declare record field types, e.g. ``.fields(user_id="string", amount="float64")``."""
        return self._set(fields=types)

    def _window(self, **w) -> "Pipeline":
        return self._set(windows=[*self._data["windows"], {k: v for k, v in w.items() if v is not None}])

    def tumbling(self, name: str, size: str, group_by: list[str] | None = None, aggregations: list[str] | None = None,
                 **options) -> "Pipeline":
        """A tumbling window; options as in ``windows[]`` (per_partition, rollups, retention)."""
        return self._window(name=name, type="tumbling", size=size, group_by=group_by or [],
                            aggregations=aggregations or ["count"], **options)

    def sliding(self, name: str, size: str, slide: str, group_by: list[str] | None = None,
                aggregations: list[str] | None = None, **options) -> "Pipeline":
        """A sliding window (``size`` every ``slide``)."""
        return self._window(name=name, type="sliding", size=size, slide=slide, group_by=group_by or [],
                            aggregations=aggregations or ["count"], **options)

    def session(self, name: str, gap: str, group_by: list[str] | None = None, aggregations: list[str] | None = None,
                **options) -> "Pipeline":
        """A session window closed by ``gap`` of inactivity per group."""
        return self._window(name=name, type="session", gap=gap, group_by=group_by or [],
                            aggregations=aggregations or ["count"], **options)

    # -- sinks: each call adds one; retries, retry_backoff and max_outage belong to the entry, the rest to the store
    def _sink(self, kind: str, options: dict) -> "Pipeline":
        outer = {k: options.pop(k) for k in _SINK_ENTRY if k in options}
        return self._set(sinks=[*self._data["sinks"], {kind: options, **outer}])

    def sink(self, kind: str, **options) -> "Pipeline":
        """Add a sink of any kind by its spec name (``parquet``, ``postgres``, ``redis``, ``influxdb``, ``kafka``, ``archive``)."""
        return self._sink(kind, dict(options))

    def parquet(self, uri: str, **options) -> "Pipeline":
        """Add a Parquet sink on ``file://`` or ``s3://``."""
        return self._sink("parquet", {"uri": uri, **options})

    def postgres(self, dsn: str, **options) -> "Pipeline":
        """Add a PostgreSQL sink (upserts; table_prefix, connect_timeout)."""
        return self._sink("postgres", {"dsn": dsn, **options})

    def redis(self, url: str, **options) -> "Pipeline":
        """Add a Redis sink (hashes, index and pub/sub; ttl, prefix, channel, tenant_key)."""
        return self._sink("redis", {"url": url, **options})

    def influxdb(self, url: str, **options) -> "Pipeline":
        """Add an InfluxDB sink (token, org, bucket, measurement_prefix, timeout)."""
        return self._sink("influxdb", {"url": url, **options})

    def kafka_sink(self, topic: str, **options) -> "Pipeline":
        """Add a Kafka sink: window rows as JSON on a compacted topic (bootstrap_servers, config)."""
        return self._sink("kafka", {"topic": topic, **options})

    def archive(self, uri: str, **options) -> "Pipeline":
        """Add an archive of the accepted raw records (Parquet by date and hour) that ``backfill`` can replay."""
        return self._sink("archive", {"uri": uri, **options})

    def late_parquet(self, uri: str, **options) -> "Pipeline":
        """Where records for freed windows go."""
        return self._set(late_output={"parquet": {"uri": uri, **options}})

    def dead_letter(self, topic: str) -> "Pipeline":
        """The dead-letter topic (default ``<source topic>.dlq``)."""
        return self._set(dead_letter={"topic": topic})

    # -- record checks and enrichment
    def validate(self, subject: str | None = None, registry: str | None = None, schema_file: str | None = None,
                 **options) -> "Pipeline":
        """JSON Schema validation: a registry ``subject`` (``registry`` = its PostgreSQL DSN) or a ``schema_file``."""
        cfg = {k: v for k, v in {"subject": subject, "schema_file": schema_file}.items() if v is not None}
        if registry is not None:
            cfg["registry"] = {"dsn": registry}
        return self._set(validate={**cfg, **options})

    def dedup(self, field: str, horizon: str | int | None = None) -> "Pipeline":
        """Dead-letter records whose event id ``field`` their partition already delivered."""
        return self._set(dedup={"field": field, **({"horizon": horizon} if horizon is not None else {})})

    def enrich(self, name: str, key: list[str] | str, fields: dict[str, str], postgres: dict, **options) -> "Pipeline":
        """Add an enricher: ``key`` looked up in ``postgres`` ({dsn, table or query, …}) adds ``fields``
        (options: type, l1, l2, negative_ttl, on_miss, defaults, invalidation_channel, retries, …)."""
        entry = {"name": name, "key": [key] if isinstance(key, str) else list(key), "fields": dict(fields),
                 "source": {"postgres": dict(postgres)}, **options}
        return self._set(enrich=[*self._data.get("enrich", []), entry])

    def observability(self, **options) -> "Pipeline":
        """metrics, tenant_field, max_tenants, notify ({webhook, timeout}), tracing ({otlp_endpoint, sample_ratio})."""
        return self._set(observability=options)

    def merge_owners(self, n: int) -> "Pipeline":
        """Actors merging the partitions' partial states (fixed per checkpoint directory)."""
        return self._set(merge_owners=n)

    def workers(self, n: int, cpus: float | None = None, **resources: float) -> "Pipeline":
        """``n`` workers (the starting count with ``autoscale``), each asking Ray for ``cpus`` and custom ``resources``."""
        extra = {"worker_cpus": cpus} if cpus is not None else {}
        if resources:
            extra["worker_resources"] = resources
        return self._set(workers=n, **extra)

    def checkpoint(self, uri: str, **options) -> "Pipeline":
        """Periodic snapshots of state and offsets on ``file://`` or ``s3://`` (interval, keep, timeout, …)."""
        return self._set(checkpoint={"uri": uri, **options})

    def health(self, **options) -> "Pipeline":
        """Worker health checks (heartbeat_timeout, stall_timeout, max_restarts, restart_window)."""
        return self._set(health=options)

    def autoscale(self, max_workers: int, min_workers: int = 1, **options) -> "Pipeline":
        """Let the coordinator choose the worker count from the lag (target_lag, catch_up, …; needs ``checkpoint``)."""
        return self._set(autoscale={"min_workers": min_workers, "max_workers": max_workers, **options})

    def spec(self, env: dict[str, str] | None = None) -> PipelineSpec:
        """The validated spec; raises SpecError naming each bad field."""
        return parse_spec(copy.deepcopy(self._data), env)

    def run(self, until_end: bool = True, address: str | None = None, inline: bool = False):
        """Run on Ray (or ``inline``); returns a ``RunReport`` with per-worker counters."""
        from pipeline.driver import run_pipeline

        return run_pipeline(self.spec(), until_end=until_end, address=address, inline=inline)

    def submit(self, address: str, until_end: bool = False, token: str | None = None, python: str = "python",
               job_id: str | None = None, env: dict[str, str] | None = None, expand: bool = True):
        """Submit this pipeline as a Ray job to the cluster whose dashboard is at ``address`` (``http://HEAD:8265``);
        returns a ``pipeline.jobs.Job`` (``status()``, ``logs()``, ``follow()``, ``wait()``, ``stop()``).
        ``token``: for clusters with token authentication (default ``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).
        ``expand=False`` leaves ``${VAR}`` to the job's environment (see ``pipeline.jobs.submit``)."""
        from pipeline.jobs import submit

        return submit(copy.deepcopy(self._data), address, until_end=until_end, token=token, python=python,
                      job_id=job_id, env=env, expand=expand)

    def preview(self, n: int = 10_000):
        """The windows over the last ``n`` records of the topic, flushed at their end: a ``Preview`` (``.to_pandas()``,
        ``.plot()``, one table per window). Nothing is written and no offset is committed."""
        from pipeline.io.preview import preview

        return preview(self.spec(), n)

    def read(self, window: str, sink: int = 0) -> pa.Table | None:
        """The latest revision of every window row written by Parquet sink ``sink``."""
        from pipeline.io.sinks.parquet import read_windows

        s = self.spec()
        cfg = s.sinks[sink].parquet
        return read_windows(cfg.uri, s.name, window, cfg.s3_endpoint_url)
