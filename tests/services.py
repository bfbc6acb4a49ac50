"""Real throwaway servers on free loopback ports, in temporary folders.

Each ``start_*`` returns a handle with the address and a ``stop()``; the pytest
session fixtures in conftest.py start them on first use and stop them after the
run. A server that does not come up fails with its log tail in the message.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

from pipeline.io.broker import EmbeddedBroker, free_port
from pipeline.io.proxy import BreakableProxy
from pipeline.io.local import Service, start_postgres, start_redis
from pipeline.io.local import _pg_bin  # noqa: F401  (tests stop and restart PostgreSQL by hand)
from pipeline.io.local import binary as _binary
from pipeline.io.local import tail as _tail
from pipeline.io.local import wait_port as _wait_port

__all__ = ["Service", "TcpProxy", "WebhookReceiver", "prom_query", "prom_value", "start_alertmanager", "start_broker", "start_moto",
           "start_postgres", "start_prometheus", "start_redis", "start_victoria_metrics"]


def start_broker() -> Service:
    broker = EmbeddedBroker().start()
    return Service("tansu", "127.0.0.1", broker.port, broker.proc, broker.log_dir, {"broker": broker}, broker.stop)


def start_victoria_metrics() -> Service:
    exe = _binary("victoria-metrics", "apt-get install victoria-metrics")
    port = free_port()
    work = tempfile.mkdtemp(prefix="raystream-vm-")
    log = os.path.join(work, "vm.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [exe, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={work}/data", "-retentionPeriod=100y",
             "-search.disableCache"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    _wait_port(port, proc, log, "victoria-metrics")
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"victoria-metrics not healthy:\n{_tail(log)}")
        time.sleep(0.1)
    return Service("victoria-metrics", "127.0.0.1", port, proc, work, {"url": f"http://127.0.0.1:{port}"})


def start_moto() -> Service:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_port(port, None, "", "moto")
    return Service("moto", "127.0.0.1", port, None, "", {"endpoint": f"http://127.0.0.1:{port}"}, server.stop)


TcpProxy = BreakableProxy  # the tests' name for it


class Cli:
    """A ``raystream`` command as an operator starts it: a child process group with its own Ray under ``tmp``
    (``RAY_TMPDIR``), output in ``tmp/<name>.out``; ``wait_up`` polls URLs until they answer 200."""

    def __init__(self, args: list[str], tmp, name: str):
        import sys
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[1])
        self.tmp, self.log = tmp, tmp / f"{name}.out"
        self._out = open(self.log, "w")
        env = {**os.environ, "RAY_TMPDIR": str(tmp / "ray"), "PYTHONPATH": root}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=self._out, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, cwd=str(tmp))

    def wait_up(self, urls: list[str], timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if all(httpx.get(u, timeout=2).status_code == 200 for u in urls):
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(1)

    def stop(self) -> None:
        """Ctrl-C (a clean stop also stops what the command started), SIGKILL after 60 s; then Ray's leftovers."""
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._out.close()
        subprocess.run(["pkill", "-9", "-f", str(self.tmp)], check=False)


def _http_ok(url: str, proc, log: str, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready:\n{_tail(log)}")
        time.sleep(0.1)


def _config_server(name: str, exe: str, config: dict, args: list[str], ready_path: str, extra) -> Service:
    """A server binary started with ``config`` written as YAML into a temporary folder (``{work}`` and ``{port}``
    in ``args`` are filled in), on a free loopback port, ready when ``ready_path`` answers 200."""
    import yaml

    port = free_port()
    work = tempfile.mkdtemp(prefix=f"raystream-{name}-")
    with open(os.path.join(work, f"{name}.yml"), "w") as f:
        yaml.safe_dump(config, f)
    log = os.path.join(work, f"{name}.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen([exe, *(a.format(work=work, port=port) for a in args)], stdout=out, stderr=subprocess.STDOUT)
    _http_ok(f"http://127.0.0.1:{port}{ready_path}", proc, log, name)
    return Service(name, "127.0.0.1", port, proc, work, extra(port))


def start_prometheus(targets: list[str], rule_files: list[str] = (), alertmanager: str | None = None,
                     interval: str = "1s") -> Service:
    """The Debian ``prometheus`` scraping ``targets`` (host:port) every ``interval``, evaluating ``rule_files``."""
    conf = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": list(rule_files),
            "scrape_configs": [{"job_name": "raystream", "static_configs": [{"targets": list(targets)}]}]}
    if alertmanager:
        conf["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return _config_server("prometheus", _binary("prometheus", "apt-get install prometheus"), conf,
                          ["--config.file={work}/prometheus.yml", "--storage.tsdb.path={work}/data",
                           "--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=1s"],
                          "/-/ready", lambda port: {"url": f"http://127.0.0.1:{port}"})


def start_alertmanager(config: dict) -> Service:
    """The Debian ``prometheus-alertmanager`` with ``config``, on loopback, clustering off."""
    return _config_server("alertmanager", _binary("prometheus-alertmanager", "apt-get install prometheus-alertmanager"),
                          config, ["--config.file={work}/alertmanager.yml", "--storage.path={work}/data",
                                   "--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                          "/-/ready", lambda port: {"address": f"127.0.0.1:{port}"})


def prom_query(prom: Service, expr: str) -> list[dict]:
    """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
    import json

    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{prom.extra['url']}/api/v1/query?{q}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def prom_value(prom: Service, expr: str) -> float | None:
    res = prom_query(prom, expr)
    return float(res[0]["value"][1]) if res else None


class WebhookReceiver:
    """A loopback HTTP server that keeps every JSON body POSTed to it (a stand-in for Slack's incoming webhook)."""

    def __init__(self):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    received.append({"path": self.path, "body": json.loads(self.rfile.read(n) or b"null"),
                                     "time": time.time()})
                finally:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, pred, timeout_s: float = 60.0, what: str = "a notification") -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for item in list(self.received):
                if pred(item):
                    return item
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; received: {self.received[-5:]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on loopback that decodes each protobuf ``ExportTraceServiceRequest``.

    ``spans`` holds one dict per span: service, name, kind, trace/span/parent ids (hex), links (trace, span ids),
    attributes.
    """

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                               ExportTraceServiceResponse)

        spans = self.spans = []

        def value(v):
            kind = v.WhichOneof("value")
            if kind == "array_value":
                return [value(x) for x in v.array_value.values]
            return getattr(v, kind) if kind else None

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)  # a malformed body fails here: the exporter must send real OTLP
                for rs in req.resource_spans:
                    res = {a.key: value(a.value) for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            spans.append({"service": res.get("service.name"), "name": s.name, "kind": s.kind,
                                          "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                          "parent": s.parent_span_id.hex() or None,
                                          "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                          "attributes": {a.key: value(a.value) for a in s.attributes}})
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sigterm_and_wait(proc, timeout_s: float = 60.0) -> str:
    """SIGTERM ``proc`` (a clean stop), wait for it and return its stderr; killed if it does not stop."""
    import signal

    try:
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=timeout_s)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
