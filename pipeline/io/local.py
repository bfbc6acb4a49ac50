"""Throwaway local servers (Redis, PostgreSQL) on free loopback ports, in temporary folders.

``raystream demo`` uses them for its stores; the tests and benchmarks start
theirs the same way. Each ``start_*`` returns a ``Service`` with the address and
a ``stop()``; a server that does not come up fails with its log tail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from pipeline.io.broker import free_port, stop_process

__all__ = ["Service", "binary", "start_postgres", "start_redis", "tail", "wait_port"]


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


def tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def wait_port(port: int, proc: subprocess.Popen | None, log: str, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s:\n{tail(log)}")


def binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    for cand in (f"/usr/bin/{name}", f"/usr/sbin/{name}", f"/usr/local/bin/{name}"):
        if os.path.exists(cand):
            return cand
    raise RuntimeError(f"{name} not found: {hint}")


def start_redis() -> Service:
    exe = binary("redis-server", "apt-get install redis-server")
    port = free_port()
    work = tempfile.mkdtemp(prefix="raystream-redis-")
    log = os.path.join(work, "redis.log")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", work,
         "--logfile", log, "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc, log, "redis-server")
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
    return binary(name, "apt-get install postgresql")


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
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{tail(log)}") from None

    def stop() -> None:
        subprocess.run(as_user + [_pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)

    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    return Service("postgres", "127.0.0.1", port, None, work, {"dsn": dsn, "data": data, "log": log}, stop)
