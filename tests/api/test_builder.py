"""The Python builder covers every section of the spec: the README's full example, built both ways, is one spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.api import Pipeline
from pipeline.spec import PipelineSpec, SpecError, parse_spec

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(marker: str, lang: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- full-example:{marker} -->\s*```{lang}\n(.*?)```", text, re.S)
    assert m, f"README has no full example in {lang}"
    return m.group(1)


def _readme_specs(env: dict[str, str]) -> tuple[PipelineSpec, PipelineSpec]:
    from_yaml = parse_spec(yaml.safe_load(_block("yaml", "yaml")), env)
    scope: dict = {}
    exec(compile(_block("python", "python"), "README.md", "exec"), scope)
    return from_yaml, scope["p"].spec(env)


def test_readme_full_example_both_ways_is_one_spec():
    env = {"PG_DSN": "postgresql://u:secret@db/shop", "OUT_URI": "s3://bucket/out"}
    from_yaml, from_python = _readme_specs(env)
    assert from_python.model_dump() == from_yaml.model_dump()
    # and it really is the full example: every section of the spec is set away from its default
    unset = [name for name, f in PipelineSpec.model_fields.items()
             if not f.is_required() and getattr(from_yaml, name) == f.get_default(call_default_factory=True)]
    assert unset == [], f"sections the full example leaves at their defaults: {unset}"
    kinds = {s.kind for s in from_yaml.sinks}
    assert kinds == {"parquet", "postgres", "redis", "influxdb", "kafka", "archive"}
    assert {w.type for w in from_yaml.windows} == {"tumbling", "sliding", "session"}
    assert from_yaml.sinks[1].max_outage == 600_000 and from_yaml.sinks[1].postgres.dsn.get_secret_value() == env["PG_DSN"]


def test_builder_is_immutable_and_errors_name_the_field():
    base = Pipeline("x").kafka("127.0.0.1:9092", "t").tumbling("w", "10s")
    a = base.parquet("file:///tmp/a")
    b = base.postgres("postgresql://db/x", retries=2)
    assert len(a._data["sinks"]) == 1 and len(b._data["sinks"]) == 1 and "sinks" in base._data
    assert b.spec().sinks[0].retries == 2
    with pytest.raises(SpecError, match=r"windows\[0\]\.size"):
        Pipeline("x").kafka("127.0.0.1:9092", "t").tumbling("w", "10 parsecs").parquet("file:///tmp/a").spec()
    with pytest.raises(SpecError, match="besides archive"):
        Pipeline("x").kafka("127.0.0.1:9092", "t").tumbling("w", "10s").archive("file:///tmp/a").spec()
    with pytest.raises(SpecError, match="dedup.horizon"):
        base.parquet("file:///tmp/a").dedup("id", horizon="soon").spec()
