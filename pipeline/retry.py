"""One retry policy: exponential backoff with full jitter, bounded in attempts and/or time.

Sinks, dead letters and lookups retry through it instead of loops of their
own. ``attempts=None`` and ``max_total_s=None`` mean "until it works": the
caller waits, which is backpressure (a sink outage pauses consumption instead
of failing the worker). Pure: the clock, the sleep and the random source are
parameters.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

__all__ = ["RetryPolicy", "GaveUp", "call_with_retries"]

T = TypeVar("T")


class GaveUp(RuntimeError):
    """Every attempt the policy allows failed; ``__cause__`` is the last error."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    ``attempts``: retries after the first call (None: no limit);
    ``backoff_s``: first delay, doubled per retry, capped at ``max_backoff_s``,
    each delay drawn uniformly from [0, cap] (full jitter);
    ``max_total_s``: give up when the next delay would end past this many
    seconds since the first call (None: no limit).
    """

    attempts: int | None = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    max_total_s: float | None = 120.0

    def delay(self, attempt: int, rng: Callable[[float, float], float] = random.uniform) -> float:
        """Delay before retry number ``attempt`` (1 = the first retry)."""
        cap = min(self.max_backoff_s, self.backoff_s * (2 ** min(attempt - 1, 30)))
        return rng(0.0, cap)

    def exhausted(self, attempt: int, elapsed_s: float, next_delay_s: float) -> bool:
        """True when retry ``attempt`` may not be made (after ``elapsed_s`` and before a ``next_delay_s`` wait)."""
        if self.attempts is not None and attempt > self.attempts:
            return True
        return self.max_total_s is not None and elapsed_s + next_delay_s > self.max_total_s

    @property
    def unbounded(self) -> bool:
        return self.attempts is None and self.max_total_s is None


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    reset: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Call ``fn`` until it returns, retrying by ``policy``.

    Steps per failure: count the attempt; draw the delay; if the policy is
    exhausted raise ``GaveUp`` (naming ``what``, the attempts and the last
    error); else report it through ``on_retry(attempt, error, since)`` (since:
    the clock time of the first failure), wait, ``reset`` (e.g. reconnect) and
    call again.
    """
    t0 = clock()
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            return fn()
        except retry_on as exc:
            attempt += 1
            if first_failure is None:
                first_failure = clock()
            delay = policy.delay(attempt)
            if policy.exhausted(attempt, clock() - t0, delay):
                raise GaveUp(f"{what}: failed after {attempt} attempts in {clock() - t0:.1f}s: "
                             f"{type(exc).__name__}: {exc}") from exc
            if on_retry is not None:
                on_retry(attempt, exc, first_failure)
            sleep(delay)
            if reset is not None:
                try:
                    reset()
                except Exception:  # the next attempt reports the store's state
                    pass
