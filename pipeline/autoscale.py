"""Lag-driven autoscaling policy (pure: no Ray, no clock of its own).

The coordinator samples the pipeline about once a second (:class:`Sample`)
and asks :meth:`Policy.decide` how many workers it should run. The model is
the one of Flink's Kubernetes operator autoscaler, adapted to a source-bound
pipeline:

- **true capacity** of a worker = records it processed / seconds it was busy
  processing them (time spent polling an empty topic, throttled, or waiting
  on a failing sink is not busy time), measured over ``metrics_window``;
- **required rate** = input rate (growth of the end offsets) + the lag above
  ``target_lag`` drained within ``catch_up``;
- **desired workers**: partitions are the unit of work, so the busiest worker
  holds ceil(P / workers) partitions, each carrying required / P; the count
  is the fewest workers whose busiest one stays within capacity x
  ``target_utilization`` (8 partitions: 5 workers do no better than 4, so 4),
  clamped to ``[min_workers, max_workers]`` and aligned the same way.

Where it goes further than Flink's:

- **hysteresis both ways**: scale out only while the lag is above
  ``target_lag`` and not draining within ``catch_up``; scale in only after
  the smaller count sufficed, with the lag at or under target, for the
  whole ``scale_in_delay`` (it scales in to the largest count needed
  during that time, so one quiet moment does not shrink it);
- **cooldowns**: nothing is decided from metrics taken within
  ``stabilization`` of a rescale (the handoff and the new workers' warm-up
  distort rates), and scale-outs are ``scale_out_cooldown`` apart;
- **backpressure**: when workers spend more than half their time waiting on
  a sink or lookup store, more workers would only wait too: no scale-out,
  and the reason says so;
- **ineffective scale-outs**: when a scale-out raised throughput by less
  than a fifth of what it should have (a shared bottleneck the policy cannot
  see), further scale-outs are blocked until the lag is back under target.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

__all__ = ["AutoscaleConfig", "Decision", "Policy", "Sample", "align"]


@dataclass(frozen=True)
class AutoscaleConfig:
    """The spec's ``autoscale`` section in seconds and records (see ``pipeline.spec.AutoscaleSpec``)."""

    min_workers: int = 1
    max_workers: int = 4
    target_lag: int = 10_000
    catch_up_s: float = 60.0
    target_utilization: float = 0.7
    metrics_window_s: float = 20.0
    stabilization_s: float = 10.0
    scale_out_cooldown_s: float = 15.0
    scale_in_delay_s: float = 60.0
    min_samples: int = 3


@dataclass(frozen=True)
class Sample:
    """What the coordinator saw at one moment (cumulative counters; times in monotonic seconds)."""

    t: float
    ends: dict[int, int]          # broker end offsets per partition (input so far)
    positions: dict[int, int]     # next offset to consume per partition
    busy_s: float                 # sum over workers: seconds spent processing batches
    wait_s: float                 # sum over workers: seconds spent waiting on sinks / lookup stores
    workers: int                  # workers running when sampled
    waiting: int = 0              # workers waiting on a store right now

    @property
    def lag(self) -> int:
        return sum(max(0, self.ends.get(p, 0) - o) for p, o in self.positions.items())


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    figures: dict = field(default_factory=dict)


def align(desired: int, partitions: int) -> int:
    """The fewest workers giving no worker more partitions than ``desired`` workers would."""
    desired = max(1, min(desired, partitions))
    share = math.ceil(partitions / desired)
    return math.ceil(partitions / share)


class Policy:
    """Keeps the recent samples and the scaling history; :meth:`decide` is the whole decision."""

    def __init__(self, cfg: AutoscaleConfig, partitions: int):
        self.cfg = cfg
        self.partitions = max(1, partitions)
        self.samples: deque[Sample] = deque()
        self.last_scale_t: float | None = None
        self.last_scale: tuple[int, int] | None = None     # (from, to)
        self.rate_before: float | None = None               # throughput when the last scale-out was decided
        self.blocked: str | None = None                     # why scale-outs are blocked (ineffective)
        self.enough_since: float | None = None              # since when fewer workers would do
        self.needed_meanwhile = 0                           # the most workers needed since then

    def bounds(self, n: int) -> int:
        hi = min(self.cfg.max_workers, self.partitions)
        return max(min(self.cfg.min_workers, hi), min(n, hi))

    def observe(self, s: Sample) -> None:
        """Add a sample; samples from before the last rescale's stabilization, or of another worker count, go."""
        self.samples.append(s)
        while self.samples and (self.samples[0].workers != s.workers
                                or s.t - self.samples[0].t > self.cfg.metrics_window_s):
            self.samples.popleft()

    def scaled(self, now: float, before: int, after: int) -> None:
        """The coordinator applied a decision (or an operator rescaled): restart the measurements."""
        if after > before and self.samples:
            self.rate_before = self._rates()[1]
        self.last_scale_t, self.last_scale = now, (before, after)
        self.samples.clear()
        self.enough_since, self.needed_meanwhile = None, 0

    def _usable(self) -> list[Sample]:
        settle = (self.last_scale_t or -math.inf) + self.cfg.stabilization_s
        return [s for s in self.samples if s.t >= settle]

    def _rates(self) -> tuple[float, float, float | None, float]:
        """(input rate, processed rate, capacity per worker or None, share of time waiting) over the usable samples."""
        got = self._usable() or list(self.samples)
        a, b = got[0], got[-1]
        dt = max(b.t - a.t, 1e-9)
        inflow = (sum(b.ends.values()) - sum(a.ends.values())) / dt
        processed = sum(b.positions.values()) - sum(a.positions.values())
        busy = (b.busy_s - a.busy_s) - (b.wait_s - a.wait_s)
        # busy seconds are summed over workers: records per busy second is one worker's capacity
        capacity = processed / busy if busy > 0.05 and processed > 0 else None
        waiting = (b.wait_s - a.wait_s) / (dt * max(1, b.workers))
        if b.waiting and waiting < 0.5:
            waiting = max(waiting, b.waiting / max(1, b.workers))
        return max(0.0, inflow), processed / dt, capacity, waiting

    def decide(self, now: float, current: int) -> Decision:
        """How many workers to run now (``current`` when nothing should change, with the reason)."""
        cfg = self.cfg
        target_now = self.bounds(current)
        if target_now != current:
            return Decision(target_now, f"outside [{cfg.min_workers}, {min(cfg.max_workers, self.partitions)}]")
        usable = self._usable()
        if len(usable) < cfg.min_samples or usable[-1].t - usable[0].t < min(5.0, cfg.metrics_window_s / 2):
            return Decision(current, "measuring")
        last = usable[-1]
        inflow, rate, capacity, waiting = self._rates()
        lag = last.lag
        figures = {"lag": lag, "input_rate": round(inflow, 1), "processed_rate": round(rate, 1),
                   "capacity_per_worker": None if capacity is None else round(capacity, 1), "waiting": round(waiting, 3)}
        if self.last_scale and self.last_scale[1] > self.last_scale[0] and self.rate_before is not None \
                and self.blocked is None and lag > cfg.target_lag:
            before, after = self.last_scale
            expected = self.rate_before * (after / before - 1)
            if expected > 0 and rate - self.rate_before < 0.2 * expected:
                self.blocked = (f"the scale-out {before}->{after} raised throughput {self.rate_before:.0f}->{rate:.0f}/s, "
                                f"under a fifth of the {expected:.0f}/s expected")
            self.rate_before = None  # judged once
        if lag <= cfg.target_lag:
            self.blocked = None
        if capacity is None and (lag > cfg.target_lag or inflow > 0):
            self.enough_since = None
            return Decision(current, "no busy time measured while input waits: holding", figures)
        required = inflow + max(0, lag - cfg.target_lag) / cfg.catch_up_s
        if capacity is None or required <= 0:  # idle: nothing arrives, nothing waits
            raw = cfg.min_workers
        else:
            # partitions are the unit of work: the busiest worker holds ceil(P / workers) of them, each carrying
            # required / P; the most partitions a worker may hold within its planned capacity sets the count
            share = math.floor(capacity * cfg.target_utilization * self.partitions / required)
            raw = self.partitions if share < 1 else math.ceil(self.partitions / share)
        desired = max(self.bounds(cfg.min_workers), align(self.bounds(max(raw, 1)), self.partitions))
        figures.update(required_rate=round(required, 1), raw=raw, desired=desired)
        if desired > current:
            self.enough_since = None
            if lag <= cfg.target_lag:
                return Decision(current, f"lag {lag} within target {cfg.target_lag}", figures)
            if waiting > 0.5:
                return Decision(current, f"workers wait on a sink or store {waiting:.0%} of the time: more would wait too",
                                figures)
            if self.blocked:
                return Decision(current, f"scale-out blocked: {self.blocked}", figures)
            if self.last_scale_t is not None and now - self.last_scale_t < cfg.scale_out_cooldown_s:
                return Decision(current, "scale-out cooldown", figures)
            return Decision(desired, f"lag {lag} > {cfg.target_lag}: need {required:.0f}/s, a worker does "
                                     f"{capacity:.0f}/s busy", figures)
        if desired < current and lag <= cfg.target_lag:
            if self.enough_since is None:
                self.enough_since, self.needed_meanwhile = now, desired
            self.needed_meanwhile = max(self.needed_meanwhile, desired)
            if now - self.enough_since < cfg.scale_in_delay_s:
                return Decision(current, f"{desired} would do; waiting {cfg.scale_in_delay_s:.0f}s before scaling in",
                                figures)
            if self.needed_meanwhile < current:
                return Decision(self.needed_meanwhile, f"{self.needed_meanwhile} sufficed for {cfg.scale_in_delay_s:.0f}s "
                                                       f"with lag {lag} <= {cfg.target_lag}", figures)
            return Decision(current, "steady", figures)
        self.enough_since = None
        return Decision(current, "steady", figures)
