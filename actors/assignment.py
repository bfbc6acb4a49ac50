"""Partition assignment plan (pure): which worker owns which partitions."""

from __future__ import annotations

__all__ = ["plan"]


def plan(partitions: list[int], workers: int) -> list[list[int]]:
    """Round-robin partitions over ``workers``; a worker may get none if there are fewer partitions.

    Every partition appears exactly once; the result is deterministic.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    out: list[list[int]] = [[] for _ in range(workers)]
    for i, p in enumerate(sorted(partitions)):
        out[i % workers].append(p)
    return out
