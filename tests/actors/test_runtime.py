"""The local Ray raystream uses listens on loopback only."""

from __future__ import annotations

import ipaddress

import psutil

from actors.assignment import plan


def test_ray_listens_only_on_loopback(ray_local):
    ray_pids = set()
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd or "ray::" in cmd
                             or "ray/dashboard" in cmd or "default_worker" in cmd):
            ray_pids.add(p.info["pid"])
    assert ray_pids, "no Ray processes found"
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    assert listening, "Ray processes listen on no port?"
    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip)
        return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)

    exposed = [(c.pid, c.laddr) for c in listening if not loopback(c.laddr.ip)]
    assert exposed == []


def test_assignment_plan_covers_every_partition_once():
    for parts in ([0, 1, 2, 3], list(range(7)), [5]):
        for workers in (1, 2, 3, 8):
            p = plan(parts, workers)
            assert len(p) == workers and sorted(x for ws in p for x in ws) == sorted(parts)
            assert max(map(len, p)) - min(map(len, p)) <= 1
