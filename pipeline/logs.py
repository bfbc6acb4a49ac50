"""Structured logs: ``--log-format json`` writes one JSON object a line with the run's context.

Every record carries ``pipeline``, ``worker``, ``partition`` and ``tenant``
when the caller gave them (``extra=``), and the current OpenTelemetry
``trace_id``/``span_id`` when a span is active, so a log line can be joined to
its trace and its metrics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "configure_logging", "log_format"]

CONTEXT_FIELDS = ("pipeline", "worker", "partition", "tenant", "action", "epoch", "store")
ENV = "RAYSTREAM_LOG_FORMAT"  # read by actors, which inherit it from the process that started Ray
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def log_format() -> str:
    return os.environ.get(ENV, "text")


def _trace_ids() -> dict:
    try:
        from opentelemetry import trace
    except ImportError:  # tracing is optional
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        out.update(_trace_ids())
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None) is not None)
        return f"{line} [{ctx}]" if ctx else line


def configure_logging(fmt: str | None = None, level: int = logging.INFO, stream=None) -> None:
    """Send ``raystream.*`` loggers to ``stream`` (stderr) as ``json`` or ``text``; sets the env for actors."""
    fmt = fmt or log_format()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format {fmt!r} is not json or text")
    os.environ[ENV] = fmt
    logger = logging.getLogger("raystream")
    for h in list(logger.handlers):
        if getattr(h, "_raystream", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._raystream = True
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
