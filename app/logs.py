"""Log lines: plain text, or one JSON object a line (AGENT_RUNS_LOG_FORMAT=json).

A run logs its start and its end (status, duration, token counts) once each; a run that
failed logs that end as its one error, with the traceback of what broke it if something
unexpected did. Every line logged in a run's greenlet names the run (runId, sessionId, orgId,
agentId) and every line of a request names the caller's organisation: :class:`RunContextFilter`
adds them from a context variable. Neither messages, answers nor tokens are ever logged.

The standalone server (:func:`configure`) writes to stderr; under ``gunicorn.conf.py`` with
the JSON format, gunicorn's own lines are JSON too, in the same fields. An application that
embeds the blueprint keeps its own logging: add a :class:`RunContextFilter` to its handlers
(and :func:`json_formatter`, if it wants these lines as JSON).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from .models import RunStatus
from .runtime.observe import RunInfo, RunObserver, RunWatch

logger = logging.getLogger("agent_runs.runs")

FORMATS = ("text", "json")
# The ids a line may carry, in the order the text format prints them.
CONTEXT_KEYS = ("runId", "sessionId", "orgId", "agentId")

# The ids of the run (or the request) the current greenlet works for. A greenlet starts with
# an empty context, so a run's ids stay with its own greenlet.
LOG_CONTEXT: ContextVar[Mapping[str, str] | None] = ContextVar("agent_runs_log", default=None)

# What every JSON line holds besides its ids; gunicorn.conf.py names the same fields.
JSON_FIELDS: dict[str, Any] = {
    "fmt": "{levelname}{name}{message}",
    "style": "{",
    "rename_fields": {"levelname": "level", "name": "logger"},
    "timestamp": "time",
}


class RunContextFilter(logging.Filter):
    """Add the ids of the current run or request to each record (for a handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = LOG_CONTEXT.get()
        if context:
            for key, value in context.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """gunicorn's line format, the logger's name, then the ids the record carries."""

    def __init__(self) -> None:
        super().__init__(
            "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
            "%Y-%m-%d %H:%M:%S %z",
        )

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{key}={record.__dict__[key]}" for key in CONTEXT_KEYS if record.__dict__.get(key)]
        return f"{line} [{' '.join(ids)}]" if ids else line


def json_formatter() -> logging.Formatter:
    """Return the formatter of JSON lines: time, level, logger, message, and the ids."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(**JSON_FIELDS)


def configure(log_format: str, level: str) -> None:
    """Log to stderr in ``log_format`` from ``level`` on, unless logging is set up already.

    A process whose root logger has handlers (gunicorn's JSON configuration, a test runner)
    keeps them; each gets a :class:`RunContextFilter`.
    """
    log_format = log_format.strip().lower()
    if log_format not in FORMATS:
        raise ValueError(f"AGENT_RUNS_LOG_FORMAT must be text or json, not {log_format!r}")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter())
        root.addHandler(handler)
        root.setLevel(level.upper())
    for existing in root.handlers:
        if not any(isinstance(f, RunContextFilter) for f in existing.filters):
            existing.addFilter(RunContextFilter())


class RunLog(RunObserver):
    """Logs each run's start and end, once each."""

    def run_started(self, run: RunInfo) -> RunWatch:
        context = {
            "runId": run.run_id,
            "sessionId": run.session_id,
            "orgId": run.org_id,
            "agentId": run.agent_id,
        }
        # Called in the run's greenlet: whatever it logs from now on names the run.
        LOG_CONTEXT.set(context)
        logger.info(
            "run %s on %s",
            "resumed" if run.resumed else "started",
            run.model_id,
            extra={**context, "model": run.model_id},
        )
        return _LoggedRun(context)

    def run_closed(
        self, run_id: str, agent_id: str, status: str, last_event: str, reason: str
    ) -> None:
        context = {"runId": run_id, "agentId": agent_id, "status": status}
        if status == RunStatus.FAILED:
            logger.error("run failed: %s", reason, extra=context)
        else:
            logger.info("run %s: %s", status.lower(), reason, extra=context)


class _LoggedRun(RunWatch):
    __slots__ = ("context", "started")

    def __init__(self, context: dict[str, str]) -> None:
        self.context = context
        self.started = time.monotonic()

    def ended(
        self,
        status: str,
        usage: Mapping[str, int],
        error_type: str | None = None,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        seconds = time.monotonic() - self.started
        fields = {
            **self.context,
            "status": status,
            "durationMs": round(seconds * 1000),
            "inputTokens": usage.get("input_tokens", 0),
            "outputTokens": usage.get("output_tokens", 0),
        }
        if status == RunStatus.FAILED:
            logger.error(
                "run failed after %.2f s (%s): %s",
                seconds,
                error_type,
                error,
                extra={**fields, "errorType": error_type},
                exc_info=exception,
            )
            return
        logger.info(
            "run %s after %.2f s, %d input and %d output tokens",
            status.lower(),
            seconds,
            fields["inputTokens"],
            fields["outputTokens"],
            extra=fields,
        )
