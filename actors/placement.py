"""Where a PartitionWorker is started (pure: the coordinator gathers the facts, this decides).

Ray alone packs actors onto the first node that fits: on a cluster whose head
takes no actors, the coordinator and every worker end up on one node, and
losing that node loses all of them at once. So the coordinator chooses:

- only nodes Ray lists alive **and** whose raylet answers a TCP connect
  right now: Ray declares a node dead only after its health checks miss for
  a while (seconds to a minute), and an actor started there in between is
  lost with it;
- only nodes with the free CPUs and custom resources the worker asks for;
- the node running the fewest workers of this pipeline (spread: one lost
  node takes as few partitions as possible), then one not running the
  coordinator, then the most free CPUs, then the node id (deterministic).

When no node fits, the worker is left to Ray (``None``): it waits for
resources, which is the demand Ray's autoscaler adds nodes for; nodes that
stopped answering are still excluded through a label selector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NodeView", "choose_node", "exclusion_selector"]


@dataclass(frozen=True)
class NodeView:
    """One node as the coordinator sees it at launch time."""

    node_id: str
    alive: bool                      # Ray's view (GCS)
    answering: bool                  # its raylet accepted a TCP connection just now
    available: dict = field(default_factory=dict)  # free resources (CPU, custom)
    workers: int = 0                 # workers of this pipeline running there
    coordinator: bool = False        # the pipeline's coordinator runs there


def _fits(node: NodeView, cpus: float, resources: dict) -> bool:
    need = {"CPU": cpus, **(resources or {})}
    return all(node.available.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def choose_node(nodes: list[NodeView], cpus: float, resources: dict | None = None) -> str | None:
    """The node to start a worker on, or None to let Ray (and its autoscaler) place it."""
    fit = [n for n in nodes if n.alive and n.answering and _fits(n, cpus, resources or {})]
    if not fit:
        return None
    best = min(fit, key=lambda n: (n.workers, n.coordinator, -n.available.get("CPU", 0.0), n.node_id))
    return best.node_id


def exclusion_selector(nodes: list[NodeView]) -> dict[str, str] | None:
    """A Ray label selector keeping actors off nodes Ray still lists alive that no longer answer."""
    silent = sorted(n.node_id for n in nodes if n.alive and not n.answering)
    return {"ray.io/node-id": f"!in({', '.join(silent)})"} if silent else None
