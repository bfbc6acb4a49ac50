"""The coordinator's health policy, without Ray: alive / waiting on a store / stalled / dead -> action."""

from __future__ import annotations

import pytest

from actors.health import Action, Observation, Slot, judge

HB, STALL = 5.0, 30.0
SINK_WAIT = {"store": "postgres", "since": 0.0, "attempts": 40, "error": "OperationalError: connection refused"}


@pytest.mark.parametrize("obs, slot, now, action, reason", [
    (Observation(False, died=True), Slot(0.0), 1.0, Action.RESTART, "actor died"),
    (Observation(False), Slot(0.0), 4.0, Action.NONE, ""),                       # slow answer, within the timeout
    (Observation(False), Slot(0.0), 6.0, Action.RESTART, "no heartbeat for 6.0s"),
    (Observation(True, state="failed", error="SinkError: sink postgres: failed\ntrace"), Slot(0.0), 1.0,
     Action.RESTART, "failed: SinkError: sink postgres: failed"),
    (Observation(True, state="drained", positions={0: 5}, lag=0), Slot(0.0, {0: 5}, 0.0), 100.0, Action.NONE, ""),
    (Observation(True, state="running", positions={0: 5}, lag=10), Slot(0.0, {0: 5}, 0.0), 31.0,
     Action.RESTART, "stalled: offsets did not move for 31s with 10 records waiting"),
    (Observation(True, state="running", positions={0: 5}, lag=0), Slot(0.0, {0: 5}, 0.0), 300.0, Action.NONE, ""),
    # three minutes without progress, but waiting on a sink: backpressure, never a restart
    (Observation(True, state="running", positions={0: 5}, lag=10_000, store_wait=SINK_WAIT), Slot(0.0, {0: 5}, 0.0), 180.0,
     Action.BACKPRESSURE, "waiting on postgres (40 attempts): OperationalError: connection refused"),
])
def test_verdicts(obs, slot, now, action, reason):
    v = judge(obs, slot, now, HB, STALL)
    assert (v.action, v.reason) == (action, reason)


def test_the_stall_clock_restarts_after_a_store_wait():
    slot = Slot(0.0, {0: 5}, 0.0)
    assert judge(Observation(True, state="running", positions={0: 5}, lag=9, store_wait=SINK_WAIT), slot, 100.0, HB, STALL).action \
        is Action.BACKPRESSURE
    # the sink is back; the worker has 30 s from the end of the wait to move its offsets
    assert judge(Observation(True, state="running", positions={0: 5}, lag=9), slot, 120.0, HB, STALL).action is Action.NONE
    assert judge(Observation(True, state="running", positions={0: 5}, lag=9), slot, 131.0, HB, STALL).action is Action.RESTART
    assert judge(Observation(True, state="running", positions={0: 6}, lag=9), Slot(0.0, {0: 5}, 0.0), 500.0, HB, STALL).action \
        is Action.NONE  # progress resets it
