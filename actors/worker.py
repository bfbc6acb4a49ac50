"""PartitionWorker: a Ray actor shell around ``PartitionLoop``."""

from __future__ import annotations

import ray

from pipeline.io.loop import PartitionLoop
from pipeline.spec import PipelineSpec

__all__ = ["PartitionWorker"]


@ray.remote(max_restarts=0, max_concurrency=4)
class PartitionWorker:
    """Owns a set of partitions; ``run`` blocks in one thread while ``status``/``stop`` answer in others."""

    def __init__(self, spec: PipelineSpec, index: int):
        self.spec = spec
        self.index = index
        self.loop: PartitionLoop | None = None

    def assign(self, partitions: list[int], epoch: int, start: dict[int, int], end: dict[int, int] | None) -> None:
        if self.loop is not None:
            self.loop.stop()
        self.loop = PartitionLoop(self.spec, partitions, start, end, epoch)

    def run(self, until_end: bool) -> dict:
        return {"index": self.index, **self.loop.run(until_end)}

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()

    def status(self) -> dict:
        if self.loop is None:
            return {"index": self.index, "partitions": []}
        return {"index": self.index, **self.loop.status()}
