"""Chaos experiments: a named schedule of faults against a running pipeline, its impact measured and reported.

``raystream chaos run EXPERIMENT.yaml`` runs the experiment's pipeline over a
known synthetic input (on an embedded broker, or a fresh topic of the spec's),
puts a ``BreakableProxy`` in front of the stores it names, injects the faults
at their times (worker and coordinator kills, broker pause, store outage or
slowness), samples the pipeline's status twice a second, and writes a report
(Markdown + PNG): per fault the lag peak, the time to recover and what the
coordinator did; over the run the records replayed; and whether every
tumbling window in the Parquet sink equals an independent reference computed
from the input (pandas group-by), when the input is known.

The models, the impact analysis and the reference are pure; ``run_experiment``
is the shell that starts things and injects the faults.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.spec import Duration, parse_spec

__all__ = ["Experiment", "Fault", "Sample", "impact", "reference_windows", "run_experiment", "write_report"]

FAULTS = ("kill-worker", "kill-coordinator", "broker-pause", "store-outage", "store-slow")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fault(_M):
    at: Duration = Field(description="when, after the pipeline started consuming")
    fault: Literal["kill-worker", "kill-coordinator", "broker-pause", "store-outage", "store-slow"]
    index: int | None = Field(default=None, description="kill-worker: which worker (default: the first live one)")
    for_: Duration = Field(default=0, alias="for", description="broker-pause, store-outage, store-slow: how long")
    store: str | None = Field(default=None, description="store-outage, store-slow: a name from `proxies`")
    delay: Duration = Field(default=200, description="store-slow: added to every chunk the store sends or receives")

    @model_validator(mode="after")
    def _shape(self) -> "Fault":
        if self.fault in ("store-outage", "store-slow") and not self.store:
            raise ValueError(f"{self.fault} needs `store` (a name from proxies)")
        if self.fault in ("broker-pause", "store-outage", "store-slow") and self.for_ <= 0:
            raise ValueError(f"{self.fault} needs `for` (how long)")
        return self


class SyntheticInput(_M):
    events: int = Field(default=20_000, ge=1, le=50_000_000)
    rate_per_s: float = Field(default=2000, gt=0, description="event-time rate of the generator")
    tenants: int = Field(default=8, ge=1)
    partitions: int = Field(default=4, ge=1, le=256)
    max_disorder: Duration = Field(default=500, description="out-of-orderness of the input (keep it under the spec's)")
    start_ms: int = Field(default=1_765_000_000_000)
    seed: int = 1


class Proxy(_M):
    name: str
    sink: int | None = Field(default=None, description="put the proxy in front of the spec's sinks[i] (postgres, redis)")


class Experiment(_M):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,80}$")
    pipeline: str = Field(description="the pipeline spec (path relative to this file)")
    input: SyntheticInput = Field(default_factory=SyntheticInput)
    broker: Literal["embedded", "spec"] = Field(default="embedded", description=(
        "embedded: a throwaway broker for the experiment (broker-pause pauses it); spec: the spec's broker, a new topic"))
    proxies: list[Proxy] = Field(default_factory=list)
    schedule: list[Fault] = Field(min_length=1)
    sample_every: Duration = 500
    timeout: Duration = Field(default=600_000, description="the whole run must end within this")

    @model_validator(mode="after")
    def _refs(self) -> "Experiment":
        names = {p.name for p in self.proxies}
        for f in self.schedule:
            if f.store and f.store not in names:
                raise ValueError(f"fault at {f.at} ms names store {f.store!r}; proxies are {sorted(names)}")
            if f.fault == "broker-pause" and self.broker != "embedded":
                raise ValueError("broker-pause needs broker: embedded (the experiment pauses its own broker)")
        return self


def load_experiment(path: str | Path) -> tuple[Experiment, dict]:
    """The experiment and its pipeline spec as written (a dict: secrets stay readable); both are validated."""
    path = Path(path)
    exp = Experiment.model_validate(yaml.safe_load(path.read_text()))
    spec_path = (path.parent / exp.pipeline) if not os.path.isabs(exp.pipeline) else Path(exp.pipeline)
    raw = yaml.safe_load(spec_path.read_text())
    parse_spec(raw)
    return exp, raw


# -- measuring ----------------------------------------------------------------
class Sample(_M):
    t: float                 # seconds since the run started
    lag: int                 # records between the broker's end and the workers' positions
    records: int             # records the live workers counted
    running: int             # workers running
    workers: int
    store_wait: bool         # a worker waits on a store
    restarts: int
    pids: tuple[tuple[int, int], ...] = ()  # (pid, records) of each live worker
    coordinator_pid: int | None = None


def impact(samples: list[Sample], faults: list[tuple[Fault, float, float]], events: list[dict],
           finished_at: float | None = None, victims: dict[int, int] | None = None) -> list[dict]:
    """Per fault (with its injection and end times): lag peak, time to recover, recovery actions meanwhile.

    Recovered: the first sample after the fault ended at which every worker runs, none waits on a store, and the
    records counted grew since the previous sample (consuming again) or the lag is 0 — and a killed process
    (``victims``: fault position -> pid) is no longer the one reported; or, without such a sample, the moment the
    run finished every partition (``finished_at``) after the fault ended.
    """
    out = []
    victims = victims or {}
    for n, (fault, start, end) in enumerate(faults):
        after = [s for s in samples if s.t >= end]
        rec_t = None
        victim = victims.get(n)
        for prev, s in zip(after, after[1:]):
            replaced = victim is None or (victim != s.coordinator_pid and victim not in {p for p, _ in s.pids})
            if replaced and s.running == s.workers and not s.store_wait and (s.records > prev.records or s.lag == 0):
                rec_t = s.t
                break
        if rec_t is None and finished_at is not None and finished_at >= end:
            rec_t = finished_at
        window = [s for s in samples if start <= s.t <= (rec_t if rec_t is not None else float("inf"))]
        base = [s.lag for s in samples if s.t <= start]
        acts = [e for e in events if e.get("action") and start <= e["t"] <= (rec_t if rec_t is not None else float("inf"))]
        out.append({"fault": fault.fault, "at_s": round(start, 2), "lasted_s": round(end - start, 2),
                    "lag_before": base[-1] if base else 0, "lag_peak": max((s.lag for s in window), default=0),
                    "recovered_after_s": None if rec_t is None else round(rec_t - start, 2),
                    "actions": sorted({e["action"] for e in acts})})
    return out


def replayed(samples: list[Sample], produced: int) -> int:
    """Records counted more than once: the most each worker process counted, summed, less the input."""
    best: dict[int, int] = {}
    for s in samples:
        for pid, n in s.pids:
            best[pid] = max(best.get(pid, 0), n)
    return max(0, sum(best.values()) - produced)


# -- the independent reference -------------------------------------------------
_REF_AGGS = {"count", "sum", "min", "max", "mean"}


def reference_windows(df: pd.DataFrame, window) -> pd.DataFrame | None:
    """Tumbling ``window`` over the raw input with pandas (no late records assumed); None when it cannot say
    (another window type, or an aggregation outside count/sum/min/max/mean)."""
    if window.type != "tumbling" or any(a.fn not in _REF_AGGS for a in window.aggregations):
        return None
    keys = list(window.group_by) + (["partition"] if window.per_partition else [])
    d = df.assign(window_start=(df["ts"] // window.size) * window.size)
    g = d.groupby(["window_start", *keys], sort=True)
    out = {}
    for a in window.aggregations:
        col = a.column
        out[col] = g.size() if a.fn == "count" else getattr(g[a.field], a.fn)()
    return pd.DataFrame(out).reset_index()


def compare(got: pd.DataFrame, want: pd.DataFrame, window) -> str | None:
    """None when equal (values to 1e-9 relative), else what differs."""
    keys = ["window_start", *window.group_by] + (["partition"] if window.per_partition else [])
    got = got.copy()
    if str(got["window_start"].dtype).startswith("datetime64"):
        got["window_start"] = got["window_start"].astype("datetime64[ms, UTC]").astype("int64")
    m = want.merge(got, on=keys, how="outer", suffixes=("", "_got"), indicator=True)
    missing, extra = int((m["_merge"] == "left_only").sum()), int((m["_merge"] == "right_only").sum())
    if missing or extra:
        return f"{missing} windows missing, {extra} unexpected"
    for a in window.aggregations:
        c = a.column
        if not np.allclose(m[c].astype(float), m[f"{c}_got"].astype(float), rtol=1e-9, atol=1e-9):
            bad = int((~np.isclose(m[c].astype(float), m[f"{c}_got"].astype(float), rtol=1e-9, atol=1e-9)).sum())
            return f"{bad} windows differ in {c}"
    return None


# -- the report ------------------------------------------------------------------
def write_report(out: Path, exp: Experiment, samples: list[Sample], faults: list[tuple[Fault, float, float]],
                 rows: list[dict], summary: dict) -> Path:
    """``out/report.md`` and ``out/timeline.png``; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    t = [s.t for s in samples]
    ax1.plot(t, [s.lag for s in samples], label="consumer lag (records)")
    ax1.set_ylabel("lag")
    rates = []  # over the last 2 s: heartbeats refresh the counts in steps
    for i, b in enumerate(samples):
        a = next((x for x in samples[:i] if b.t - x.t <= 2.0), b)
        rates.append(max(0.0, (b.records - a.records) / (b.t - a.t)) if b.t > a.t else 0.0)
    ax2.plot(t, rates, color="tab:green", label="records/s (live workers, 2 s window)")
    ax2.set_ylabel("records/s")
    ax2.set_xlabel("seconds since start")
    for fault, start, end in faults:
        for ax in (ax1, ax2):
            ax.axvspan(start, max(end, start + 0.2), color="tab:red", alpha=0.15)
        ax1.annotate(fault.fault, (start, 0), rotation=90, fontsize=8, va="bottom")
    ax1.set_title(f"chaos experiment {exp.name}")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=100)
    plt.close(fig)
    lines = [f"# Chaos experiment `{exp.name}`", "",
             f"Pipeline `{summary['pipeline']}`, {summary['produced']:,} input records, {summary['workers']} workers; "
             f"ran {summary['wall_s']:.1f}s.", "",
             "| fault | at (s) | lasted (s) | lag before | lag peak | recovered after (s) | coordinator actions |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rec = "not recovered" if r["recovered_after_s"] is None else f"{r['recovered_after_s']:.2f}"
        lines.append(f"| {r['fault']} | {r['at_s']:.2f} | {r['lasted_s']:.2f} | {r['lag_before']:,} | {r['lag_peak']:,} | "
                     f"{rec} | {', '.join(r['actions']) or '-'} |")
    if summary.get("not_injected"):
        lines += ["", "Not injected (the run had ended): " + ", ".join(summary["not_injected"]) + "."]
    lines += ["", f"Records replayed (counted more than once after restarts): {summary['replayed']:,}.", "",
              "## Output", ""]
    for name, verdict in summary["windows"].items():
        lines.append(f"- window `{name}`: {verdict}")
    lines += ["", f"Verdict: **{'exact' if summary['exact'] else 'NOT exact'}**"
              + ("" if summary["checked"] else " (no window could be checked)"), "", "![timeline](timeline.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- the shell ----------------------------------------------------------------------
def _status(name: str) -> dict | None:
    import ray

    from actors import control

    if not ray.is_initialized():  # the run starts (or joins) Ray itself; never connect anywhere else first
        return None
    try:
        return control.pipeline_status(name, timeout_s=5)
    except Exception:  # starting, finished or the coordinator restarting
        return None


def _sample(st: dict, t: float) -> Sample:
    ws = st.get("workers", [])
    return Sample(t=t, lag=int(sum(w.get("lag") or 0 for w in ws)), records=int(sum(w.get("records") or 0 for w in ws)),
                  running=sum(1 for w in ws if w.get("state") == "running"), workers=len(ws),
                  store_wait=any(w.get("store_wait") for w in ws), restarts=int(sum(w.get("restarts") or 0 for w in ws)),
                  pids=tuple((int(w["pid"]), int(w.get("records") or 0)) for w in ws if w.get("pid")),
                  coordinator_pid=st.get("coordinator_pid"))


def run_experiment(path: str | Path, out: str | Path, on_progress=None) -> dict:
    """Run the experiment at ``path``; write the report under ``out``; returns the summary (``exact`` etc.)."""
    from actors.runtime import ensure_ray, local_ray_env

    local_ray_env()  # before Ray is first imported: it reads the auth mode then
    ensure_ray()  # here, in the main thread (a local, loopback, token-auth Ray unless one is connected already)
    from actors import control
    from pipeline.driver import run_pipeline
    from pipeline.io.broker import EmbeddedBroker
    from pipeline.io.kafka import ensure_topic, produce_all
    from pipeline.io.proxy import BreakableProxy
    from pipeline.io.sinks.parquet import read_windows
    from pipeline.synthetic import events

    exp, d = load_experiment(path)
    out = Path(out)
    broker = EmbeddedBroker().start() if exp.broker == "embedded" else None
    proxies: dict[str, BreakableProxy] = {}
    try:
        import copy

        d = copy.deepcopy(d)
        kafka = d["source"]["kafka"]
        bootstrap = broker.bootstrap if broker else kafka["bootstrap_servers"]
        topic = f"{kafka['topic']}-{exp.name}-{int(time.time())}"
        name = f"{d['name']}-chaos-{int(time.time()) % 100000}"[:63]
        d["name"] = name
        d["source"]["kafka"].update(bootstrap_servers=bootstrap, topic=topic)
        for p in exp.proxies:
            if p.sink is not None:
                proxies[p.name] = _proxy_sink(d["sinks"][p.sink], BreakableProxy)
        if d.get("checkpoint") and d["checkpoint"]["uri"].startswith("file://"):
            d["checkpoint"]["uri"] = d["checkpoint"]["uri"].rstrip("/") + f"/{exp.name}"
        spec = parse_spec(d)
        inp = exp.input
        values, keys, cols = events(inp.events, inp.start_ms, inp.rate_per_s, inp.tenants, inp.max_disorder, seed=inp.seed)
        df = pd.DataFrame(cols)
        df["partition"] = [int(t.split("-")[1]) % inp.partitions for t in df["tenant_id"]]
        if broker:
            broker.create_topic(topic, inp.partitions)
        else:
            ensure_topic(bootstrap, topic, inp.partitions, 10.0)
        produce_all(bootstrap, topic, values, keys, df["partition"].tolist())

        box: dict[str, Any] = {}
        t0 = time.monotonic()
        runner = threading.Thread(target=lambda: _run(box, run_pipeline, spec), daemon=True)
        runner.start()
        samples: list[Sample] = []
        seen_events: dict[tuple, dict] = {}
        faults: list[tuple[Fault, float, float]] = []
        pending = sorted(exp.schedule, key=lambda f: f.at)
        started: float | None = None
        undo: list[tuple[float, Any]] = []
        victims: dict[int, int] = {}
        deadline = t0 + exp.timeout / 1000.0
        while runner.is_alive() and time.monotonic() < deadline:
            now = time.monotonic() - t0
            st = _status(name)
            if st is not None:
                samples.append(_sample(st, now))
                for e in st.get("events", []):
                    seen_events.setdefault((e["time"], e["event"]), {**e, "t": e["time"] - (time.time() - now)})
                if started is None and samples[-1].records > 0:
                    started = now
            if started is not None:
                while pending and now - started >= pending[0].at / 1000.0:
                    f = pending.pop(0)
                    end, victim = _inject(f, name, broker, proxies, control)
                    if victim is not None:
                        victims[len(faults)] = victim
                    faults.append((f, now, now + end))
                    if end:
                        undo.append((now + end, f))
                    if on_progress:
                        on_progress(f"{now:6.1f}s {f.fault}")
            for item in [u for u in undo if u[0] <= now]:
                _undo(item[1], broker, proxies)
                undo.remove(item)
            time.sleep(exp.sample_every / 1000.0)
        for _, f in undo:
            _undo(f, broker, proxies)
        runner.join(60)
        wall = time.monotonic() - t0
        finished_at = box.get("finished")
        if "error" in box:
            raise box["error"]
        if runner.is_alive():
            raise TimeoutError(f"the experiment's pipeline did not finish within {exp.timeout / 1000:.0f}s")
        report = box["report"]
        rows = impact(samples, faults, list(seen_events.values()), finished_at - t0 if finished_at else None, victims)
        verdicts, exact, checked = {}, True, False
        parquet = next((s.parquet for s in spec.sinks if s.parquet is not None), None)
        late = report.late
        for w in spec.windows:
            want = reference_windows(df, w) if late == 0 else None
            if want is None or parquet is None:
                verdicts[w.name] = "not checked (" + ("late records in the input" if late else
                                                      "no Parquet sink" if parquet is None else
                                                      "only tumbling count/sum/min/max/mean windows are checked") + ")"
                continue
            got = read_windows(parquet.uri, name, w.name, parquet.s3_endpoint_url)
            diff = compare(got.to_pandas(), want, w) if got is not None else "no output"
            checked = True
            exact = exact and diff is None
            verdicts[w.name] = "equal to the reference" if diff is None else f"DIFFERS: {diff}"
        summary = {"experiment": exp.name, "pipeline": name, "produced": len(values), "workers": spec.workers,
                   "wall_s": wall, "replayed": replayed(samples, len(values)), "faults": rows, "windows": verdicts,
                   "exact": exact, "checked": checked, "records": report.records,
                   "not_injected": [f"{f.fault} at {f.at / 1000:g}s" for f in pending],
                   "actions": sorted(({"t": round(e["t"], 2), "action": e["action"], "event": e["event"][:200]}
                                      for e in seen_events.values() if e.get("action")), key=lambda e: e["t"])}
        summary["report"] = str(write_report(out, exp, samples, faults, rows, summary))
        return summary
    finally:
        for p in proxies.values():
            p.close()
        if broker:
            broker.stop()


def _run(box: dict, run_pipeline, spec) -> None:
    try:
        box["report"] = run_pipeline(spec, until_end=True)
        box["finished"] = time.monotonic()
    except BaseException as exc:  # re-raised by run_experiment; logged now (the sampler may still be waiting)
        logging.getLogger("raystream.chaos").error("the pipeline failed: %s: %s", type(exc).__name__, exc,
                                                   exc_info=exc)
        box["error"] = exc


def _proxy_sink(sink: dict, proxy_cls):
    """Point a sink's store at a new proxy in front of it; returns the proxy."""
    from urllib.parse import urlsplit, urlunsplit

    kind, key = (("postgres", "dsn") if sink.get("postgres") else ("redis", "url") if sink.get("redis") else (None, None))
    if kind is None:
        raise ValueError("a proxy goes in front of a postgres or redis sink")
    url = sink[kind][key]
    parts = urlsplit(url)
    proxy = proxy_cls(parts.port or (5432 if kind == "postgres" else 6379), parts.hostname or "127.0.0.1")
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    sink[kind][key] = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    return proxy


def _inject(f: Fault, name: str, broker, proxies: dict, control) -> tuple[float, int | None]:
    """Start fault ``f``; returns how long until it is undone (0: nothing to undo) and the pid it killed."""
    if f.fault == "kill-worker":
        return 0.0, control.kill_worker(name, f.index)["pid"]
    if f.fault == "kill-coordinator":
        return 0.0, control.kill_coordinator(name)["pid"]
    if f.fault == "broker-pause":
        os.kill(broker.proc.pid, signal.SIGSTOP)
    elif f.fault == "store-outage":
        proxies[f.store].set_broken(True)
    elif f.fault == "store-slow":
        proxies[f.store].set_delay(f.delay / 1000.0)
    return f.for_ / 1000.0, None


def _undo(f: Fault, broker, proxies: dict) -> None:
    if f.fault == "broker-pause":
        os.kill(broker.proc.pid, signal.SIGCONT)
    elif f.fault == "store-outage":
        proxies[f.store].set_broken(False)
    elif f.fault == "store-slow":
        proxies[f.store].set_delay(0)
