"""PipelineSpec: the README example loads; YAML and Python give the same spec."""

from __future__ import annotations

import os

import pytest
import yaml

from pipeline.spec import Aggregation, SpecError, load_spec, parse_duration, parse_spec

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "clicks.yaml")


def test_example_loads_with_environment_defaults():
    s = load_spec(EXAMPLE, env={})
    assert s.source.kafka.bootstrap_servers == "127.0.0.1:9092" and s.source.kafka.topic == "events"
    assert s.event_time.max_out_of_orderness == 2000 and s.event_time.idle_timeout == 5000
    assert [a.column for a in s.windows[0].aggregations] == [
        "count", "sum_value", "min_value", "max_value", "mean_value", "p95_value"]
    assert s.sinks[0].parquet.uri == "file://./out" and s.workers == 2
    s2 = load_spec(EXAMPLE, env={"TOPIC": "other", "KAFKA_BOOTSTRAP": "h:1"})
    assert (s2.source.kafka.topic, s2.source.kafka.bootstrap_servers) == ("other", "h:1")


def test_demo_embeds_the_example():
    from pipeline.demo import DEMO_SPEC

    strip = lambda d: d  # noqa: E731
    assert strip(yaml.safe_load(DEMO_SPEC)) == strip(yaml.safe_load(open(EXAMPLE)))


def test_python_builder_gives_the_same_spec():
    from pipeline.api import Pipeline

    built = (
        Pipeline("clicks")
        .kafka("${KAFKA_BOOTSTRAP:-127.0.0.1:9092}", "${TOPIC:-events}")
        .event_time("ts", max_out_of_orderness="2s", allowed_lateness="0s", idle_timeout="5s")
        .tumbling("tenant_type_10s", "10s", group_by=["tenant_id", "event_type"],
                  aggregations=["count", "sum(value)", "min(value)", "max(value)", "mean(value)", "p95(value)"])
        .parquet("${OUT_URI:-file://./out}")
        .late_parquet("${LATE_URI:-file://./late}")
        .workers(2)
        .spec(env={})
    )
    assert built == load_spec(EXAMPLE, env={})


@pytest.mark.parametrize("text,ms", [("10s", 10_000), ("500ms", 500), ("1.5m", 90_000), ("2h", 7_200_000), ("1d", 86_400_000), (0, 0), (2.5, 2500)])
def test_durations(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["10 parsecs", "-1s", "s", "", True, -3])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_aggregation_names():
    assert Aggregation.parse("count").column == "count"
    assert Aggregation.parse("p99(latency)").quantile == 0.99
    assert Aggregation.parse("mymod.sub:spread(v) as s").column == "s"
    assert Aggregation.parse("count_distinct(user_id)").column == "count_distinct_user_id"


@pytest.mark.parametrize(
    "window,message",
    [
        ({"type": "sliding", "size": "10s"}, "sliding windows need 'slide'"),
        ({"type": "sliding", "size": "10s", "slide": "20s"}, "must not exceed size"),
        ({"type": "session", "size": "10s"}, "session windows need 'gap'"),
        ({"type": "tumbling"}, "tumbling windows need 'size'"),
        ({"type": "tumbling", "size": "1s", "aggregations": ["sum"]}, "sum needs a field"),
        ({"type": "tumbling", "size": "1s", "aggregations": ["sum(v)", "sum(v)"]}, "same column twice"),
    ],
)
def test_window_shape_errors_name_the_window(window, message):
    data = yaml.safe_load(open(EXAMPLE))
    data["windows"][0] = {"name": "w", "aggregations": ["count"], **window}
    with pytest.raises(SpecError) as err:
        parse_spec(data, env={})
    assert any(p.startswith("windows[0]") and message in p for p in err.value.problems), err.value.problems


def test_dumped_spec_validates_back_to_the_same_spec():
    from pipeline.spec import PipelineSpec

    s = load_spec(EXAMPLE, env={})
    assert PipelineSpec.model_validate(s.model_dump()) == s
    assert PipelineSpec.model_validate_json(s.model_dump_json()) == s


@pytest.mark.parametrize(
    "enricher,message",
    [
        ({"source": {"postgres": {"dsn": "x"}}}, "give exactly one of 'table' or 'query'"),
        ({"source": {"postgres": {"dsn": "x", "query": "select 1"}}}, "must contain %(keys)s"),
        ({"on_miss": "default"}, "on_miss: default needs defaults for ['tier']"),
        ({"type": "ip", "key": ["a", "b"]}, "one key field"),
        ({"fields": {"tier": "text"}}, "type 'text' is not one of"),
        ({"fields": {"ts": "string"}}, "already a record field"),
    ],
)
def test_enricher_errors_name_the_field(enricher, message):
    data = yaml.safe_load(open(EXAMPLE))
    data["enrich"] = [{"name": "users", "key": ["user_id"], "fields": {"tier": "string"},
                       "source": {"postgres": {"dsn": "postgresql://x", "table": "users"}}, **enricher}]
    with pytest.raises(SpecError) as err:
        parse_spec(data, env={})
    assert any(message in p for p in err.value.problems), err.value.problems


def test_autoscale_section_and_its_builder():
    from pipeline.api import Pipeline

    base = {"name": "a", "source": {"kafka": {"bootstrap_servers": "h:1", "topic": "t"}},
            "windows": [{"name": "w", "type": "tumbling", "size": "1s", "aggregations": ["count"]}],
            "sinks": [{"parquet": {"uri": "file:///x"}}]}
    with pytest.raises(SpecError, match="checkpoint"):
        parse_spec({**base, "autoscale": {"max_workers": 4}})
    with pytest.raises(SpecError, match="min_workers"):
        parse_spec({**base, "checkpoint": {"uri": "file:///c"}, "autoscale": {"min_workers": 5, "max_workers": 4}})
    with pytest.raises(SpecError, match="worker_resources"):
        parse_spec({**base, "worker_resources": {"stream": 0}})
    d = {**base, "checkpoint": {"uri": "file:///c", "interval": "2s"}, "worker_cpus": 1.0,
         "worker_resources": {"stream": 1.0}, "workers": 2,
         "autoscale": {"min_workers": 1, "max_workers": 6, "target_lag": 500, "catch_up": "30s"}}
    spec = parse_spec(d)
    cfg = spec.autoscale.config()
    assert (cfg.max_workers, cfg.target_lag, cfg.catch_up_s, cfg.scale_in_delay_s) == (6, 500, 30.0, 60.0)
    built = (Pipeline("a").kafka("h:1", "t").tumbling("w", "1s").parquet("file:///x").checkpoint("file:///c", interval="2s")
             .workers(2, cpus=1.0, stream=1.0).autoscale(6, target_lag=500, catch_up="30s"))
    assert built.spec() == spec
