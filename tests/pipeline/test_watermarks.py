"""Watermarks: per-partition prefix, idle partitions, finished partitions, never backwards."""

from __future__ import annotations

import numpy as np

from pipeline.watermarks import NEG_INF, POS_INF, WatermarkTracker


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_prefix_watermark_is_per_partition_and_excludes_the_record_itself():
    tr = WatermarkTracker([0, 1], max_out_of_orderness=100, idle_timeout=5000, clock=Clock())
    wm = tr.prefix(np.array([0, 0, 1, 0]), np.array([1000, 500, 9000, 2000]), np.ones(4, bool))
    assert wm.tolist() == [NEG_INF, 900, NEG_INF, 900]
    assert tr.current() == 1900  # min(2000, 9000) - 100


def test_rejected_outlier_does_not_move_the_watermark():
    tr = WatermarkTracker([0], 0, 5000, clock=Clock())
    tr.prefix(np.array([0, 0]), np.array([1000, 10**15]), np.array([True, False]))
    assert tr.current() == 1000


def test_idle_partition_stops_holding_the_watermark_and_it_never_goes_back():
    clock = Clock()
    tr = WatermarkTracker([0, 1], 0, idle_timeout=5000, clock=clock)
    tr.prefix(np.array([0, 1]), np.array([10_000, 2_000]), np.ones(2, bool))
    assert tr.current() == 2_000
    clock.t = 3.0
    tr.prefix(np.array([0]), np.array([20_000]), np.ones(1, bool))
    assert tr.current() == 2_000  # partition 1 not idle yet (3 s < 5 s)
    clock.t = 6.0
    assert tr.current() == 2_000  # quiet, but nobody confirmed it has no backlog: still holding
    tr.caught_up(1)
    assert tr.current() == 20_000  # partition 1 idle: only partition 0 counts
    tr.prefix(np.array([1]), np.array([3_000]), np.ones(1, bool))
    assert tr.current() == 20_000  # partition 1 is back, but watermarks only move forward


def test_finished_partitions_and_end_of_input():
    tr = WatermarkTracker([0, 1], 0, 5000, clock=Clock())
    tr.prefix(np.array([0]), np.array([5_000]), np.ones(1, bool))
    assert tr.current() == NEG_INF  # partition 1 has shown nothing yet
    tr.finish(1)
    assert tr.current() == 5_000
    assert tr.advance_to_end() == POS_INF


def test_a_partition_waiting_behind_a_backlog_is_never_idle():
    # event time   0s        10s        20s
    # partition 0  ..........x (fast, 20 s ahead)
    # partition 1  x  ...waiting its turn for 60 s of wall time, with unread records
    clock = Clock()
    tr = WatermarkTracker([0, 1], 0, idle_timeout=5000, clock=clock)
    tr.prefix(np.array([0, 1]), np.array([20_000, 1_000]), np.ones(2, bool))
    clock.t = 60.0
    assert tr.quiet(1) and not tr.idle(1)
    assert tr.current() == 1_000
    assert tr.partition_watermarks()[1] == 1_000


def test_a_confirmation_older_than_the_last_record_does_not_count():
    clock = Clock()
    tr = WatermarkTracker([0, 1], 0, idle_timeout=5000, clock=clock)
    tr.caught_up(1, at=0.0)  # asked the broker at t=0
    clock.t = 1.0
    tr.prefix(np.array([0, 1]), np.array([20_000, 1_000]), np.ones(2, bool))  # then a record arrived
    clock.t = 10.0
    assert not tr.idle(1)
    tr.caught_up(1, at=9.0)
    assert tr.idle(1) and tr.current() == 20_000
