"""The notebook API: build a spec in Python, run it, read its windows.

>>> p = (Pipeline("clicks")
...      .kafka("127.0.0.1:9092", "events")
...      .event_time("ts", max_out_of_orderness="2s")
...      .tumbling("by_tenant", "10s", group_by=["tenant_id"], aggregations=["count", "p95(value)"])
...      .parquet("file://./out"))
>>> report = p.run(until_end=True)          # doctest: +SKIP
>>> p.read("by_tenant").to_pandas()         # doctest: +SKIP

``spec()`` validates exactly like a YAML file (same ``PipelineSpec``, same
field-path errors).
"""

from __future__ import annotations

import copy
from typing import Any

import pyarrow as pa

from pipeline.spec import PipelineSpec, parse_spec

__all__ = ["Pipeline"]


class Pipeline:
    """A fluent builder over the spec's plain data."""

    def __init__(self, name: str):
        self._data: dict[str, Any] = {"name": name, "windows": [], "sinks": []}

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

    def tumbling(self, name: str, size: str, group_by: list[str] | None = None, aggregations: list[str] | None = None) -> "Pipeline":
        return self._window(name=name, type="tumbling", size=size, group_by=group_by or [], aggregations=aggregations or ["count"])

    def sliding(self, name: str, size: str, slide: str, group_by: list[str] | None = None, aggregations: list[str] | None = None) -> "Pipeline":
        return self._window(name=name, type="sliding", size=size, slide=slide, group_by=group_by or [], aggregations=aggregations or ["count"])

    def session(self, name: str, gap: str, group_by: list[str] | None = None, aggregations: list[str] | None = None) -> "Pipeline":
        return self._window(name=name, type="session", gap=gap, group_by=group_by or [], aggregations=aggregations or ["count"])

    def parquet(self, uri: str, **options) -> "Pipeline":
        """Add a Parquet sink on ``file://`` or ``s3://``."""
        return self._set(sinks=[*self._data["sinks"], {"parquet": {"uri": uri, **options}}])

    def late_parquet(self, uri: str, **options) -> "Pipeline":
        """Where records for freed windows go."""
        return self._set(late_output={"parquet": {"uri": uri, **options}})

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

    def read(self, window: str, sink: int = 0) -> pa.Table | None:
        """The latest revision of every window row written by Parquet sink ``sink``."""
        from pipeline.io.sinks.parquet import read_windows

        s = self.spec()
        cfg = s.sinks[sink].parquet
        return read_windows(cfg.uri, s.name, window, cfg.s3_endpoint_url)
