"""Prometheus metrics of runs, streams and requests, served by GET {prefix}/metrics.

The metrics are prometheus-client's, in its default registry, so a host application that
exposes that registry shows them too. Under gunicorn, several workers count at once: with
``PROMETHEUS_MULTIPROC_DIR`` set (``gunicorn.conf.py`` sets it up), prometheus-client writes
each worker's values to files of its own in that directory, and :func:`exposition` adds every
worker's up, so any worker answers the whole server's figures. Without it (an application
embedding the blueprint under a server of its own) the registry of the one process is served.

What runs cost matters more than anything here: a run's events are counted once per batch the
event log commits, never one by one, and every other figure changes once per run, model call,
tool call, stream or request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from .runtime.observe import CallWatch, RunInfo, RunObserver, RunWatch

RUNS = Counter(
    "agent_runs_runs",
    "Runs that ended, or paused for approval, by agent and status.",
    ["agent", "status"],
)
# Gauges add up the workers that are alive (gunicorn.conf.py forgets a dead worker's).
ACTIVE_RUNS = Gauge("agent_runs_active_runs", "Runs executing now.", multiprocess_mode="livesum")
ACTIVE_STREAMS = Gauge(
    "agent_runs_active_streams",
    "Clients following a run's events now (runs/stream and /events).",
    multiprocess_mode="livesum",
)
EVENTS = Counter("agent_runs_events", "Run events written to the event log, by type.", ["type"])
TIME_TO_FIRST_EVENT = Histogram(
    "agent_runs_time_to_first_event_seconds",
    "Seconds from a run's start to its first event after START: the model's first output "
    "or tool call.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RUN_DURATION = Histogram(
    "agent_runs_run_duration_seconds",
    "Seconds a run executed, from its start to its end (or pause), by agent.",
    ["agent"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
MODEL_TOKENS = Counter(
    "agent_runs_model_tokens",
    "Tokens the models reported, by model and direction (input, output).",
    ["model", "direction"],
)
TOOL_CALLS = Counter(
    "agent_runs_tool_calls",
    "Tool calls, by tool and outcome (ok, error, timeout, rejected, cancelled).",
    ["tool", "outcome"],
)
HTTP_REQUESTS = Counter(
    "agent_runs_http_requests",
    "Requests the API answered, by endpoint and status code.",
    ["endpoint", "status"],
)

# A tool the agent does not have is counted under this name: the model picks the names.
UNKNOWN_TOOL = "(unknown)"

_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """Return the metric's child for the labels, looked up once (labels() takes a lock and
    checks every value)."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


class Metrics(RunObserver):
    """Counts what every run of this worker does."""

    counts_events = True

    def run_started(self, run: RunInfo) -> RunWatch:
        ACTIVE_RUNS.inc()
        if not run.resumed:
            _child(EVENTS, "START").inc()  # written with the run, not by the event log
        return _MeteredRun(run)

    def run_closed(
        self, run_id: str, agent_id: str, status: str, last_event: str, reason: str
    ) -> None:
        _child(RUNS, agent_id, status).inc()
        _child(EVENTS, last_event).inc()

    def events_written(self, counts: Mapping[str, int]) -> None:
        for type, count in counts.items():
            _child(EVENTS, type).inc(count)

    def stream_opened(self) -> None:
        ACTIVE_STREAMS.inc()

    def stream_closed(self) -> None:
        ACTIVE_STREAMS.dec()

    def count_request(self, endpoint: str, status: int) -> None:
        """Count a request the API answered."""
        _child(HTTP_REQUESTS, endpoint, str(status)).inc()


class _MeteredRun(RunWatch):
    __slots__ = ("agent_id", "model_id", "started")

    def __init__(self, run: RunInfo) -> None:
        self.agent_id = run.agent_id
        self.model_id = run.model_id
        self.started = time.monotonic()

    def first_event(self) -> None:
        TIME_TO_FIRST_EVENT.observe(time.monotonic() - self.started)

    def model_call(
        self, purpose: str, temperature: float | None, max_tokens: int | None
    ) -> CallWatch:
        return _MeteredModelCall(self.model_id)

    def tool_call(self, call_id: str, name: str, known: bool) -> CallWatch:
        return _MeteredToolCall(name if known else UNKNOWN_TOOL)

    def ended(self, status: str, usage: Mapping[str, int], *args: Any, **kwargs: Any) -> None:
        ACTIVE_RUNS.dec()
        _child(RUNS, self.agent_id, status).inc()
        _child(RUN_DURATION, self.agent_id).observe(time.monotonic() - self.started)


class _MeteredModelCall(CallWatch):
    __slots__ = ("model_id",)

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def ended(self, *, input_tokens: int = 0, output_tokens: int = 0, **kwargs: Any) -> None:
        if input_tokens:
            _child(MODEL_TOKENS, self.model_id, "input").inc(input_tokens)
        if output_tokens:
            _child(MODEL_TOKENS, self.model_id, "output").inc(output_tokens)


class _MeteredToolCall(CallWatch):
    __slots__ = ("tool",)

    def __init__(self, tool: str) -> None:
        self.tool = tool

    def ended(self, *, outcome: str = "ok", **kwargs: Any) -> None:
        _child(TOOL_CALLS, self.tool, outcome).inc()


def exposition(accept: str | None) -> tuple[bytes, str]:
    """Return every worker's metrics in the format ``accept`` asks for, and its media type."""
    registry = REGISTRY
    if values.ValueClass._multiprocess:
        # A registry of its own per scrape, as prometheus-client asks: the collector reads
        # the files of every worker, this one's included.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
