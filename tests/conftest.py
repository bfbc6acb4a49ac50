"""Session fixtures: real servers on loopback and one local Ray for the whole run."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

from tests import services

# Ray reads these at import time: set them before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # every actor's metrics reach the node's port each second
# moto accepts any credentials; pyarrow and boto3 both read these
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_REGION", "us-east-1")


def _service(starter):
    svc = starter()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def broker():
    yield from _service(services.start_broker)


@pytest.fixture(scope="session")
def redis_server():
    yield from _service(services.start_redis)


@pytest.fixture(scope="session")
def postgres():
    yield from _service(services.start_postgres)


@pytest.fixture(scope="session")
def victoria_metrics():
    yield from _service(services.start_victoria_metrics)


@pytest.fixture(scope="session")
def s3():
    yield from _service(services.start_moto)


RAY_METRICS_PORT = services.free_port()  # the session Ray's metrics agent: every actor's Prometheus metrics


@pytest.fixture(scope="module")  # per module: a 1 s scrape and rule loop must not load the rest of the suite
def monitoring(ray_local):
    """Prometheus scraping the session Ray (rules of cluster/monitoring, their ``for`` cut to 1 s), Alertmanager
    with the shipped routing to a Slack-compatible webhook receiver (waits cut to 1 s), and that receiver."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "cluster" / "monitoring"
    work = Path(tempfile.mkdtemp(prefix="raystream-mon-"))
    receiver = services.WebhookReceiver()
    am_conf = yaml.safe_load((root / "alertmanager.yml").read_text())
    route = am_conf["route"]
    route.update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for sub in route.get("routes", []):
        sub.update(group_wait="1s")
    for rcv in am_conf["receivers"]:
        for sc in rcv.get("slack_configs", []):
            sc.pop("api_url_file", None)
            sc["api_url"] = f"{receiver.url}/slack"
    am = services.start_alertmanager(am_conf)
    rules = yaml.safe_load((root / "rules" / "raystream.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    (work / "rules.yml").write_text(yaml.safe_dump(rules))
    prom = services.start_prometheus([f"127.0.0.1:{RAY_METRICS_PORT}"], [str(work / "rules.yml")], am.extra["address"])
    try:
        yield {"prometheus": prom, "alertmanager": am, "receiver": receiver}
    finally:
        prom.stop()
        am.stop()
        receiver.close()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (loopback only) for every test that needs actors."""
    import ray

    ray.init(address="local", namespace="raystream", num_cpus=2, include_dashboard=False,
             log_to_driver=False, configure_logging=False, _metrics_export_port=RAY_METRICS_PORT)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def topic_name():
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pipeline_name():
    return f"p{uuid.uuid4().hex[:10]}"
