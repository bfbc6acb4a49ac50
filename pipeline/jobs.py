"""Ray Jobs: submit a pipeline to a running cluster, list, follow and stop its jobs.

Through Ray's ``JobSubmissionClient`` (the dashboard's HTTP API, port 8265). The spec travels in the job's
``runtime_env`` (``RAYSTREAM_SPEC_JSON``: the spec's plain data with ``${VAR}`` expanded where it was
submitted, so the cluster runs what was validated here); the entrypoint is ``raystream run`` against the
cluster the job runs in. On a cluster with token authentication the token is sent as a bearer header: given
explicitly, or ``$RAY_AUTH_TOKEN``, or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.spec import expand_spec, parse_spec

__all__ = ["Job", "auth_token", "client", "list_jobs", "submit"]

SPEC_ENV = "RAYSTREAM_SPEC_JSON"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_token(token: str | None = None) -> str | None:
    """The token for a cluster with token authentication: ``token``, ``$RAY_AUTH_TOKEN``, or ``~/.ray/auth_token``."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def client(address: str, token: str | None = None):
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (``http://HEAD:8265``)."""
    from ray.job_submission import JobSubmissionClient

    tok = auth_token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    return JobSubmissionClient(address, headers=headers)


@dataclass
class Job:
    """A submitted pipeline job."""

    id: str
    address: str
    token: str | None = None

    def _client(self):
        return client(self.address, self.token)

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self._client().get_job_status(self.id).value)

    def info(self) -> dict:
        i = self._client().get_job_info(self.id)
        return {"id": self.id, "status": str(i.status.value), "message": i.message, "entrypoint": i.entrypoint,
                "start_time": i.start_time, "end_time": i.end_time, "metadata": i.metadata or {}}

    def logs(self) -> str:
        """Everything the job's driver printed so far."""
        return self._client().get_job_logs(self.id)

    def follow(self, poll_s: float = 1.0) -> Iterator[str]:
        """The job's log as it grows, until the job ends."""
        seen = 0
        while True:
            done = self.status() in TERMINAL
            text = self.logs()
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if done:
                return
            time.sleep(poll_s)

    def wait(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
        """Wait until the job ends (or ``timeout_s``); returns its status."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if st in TERMINAL or time.monotonic() > deadline:
                return st
            time.sleep(poll_s)

    def stop(self) -> bool:
        """Ask the job to stop (SIGTERM to its driver: a clean stop of the pipeline, as Ctrl-C)."""
        return bool(self._client().stop_job(self.id))


def submit(data: dict[str, Any], address: str, until_end: bool = False, token: str | None = None,
           python: str = "python", job_id: str | None = None, env: dict[str, str] | None = None,
           extra_args: list[str] = (), expand: bool = True, stop_wait_s: int = 120) -> Job:
    """Submit the spec ``data`` (plain data, as YAML gives it) as a Ray job on the cluster at ``address``.

    ``python``: the cluster's Python with raystream installed (the image's). ``env``: more environment variables
    for the job's driver. The spec is validated here first (a SpecError names each bad field). With ``expand``
    (the default) ``${VAR}`` is replaced here; whoever may read the cluster's jobs can then read the values, so
    with ``expand=False`` they stay as written and the job's environment (the nodes', or ``env``) supplies them.
    ``stop_wait_s``: how long a stopped job's driver gets for its clean stop (windows written, a final
    checkpoint) before Ray kills it (Ray's default is 3 s)."""
    from pipeline.spec import SpecError

    if expand:
        sent = expand_spec(data)
        spec = parse_spec(sent, env={})
    else:
        sent = data
        try:
            spec = parse_spec(data, env={**os.environ, **(env or {})})
        except SpecError as exc:  # a variable only the cluster has is fine; anything else is not
            if not all("environment variable" in p for p in exc.problems):
                raise
            spec = None
    args = [python, "-m", "pipeline.cli", "run", f"env:{SPEC_ENV}", "--address", "auto", "--quiet", *extra_args]
    if until_end:
        args.append("--until-end")
    c = client(address, token)
    jid = c.submit_job(entrypoint=" ".join(shlex.quote(a) for a in args),
                       submission_id=job_id,
                       # a job's log is a file: plain text, whatever the submitting shell forces (FORCE_COLOR)
                       runtime_env={"env_vars": {SPEC_ENV: json.dumps(sent), "TTY_COMPATIBLE": "0", "NO_COLOR": "1",
                                                 # read by the job's supervisor: SIGTERM, then this long before SIGKILL
                                                 "RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_wait_s)),
                                                 **(env or {})}},
                       metadata={"raystream": "1", "pipeline": spec.name if spec is not None else str(data.get("name", ""))})
    return Job(jid, address, token)


def list_jobs(address: str, token: str | None = None, every: bool = False) -> list[dict]:
    """Jobs of the cluster (raystream's only, unless ``every``), newest first."""
    out = []
    for j in client(address, token).list_jobs():
        meta = j.metadata or {}
        if not every and meta.get("raystream") != "1":
            continue
        out.append({"id": j.submission_id or j.job_id, "pipeline": meta.get("pipeline", ""), "status": str(j.status.value),
                    "start_time": j.start_time, "end_time": j.end_time, "message": j.message or ""})
    return sorted(out, key=lambda r: r["start_time"] or 0, reverse=True)
