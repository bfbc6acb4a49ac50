"""Grafana dashboards against a real Prometheus: every panel's PromQL parses and names only scraped series."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from tests.services import prom_query

DASHBOARDS = Path(__file__).resolve().parents[1] / "cluster" / "monitoring" / "dashboards"


def dashboard_exprs(names: list[str]) -> dict[str, list[str]]:
    """Every panel target's PromQL of the named dashboards (``{file: [expr, ...]}``)."""
    out = {}
    for name in names:
        board = json.loads((DASHBOARDS / name).read_text())
        exprs = []
        for panel in board["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q))
        out[name] = exprs
    return out


def check_dashboards(prom, names: list[str]) -> None:
    """Each expression parses (Prometheus answers it) and names only series a real scrape returned."""
    with urllib.request.urlopen(f"{prom.extra['url']}/api/v1/label/__name__/values", timeout=10) as r:
        scraped = set(json.load(r)["data"])
    for board, exprs in dashboard_exprs(names).items():
        assert exprs, f"{board} has no queries"
        for expr in exprs:
            concrete = expr.replace("$pipeline", "x").replace("$__rate_interval", "1m").replace("$__interval", "1m")
            prom_query(prom, concrete)  # a parse error is a 400 from Prometheus: fails here
            for metric in set(re.findall(r"\bray_raystream_[a-z0-9_]+", expr)):
                assert metric in scraped, f"{board}: {metric} is in a panel but no scrape returned it"
