"""Loopback by default: every listening socket of `raystream demo`'s whole process tree (Ray, Serve's
proxy, the replicas' direct and gRPC ports, the embedded broker, PostgreSQL, Redis) is on 127.0.0.1 —
but for the one Ray binds with no setting, each replica's inter-deployment gRPC server (README,
security). `raystream serve` gets the same check in tests/serve/test_hardening.py."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from pipeline.io.broker import free_port
from tests.serve.test_hardening import _listeners, assert_loopback_only
from tests.services import Cli


def test_every_listener_of_the_demo_is_on_loopback():
    tmp = Path(tempfile.mkdtemp(prefix="rsd", dir="/tmp"))
    http, grpc_port = free_port(), free_port()
    demo = Cli(["demo", "--duration", "120", "--rate", "2000", "--out", str(tmp / "out"), "--http-port", str(http),
                "--grpc-port", str(grpc_port)], tmp, "demo")
    proc = demo.proc
    try:
        demo.wait_up([f"http://127.0.0.1:{http}/healthz"], 240)
        time.sleep(3)  # the replica's own ports come up in its constructor: let the pipeline's workers start too
        listeners = _listeners(proc)
        assert {http, grpc_port} <= {p for _, _, p, _ in listeners}
        assert len(listeners) > 10  # Ray, the broker, PostgreSQL, Redis, Serve: all of them were looked at
        wild = assert_loopback_only(listeners)
        assert len(wild) == 1, wild
    finally:
        demo.stop()
        shutil.rmtree(tmp, ignore_errors=True)
