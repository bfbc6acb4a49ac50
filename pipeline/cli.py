"""The ``raystream`` command: run, validate, demo, status, scale and chaos drills."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.io.kafka import KafkaFailure
from pipeline.spec import SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="raystream: event-time stream processing on Ray")
console = Console(stderr=True)

EXIT_SPEC = 2
EXIT_RUNTIME = 1


@app.callback()
def _options(
    log_format: str = typer.Option("text", "--log-format", envvar="RAYSTREAM_LOG_FORMAT",
                                   help="logs on stderr (and in the actors' logs): json (one object a line) or text"),
) -> None:
    """raystream: event-time stream processing on Ray."""
    from pipeline.logs import configure_logging

    if log_format not in ("json", "text"):
        raise typer.BadParameter("json or text", param_hint="--log-format")
    configure_logging(log_format)


def _fmt_time(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


def status_table(workers: list[dict], rates: dict[int, float], title: str = "raystream") -> Table:
    """The live table: one row per worker plus totals."""
    t = Table(title=title, expand=False)
    for col in ("wkr", "parts", "records", "ev/s", "watermark", "lag s", "windows", "late", "rej", "open", "MiB"):
        t.add_column(col, justify="right")
    now_ms = time.time() * 1000
    for w in workers:
        wm = w.get("watermark")
        lag = f"{(now_ms - wm) / 1000:.1f}" if wm is not None else "-"
        t.add_row(
            str(w.get("index")),
            ",".join(map(str, w.get("partitions", []))),
            f"{w.get('records', 0):,}",
            f"{rates.get(w.get('index'), 0.0):,.0f}",
            _fmt_time(wm),
            lag,
            f"{w.get('windows_emitted', 0):,}",
            f"{w.get('late', 0):,}",
            f"{w.get('rejected', 0):,}",
            f"{w.get('open_windows', 0):,}",
            f"{w.get('rss_bytes', 0) / 2**20:,.0f}",
        )
    t.add_row(
        "all", "", f"{sum(w.get('records', 0) for w in workers):,}", f"{sum(rates.values()):,.0f}", "", "",
        f"{sum(w.get('windows_emitted', 0) for w in workers):,}", f"{sum(w.get('late', 0) for w in workers):,}",
        f"{sum(w.get('rejected', 0) for w in workers):,}", "", "",
    )
    return t


class _Rates:
    def __init__(self):
        self.last: dict[int, tuple[float, int]] = {}
        self.rates: dict[int, float] = {}

    def update(self, workers: list[dict]) -> dict[int, float]:
        now = time.monotonic()
        for w in workers:
            i, n = w.get("index"), w.get("records", 0)
            if i in self.last:
                t0, n0 = self.last[i]
                if now > t0:
                    self.rates[i] = (n - n0) / (now - t0)
            self.last[i] = (now, n)
        return self.rates


@app.command()
def validate(spec: Path = typer.Argument(..., help="pipeline spec (YAML)")) -> None:
    """Check a spec file and print it normalized."""
    try:
        s = load_spec(spec)
    except SpecError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    from pipeline.redact import redact

    # secrets masked: SecretStr fields and secret-named keys of free-form maps (source.kafka.config's sasl.password)
    typer.echo(json.dumps(redact(s.model_dump(mode="json")), indent=2))


@app.command()
def run(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML)"),
    until_end: bool = typer.Option(False, "--until-end", help="consume to the end offsets seen at start, flush every window, exit 0"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local one on 127.0.0.1)"),
    inline: bool = typer.Option(False, "--inline", help="run in this process without Ray (one loop over all partitions)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no live table"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the final per-worker counters as JSON here"),
    from_checkpoint: Optional[int] = typer.Option(None, "--from-checkpoint",
                                                  help="resume from this checkpoint id instead of the newest (a loud warning names both)"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help=(
        "Prometheus metrics on 127.0.0.1:PORT: the local Ray's metrics agent (every actor), or with --inline this "
        "process; on a cluster (--address) each node serves its own metrics-export-port")),
) -> None:
    """Run a pipeline until stopped (SIGINT/SIGTERM) or, with --until-end, to the end of its input."""
    try:
        s = load_spec(spec)
    except SpecError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    _run_and_report(s, until_end=until_end, address=address, inline=inline, quiet=quiet, report_path=report,
                    from_checkpoint=from_checkpoint, metrics_port=metrics_port)


@app.command()
def backfill(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML)"),
    source: str = typer.Option(..., "--from", help=(
        "kafka:START..END (offsets, earliest/latest or ISO-8601 times; END exclusive) or parquet:URI "
        "(an archive sink's file:// or s3:// uri)")),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local one on 127.0.0.1)"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the totals and per-partition counters as JSON here"),
) -> None:
    """Run the spec over stored records as a Ray Data job; writes the windows the streaming run writes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pipeline.backfill import parse_source, run_backfill

    try:
        s = load_spec(spec)
        src = parse_source(source)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(f"backfill {s.name} from {source}", total=None)

        def on_progress(stage: str, done: int, total) -> None:
            progress.update(task, description=f"backfill {s.name}: {stage} {done}/{total or '?'}")

        try:
            out = run_backfill(s, src, address=address, on_progress=on_progress)
        except Exception as exc:  # say what failed without a wall of Ray frames
            cause = getattr(exc, "cause", None) or exc
            console.print(f"[red]error:[/] {type(cause).__name__}: {cause}")
            raise typer.Exit(EXIT_RUNTIME)
    if report is not None:
        report.write_text(json.dumps({"records": out.records, "rejected": out.rejected, "late": out.late,
                                      "windows_emitted": out.windows_emitted, "merged_rows": out.merged_rows,
                                      "wall_s": out.wall_s, "partitions": out.partitions}, indent=2, default=str))
    rate = out.records / out.wall_s if out.wall_s else 0
    typer.echo(f"done {out.records} records ({out.rejected} rejected, {out.late} late), {out.windows_emitted} window rows "
               f"written in {out.wall_s:.1f}s ({rate:,.0f} records/s)")


def _run_and_report(s, until_end: bool, address, inline: bool, quiet: bool, duration: Optional[float] = None,
                    report_path: Optional[Path] = None, from_checkpoint: Optional[int] = None,
                    metrics_port: Optional[int] = None) -> None:
    from pipeline.driver import run_pipeline

    stop = threading.Event()
    if duration:
        # a daemon: Ctrl-C before the duration is up must not leave the process waiting for the timer
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()
    rates = _Rates()
    live = None if quiet else Live(console=console, refresh_per_second=2)

    def on_status(workers: list[dict]) -> None:
        r = rates.update(workers)
        if live is not None:
            live.update(status_table(workers, r, f"raystream · {s.name}"))

    try:
        if live is not None:
            live.start()
        report = run_pipeline(s, until_end=until_end, address=address, inline=inline, on_status=on_status,
                              from_checkpoint=from_checkpoint, stop=stop,
                              handle_signals=True, metrics_port=metrics_port)
    except KafkaFailure as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    except Exception as exc:  # a worker or the coordinator failed: say what, without a wall of Ray frames
        cause = getattr(exc, "cause", None) or exc
        console.print(f"[red]error:[/] {type(cause).__name__}: {cause}")
        raise typer.Exit(EXIT_RUNTIME)
    finally:
        if live is not None:
            live.stop()
    if report_path is not None:
        import json

        report_path.write_text(json.dumps({"wall_s": report.wall_s, "workers": report.workers,
                                           "merge_owners": report.merge_owners}, indent=2, default=str))
    rate = report.records / report.wall_s if report.wall_s else 0
    console.print(
        f"[green]done[/] {report.records:,} records ({report.rejected:,} rejected, {report.late:,} late), "
        f"{report.windows_emitted:,} window rows emitted in {report.wall_s:.1f}s ({rate:,.0f} records/s)"
    )


@app.command()
def demo(
    duration: Optional[float] = typer.Option(None, "--duration", help="seconds to run (default: until Ctrl-C)"),
    rate: int = typer.Option(20_000, "--rate", help="synthetic events per second"),
    out: Path = typer.Option(Path("demo-out"), "--out", help="folder for window and late Parquet files"),
    workers: int = typer.Option(2, "--workers", help="PartitionWorker actors"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="also PostgreSQL + Redis sinks and the serving layer"),
    http_port: int = typer.Option(8000, "--http-port", help="REST/WebSocket port (a free one if taken)"),
    grpc_port: int = typer.Option(9000, "--grpc-port", help="gRPC port (a free one if taken)"),
) -> None:
    """Local Ray + embedded broker + synthetic producer + the example pipeline, with a live table.

    With the serving layer (default) the windows also go to a throwaway PostgreSQL and Redis, and
    REST, WebSocket and gRPC endpoints come up on Ray Serve; their URLs and a token are printed.
    """
    from pipeline.demo import run_demo

    run_demo(duration=duration, rate=rate, out=out, workers=workers, console=console, run_and_report=_run_and_report,
             serve=serve, http_port=http_port, grpc_port=grpc_port)


def _control(pipeline: str, address: Optional[str]):
    from actors import control

    try:
        control.connect(pipeline, address)
    except LookupError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    return control


def pipeline_table(st: dict) -> Table:
    """``raystream status``: one row per worker."""
    ck = st.get("last_checkpoint") or {}
    title = (f"{st['pipeline']} · {st['phase']} · epoch {st['epoch']} · checkpoint "
             f"{ck.get('id', '-')}" + (f" ({time.time() - ck['created']:.0f}s ago)" if ck.get("created") else ""))
    t = Table(title=title)
    for col in ("wkr", "parts", "offsets", "lag", "watermark", "checkpointed", "restarts", "health", "records", "pid"):
        t.add_column(col, justify="right")
    for w in st["workers"]:
        offs = ",".join(f"{p}:{o}" for p, o in sorted((w.get("positions") or {}).items()))
        cks = ",".join(f"{p}:{o if o is not None else '-'}" for p, o in sorted((w.get("checkpointed") or {}).items()))
        t.add_row(str(w["index"]), ",".join(map(str, w["partitions"])), offs or "-",
                  "-" if w.get("lag") is None else f"{w['lag']:,}", _fmt_time(w.get("watermark")), cks or "-",
                  str(w.get("restarts", 0)), str(w.get("health")), f"{w.get('records', 0):,}", str(w.get("pid", "-")))
    return t


@app.command()
def status(
    pipeline: str = typer.Argument(..., help="pipeline name"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: where `raystream run` recorded it)"),
    as_json: bool = typer.Option(False, "--json", help="print the raw status as JSON"),
) -> None:
    """Per worker: partitions, offsets, lag, watermark, last checkpoint, restarts, health."""
    control = _control(pipeline, address)
    try:
        st = control.pipeline_status(pipeline)
    except LookupError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        import json

        typer.echo(json.dumps(st, indent=2, default=str))
        return
    Console(width=None if sys.stdout.isatty() else 200).print(pipeline_table(st))
    if st.get("degraded"):
        console.print(f"[red]degraded:[/] {st['degraded']}")
    for e in st.get("events", [])[-5:]:
        console.print(f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']}")


@app.command()
def scale(
    pipeline: str = typer.Argument(..., help="pipeline name"),
    workers: int = typer.Argument(..., min=1, help="new number of workers"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address"),
) -> None:
    """Move every partition and its state onto N workers (through a checkpoint)."""
    control = _control(pipeline, address)
    try:
        info = control.scale(pipeline, workers)
    except Exception as exc:  # not running, no checkpoint section, not enough CPUs
        console.print(f"[red]error:[/] {getattr(exc, 'cause', None) or exc}")
        raise typer.Exit(EXIT_RUNTIME)
    console.print(f"[green]scaled[/] {pipeline} to {workers} workers: {info['assignment']} (epoch {info['epoch']})")


chaos_app = typer.Typer(help="fault drills for operators (and the tests)")
app.add_typer(chaos_app, name="chaos")


@chaos_app.command("run")
def chaos_run(
    experiment: Path = typer.Argument(..., help="experiment (YAML): pipeline, input, proxies, schedule of faults"),
    out: Path = typer.Option(Path("chaos-report"), "--out", help="folder for report.md and timeline.png"),
) -> None:
    """Run a chaos experiment: its pipeline over a known input, the faults on schedule, then a report of the
    impact (lag peak, time to recover, records replayed) and whether the output equals the reference.
    Exit 0 when the output is exact (or could not be checked), 1 when it is not."""
    from pipeline.chaos import run_experiment

    try:
        summary = run_experiment(experiment, out, on_progress=lambda text: console.print(f"[yellow]fault[/] {text}"))
    except SpecError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    except Exception as exc:  # pydantic errors, a pipeline that failed, a timeout: said plainly
        console.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    t = Table(title=f"chaos · {summary['experiment']}")
    for col in ("fault", "at s", "lag peak", "recovered after s", "actions"):
        t.add_column(col)
    for r in summary["faults"]:
        t.add_row(r["fault"], f"{r['at_s']:.1f}", f"{r['lag_peak']:,}",
                  "-" if r["recovered_after_s"] is None else f"{r['recovered_after_s']:.2f}", ", ".join(r["actions"]))
    console.print(t)
    for name, verdict in summary["windows"].items():
        console.print(f"window {name}: {verdict}")
    if summary["not_injected"]:
        console.print(f"[yellow]not injected (the run had ended):[/] {', '.join(summary['not_injected'])}")
    console.print(f"replayed {summary['replayed']:,} records; report: {summary['report']}")
    if not summary["exact"]:
        raise typer.Exit(EXIT_RUNTIME)


@chaos_app.command("kill-worker")
def chaos_kill_worker(
    pipeline: str = typer.Argument(..., help="pipeline name"),
    index: Optional[int] = typer.Option(None, "--index", help="worker index (default: the first live one)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address"),
) -> None:
    """SIGKILL a worker's process; the coordinator restarts it from the last checkpoint."""
    control = _control(pipeline, address)
    try:
        k = control.kill_worker(pipeline, index)
    except (LookupError, RuntimeError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    console.print(f"killed worker {k['index']} (pid {k['pid']}, partitions {k['partitions']})")


@chaos_app.command("kill-coordinator")
def chaos_kill_coordinator(
    pipeline: str = typer.Argument(..., help="pipeline name"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address"),
) -> None:
    """SIGKILL the coordinator's process; Ray restarts it and it adopts the workers."""
    control = _control(pipeline, address)
    try:
        k = control.kill_coordinator(pipeline)
    except (LookupError, RuntimeError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    console.print(f"killed the coordinator (pid {k['pid']})")


schema_app = typer.Typer(help="the schema registry (PostgreSQL; --dsn or $RAYSTREAM_REGISTRY_DSN)")
app.add_typer(schema_app, name="schema")

_DSN = typer.Option(None, "--dsn", envvar="RAYSTREAM_REGISTRY_DSN", help="PostgreSQL holding the registry")


def _registry(dsn: Optional[str]):
    from pipeline.io.registry import Registry

    if not dsn:
        console.print("[red]error:[/] give --dsn or set RAYSTREAM_REGISTRY_DSN")
        raise typer.Exit(EXIT_SPEC)
    return Registry(dsn)


def _load_schema(path: Path, kind: Optional[str], message: Optional[str]):
    import base64

    from pipeline.schemas import Schema

    kind = kind or ("protobuf" if path.suffix in (".pb", ".desc", ".protoset") else "json")
    try:
        if kind == "protobuf":
            return Schema("protobuf", base64.b64encode(path.read_bytes()).decode(), message)
        return Schema("json", path.read_text())
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/] {path}: {exc}")
        raise typer.Exit(EXIT_SPEC)


@schema_app.command("register")
def schema_register(
    subject: str = typer.Argument(..., help="subject (topic or event type)"),
    file: Path = typer.Argument(..., help="JSON Schema file, or a protobuf FileDescriptorSet (protoc --descriptor_set_out)"),
    kind: Optional[str] = typer.Option(None, "--type", help="json | protobuf (default: by file suffix)"),
    message: Optional[str] = typer.Option(None, "--message", help="protobuf: the record message, e.g. acme.Event"),
    compatibility: Optional[str] = typer.Option(None, "--compatibility", help="set the subject's mode first"),
    dsn: Optional[str] = _DSN,
) -> None:
    """Register a new version (refused, with the offending fields, when incompatible)."""
    from pipeline.io.registry import Incompatible

    reg = _registry(dsn)
    schema = _load_schema(file, kind, message)
    try:
        if compatibility:
            reg.set_compatibility(subject, compatibility)
        version = reg.register(subject, schema)
    except Incompatible as exc:
        console.print(f"[red]incompatible ({exc.mode}):[/]")
        for p in exc.problems:
            console.print(f"  - {p}")
        raise typer.Exit(EXIT_SPEC)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_SPEC)
    typer.echo(f"{subject} version {version}")


@schema_app.command("check")
def schema_check(
    subject: str = typer.Argument(...), file: Path = typer.Argument(...),
    kind: Optional[str] = typer.Option(None, "--type"), message: Optional[str] = typer.Option(None, "--message"),
    compatibility: Optional[str] = typer.Option(None, "--compatibility", help="check against this mode instead"),
    dsn: Optional[str] = _DSN,
) -> None:
    """Would this schema be accepted? Exit 0 if compatible, 2 with the problems if not."""
    problems = _registry(dsn).check(subject, _load_schema(file, kind, message), compatibility)
    if problems:
        for p in problems:
            console.print(f"  - {p}")
        raise typer.Exit(EXIT_SPEC)
    typer.echo("compatible")


@schema_app.command("list")
def schema_list(dsn: Optional[str] = _DSN) -> None:
    """Subjects with their compatibility mode and latest version."""
    t = Table(title="schema subjects")
    for c in ("subject", "compatibility", "versions", "latest"):
        t.add_column(c)
    for s in _registry(dsn).subjects():
        t.add_row(s["subject"], s["compatibility"], str(s["versions"]), str(s["latest"] or "-"))
    Console(width=None if sys.stdout.isatty() else 200).print(t)


@schema_app.command("show")
def schema_show(subject: str = typer.Argument(...), version: str = typer.Argument("latest"), dsn: Optional[str] = _DSN) -> None:
    """Print one version (JSON Schema text, or the protobuf message's fields)."""
    from pipeline.io.registry import UnknownVersion

    try:
        v, schema = _registry(dsn).get(subject, version)
    except UnknownVersion as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    typer.echo(f"# {subject} version {v} ({schema.kind})")
    if schema.kind == "json":
        import json

        typer.echo(json.dumps(schema.doc, indent=2))
    else:
        d = schema.descriptor()
        for f in d.fields:
            typer.echo(f"{f.number}: {f.name}")


dlq_app = typer.Typer(help="dead-letter topics (where rejected records go): inspect, replay after a fix")
app.add_typer(dlq_app, name="dead-letter")
# the old name, kept for one release
app.add_typer(dlq_app, name="dlq", hidden=True, deprecated=True)


@dlq_app.command("inspect")
def dlq_inspect(
    topic: str = typer.Argument(..., help="dead-letter topic"),
    bootstrap: str = typer.Option("127.0.0.1:9092", "--bootstrap", envvar="RAYSTREAM_BOOTSTRAP", help="Kafka bootstrap servers"),
    as_json: bool = typer.Option(False, "--json", help="print the groups as JSON"),
) -> None:
    """Dead-lettered records grouped by reason, with an example of each."""
    from pipeline.io.dead_letter import inspect, read_topic

    try:
        groups = inspect(read_topic(bootstrap, topic))
    except KafkaFailure as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        import json

        typer.echo(json.dumps(groups, indent=2))
        return
    t = Table(title=f"{topic}: {sum(g['count'] for g in groups):,} records")
    for c in ("reason", "count", "example detail", "example source", "schemas"):
        t.add_column(c)
    for g in groups:
        t.add_row(g["reason"], f"{g['count']:,}", g["example_detail"][:80], g["example_source"],
                  ", ".join(f"{k}: {v}" for k, v in g["schemas"].items()))
    Console(width=None if sys.stdout.isatty() else 200).print(t)


@dlq_app.command("replay")
def dlq_replay(
    topic: str = typer.Argument(..., help="dead-letter topic"),
    spec: Path = typer.Option(..., "--spec", help="pipeline spec whose decoder and schema decide what passes now"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only count what would pass"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Re-check dead letters after a fix; re-feed those that pass to the source topic (once)."""
    from pipeline.io.dead_letter import replay

    try:
        s = load_spec(spec)
    except SpecError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    try:
        report = replay(s, topic, dry_run=dry_run)
    except (KafkaFailure, RuntimeError, LookupError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        import json

        typer.echo(json.dumps(report.as_dict()))
        return
    verb = "would pass" if dry_run else "replayed"
    console.print(f"{report.total:,} dead letters: {report.replayed:,} {verb}, {report.already_replayed:,} replayed before, "
                  f"{report.not_replayable:,} not replayable (late), still failing: {report.still_failing or 0}")


_TOKEN = typer.Option(None, "--token", envvar="RAY_AUTH_TOKEN",
                      help="token of a cluster with token authentication (default: ~/.ray/auth_token)", show_default=False)
_DASHBOARD = typer.Option(..., "--address", envvar="RAY_DASHBOARD_ADDRESS", help="the cluster's dashboard, http://HEAD:8265")


def _follow(job) -> int:
    for chunk in job.follow():
        sys.stdout.write(chunk)
        sys.stdout.flush()
    status = job.status()
    console.print(f"job {job.id}: {status}")
    return 0 if status == "SUCCEEDED" else EXIT_RUNTIME


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML)"),
    address: str = _DASHBOARD,
    until_end: bool = typer.Option(False, "--until-end", help="a bounded job: consume to the end offsets and finish"),
    follow: bool = typer.Option(False, "--follow", help="print the job's log until it ends; exit 0 only if it succeeded"),
    token: Optional[str] = _TOKEN,
    python: str = typer.Option("python", "--python", help="the cluster's Python with raystream installed"),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="submission id (default: Ray chooses)"),
    expand: bool = typer.Option(True, "--expand/--no-expand", help=(
        "replace ${VAR} here (default), or leave it for the job's environment on the cluster (keeps secrets out of "
        "the job's runtime_env, which whoever may read the cluster's jobs can read)")),
    env: list[str] = typer.Option([], "--env", help="NAME=VALUE for the job's environment (repeatable)"),
) -> None:
    """Submit a pipeline to a running Ray cluster through its Jobs API (the spec travels in runtime_env)."""
    from pipeline.jobs import submit as submit_job
    from pipeline.spec import read_spec_data

    try:
        bad = [e for e in env if "=" not in e]
        if bad:
            raise typer.BadParameter(f"NAME=VALUE expected, got {bad[0]!r}", param_hint="--env")
        job = submit_job(read_spec_data(spec), address, until_end=until_end, token=token, python=python, job_id=job_id,
                         env=dict(e.split("=", 1) for e in env), expand=expand)
    except SpecError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    except Exception as exc:  # the dashboard refused or could not be reached: say so plainly
        console.print(f"[red]error:[/] submitting to {address}: {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_RUNTIME)
    typer.echo(job.id)
    if follow:
        raise typer.Exit(_follow(job))


jobs_app = typer.Typer(help="Ray jobs of a cluster (--address http://HEAD:8265): list, logs, stop")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(address: str = _DASHBOARD, token: Optional[str] = _TOKEN,
              every: bool = typer.Option(False, "--all", help="every job, not only raystream's"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """The cluster's raystream jobs, newest first."""
    from pipeline.jobs import list_jobs

    rows = list_jobs(address, token, every)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    t = Table(title=f"jobs at {address}")
    for c in ("id", "pipeline", "status", "started", "message"):
        t.add_column(c)
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["start_time"] / 1000)) if r["start_time"] else ""
        t.add_row(r["id"], r["pipeline"], r["status"], started, r["message"][:80])
    Console().print(t)


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(...), address: str = _DASHBOARD, token: Optional[str] = _TOKEN,
              follow: bool = typer.Option(False, "--follow", "-f", help="until the job ends")) -> None:
    """A job's driver log."""
    from pipeline.jobs import Job

    job = Job(job_id, address, token)
    if follow:
        raise typer.Exit(_follow(job))
    sys.stdout.write(job.logs())


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(...), address: str = _DASHBOARD, token: Optional[str] = _TOKEN,
              wait: float = typer.Option(60.0, "--wait", help="seconds to wait for it to end")) -> None:
    """Stop a job (its pipeline stops cleanly: windows flushed, a final checkpoint)."""
    from pipeline.jobs import Job

    job = Job(job_id, address, token)
    job.stop()
    status = job.wait(wait)
    console.print(f"job {job_id}: {status}")
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise typer.Exit(EXIT_RUNTIME)


state_app = typer.Typer(help="read checkpoints: offsets, watermarks and the window state they hold")
app.add_typer(state_app, name="state")


def arrow_table(t, title: str, limit: int) -> Table:
    """A rich table of the first ``limit`` rows of an Arrow table."""
    from datetime import datetime

    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, datetime):
            return v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        return str(v)

    out = Table(title=title if t.num_rows <= limit else f"{title} (first {limit} of {t.num_rows})")
    for name in t.column_names:
        out.add_column(name, justify="left" if t.schema.field(name).type in ("string", "large_string") else "right")
    for row in t.slice(0, limit).to_pylist():
        out.add_row(*(cell(v) for v in row.values()))
    return out


@state_app.command("show")
def state_show(
    uri: str = typer.Argument(..., help="the spec's checkpoint.uri (file:// or s3://), or its pipeline folder"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="pipeline name (when the uri holds several)"),
    partition: Optional[int] = typer.Option(None, "--partition", help="only this source partition"),
    checkpoint: Optional[int] = typer.Option(None, "--checkpoint", help="checkpoint id (default: the newest readable)"),
    limit: int = typer.Option(50, "--limit", help="rows shown per window"),
    as_json: bool = typer.Option(False, "--json", help="everything as JSON on stdout"),
    s3_endpoint_url: Optional[str] = typer.Option(None, "--s3-endpoint-url", envvar="AWS_ENDPOINT_URL"),
) -> None:
    """Read a checkpoint into tables: per partition its offset, watermark and epoch; every window slot it holds."""
    from pipeline.io.state import read_state

    try:
        st = read_state(uri, pipeline, checkpoint, partition, s3_endpoint_url)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        typer.echo(json.dumps({"pipeline": st.pipeline, "checkpoint": st.checkpoint, "created": st.created,
                               "final": st.final, "partitions": st.partitions.to_pylist(),
                               "windows": {n: t.to_pylist() for n, t in st.windows.items()},
                               "merged": {n: t.to_pylist() for n, t in st.merged.items()}}, default=str, indent=1))
        return
    out = Console()
    out.print(f"pipeline [bold]{st.pipeline}[/] checkpoint [bold]{st.checkpoint}[/]"
              f"{' (final)' if st.final else ''}, taken {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(st.created))} UTC"
              f"{f', {st.merge_snapshots} merge owner snapshots' if st.merge_snapshots else ''}")
    out.print(arrow_table(st.partitions, "partitions", 10_000))
    for name, t in st.windows.items():
        out.print(arrow_table(t.drop_columns(["window"]), f"window {name}: {t.num_rows} slots (revision 0: not emitted yet)",
                              limit))
    for name, t in st.merged.items():
        out.print(arrow_table(t.drop_columns(["window"]), f"merged window {name}: {t.num_rows} groups held by the merge "
                              "owners (merged now, revision 0)", limit))
    if not st.windows and not st.merged:
        out.print("no window slot is held")


@app.command("serve")
def serve_cmd(
    config: Path = typer.Option(..., "--config", help="serving configuration (YAML), see README"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local one on 127.0.0.1)"),
) -> None:
    """Start the serving layer (REST, WebSocket, gRPC) on Ray Serve and keep it up until Ctrl-C."""
    from serve.config import load_config
    from serve.runner import start_serve, stop_serve

    try:
        cfg = load_config(config)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_SPEC)
    urls = start_serve(cfg, address)
    console.print(f"[green]serving[/] REST {urls['http']}  OpenAPI {urls['docs']}  WebSocket {urls['ws']}"
                  + (f"  gRPC {urls['grpc']}" if "grpc" in urls else ""))
    stop = threading.Event()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stop_serve()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
