"""The coordinator's health policy (pure: no Ray, no clock of its own).

Each monitor tick observes every worker once (its heartbeat, ``status``) and
asks ``judge`` what to do. A worker waiting on a sink (retrying a write, its
partitions paused) is *backpressured*, not stalled: it is never restarted for
that; only a spec policy (a sink's ``max_outage`` or ``retries``) turns an
outage into a failure, which the worker then reports as ``failed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Action", "Observation", "Slot", "Verdict", "judge"]


class Action(str, Enum):
    NONE = "none"            # alive and consuming, drained, or nothing to consume
    BACKPRESSURE = "backpressure"  # alive, waiting on a sink: report, do not restart
    RESTART = "restart"      # dead, failed, fenced, silent past heartbeat_timeout, or stalled


@dataclass
class Observation:
    """What one heartbeat round saw of one worker."""

    answered: bool                  # status() returned in time
    died: bool = False              # the actor is gone (Ray said so)
    state: str | None = None        # running / drained / failed / fenced / finished
    error: str | None = None
    positions: dict[int, int] = field(default_factory=dict)
    lag: int = 0                    # records waiting (end offset - position), 0 when unknown
    store_wait: dict | None = None   # {"store", "since", "attempts", "error"} while a sink write or a lookup is retried


@dataclass
class Slot:
    """The coordinator's memory of one worker between ticks (times are monotonic seconds)."""

    last_ok: float
    progress: dict[int, int] | None = None
    progress_t: float = 0.0


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""


def judge(obs: Observation, slot: Slot, now: float, heartbeat_timeout_s: float, stall_timeout_s: float) -> Verdict:
    """Decide about one worker; updates ``slot`` (last answer, last progress)."""
    if obs.died:
        return Verdict(Action.RESTART, "actor died")
    if not obs.answered:
        silent = now - slot.last_ok
        if silent > heartbeat_timeout_s:
            return Verdict(Action.RESTART, f"no heartbeat for {silent:.1f}s")
        return Verdict(Action.NONE)
    slot.last_ok = now
    if obs.state in ("failed", "fenced"):
        first = (obs.error or "").splitlines()[0] if obs.error else ""
        return Verdict(Action.RESTART, f"{obs.state}: {first}")
    if obs.state != "running":
        return Verdict(Action.NONE)
    if obs.positions != slot.progress:
        slot.progress, slot.progress_t = dict(obs.positions), now
        return Verdict(Action.NONE)
    if obs.store_wait:
        slot.progress_t = now  # time spent waiting on a sink is not time stalled
        w = obs.store_wait
        return Verdict(Action.BACKPRESSURE, f"waiting on {w.get('store')} ({w.get('attempts')} attempts): {w.get('error')}")
    if obs.lag > 0 and now - slot.progress_t > stall_timeout_s:
        return Verdict(Action.RESTART, f"stalled: offsets did not move for {now - slot.progress_t:.0f}s with {obs.lag} records waiting")
    return Verdict(Action.NONE)
