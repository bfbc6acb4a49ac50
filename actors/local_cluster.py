"""A real multi-node Ray cluster of processes on one machine, on loopback (tests, drills, benchmarks).

Each node is started with ``ray start`` in its own process group (its raylet,
its agents and every worker process it spawns stay in that group), so a whole
node can be killed at once, as a machine or a pod is lost. Every listener is on
127.0.0.1 with explicit ports; token auth stays on (``RAY_AUTH_MODE=token``).

One-machine Ray refuses ``ray start --address`` while
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which is what keeps Ray on loopback);
the guard is read only by the CLI module, so ``ray start`` runs through a tiny
launcher that lifts it for that module alone (``_LAUNCHER``): addresses are
still resolved as loopback everywhere else.

With ``redis`` the head runs with GCS fault tolerance (``RAY_REDIS_ADDRESS``,
as KubeRay configures it): :meth:`LocalCluster.restart_gcs` kills the GCS
server and starts it again from its own command line, and the cluster carries
on from Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pipeline.io.broker import free_port

__all__ = ["LocalCluster", "NodeProc"]

_LAUNCHER = r"""
import sys, types
import ray._private.ray_constants as real
import ray.scripts.scripts as cli
shim = types.ModuleType("ray_constants_cli")
shim.__dict__.update(real.__dict__)
shim.ENABLE_RAY_CLUSTER = True  # join allowed; services.get_node_ip_address still sees the real (False): loopback
cli.ray_constants = shim
sys.argv = ["ray", *sys.argv[1:]]
cli.main()
"""


_MONITOR_DEFAULTS = """import os, sys
if sys.argv and sys.argv[0].endswith("monitor.py") and os.environ.get("RAYSTREAM_FAKE_PROVIDER_DEFAULTS"):
    from ray.autoscaler._private import providers
    providers._DEFAULT_CONFIGS["fake_multinode"] = lambda: os.environ["RAYSTREAM_FAKE_PROVIDER_DEFAULTS"]
"""


@dataclass
class NodeProc:
    """One node: the process group of its ``ray start`` and what it was given."""

    name: str
    pgid: int
    cpus: float
    resources: dict
    head: bool = False
    node_id: str | None = None
    log: str = ""
    alive: bool = True
    groups: list[int] = field(default_factory=list)  # more process groups of the node (a restarted GCS)


@dataclass
class LocalCluster:
    """Start a head and worker nodes; kill a node; restart the GCS; stop everything.

    ``head_cpus=0`` runs a head that takes no actor needing a CPU (as KubeRay
    clusters are often run). Every node gets a custom resource named after it
    (``node:<name>`` style, here ``rs_<name>: 1``) so a test can tell or pin
    where an actor runs.
    """

    workdir: str
    head_cpus: float = 0
    redis: str | None = None        # host:port of an external Redis: GCS fault tolerance
    env: dict = field(default_factory=dict)
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    port: int = 0
    metrics_ports: dict[str, int] = field(default_factory=dict)
    dashboard: bool = False         # the head serves the dashboard (and the Jobs API) on 127.0.0.1:dashboard_port
    dashboard_port: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict:
        env = {**os.environ, **self.env}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("RAY_DEDUP_LOGS", "0")
        # a node that stops answering is declared dead after ~5 s (the defaults take ~30 s)
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_timeout_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "4")
        if self.redis:
            env["RAY_REDIS_ADDRESS"] = self.redis
            env.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "120")
        return env

    def _start(self, name: str, cpus: float, resources: dict, head: bool, extra: list[str] = ()) -> NodeProc:
        os.makedirs(self.workdir, exist_ok=True)
        log = os.path.join(self.workdir, f"node-{name}.log")
        metrics = free_port()
        self.metrics_ports[name] = metrics
        res = {f"rs_{name}": 1, **resources}
        args = ["start", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--resources={json.dumps(res)}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                "--object-store-memory=100000000", "--disable-usage-stats", *extra]
        if head:
            self.port = self.port or free_port()
            args += ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}"]
            if self.dashboard:
                self.dashboard_port = self.dashboard_port or free_port()
                args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
            else:
                args += ["--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=self._env(), start_new_session=True)
            rc = proc.wait(timeout=120)
        if rc != 0:
            with open(log, errors="replace") as f:
                raise RuntimeError(f"ray start for node {name} failed ({rc}):\n{f.read()[-3000:]}")
        node = NodeProc(name, proc.pid, cpus, res, head=head, log=log)
        self.nodes[name] = node
        return node

    def start_head(self, extra: list[str] = (), autoscaling: dict | None = None) -> NodeProc:
        """Start the head node (GCS, its raylet).

        ``autoscaling``: run Ray's autoscaler (v2, as KubeRay does) with the fake multi-node provider Ray's own
        autoscaler tests use: it launches and removes real nodes as processes on this machine. The dict gives
        ``available_node_types`` (each with resources, min_workers, max_workers) and optionally
        ``idle_timeout_minutes`` and ``max_workers``.
        """
        if autoscaling is None:
            return self._start("head", self.head_cpus, {}, True, extra)
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        self.port = self.port or free_port()
        types = {k: {"node_config": {}, "min_workers": 0, **v} for k, v in autoscaling["available_node_types"].items()}
        types["ray.head.default"] = {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0}
        config = {"cluster_name": "raystream-local", "max_workers": autoscaling.get("max_workers", 8),
                  "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                               "disable_launch_config_check": True, "launch_multiple": True,
                               "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": self.address},
                  "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
                  "upscaling_speed": 1.0, "idle_timeout_minutes": autoscaling.get("idle_timeout_minutes", 0.1),
                  "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                  "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
                  "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                  "rsync_exclude": [], "rsync_filter": []}
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(config, f)
        # Ray's wheel lacks the fake provider's defaults file that its autoscaler loads: the monitor process gets
        # this config as those defaults (a sitecustomize on the head's PYTHONPATH, acting in monitor.py only)
        site = os.path.join(self.workdir, "site")
        os.makedirs(site, exist_ok=True)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(_MONITOR_DEFAULTS)
        self.env["RAYSTREAM_FAKE_PROVIDER_DEFAULTS"] = path
        self.env["PYTHONPATH"] = os.pathsep.join(x for x in (site, os.environ.get("PYTHONPATH")) if x)
        self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
                         "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        try:
            return self._start("head", self.head_cpus, {}, True, [*extra, f"--autoscaling-config={path}"])
        finally:
            for k in ("RAY_CLOUD_INSTANCE_ID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING"):
                self.env.pop(k)  # the head's own identity: worker nodes get theirs from the provider

    def add_node(self, name: str, cpus: float = 1, resources: dict | None = None, wait_s: float = 60) -> NodeProc:
        """Start a worker node and wait until the GCS lists it alive."""
        node = self._start(name, cpus, resources or {}, False)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            found = self.node_ids().get(name)
            if found:
                node.node_id = found
                return node
            time.sleep(0.2)
        raise RuntimeError(f"node {name} did not join within {wait_s}s")

    def node_ids(self) -> dict[str, str]:
        """Alive nodes by name (their ``rs_<name>`` resource), asked of the GCS from a helper process."""
        code = ("import json, ray\n"
                "ray.init(address=%r, log_to_driver=False, configure_logging=False)\n"
                "print(json.dumps({k[3:]: n['NodeID'] for n in ray.nodes() if n['Alive'] "
                "for k in n['Resources'] if k.startswith('rs_')}))") % self.address
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self._env(), timeout=60)
        if out.returncode != 0:
            return {}
        return json.loads(out.stdout.strip().splitlines()[-1])

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of a node at once, as a lost machine: its process group (raylet, agents) and
        every descendant (the raylet starts its worker processes, the actors, in process groups of their own).
        Returns the pids killed."""
        node = self.nodes[name]
        victims = self.pids(name)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGSTOP)  # freeze first: nothing of the node reacts to the others dying
            except ProcessLookupError:
                pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.alive = False
        return victims

    def pids(self, name: str) -> list[int]:
        """The live processes of a node: its process group and all their descendants."""
        table: dict[int, tuple[int, int, str]] = {}  # pid -> (ppid, pgid, state)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
        groups = {self.nodes[name].pgid, *self.nodes[name].groups}
        found = {pid for pid, (_, pgid, st) in table.items() if pgid in groups and st != "Z"}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _, st) in table.items() if ppid in found and st != "Z"} - found
            found |= more
            grew = bool(more)
        return sorted(found)

    def _gcs_pid(self) -> int:
        for pid in self.pids("head"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"gcs_server"):
                return pid
        raise RuntimeError("no gcs_server process in the head's group")

    def restart_gcs(self, down_s: float = 0.0) -> float:
        """Kill the head's GCS server and start it again from its own command line (GCS FT needs ``redis``).

        Returns how long it was down. The new one is counted among the head's processes, so a later kill of the
        head still takes it.
        """
        if not self.redis:
            raise RuntimeError("the GCS keeps its state in memory without an external Redis: start with redis=")
        pid = self._gcs_pid()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            time.sleep(0.02)
        time.sleep(down_s)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.nodes["head"].groups.append(proc.pid)
        return time.monotonic() - t0

    def stop(self) -> None:
        """Kill every node, worker nodes first (Ray's session folders under /tmp/ray stay for post-mortems)."""
        for name in [n for n in self.nodes if n != "head"] + [n for n in self.nodes if n == "head"]:
            self.kill_node(name)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"
