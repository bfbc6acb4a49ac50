"""Run a pipeline: on Ray actors (the default) or inline in this process.

This is the composition root shared by the ``raystream`` command and
``pipeline.api``: the one place in ``pipeline`` that reaches up to ``actors``
(lazily, so the pure core never imports Ray).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pipeline.io.kafka import end_offsets, ensure_topic, topic_partitions
from pipeline.metrics import checkpoint_metrics
from pipeline.spec import PipelineSpec

__all__ = ["IncompleteRun", "RunReport", "Totals", "run_pipeline", "shortfalls"]


class IncompleteRun(RuntimeError):
    """A bounded run finished with a partition nobody consumed to its end offset."""


def shortfalls(workers: list[dict], end: dict[int, int]) -> list[str]:
    """What keeps a bounded run from being complete: partitions no worker reported, or short of their end.

    ``workers`` are final worker statuses (``partitions`` and ``positions``);
    ``end`` is the end offset of every partition of the run. An empty list
    means every partition was consumed to its end.
    """
    reached: dict[int, int] = {}
    for w in workers:
        for p, o in (w.get("positions") or {}).items():
            reached[int(p)] = max(reached.get(int(p), -1), int(o))
    out = []
    for p, e in sorted((int(p), int(e)) for p, e in end.items()):
        if p not in reached:
            out.append(f"partition {p} was owned by no worker (end offset {e})")
        elif reached[p] < e:
            out.append(f"partition {p} stopped at offset {reached[p]}, {e - reached[p]} records short of its end offset {e}")
    return out


class Totals:
    """Record totals over the final statuses of a run's loops (``_loops``): every record accepted or rejected."""

    def _loops(self) -> list[dict]:
        raise NotImplementedError("a report names the statuses it totals")

    def _sum(self, key: str) -> int:
        return sum(loop.get(key, 0) for loop in self._loops())

    @property
    def records(self) -> int:
        return self._sum("records")

    @property
    def rejected(self) -> int:
        return self._sum("rejected")

    @property
    def late(self) -> int:
        return self._sum("late")


@dataclass
class RunReport(Totals):
    """Final status of every worker and the run's totals."""

    workers: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)
    merge_owners: list[dict] = field(default_factory=list)  # final status of each merge owner (Ray runs)

    def __post_init__(self):
        from pipeline.redact import redact

        # a report is printed and written to files: no secret of the spec may reach it
        self.workers = redact(self.workers)
        self.warnings = redact(self.warnings)
        self.merge_owners = redact(self.merge_owners)

    def _loops(self) -> list[dict]:
        return self.workers

    @property
    def windows_emitted(self) -> int:
        """Window rows written: by the workers, and (merged windows on Ray) by the merge owners."""
        return self._sum("windows_emitted") + sum(o.get("rows_emitted", 0) for o in self.merge_owners)


def _preflight(spec: PipelineSpec) -> list[int]:
    kafka = spec.source.kafka
    return topic_partitions(kafka.bootstrap_servers, kafka.topic, kafka.connect_timeout / 1000.0)


def run_pipeline(
    spec: PipelineSpec,
    until_end: bool = False,
    address: str | None = None,
    inline: bool = False,
    on_status: Callable[[list[dict]], None] | None = None,
    status_every_s: float = 1.0,
    stop: threading.Event | None = None,
    handle_signals: bool = False,
    from_checkpoint: int | None = None,
    metrics_port: int | None = None,
) -> RunReport:
    """Run ``spec`` until stopped (``stop`` set) or, with ``until_end``, to the end offsets.

    Fails fast, before starting anything, with ``BrokerUnavailable`` or
    ``TopicMissing`` when the source cannot be used. With ``handle_signals`` the
    first SIGINT/SIGTERM sets ``stop`` (a clean stop) and a second one interrupts.

    ``metrics_port``: Prometheus metrics on 127.0.0.1 at that port: the metrics
    agent of the Ray that this call starts, or (``inline``) a server in this
    process. On an existing cluster (``address``) each node serves its own.
    """
    stop = stop or threading.Event()
    if handle_signals:
        _stop_on_signals(stop)
    partitions = _preflight(spec)
    warnings = _restore_point(spec, from_checkpoint)
    kafka = spec.source.kafka
    end = end_offsets(kafka.bootstrap_servers, kafka.topic, partitions, kafka.connect_timeout / 1000.0) if until_end else None
    t0 = time.perf_counter()
    if inline:
        workers = _run_inline(spec, until_end, on_status, status_every_s, stop, partitions, end, metrics_port)
    else:
        workers = _run_on_ray(spec, until_end, address, on_status, status_every_s, stop, handle_signals, partitions, end,
                              metrics_port)
    owners = [w for w in workers if w.get("merge_owner")]
    workers = [w for w in workers if not w.get("merge_owner")]
    if end is not None and not stop.is_set():
        # never report success with a partition short of its end: a gap is an error, not a silent loss
        problems = shortfalls(workers, end)
        if problems:
            raise IncompleteRun("the run ended short of its end offsets: " + "; ".join(problems))
    return RunReport(workers=workers, wall_s=time.perf_counter() - t0, stopped=stop.is_set(), warnings=warnings,
                     merge_owners=owners)


def _restore_point(spec: PipelineSpec, from_checkpoint: int | None) -> list[str]:
    """Choose the checkpoint the run resumes from; warnings (printed loudly) say when it is not the newest."""
    if spec.checkpoint is None:
        if from_checkpoint is not None:
            raise ValueError("--from-checkpoint needs a 'checkpoint' section in the spec")
        return []
    from pipeline.io.checkpoints import CheckpointStore

    store = CheckpointStore(spec.checkpoint, spec.name)
    if from_checkpoint is not None:
        store.rewind(from_checkpoint)
    else:
        store.latest()  # an unreadable newest manifest is reported here
    for w in store.warnings:
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    return list(store.warnings)


def _run_inline(spec, until_end, on_status, every, stop, partitions, end, metrics_port=None) -> list[dict]:
    """One loop over every partition in this process; checkpoints like the coordinator does, when configured."""
    from pipeline.io.checkpoints import CheckpointStore, commit_checkpoint
    from pipeline.io.kafka import commit_offsets
    from pipeline.io.loop import HeldOutput, PartitionLoop

    kafka = spec.source.kafka
    timeout = kafka.connect_timeout / 1000.0
    ensure_topic(kafka.bootstrap_servers, spec.dead_letter_topic, 1, timeout)
    store = CheckpointStore(spec.checkpoint, spec.name) if spec.checkpoint else None
    latest = store.latest() if store else None
    entries = latest["partitions"] if latest else {}
    snapshots = {p: store.read_partition(e["path"]) for p, e in entries.items() if e.get("path") and p in partitions}
    start = {p: int(entries.get(p, {}).get("offset", 0)) for p in partitions}
    epoch = int(latest.get("epoch", 0)) + 1 if latest else 1
    resumed = latest is not None and not latest.get("final")  # the previous run did not end cleanly
    # the merge state of the checkpoint (all its owners' snapshots: a Ray run may have had several)
    merge_snapshots = [store.read_partition(e["path"]) for _, e in sorted((latest or {}).get("merge", {}).items(),
                                                                            key=lambda kv: int(kv[0])) if e.get("path")]
    metrics, backend = None, None
    if metrics_port is not None and spec.observability.metrics:
        from pipeline.metrics import Metrics, PromClientBackend

        backend = PromClientBackend()
        backend.serve("127.0.0.1", metrics_port)
        metrics = Metrics(backend)
    loop = PartitionLoop(spec, partitions, start, end, epoch, snapshots, resumed=resumed, merge_snapshots=merge_snapshots,
                         all_partitions=partitions, metrics=metrics)
    next_id = [max(store.all_ids(), default=0) if store else 0]

    def checkpoint(final: bool = False) -> None:
        next_id[0] += 1
        cid = next_id[0]
        def snap():
            parts = loop.snapshot(cid, lambda p, data: store.write_partition(cid, p, epoch, data))
            return parts, loop.snapshot_merge(cid, lambda data: store.write_merge(cid, 0, epoch, data))

        t0 = time.perf_counter()
        try:
            got, merge = loop.call_between_batches(snap, spec.checkpoint.timeout / 1000.0)
            manifest, problems = commit_checkpoint(
                store, cid, got, partitions, epoch, spec.checkpoint.keep,
                lambda offsets: commit_offsets(kafka.bootstrap_servers, spec.group_id, kafka.topic, offsets, 5.0),
                final=final, merge={0: merge} if merge is not None else None)
        except HeldOutput:
            raise
        except Exception:
            if metrics is not None:
                metrics.inc("raystream_checkpoint_failures", pipeline=spec.name)
            raise
        if metrics is not None:
            checkpoint_metrics(metrics, spec, manifest, time.perf_counter() - t0)
        for problem in problems:
            print(f"checkpoint {cid}: {problem}", file=sys.stderr, flush=True)

    ended = threading.Event()

    def watch() -> None:
        # ends with the run: a watcher left waiting on ``stop`` would keep the loop (and its Kafka clients) alive
        while not ended.is_set():
            if stop.wait(0.2):
                loop.stop()
                return

    watcher = threading.Thread(target=watch, daemon=True, name="raystream-stop-watcher")
    watcher.start()
    result: list[dict] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            loop.run(until_end, finish=False)
            if store is not None:
                try:
                    checkpoint(final=True)  # the final checkpoint, before the end-of-input flush
                except HeldOutput as exc:  # stopped during a replay: the previous checkpoint stays the latest
                    print(f"final checkpoint skipped: {exc}", file=sys.stderr, flush=True)
            result.append({"index": 0, **loop.finish(until_end and loop.done and not stop.is_set())})
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    runner = threading.Thread(target=body, daemon=True)
    runner.start()
    last = time.monotonic()
    while runner.is_alive():
        runner.join(min(every, 0.5))
        if store is not None and runner.is_alive() and not loop.drained and time.monotonic() - last >= spec.checkpoint.interval / 1000.0:
            last = time.monotonic()
            try:
                checkpoint()
            except Exception as exc:  # a failed checkpoint is retried at the next interval
                print(f"checkpoint failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if on_status is not None:
            on_status([{"index": 0, **loop.status()}])
    ended.set()
    watcher.join()
    if backend is not None:
        backend.close()
    if errors:
        raise errors[0]
    return result


def _stop_on_signals(stop: threading.Event) -> None:
    import signal
    import sys

    def handler(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print(f"{signal.Signals(signum).name}: flushing and stopping", file=sys.stderr, flush=True)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _run_on_ray(spec, until_end, address, on_status, every, stop, handle_signals, partitions, end,
                metrics_port=None) -> list[dict]:
    from actors.runtime import NAMESPACE, actor_name, ensure_ray, local_ray_env

    if address is None:
        local_ray_env()
    import ray

    from actors.coordinator import Coordinator, kill_pipeline_actors

    ensure_ray(address, metrics_port=metrics_port)
    if handle_signals:
        _stop_on_signals(stop)  # ray.init installs its own SIGTERM handler: take it back
    from actors.control import forget_pipeline, record_pipeline

    name = actor_name(spec.name, "coordinator")
    record_pipeline(spec.name, address or ray.get_runtime_context().gcs_address)
    kill_pipeline_actors(spec.name, spec.workers)
    coord = Coordinator.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(spec, until_end, partitions, end)
    try:
        ray.get(coord.start.remote())
        stopping = False
        while True:
            try:
                done = ray.get(coord.wait.remote(every))
                if done is not None:
                    return done
                if stop.is_set() and not stopping:
                    ray.get(coord.stop.remote())
                    stopping = True
                if on_status is not None:
                    on_status(ray.get(coord.status.remote())["workers"])
            except ray.exceptions.RayActorError:
                # the coordinator died; Ray restarts it and it adopts the workers: wait for it
                time.sleep(0.5)
                try:
                    coord = ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    raise RuntimeError(f"the coordinator of {spec.name} is gone") from None
    finally:
        try:
            ray.get(coord.shutdown.remote(), timeout=30)
        except Exception:  # the coordinator may already be gone; the kill below still runs
            pass
        ray.kill(coord, no_restart=True)
        kill_pipeline_actors(spec.name, spec.workers)
        forget_pipeline(spec.name)
