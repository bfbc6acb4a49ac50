"""Session fixtures: real servers on loopback and one local Ray for the whole run."""

from __future__ import annotations

import os
import uuid

import pytest

from tests import services

# Ray reads these at import time: set them before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (loopback only) for every test that needs actors."""
    import ray

    ray.init(address="local", namespace="raystream", num_cpus=2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
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
