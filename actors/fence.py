"""The epoch fence shared by workers and merge owners: before writing, confirm with the coordinator that
this actor's epoch is still the current one.

Asked at most once a second (``FENCE_VALID_S``); while the coordinator is restarting the question is retried
(0.1 s doubling to 2 s apart, without limit): an actor never writes unconfirmed. One that is stopping gives
up instead and writes nothing.
"""

from __future__ import annotations

import time
from typing import Callable

import ray

from actors.runtime import NAMESPACE, actor_name
from pipeline.retry import RetryPolicy, call_with_retries

__all__ = ["FENCE_VALID_S", "EpochFence"]

FENCE_VALID_S = 1.0
_POLICY = RetryPolicy(attempts=None, backoff_s=0.1, max_backoff_s=2.0, max_total_s=None)


class _Stopping(BaseException):
    """Stopping while the coordinator does not answer: write nothing (a BaseException, so the retry policy,
    which retries every Exception, lets it through)."""


class EpochFence:
    """``confirm(epoch)``: whether ``coordinator.<method>(*args)`` still returns ``epoch``."""

    def __init__(self, pipeline: str, method: str, *args):
        self.pipeline, self.method, self.args = pipeline, method, args
        self._coordinator = None
        self._ok_at = -1e9

    def confirm(self, epoch: int, stopping: Callable[[], bool] = lambda: False) -> bool:
        began = time.monotonic()
        if began - self._ok_at < FENCE_VALID_S:
            return True

        def ask() -> int:
            try:
                if self._coordinator is None:
                    self._coordinator = ray.get_actor(actor_name(self.pipeline, "coordinator"), namespace=NAMESPACE)
                return ray.get(getattr(self._coordinator, self.method).remote(*self.args), timeout=10)
            except Exception:
                self._coordinator = None  # restarting: look it up again next time
                if stopping():
                    raise _Stopping() from None  # stopping and unconfirmed: write nothing
                raise

        try:
            current = call_with_retries(ask, _POLICY, f"{self.method} check")
        except _Stopping:
            return False
        ok = current == epoch
        if ok:
            self._ok_at = began
        return ok
