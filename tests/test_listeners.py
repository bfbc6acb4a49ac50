"""Loopback by default: every listening socket of `raystream demo`'s whole process tree (Ray, Serve's
proxy, the replicas' direct and gRPC ports, the embedded broker, PostgreSQL, Redis) is on 127.0.0.1 —
but for the one Ray binds with no setting, each replica's inter-deployment gRPC server (README,
security). `raystream serve` gets the same check in tests/serve/test_hardening.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pipeline.io.broker import free_port
from tests.serve.test_hardening import _listeners, assert_loopback_only


def test_every_listener_of_the_demo_is_on_loopback():
    tmp = Path(tempfile.mkdtemp(prefix="rsd", dir="/tmp"))
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "RAY_TMPDIR": str(tmp / "ray"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = open(tmp / "demo.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", "--duration", "120", "--rate", "2000",
                             "--out", str(tmp / "out"), "--http-port", str(http), "--grpc-port", str(grpc_port)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(tmp))
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp / "demo.out").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp / "demo.out").read_text()[-3000:]
            time.sleep(1)
        time.sleep(3)  # the replica's own ports come up in its constructor: let the pipeline's workers start too
        listeners = _listeners(proc)
        assert {http, grpc_port} <= {p for _, _, p, _ in listeners}
        assert len(listeners) > 10  # Ray, the broker, PostgreSQL, Redis, Serve: all of them were looked at
        wild = assert_loopback_only(listeners)
        assert len(wild) == 1, wild
    finally:
        if proc.poll() is None:  # a clean stop (Ctrl-C) also stops the demo's PostgreSQL and Redis
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        out.close()
        subprocess.run(["pkill", "-9", "-f", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
