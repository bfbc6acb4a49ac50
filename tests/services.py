"""Real throwaway servers on free loopback ports, in temporary folders.

Each ``start_*`` returns a handle with the address and a ``stop()``; the pytest
session fixtures in conftest.py start them on first use and stop them after the
run. A server that does not come up fails with its log tail in the message.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from pipeline.io.broker import EmbeddedBroker, free_port, stop_process

__all__ = ["Service", "TcpProxy", "start_broker", "start_moto", "start_postgres", "start_redis", "start_victoria_metrics"]


@dataclass
class Service:
    name: str
    host: str
    port: int
    proc: subprocess.Popen | None = None
    workdir: str = ""
    extra: dict = field(default_factory=dict)
    stopper: object = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.stopper is not None:
            self.stopper()
        else:
            stop_process(self.proc)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_port(port: int, proc: subprocess.Popen | None, log: str, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s:\n{_tail(log)}")


def _binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    for cand in (f"/usr/bin/{name}", f"/usr/sbin/{name}", f"/usr/local/bin/{name}"):
        if os.path.exists(cand):
            return cand
    raise RuntimeError(f"{name} not found: {hint}")


def start_broker() -> Service:
    broker = EmbeddedBroker().start()
    return Service("tansu", "127.0.0.1", broker.port, broker.proc, broker.log_dir, {"broker": broker}, broker.stop)


def start_redis() -> Service:
    exe = _binary("redis-server", "apt-get install redis-server")
    port = free_port()
    work = tempfile.mkdtemp(prefix="raystream-redis-")
    log = os.path.join(work, "redis.log")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", work,
         "--logfile", log, "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_port(port, proc, log, "redis-server")
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while not client.ping():
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server does not answer PING")
        time.sleep(0.05)
    return Service("redis", "127.0.0.1", port, proc, work, {"url": f"redis://127.0.0.1:{port}/0"})


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    return _binary(name, "apt-get install postgresql")


def start_postgres() -> Service:
    """initdb + pg_ctl as the unprivileged ``postgres`` user (PostgreSQL refuses root)."""
    port = free_port()
    work = tempfile.mkdtemp(prefix="raystream-pg-")
    data = os.path.join(work, "data")
    log = os.path.join(work, "pg.log")
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(work, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda args: subprocess.run(as_user + args, check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run([_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        run([_pg_bin("pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "-o",
             f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=on", "start"])
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{_tail(log)}") from None

    def stop() -> None:
        subprocess.run(as_user + [_pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)

    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    return Service("postgres", "127.0.0.1", port, None, work, {"dsn": dsn, "data": data, "log": log}, stop)


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


class TcpProxy:
    """A loopback TCP proxy that can be broken (connections refused/reset) to drill store failures."""

    def __init__(self, target_port: int):
        import socket

        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.broken = False
        self.refused = 0
        self.conns: list = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.broken:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data or self.broken:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def set_broken(self, broken: bool) -> None:
        self.broken = broken
        if broken:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass
            self.conns = []

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        self.set_broken(True)
