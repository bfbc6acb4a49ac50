"""RetryPolicy / call_with_retries: bounded by attempts or time, or unbounded (backpressure)."""

from __future__ import annotations

import pytest

from pipeline.retry import GaveUp, RetryPolicy, call_with_retries


class Fake:
    def __init__(self, fail_times: int):
        self.left = fail_times
        self.t = 0.0
        self.calls = 0

    def clock(self):
        return self.t

    def sleep(self, s):
        self.t += s

    def fn(self):
        self.calls += 1
        if self.left:
            self.left -= 1
            raise ConnectionError("store down")
        return "ok"


def test_unbounded_policy_waits_as_long_as_the_store_is_down():
    f = Fake(fail_times=500)  # ~500 retries at up to 10 s: over an hour of fake time
    seen = []
    out = call_with_retries(f.fn, RetryPolicy(attempts=None, max_total_s=None), "sink x", sleep=f.sleep, clock=f.clock,
                            on_retry=lambda a, e, since: seen.append((a, since)))
    assert out == "ok" and f.calls == 501 and f.t > 600
    assert [a for a, _ in seen] == list(range(1, 501)) and {s for _, s in seen} == {0.0}


@pytest.mark.parametrize("policy, calls", [
    (RetryPolicy(attempts=0, max_total_s=None), 1),
    (RetryPolicy(attempts=3, max_total_s=None), 4),
    (RetryPolicy(attempts=None, backoff_s=1.0, max_backoff_s=1.0, max_total_s=0.0), 1),
])
def test_bounded_policies_give_up_naming_what_and_why(policy, calls):
    f = Fake(fail_times=10**6)
    with pytest.raises(GaveUp, match=r"sink x: failed after \d+ attempts .*ConnectionError: store down") as exc:
        call_with_retries(f.fn, policy, "sink x", sleep=f.sleep, clock=f.clock)
    assert f.calls == calls and isinstance(exc.value.__cause__, ConnectionError)


def test_time_bound_counts_the_wait_before_the_next_attempt():
    f = Fake(fail_times=10**6)
    policy = RetryPolicy(attempts=None, backoff_s=1.0, max_backoff_s=1.0, max_total_s=30.0)
    with pytest.raises(GaveUp):
        call_with_retries(f.fn, policy, "x", sleep=f.sleep, clock=f.clock)
    assert f.t <= 30.0


def test_delays_are_full_jitter_of_a_doubling_capped_backoff():
    p = RetryPolicy(backoff_s=0.2, max_backoff_s=10.0)
    assert [p.delay(a, rng=lambda lo, hi: hi) for a in (1, 2, 3, 8, 60)] == [0.2, 0.4, 0.8, 10.0, 10.0]
    assert p.delay(3, rng=lambda lo, hi: lo) == 0.0
