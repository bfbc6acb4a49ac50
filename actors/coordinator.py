"""Coordinator: assigns partitions to PartitionWorkers, checkpoints, heals.

It is a named, detached actor that Ray restarts when its process dies
(``max_restarts=-1``); a restarted coordinator adopts the running workers by
name and reloads the latest manifest. Workers are created detached and named
per pipeline, so they are not its children (a Ray actor dies with its
creator) and keep running while it restarts.

Every assignment of partitions to a worker carries an epoch (a counter that
only grows). Workers ask ``epoch_of`` before writing; a worker whose epoch is
no longer current stops without writing (see ``actors.worker``).

A monitor thread, every half second: checks each worker's heartbeat
(``status``), restarts a worker that died, failed, stopped answering or stopped
consuming while input waits, from the latest checkpoint; after
``health.max_restarts`` restarts within ``health.restart_window`` it stops
restarting that worker and marks the pipeline degraded, saying why; takes a
checkpoint every ``checkpoint.interval``; and when every worker has drained
(end of input, or a stop), takes the final checkpoint and finishes them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.assignment import plan
from actors.health import Action, Observation, Slot, judge
from actors.merge_owner import MergeOwner, owner_name
from actors.metrics import ray_metrics
from actors.placement import NodeView, choose_node, exclusion_selector
from actors.runtime import NAMESPACE, actor_name
from actors.worker import PartitionWorker
from pipeline.autoscale import Policy, Sample, align
from pipeline.io.checkpoints import CheckpointStore, commit_checkpoint
from pipeline.io.kafka import commit_offsets, end_offsets, ensure_topic, topic_partitions
from pipeline.io.notify import Notifier, recovery_message
from pipeline.logs import configure_logging
from pipeline.metrics import checkpoint_metrics
from pipeline.redact import redact
from pipeline.spec import PipelineSpec

__all__ = ["Coordinator", "PipelineDegraded", "WorkerSlot", "kill_pipeline_actors"]

TICK_S = 0.5
log = logging.getLogger("raystream.coordinator")


@dataclass
class WorkerSlot:
    """The coordinator's record of one worker index: who runs it, what it owns, how it has been doing."""

    handle: Any                       # the PartitionWorker actor
    partitions: list[int]
    epoch: int                        # the only epoch allowed to write for these partitions
    status: dict = field(default_factory=dict)          # its last heartbeat (``status``)
    pid: int | None = None
    launched: float = field(default_factory=time.time)
    track: Slot = field(default_factory=lambda: Slot(last_ok=time.monotonic(), progress_t=time.monotonic()))
    restarts: list[float] = field(default_factory=list)  # restart times within health.restart_window
    restart_total: int = 0
    given_up: str | None = None       # why it is no longer restarted (the pipeline is degraded)
    backpressure: str | None = None   # what it waits on, while it does


class PipelineDegraded(RuntimeError):
    """A worker crashed too often and is no longer restarted."""


def kill_pipeline_actors(pipeline: str, workers: int, include_coordinator: bool = True) -> int:
    """Kill leftover named actors of a pipeline (a driver that died leaves detached actors)."""
    names = [actor_name(pipeline, f"worker-{i}") for i in range(max(workers, 64))]
    names += [owner_name(pipeline, k) for k in range(256)]
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


def _answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a node's raylet accepts a TCP connection now (a lost node refuses or times out)."""
    if not host or not port:
        return True  # nothing to probe: trust Ray's view
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_name_free(name: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)


@ray.remote(num_cpus=0.01, max_concurrency=32, max_restarts=-1)
class Coordinator:
    """Plans the assignment, starts, checkpoints and heals the workers, reports status."""

    def __init__(self, spec: PipelineSpec, until_end: bool, partitions: list[int] | None = None,
                 end: dict[int, int] | None = None):
        """``partitions`` and (with ``until_end``) ``end`` are read once by the driver and passed here,
        so a coordinator that Ray restarts gets the same ones back: it knows every partition that must
        be owned, and where a bounded run ends, without asking the broker again."""
        if spec.merged_windows and spec.merge_owners is None:
            # the owner count is pinned for this run: rescaling the workers must not move groups between owners
            spec = spec.model_copy(update={"merge_owners": spec.owners})
        self.spec = spec
        self.until_end = until_end
        self.kafka = spec.source.kafka
        self.timeout_s = self.kafka.connect_timeout / 1000.0
        self.store = CheckpointStore(spec.checkpoint, spec.name) if spec.checkpoint else None
        self.lock = threading.RLock()
        self.slots: dict[int, dict] = {}
        self.next_epoch = 1
        self.phase = "created"
        self.stopping = False
        self.degraded: str | None = None
        self.failure: str | None = None
        self.events: deque = deque(maxlen=200)
        self.partitions: list[int] | None = sorted(int(p) for p in partitions) if partitions is not None else None
        self.end: dict[int, int] | None = {int(p): int(o) for p, o in end.items()} if end is not None else None
        self.broker_ends: dict[int, int] = {}
        self.broker_ends_t = 0.0
        self.checkpoint_id = 0
        self.owners: dict[int, Any] = {}  # merge owner shard -> handle
        self.owner_status: dict[int, dict] = {}
        self.owner_ok: dict[int, float] = {}  # when each owner last answered (monotonic)
        self.owner_epoch = -1  # the only epoch whose owners may write (see MergeOwner._fence)
        self.global_restarts = 0
        self.last_checkpoint: dict | None = None
        self.last_checkpoint_t = time.monotonic()
        self.checkpoints_failed = 0
        self.results: list[dict] | None = None
        self.started = time.time()
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        configure_logging()
        self.metrics = ray_metrics(spec.observability.metrics)
        notify = spec.observability.notify
        self.notifier = Notifier(notify.webhook, notify.timeout / 1000.0) if notify is not None else None
        self.recovering: dict[int, float] = {}  # worker index -> when its restart began (for recovery time)
        self.placed: dict[int, str] = {}  # worker index -> the node it was started on
        self.silent_nodes: set[str] = set()  # nodes Ray still lists alive whose raylet did not answer at the last launch
        self.announced_silent: set[str] = set()
        self.autoscale = Policy(spec.autoscale.config(), len(partitions or [])) if spec.autoscale else None
        self.autoscale_last: dict | None = None  # the last decision (status)
        self.pending_scale: tuple[int, float, str] | None = None  # (workers, give-up time, reason) waiting for CPUs
        self.last_sample_t = 0.0
        if self.store is not None:
            ids = self.store.all_ids()
            self.checkpoint_id = ids[-1] if ids else 0
            latest = self.store.latest()
            if latest is not None:
                self.next_epoch = int(latest.get("epoch", 0)) + 1
                self.last_checkpoint = self._summary(latest)
        if self.restarted:
            self._adopt()
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()

    # -- helpers ------------------------------------------------------------
    def _event(self, text: str, action: str | None = None, **extra) -> None:
        """Remember ``text`` for ``status``, log it; a recovery ``action`` is also counted and announced."""
        self.events.append({"time": time.time(), "event": text, **({"action": action} if action else {}), **extra})
        log.log(logging.WARNING if action else logging.INFO, text,
                extra={"pipeline": self.spec.name, **({"action": action} if action else {}),
                       **{k: v for k, v in extra.items() if k in ("worker", "epoch", "partitions")}})
        if action:
            self.metrics.inc("raystream_recovery_actions", 1, pipeline=self.spec.name, action=action)
            if self.notifier is not None:
                self.notifier.send(recovery_message(self.spec.name, action, text))

    def _new_epoch(self) -> int:
        e = self.next_epoch
        self.next_epoch += 1
        return e

    @staticmethod
    def _summary(manifest: dict) -> dict:
        return {"id": manifest["id"], "created": manifest["created"],
                "offsets": {int(p): e["offset"] for p, e in manifest["partitions"].items()}}

    def _entries(self, partitions: list[int]) -> dict[int, dict]:
        latest = self.store.latest() if self.store is not None else None
        saved = latest["partitions"] if latest else {}
        return {p: saved.get(p, {"offset": 0, "path": None}) for p in partitions}

    def _nodes(self) -> list[NodeView]:
        """Every node Ray lists alive, with whether its raylet answers now and what it has free."""
        from ray._private.state import available_resources_per_node

        listed = [n for n in ray.nodes() if n.get("Alive")]
        free = available_resources_per_node()
        here = ray.get_runtime_context().get_node_id()
        counts: dict[str, int] = {}
        for i, node in self.placed.items():
            if i in self.slots:
                counts[node] = counts.get(node, 0) + 1
        views = []
        for n in listed:
            nid = n["NodeID"]
            views.append(NodeView(nid, True, _answers(n.get("NodeManagerAddress", ""), int(n.get("NodeManagerPort") or 0)),
                                  dict(free.get(nid, {})), counts.get(nid, 0), nid == here))
        self.silent_nodes = {v.node_id for v in views if not v.answering}
        return views

    def _placement(self, cpus: float, resources: dict) -> tuple[dict, str | None]:
        """Ray options placing one actor (see ``actors.placement``) and the node chosen (None: Ray decides)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            views = self._nodes()
        except Exception as exc:  # the GCS is restarting: let Ray place it when it can
            log.warning("node list unavailable (%s): placement left to Ray", exc, extra={"pipeline": self.spec.name})
            return {}, None
        for v in views:
            if not v.answering and v.node_id not in self.announced_silent:
                self.announced_silent.add(v.node_id)
                self._event(f"node {v.node_id[:12]} does not answer (Ray still lists it alive): nothing is started there")
        node = choose_node(views, cpus, resources)
        if node is not None:
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}, node
        selector = exclusion_selector(views)
        return ({"label_selector": selector} if selector else {}), None

    def _launch(self, index: int, partitions: list[int], epoch: int, entries: dict[int, dict], resumed: bool) -> dict:
        """Start worker ``index`` for ``partitions`` from ``entries``; ``resumed`` when their previous owner
        did not stop cleanly (it may have written output past the checkpoint: the new one holds it back)."""
        name = actor_name(self.spec.name, f"worker-{index}")
        try:  # a worker that died with the coordinator may still hold its name: take it back
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except (ValueError, ray.exceptions.RayError):  # no such actor (the usual case) or already dead
            pass
        _wait_name_free(name)
        where, node = self._placement(self.spec.worker_cpus, self.spec.worker_resources)
        if node is not None:
            self.placed[index] = node
        handle = PartitionWorker.options(
            name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=self.spec.worker_cpus,
            **({"resources": dict(self.spec.worker_resources)} if self.spec.worker_resources else {}), **where,
        ).remote(self.spec, index)
        # the slot (and its epoch) is visible before start: the new loop's fence must see its own epoch
        previous = self.slots.get(index)
        slot = WorkerSlot(handle, partitions, epoch)
        if previous is not None:  # restarts are counted per index across launches
            slot.restarts, slot.restart_total = previous.restarts, previous.restart_total
        self.slots[index] = slot
        info = ray.get(handle.start.remote(partitions, epoch, entries, {p: self.end[p] for p in partitions} if self.end else None,
                                           self.until_end, resumed), timeout=120)
        slot.pid = info["pid"]
        if info.get("node"):
            self.placed[index] = info["node"]
        return info

    def _launch_owners(self) -> None:
        """Start the merge owners from the latest manifest's ``merge`` entries (empty ones without)."""
        if not self.spec.owners:
            return
        latest = self.store.latest() if self.store is not None else None
        saved = (latest or {}).get("merge", {})
        # a checkpoint taken with another number of owners: each new owner takes its groups from all of them
        reshard = [e["path"] for _, e in sorted(saved.items(), key=lambda kv: int(kv[0])) if e.get("path")] \
            if saved and len(saved) != self.spec.owners else None
        if reshard:
            self._event(f"merge owners: {len(saved)} in the checkpoint, {self.spec.owners} now: their groups are re-sharded")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = []
        self.owner_epoch = epoch = self._new_epoch()  # fences the owners replaced here at once
        for k in range(self.spec.owners):
            name = owner_name(self.spec.name, k)
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except (ValueError, ray.exceptions.RayError):
                pass
            _wait_name_free(name)
            entry = {} if reshard else (saved.get(str(k)) or {})
            # owners are small: beside the coordinator (soft), leaving whole nodes to the workers
            where = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}
            h = MergeOwner.options(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0.01, **where).remote(
                self.spec, k, list(self.partitions), entry.get("path"), reshard, epoch)
            self.owners[k] = h
            refs.append(h.pid.remote())
        ray.get(refs, timeout=120)
        self.owner_ok = {k: time.monotonic() for k in self.owners}

    def _owners_alive(self) -> str | None:
        """None when every merge owner answers; else why not: dead, or silent for heartbeat_timeout (a stalled
        process: its workers wait on it forever otherwise). An owner busy on a sink still answers ``status``
        from another thread, so silence is not taken for backpressure."""
        hb = self.spec.health.heartbeat_timeout / 1000.0
        refs = {k: h.status.remote() for k, h in self.owners.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=min(2.0, hb))
        now = time.monotonic()
        for k, ref in refs.items():
            if ref not in ready:
                silent = now - self.owner_ok.setdefault(k, now)
                if silent > hb:
                    return f"merge owner {k} has not answered for {silent:.1f}s"
                continue
            try:
                self.owner_status[k] = ray.get(ref)
                self.owner_ok[k] = now
            except ray.exceptions.RayError as exc:
                return f"merge owner {k} died ({type(exc).__name__})"
        return None

    def _restart_all(self, reason: str) -> None:
        """A merge owner died: its merged state since the last checkpoint is gone, so every worker and owner goes
        back to the latest checkpoint (owners from their snapshots, workers from their offsets, replaying)."""
        for s in self.slots.values():
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # already gone
                pass
        self._launch_owners()
        epoch = self._new_epoch()
        for i, s in sorted(self.slots.items()):
            if s.given_up:
                continue
            s.epoch = epoch
            try:
                self._launch(i, s.partitions, epoch, self._entries(s.partitions), resumed=True)
            except Exception as exc:  # the next tick sees it dead and restarts it alone
                self._event(f"worker {i}: restart failed: {type(exc).__name__}: {exc}", worker=i)
        self._event(f"{reason}: every worker and merge owner restarted from the latest checkpoint at epoch {epoch}",
                    action="restart_all")
        self.global_restarts += 1
        if self.stopping:
            for s in self.slots.values():
                s.handle.stop.remote()

    def _check_cpus(self, workers: int) -> None:
        need = workers * self.spec.worker_cpus
        total = ray.cluster_resources().get("CPU", 0.0)
        if need > total - 0.01 + 1e-9:
            # an actor that cannot be placed would wait forever: refuse up front
            raise RuntimeError(
                f"{workers} workers x worker_cpus {self.spec.worker_cpus} need {need:g} CPUs, "
                f"the Ray cluster has {total:g} (the coordinator takes 0.01): lower worker_cpus or workers"
            )

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> dict:
        """Assign partitions and start every worker from the latest checkpoint (or offset 0)."""
        with self.lock:
            if self.phase != "created":
                return self._plan_info()
            if self.partitions is None:
                self.partitions = topic_partitions(self.kafka.bootstrap_servers, self.kafka.topic, self.timeout_s)
            partitions = self.partitions
            ensure_topic(self.kafka.bootstrap_servers, self.spec.dead_letter_topic, 1, self.timeout_s)
            if self.until_end and self.end is None:
                self.end = end_offsets(self.kafka.bootstrap_servers, self.kafka.topic, partitions, self.timeout_s)
            kill_pipeline_actors(self.spec.name, self.spec.workers, include_coordinator=False)
            self._check_cpus(self.spec.workers)
            self._launch_owners()
            entries = self._entries(partitions)
            epoch = self._new_epoch()
            latest = self.store.latest() if self.store is not None else None
            resumed = latest is not None and not latest.get("final")  # the previous run did not end cleanly
            for i, parts in enumerate(plan(partitions, self.spec.workers)):
                self._launch(i, parts, epoch, {p: entries[p] for p in parts}, resumed)
            self.phase = "running"
            resumed = self.last_checkpoint["id"] if self.last_checkpoint else None
            self._event(f"started {self.spec.workers} workers at epoch {epoch}" + (f", resumed from checkpoint {resumed}" if resumed else ""))
            return self._plan_info()

    def _plan_info(self) -> dict:
        return {"partitions": sorted(p for s in self.slots.values() for p in s.partitions),
                "assignment": [self.slots[i].partitions for i in sorted(self.slots)],
                "end_offsets": self.end, "epoch": self.next_epoch - 1,
                "resumed_from": self.last_checkpoint["id"] if self.last_checkpoint else None}

    def _adopt(self) -> None:
        """After a restart: find the workers by name and carry on with them."""
        for i in range(max(self.spec.workers, 64)):
            try:
                h = ray.get_actor(actor_name(self.spec.name, f"worker-{i}"), namespace=NAMESPACE)
                st = ray.get(h.status.remote(), timeout=10)
            except Exception:  # no such worker, or it died with the coordinator gone: the monitor handles it
                continue
            if not st.get("partitions"):
                # created but never started (the coordinator died between creating and starting it): its
                # partitions are orphans; free the name so they can be given to this index again
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # already gone
                    pass
                continue
            self.slots[i] = WorkerSlot(h, st["partitions"], st.get("epoch", 0), status=st, pid=st.get("pid"))
            if st.get("end_offsets") is not None:
                self.end = {**(self.end or {}), **{int(p): o for p, o in st["end_offsets"].items()}}
            self.next_epoch = max(self.next_epoch, int(st.get("epoch", 0)) + 1)
        for k in range(self.spec.owners):
            try:
                self.owners[k] = ray.get_actor(owner_name(self.spec.name, k), namespace=NAMESPACE)
                st = ray.get(self.owners[k].status.remote(), timeout=10)
                self.owner_epoch = max(self.owner_epoch, int(st.get("epoch", -1)))
                self.next_epoch = max(self.next_epoch, self.owner_epoch + 1)
            except Exception:  # missing or silent: the monitor restores every owner and worker from the checkpoint
                self.owners.pop(k, None)
        adopted = len(self.slots)
        if self.partitions is None and self.store is not None and self.store.latest() is not None:
            self.partitions = sorted(int(p) for p in self.store.latest()["partitions"])
        self.phase = "running" if self.slots or self.partitions else "created"
        self._event(f"coordinator restarted: adopted {adopted} workers", action="resume")
        if self.phase == "running":
            self._cover()  # partitions of workers that died with it are owned again at once

    def stop(self) -> None:
        """Clean stop: workers finish their batch, a final checkpoint is taken, then they close."""
        with self.lock:
            self.stopping = True
            for s in self.slots.values():
                if not s.given_up:
                    try:
                        s.handle.stop.remote()
                    except Exception:  # a dead worker is handled by the monitor
                        pass

    def owner_epoch_of(self) -> int:
        """The epoch the merge owners now running were started at (read without the lock, like ``epoch_of``)."""
        return self.owner_epoch

    def epoch_of(self, index: int) -> int:
        """Current epoch of worker ``index`` (read without the lock: workers ask it while a checkpoint waits on them)."""
        slot = self.slots.get(index)
        return -1 if slot is None else slot.epoch

    def pid(self) -> int:
        return os.getpid()

    # -- monitor ------------------------------------------------------------
    def _monitor(self) -> None:
        while True:
            time.sleep(TICK_S)
            try:
                with self.lock:
                    if self.phase != "running":
                        continue
                    self._health()
                    self._gauges()
                    if self._all_drained():
                        self._finalize()
                        continue
                    if self.autoscale is not None and not self.stopping:
                        self._autoscale_step()
                    elif (self.store is not None and not self.stopping
                          and time.monotonic() - self.last_checkpoint_t >= self.spec.checkpoint.interval / 1000.0):
                        self._checkpoint()
            except Exception as exc:  # the monitor must survive anything; the error is reported in status
                self._event(f"monitor error: {type(exc).__name__}: {exc}")

    def _refresh_ends(self) -> None:
        if self.end is not None:
            self.broker_ends = self.end
            return
        if time.monotonic() - self.broker_ends_t < 2.0:
            return
        try:
            parts = sorted(p for s in self.slots.values() for p in s.partitions)
            self.broker_ends = end_offsets(self.kafka.bootstrap_servers, self.kafka.topic, parts, 3.0)
            self.broker_ends_t = time.monotonic()
        except Exception:  # broker paused: lag is unknown for now, so no stall verdicts either
            self.broker_ends_t = time.monotonic()
            self.broker_ends = {}

    def _health(self) -> None:
        """One heartbeat round: observe every worker, let ``actors.health.judge`` decide, act."""
        hb = self.spec.health.heartbeat_timeout / 1000.0
        stall = self.spec.health.stall_timeout / 1000.0
        self._refresh_ends()
        if self.spec.owners:
            dead = "merge owners missing" if len(self.owners) < self.spec.owners else self._owners_alive()
            if dead:
                self._restart_all(dead)
                return
        self._cover()
        refs = {i: s.handle.status.remote() for i, s in self.slots.items() if not s.given_up}
        for i, ref in refs.items():
            s = self.slots[i]
            track = s.track
            try:
                st = ray.get(ref, timeout=min(2.0, hb))
                positions = {int(p): int(o) for p, o in (st.get("positions") or {}).items()}
                lag = sum(max(0, self.broker_ends.get(p, 0) - o) for p, o in positions.items()) if self.broker_ends else 0
                obs = Observation(True, state=st["state"], error=st.get("error"), positions=positions, lag=lag,
                                  store_wait=st.get("store_wait"))
                s.status = st
            except ray.exceptions.GetTimeoutError:
                obs = Observation(False)
            except ray.exceptions.RayError:
                obs = Observation(False, died=True)
            self._recovered(i, s)
            verdict = judge(obs, track, time.monotonic(), hb, stall)
            s.backpressure = verdict.reason if verdict.action is Action.BACKPRESSURE else None
            if verdict.action is Action.RESTART:
                self._restart(i, verdict.reason)

    def _orphans(self) -> list[int]:
        """Partitions of the run that no live worker owns (given-up workers still count as owners: degraded)."""
        owned = {p for s in self.slots.values() for p in s.partitions}
        return sorted(set(self.partitions or []) - owned)

    def _cover(self) -> None:
        """Give every partition nobody owns to a worker again, from its latest checkpoint entry.

        A restarted coordinator rebuilds ownership from the plan and the
        manifest, not only from the workers it can reach: the partitions of a
        worker that died with it would otherwise never be consumed again.
        Orphans go back to the worker indices the plan gave them, else to a new
        index; each launch gets a new epoch.
        """
        orphans = self._orphans()
        if not orphans:
            return
        self._event(f"partitions {orphans} have no owner: starting workers for them", action="cover", partitions=orphans)
        groups: dict[int, list[int]] = {}
        for i, planned in enumerate(plan(self.partitions, self.spec.workers)):
            mine = [p for p in planned if p in orphans]
            if mine:
                index = i if i not in self.slots else max([*self.slots, *groups, -1]) + 1
                groups[index] = mine
        for index, parts in groups.items():
            epoch = self._new_epoch()
            try:
                self._launch(index, parts, epoch, self._entries(parts), resumed=True)
            except Exception as exc:  # the next tick finds them orphaned (or the worker dead) and tries again
                self._event(f"worker {index}: start for partitions {parts} failed: {type(exc).__name__}: {exc}", worker=index)
                continue
            self._event(f"worker {index} started for orphaned partitions {parts} at epoch {epoch}", worker=index, epoch=epoch)
            if self.stopping:  # a clean stop was asked before this worker existed: it drains too
                self.slots[index].handle.stop.remote()

    def _restart(self, index: int, reason: str) -> None:
        s = self.slots[index]
        now = time.monotonic()
        window = self.spec.health.restart_window / 1000.0
        s.restarts = [t for t in s.restarts if now - t <= window] + [now]
        s.restart_total = s.restart_total + 1
        try:
            ray.kill(s.handle, no_restart=True)
        except Exception:  # already gone
            pass
        if len(s.restarts) > self.spec.health.max_restarts:
            s.given_up = reason
            self.degraded = (f"worker {index} (partitions {s.partitions}) restarted {len(s.restarts) - 1} times within "
                             f"{window:.0f}s, last because {reason}; it is no longer restarted")
            self._event(self.degraded, action="degrade", worker=index)
            self.metrics.set("raystream_degraded", 1, pipeline=self.spec.name)
            return
        epoch = self._new_epoch()
        old, s.epoch = s.epoch, epoch  # fence the old one at once, even before the new one runs
        self._event(f"worker {index} epoch {old} fenced: {reason}", action="fence", worker=index, epoch=old)
        t0 = time.time()
        self.recovering[index] = t0
        self.metrics.inc("raystream_worker_restarts", 1, pipeline=self.spec.name, worker=index)
        try:
            info = self._launch(index, s.partitions, epoch, self._entries(s.partitions), resumed=True)
        except Exception as exc:  # the next tick sees it dead again and counts another restart
            self._event(f"worker {index}: restart failed: {type(exc).__name__}: {exc}", worker=index)
            return
        self._event(f"worker {index} restarted at epoch {epoch} from offsets {info['positions']}: {reason}",
                    action="restart", worker=index, epoch=epoch, detected=t0)
        if self.stopping:  # a clean stop was asked before this worker existed: it drains too
            self.slots[index].handle.stop.remote()

    # -- checkpoints ----------------------------------------------------------
    def _checkpoint_failed(self) -> None:
        self.checkpoints_failed += 1
        self.metrics.inc("raystream_checkpoint_failures", 1, pipeline=self.spec.name)

    def _recovered(self, index: int, s) -> None:
        """A restarted worker consumes again: its recovery time is from the restart to its first batch."""
        began = self.recovering.get(index)
        first = (s.status or {}).get("first_batch_at")
        if began is not None and first is not None and first >= began:
            self.metrics.observe("raystream_recovery_seconds", first - began, pipeline=self.spec.name)
            del self.recovering[index]

    def _gauges(self) -> None:
        name = self.spec.name
        running = sum(1 for s in self.slots.values() if not s.given_up and (s.status or {}).get("state") == "running")
        self.metrics.set("raystream_workers_running", running, pipeline=name)
        self.metrics.set("raystream_unowned_partitions", len(self._orphans()), pipeline=name)
        self.metrics.set("raystream_degraded", 1 if self.degraded else 0, pipeline=name)
        if self.store is not None:  # before the first checkpoint, its age counts from the start of the run
            self.metrics.set("raystream_checkpoint_interval_seconds", self.spec.checkpoint.interval / 1000.0, pipeline=name)
            last = self.last_checkpoint["created"] if self.last_checkpoint else self.started
            self.metrics.set("raystream_checkpoint_last_success_timestamp", last, pipeline=name)

    def _checkpoint(self, final: bool = False) -> dict | None:
        """Snapshot every live worker; write the manifest when there is something new. None when nothing was written."""
        self.last_checkpoint_t = t_begin = time.monotonic()
        self.checkpoint_id += 1
        cid = self.checkpoint_id
        timeout = self.spec.checkpoint.timeout / 1000.0
        # a worker waiting on a store answers only after it is back: it misses this round (keeps its entries)
        refs = {i: (s.handle.checkpoint.remote(cid, s.epoch, timeout), s.epoch)
                for i, s in self.slots.items() if not s.given_up and not (s.status or {}).get("store_wait")}
        entries: dict[int, dict] = {}
        pending = {ref: (i, epoch) for i, (ref, epoch) in refs.items()}
        deadline = time.monotonic() + timeout + 5
        hb = self.spec.health.heartbeat_timeout / 1000.0
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(1.0, hb, max(0.0, deadline - time.monotonic())))
            for ref in ready:
                i, epoch = pending.pop(ref)
                try:
                    got = ray.get(ref)
                except Exception as exc:  # a failed snapshot only means this round keeps the previous entries
                    self._event(f"checkpoint {cid}: worker {i} failed: {type(exc).__name__}: {str(exc)[:300]}", worker=i)
                    continue
                if self.slots[i].epoch == epoch:
                    entries.update({int(p): e for p, e in got.items()})
            # a worker that stopped answering is not waited for (the monitor restarts it), nor one that waits
            # on a store (it answers between batches only after the store is back): this round keeps its entries
            for ref, (i, _) in list(pending.items()):
                try:
                    st = ray.get(self.slots[i].handle.status.remote(), timeout=2.0)
                except Exception:
                    pending.pop(ref)
                    self._event(f"checkpoint {cid}: worker {i} does not answer; checkpointed without it", worker=i)
                    continue
                self.slots[i].status = st
                if st.get("store_wait"):
                    pending.pop(ref)
                    self._event(f"checkpoint {cid}: worker {i} waits on {st['store_wait'].get('store')}; "
                                f"checkpointed without it", worker=i)
        for ref, (i, _) in pending.items():
            self._event(f"checkpoint {cid}: worker {i} timed out", worker=i)
        if not entries:
            self._checkpoint_failed()
            return None
        merge = None
        if self.owners:
            # after every worker snapshot above: an owner holds at least what those positions shipped
            try:
                got = ray.get([h.snapshot.remote(cid, self.next_epoch - 1) for h in self.owners.values()], timeout=timeout + 5)
                merge = dict(zip(self.owners, got))
            except Exception as exc:  # an older owner snapshot with newer offsets would lose partials: no manifest
                self._checkpoint_failed()
                self._event(f"checkpoint {cid}: a merge owner did not snapshot ({type(exc).__name__}: {str(exc)[:200]}); "
                            "no manifest this round")
                return None
        all_parts = sorted(p for s in self.slots.values() for p in s.partitions)
        try:
            # final: every worker drained and is in it, so a later run resumes exactly here (no replayed output)
            manifest, problems = commit_checkpoint(
                self.store, cid, entries, all_parts, self.next_epoch - 1, self.spec.checkpoint.keep,
                lambda offsets: commit_offsets(self.kafka.bootstrap_servers, self.spec.group_id, self.kafka.topic,
                                               offsets, 5.0),
                final=final, merge=merge)
        except Exception as exc:
            self._checkpoint_failed()
            self._event(f"checkpoint {cid}: manifest not written: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        for problem in problems:
            self._event(f"checkpoint {cid}: {problem}")
        self.last_checkpoint = self._summary(manifest)
        checkpoint_metrics(self.metrics, self.spec, manifest, time.monotonic() - t_begin)
        return manifest

    def checkpoint(self) -> dict | None:
        """Take a checkpoint now (operators, tests)."""
        with self.lock:
            return self._checkpoint()

    # -- the end --------------------------------------------------------------
    def _all_drained(self) -> bool:
        if self._orphans():
            return False  # a partition nobody owns is never "done"
        live = [s for s in self.slots.values() if not s.given_up]
        return bool(live) and all(s.status.get("state") == "drained" for s in live) or (
            not live and bool(self.slots))

    def _finalize(self) -> None:
        given_up = {i: s.given_up for i, s in self.slots.items() if s.given_up}
        if given_up and not self.degraded:  # never finish quietly without a worker's output
            self.degraded = "; ".join(f"worker {i} is no longer restarted: {why}" for i, why in sorted(given_up.items()))
            self._event(self.degraded, action="degrade")
            self.metrics.set("raystream_degraded", 1, pipeline=self.spec.name)
        if self.store is not None:
            self._checkpoint(final=not self.degraded and not self.failure)
        results = []
        to_end = self.until_end and not self.stopping
        for i, s in sorted(self.slots.items()):
            if s.given_up:
                results.append({"index": i, "state": "given_up", "error": s.given_up, **s.status})
                continue
            try:
                results.append(ray.get(s.handle.finish.remote(to_end), timeout=300))
            except Exception as exc:
                self.failure = f"worker {i} failed to finish: {type(exc).__name__}: {exc}"
                results.append({"index": i, "state": "failed", "error": self.failure})
        for k, h in sorted(self.owners.items()):
            try:
                self.owner_status[k] = ray.get(h.finish.remote(), timeout=120)
                results.append({**self.owner_status[k], "merge_owner": True})
            except Exception as exc:
                self.failure = f"merge owner {k} failed to finish: {type(exc).__name__}: {exc}"
        if to_end and self.end is not None and not self.failure and not self.degraded:
            from pipeline.driver import shortfalls

            problems = shortfalls(results, self.end)
            if problems:
                self.failure = "the run ended short of its end offsets: " + "; ".join(problems)
        self.results = results
        self._release_capacity()
        self.phase = "finished"
        self._event("finished" + (f" (degraded: {self.degraded})" if self.degraded else ""))

    def wait(self, timeout_s: float) -> list[dict] | None:
        """Final stats of every worker once the pipeline finished; None while it runs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.phase == "finished":
                if self.degraded:
                    raise PipelineDegraded(self.degraded)
                if self.failure:
                    raise RuntimeError(self.failure)
                return self.results
            time.sleep(0.05)
        return None

    # -- operators --------------------------------------------------------------
    def scale(self, workers: int) -> dict:
        """Move every partition (with its state) onto ``workers`` workers, through a checkpoint."""
        with self.lock:
            if self.phase != "running":
                raise RuntimeError(f"pipeline is {self.phase}, not running")
            if self.store is None:
                raise RuntimeError("scaling moves state through checkpoints: the spec has no 'checkpoint' section")
            self._check_cpus(workers)
            return self._rescale(workers, "operator")

    def _rescale(self, workers: int, why: str) -> dict:
        """The live handoff (lock held): every worker drains, a checkpoint is taken, ``workers`` new ones resume
        from it with their partitions spread by the plan."""
        for s in self.slots.values():
            s.handle.stop.remote()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = ray.get([s.handle.status.remote() for s in self.slots.values()], timeout=30)
            if all(st["state"] in ("drained", "failed", "fenced") for st in states):
                break
            time.sleep(0.1)
        manifest = self._checkpoint()
        for s in self.slots.values():
            try:
                ray.get(s.handle.finish.remote(False), timeout=60)
            except Exception:  # a worker that failed has nothing to flush
                pass
            ray.kill(s.handle, no_restart=True)
        partitions = sorted(p for s in self.slots.values() for p in s.partitions)
        before = len(self.slots)
        self.slots = {}
        self.spec = self.spec.model_copy(update={"workers": workers})
        epoch = self._new_epoch()
        entries = self._entries(partitions)
        for i, parts in enumerate(plan(partitions, workers)):
            self._launch(i, parts, epoch, {p: entries[p] for p in parts}, resumed=False)  # a clean handoff
        self._event(f"scaled from {before} to {workers} workers at epoch {epoch} through checkpoint "
                    f"{manifest['id'] if manifest else '?'} ({why})", action="scale")
        if self.autoscale is not None:
            self.autoscale.scaled(time.monotonic(), before, workers)
        return self._plan_info()

    # -- autoscaling ------------------------------------------------------------
    def _ours_per_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i, s in self.slots.items():
            node = self.placed.get(i) or (s.status or {}).get("node")
            if node and not s.given_up:
                counts[node] = counts.get(node, 0) + 1
        return counts

    def _capacity_for(self, workers: int) -> bool:
        """Whether the nodes have room for ``workers`` workers, node by node (a worker needs its CPUs on one
        node), counting what the current workers hold (freed by the handoff)."""
        from ray._private.state import available_resources_per_node

        need = {"CPU": self.spec.worker_cpus, **self.spec.worker_resources}
        ours = self._ours_per_node()
        fit = 0
        for node, free in available_resources_per_node().items():
            room = {k: free.get(k, 0.0) + ours.get(node, 0) * v for k, v in need.items()}
            fit += int(min(room[k] / v + 1e-6 for k, v in need.items() if v > 0))
        return fit >= workers

    def _request_capacity(self, extra: int) -> None:
        """Reserve room for ``extra`` more workers, a placement group each: while they wait, Ray's autoscaler sees
        the demand and adds nodes; once placed the room exists, the groups are removed and the handoff starts
        the workers there (the old workers keep consuming meanwhile). One group per worker, so a cluster that can
        grow by fewer still gives what it can."""
        from ray.util.placement_group import placement_group

        self._release_capacity()
        bundle = {"CPU": self.spec.worker_cpus, **self.spec.worker_resources}
        self.reservation = [placement_group([dict(bundle)], name=f"{self.spec.name}:scale-out-{k}") for k in range(extra)]
        self._event(f"reserving room for {extra} more workers ({extra * self.spec.worker_cpus:g} CPUs): "
                    "Ray's autoscaler adds nodes if the cluster lacks them")

    def _reserved(self) -> int:
        """How many of the reserved workers' rooms exist now."""
        groups = getattr(self, "reservation", None) or []
        if not groups:
            return 0
        ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=0)
        return len(ready)

    def _release_capacity(self) -> None:
        """Give the reserved room back (to the new workers, or because the run no longer needs it)."""
        from ray.util.placement_group import remove_placement_group

        for g in getattr(self, "reservation", None) or []:
            try:
                remove_placement_group(g)
            except Exception as exc:  # the cluster going away: nothing left to release
                log.warning("could not remove a scale-out reservation: %s", exc, extra={"pipeline": self.spec.name})
        self.reservation = []

    def _autoscale_step(self) -> None:
        """Sample about once a second, let ``pipeline.autoscale.Policy`` decide, apply (lock held)."""
        now = time.monotonic()
        live = [s for s in self.slots.values() if not s.given_up]
        if self.pending_scale is not None:
            n, give_up, reason = self.pending_scale
            got = self._reserved()
            if got >= n - len(live) or self._capacity_for(n):
                self.pending_scale = None
                self._release_capacity()  # the room goes to the new workers of the handoff
                self._rescale(n, f"autoscale: {reason}")
            elif now > give_up:
                self.pending_scale = None
                self._release_capacity()
                partial = align(len(live) + got, len(self.partitions))
                if partial > len(live):
                    self._event(f"autoscale: the cluster made room for {got} of {n - len(live)} more workers in time: "
                                f"scaling to {partial}")
                    self._rescale(partial, f"autoscale: {reason} (as far as the cluster grew)")
                else:
                    self._event(f"autoscale: the cluster did not make room for {n} workers in time; staying at {len(live)}")
                    self.autoscale.scaled(now, len(live), len(live))  # cooldown before asking again
            return
        if now - self.last_sample_t < 1.0 or not self.broker_ends or self.degraded or self._orphans():
            return
        self.last_sample_t = now
        positions: dict[int, int] = {}
        busy = wait = 0.0
        waiting = 0
        for s in live:
            st = s.status or {}
            positions.update({int(p): int(o) for p, o in (st.get("positions") or {}).items()})
            # fetching and decoding a non-empty batch is work too (consume_s), and a throttled worker is saturated
            busy += sum(float(st.get(k) or 0.0) for k in ("busy_s", "consume_s", "throttled_s"))
            wait += float(st.get("store_wait_s") or 0.0)
            if st.get("store_wait"):
                waiting += 1
                wait += max(0.0, time.time() - float(st["store_wait"].get("since") or time.time()))
        if set(positions) != set(self.partitions or []):
            return  # a worker has not reported yet
        self.autoscale.partitions = len(self.partitions)
        self.autoscale.observe(Sample(now, dict(self.broker_ends), positions, busy, wait, len(live), waiting))
        d = self.autoscale.decide(now, len(live))
        self.autoscale_last = {"desired": d.desired, "reason": d.reason, **d.figures}
        self.metrics.set("raystream_workers_desired", d.desired, pipeline=self.spec.name)
        if d.desired == len(live):
            return
        if d.desired > len(live) and not self._capacity_for(d.desired):
            self._request_capacity(d.desired - len(live))
            self.pending_scale = (d.desired, now + self.spec.autoscale.resources_timeout / 1000.0, d.reason)
            self._event(f"autoscale: {d.reason}; asking the Ray cluster for room for {d.desired} workers")
            return
        self._release_capacity()  # nothing standing: the nodes a scale-in leaves idle go
        self._rescale(d.desired, f"autoscale: {d.reason}")

    def open_windows(self, window: str, filters: dict[str, str]) -> list[dict]:
        """Open windows of every live worker (the serving layer's ``include_open``); a merged window's open rows
        are merged from the partials held by the workers and the owners."""
        if window in self.spec.merged_windows:
            from pipeline.io.sinks.common import row_dicts
            from pipeline.merge import merge_open

            refs = [s.handle.open_partials.remote(window, filters) for s in self.slots.values() if not s.given_up]
            refs += [h.open_partials.remote(window, filters) for h in self.owners.values()]
            partials = []
            for ref in refs:
                try:
                    got = ray.get(ref, timeout=15)
                except Exception:  # restarting: nothing to show from it yet
                    continue
                if got is not None:
                    partials.append(got)
            w = next(w for w in self.spec.windows if w.name == window)
            table = merge_open(w, self.spec.event_time.allowed_lateness, partials)
            return row_dicts(table) if table is not None else []
        refs = [s.handle.open_windows.remote(window, filters) for s in self.slots.values() if not s.given_up]
        out: list[dict] = []
        for ref in refs:
            try:
                out += ray.get(ref, timeout=15)
            except Exception:  # a worker restarting has no open windows to show yet
                continue
        return out

    def status(self) -> dict:
        """Per worker: partitions, offsets, lag, watermark, last checkpoint, restarts, health."""
        workers = []
        ends = self.broker_ends or self.end or {}
        ck = (self.last_checkpoint or {}).get("offsets", {})
        for i, s in sorted(self.slots.items()):
            st = dict(s.status or {})
            positions = {int(p): int(o) for p, o in (st.get("positions") or {}).items()}
            health = "given up" if s.given_up else "waiting on store" if s.backpressure else (
                "dead?" if time.monotonic() - s.track.last_ok > self.spec.health.heartbeat_timeout / 1000.0 else st.get("state", "starting"))
            workers.append({
                **st, "index": i, "partitions": s.partitions, "epoch": s.epoch, "positions": positions,
                "lag": sum(max(0, ends.get(p, 0) - o) for p, o in positions.items()) if ends else None,
                "checkpointed": {p: ck.get(p) for p in s.partitions}, "restarts": s.restart_total,
                "health": health, "given_up": s.given_up, "pid": s.pid or st.get("pid"),
                "backpressure": s.backpressure,
            })
        # redacted: status reaches the CLI, the API and reports, and failure texts may quote a connection string
        return redact({"pipeline": self.spec.name, "phase": self.phase, "degraded": self.degraded, "failure": self.failure,
                "epoch": self.next_epoch - 1, "coordinator_pid": os.getpid(),
                "coordinator_node": ray.get_runtime_context().get_node_id(), "coordinator_restarted": self.restarted,
                "last_checkpoint": self.last_checkpoint, "checkpoints_failed": self.checkpoints_failed,
                "workers": workers, "events": list(self.events)[-30:], "until_end": self.until_end,
                "merge_owners": [self.owner_status.get(k, {"shard": k}) for k in sorted(self.owners)],
                "global_restarts": self.global_restarts, "autoscale": self.autoscale_last,
                "pending_scale": self.pending_scale[0] if self.pending_scale else None,
                "silent_nodes": sorted(self.silent_nodes)})

    def shutdown(self) -> None:
        with self.lock:
            for s in self.slots.values():
                try:
                    ray.kill(s.handle, no_restart=True)
                except Exception:  # already gone
                    pass
            for h in self.owners.values():
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # already gone
                    pass
            self.slots = {}
            self.owners = {}
            self._release_capacity()
            self.phase = "shut down"
