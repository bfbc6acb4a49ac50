"""Every throwaway server comes up, answers, and is reachable only on loopback."""

from __future__ import annotations

import json
import time
import urllib.request

import boto3


def test_broker_round_trip(broker, topic_name):
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.io.kafka import end_offsets, produce_all

    b = broker.extra["broker"]
    b.create_topic(topic_name, 2)
    produce_all(broker.address, topic_name, [b"a", b"b", b"c"], None, [0, 1, 1])
    assert end_offsets(broker.address, topic_name, [0, 1]) == {0: 1, 1: 2}
    c = Consumer({"bootstrap.servers": broker.address, "group.id": "x", "enable.auto.commit": False})
    c.assign([TopicPartition(topic_name, 1, 0)])
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        got += [m.value() for m in c.consume(10, 0.5) if m.error() is None]
    c.close()
    assert got == [b"b", b"c"]


def test_redis(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.extra["url"])
    r.set("k", "v")
    assert r.get("k") == b"v"


def test_postgres(postgres):
    import psycopg

    with psycopg.connect(postgres.extra["dsn"]) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
        assert conn.execute("show fsync").fetchone() == ("on",)


def test_victoria_metrics_accepts_influx_line_protocol(victoria_metrics):
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    url = victoria_metrics.extra["url"]
    with InfluxDBClient(url=url, token="unused", org="raystream") as client:
        client.write_api(write_options=SYNCHRONOUS).write("db", record="clicks,tenant=a count=3i 1700000000000000000")
    deadline = time.monotonic() + 15
    while True:
        urllib.request.urlopen(f"{url}/internal/force_flush", timeout=5).read()
        body = urllib.request.urlopen(f"{url}/api/v1/export?match[]={{__name__=~%22clicks.*%22}}", timeout=5).read()
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert lines and lines[0]["metric"]["tenant"] == "a" and lines[0]["values"] == [3]


def test_moto_s3(s3):
    client = boto3.client("s3", endpoint_url=s3.extra["endpoint"])
    client.create_bucket(Bucket="svc-check")
    client.put_object(Bucket="svc-check", Key="a/b", Body=b"hello")
    assert client.get_object(Bucket="svc-check", Key="a/b")["Body"].read() == b"hello"
