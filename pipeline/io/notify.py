"""Recovery notifications to a Slack-compatible webhook, sent off the caller's thread."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request

__all__ = ["Notifier", "recovery_message"]


def recovery_message(pipeline: str, action: str, reason: str, when: float | None = None) -> dict:
    """The JSON body: Slack's ``text`` plus the same facts as fields for machines."""
    when = time.time() if when is None else when
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return {"text": f"raystream · {pipeline}: {action} — {reason} ({stamp})",
            "raystream": {"pipeline": pipeline, "action": action, "reason": reason, "time": when}}


class Notifier:
    """Posts messages in order from one daemon thread; a slow or dead receiver never blocks the caller.

    At most ``max_queue`` messages wait; beyond that the oldest are dropped and counted (``dropped``),
    each post is tried ``attempts`` times with ``timeout_s`` each.
    """

    def __init__(self, url: str, timeout_s: float = 5.0, attempts: int = 3, max_queue: int = 1000):
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        threading.Thread(target=self._run, name="notifier", daemon=True).start()

    def send(self, body: dict) -> None:
        while True:
            try:
                self._q.put_nowait(body)
                return
            except queue.Full:
                try:
                    self._q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while True:
            body = self._q.get()
            data = json.dumps(body).encode()
            for attempt in range(self.attempts):
                try:
                    req = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                        resp.read()
                    self.sent += 1
                    break
                except Exception:  # the receiver is down or slow: try again, then give this message up
                    time.sleep(min(2.0 ** attempt, 5.0))
            else:
                self.failed += 1
            self._q.task_done()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued message was posted or given up (True) or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._q.unfinished_tasks
