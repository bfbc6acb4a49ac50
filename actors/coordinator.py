"""Coordinator: reads the topic's partitions and assigns them to PartitionWorkers.

Workers are created detached and named per pipeline, so they are not the
coordinator's children (a Ray actor dies with its creator); the coordinator
finds them by name.
"""

from __future__ import annotations

import ray

from actors.assignment import plan
from actors.runtime import NAMESPACE, actor_name
from actors.worker import PartitionWorker
from pipeline.io.kafka import end_offsets, ensure_topic, topic_partitions
from pipeline.spec import PipelineSpec

__all__ = ["Coordinator", "kill_pipeline_actors"]


def kill_pipeline_actors(pipeline: str, workers: int, include_coordinator: bool = True) -> int:
    """Kill leftover named actors of a pipeline (a driver that died leaves detached actors)."""
    names = [actor_name(pipeline, f"worker-{i}") for i in range(max(workers, 64))]
    if include_coordinator:
        names.append(actor_name(pipeline, "coordinator"))
    killed = 0
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        killed += 1
    return killed


@ray.remote(num_cpus=0.01, max_concurrency=8)
class Coordinator:
    """Plans the assignment, starts the workers and reports their status."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.epoch = 1
        self.workers: list = []
        self.runs: list = []
        self.assignment: list[list[int]] = []
        self.end: dict[int, int] | None = None

    def start(self, until_end: bool) -> dict:
        """Assign partitions and start every worker's loop; returns the plan."""
        kafka = self.spec.source.kafka
        timeout = kafka.connect_timeout / 1000.0
        partitions = topic_partitions(kafka.bootstrap_servers, kafka.topic, timeout)
        ensure_topic(kafka.bootstrap_servers, self.spec.dead_letter_topic, 1, timeout)
        self.end = end_offsets(kafka.bootstrap_servers, kafka.topic, partitions, timeout) if until_end else None
        self.assignment = plan(partitions, self.spec.workers)
        kill_pipeline_actors(self.spec.name, self.spec.workers, include_coordinator=False)
        need = self.spec.workers * self.spec.worker_cpus
        total = ray.cluster_resources().get("CPU", 0.0)
        if need > total - 0.01 + 1e-9:
            # an actor that cannot be placed would wait forever: refuse up front
            raise RuntimeError(
                f"{self.spec.workers} workers x worker_cpus {self.spec.worker_cpus} need {need:g} CPUs, "
                f"the Ray cluster has {total:g} (the coordinator takes 0.01): lower worker_cpus or workers"
            )
        for i, parts in enumerate(self.assignment):
            w = PartitionWorker.options(
                name=actor_name(self.spec.name, f"worker-{i}"),
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=self.spec.worker_cpus,
            ).remote(self.spec, i)
            self.workers.append(w)
        ray.get([
            w.assign.remote(parts, self.epoch, {p: 0 for p in parts}, {p: self.end[p] for p in parts} if self.end else None)
            for w, parts in zip(self.workers, self.assignment)
        ])
        self.runs = [w.run.remote(until_end) for w in self.workers]
        return {"partitions": partitions, "assignment": self.assignment, "end_offsets": self.end, "epoch": self.epoch}

    def wait(self, timeout_s: float) -> list[dict] | None:
        """Final stats of every worker once all have finished; None while some still run.

        A worker that failed raises its error here.
        """
        ready, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        if len(ready) < len(self.runs):
            for ref in ready:
                ray.get(ref)  # surface a failure early
            return None
        return ray.get(self.runs)

    def status(self) -> list[dict]:
        return ray.get([w.status.remote() for w in self.workers])

    def stop(self) -> None:
        ray.get([w.stop.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []

