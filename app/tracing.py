"""OpenTelemetry traces of runs: a span per run, a child span per model call and tool call.

Needs the ``otel`` extra (opentelemetry-sdk and the OTLP/HTTP exporter) and is configured by
the standard ``OTEL_*`` variables: traces are exported once ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and the SDK reads the rest itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_BSP_*`` ...). An application embedding the blueprint that installed a tracer
provider of its own gets its spans there.

Spans follow OpenTelemetry's GenAI semantic conventions: ``invoke_agent {agent}`` for the run,
``chat {model}`` for each model call (with ``gen_ai.usage.input_tokens`` and
``gen_ai.usage.output_tokens``), ``execute_tool {tool}`` for each tool call; the run, session
and organisation ids ride along as ``agent_runs.*`` attributes. The run's span continues the
trace of the request that started it (its ``traceparent`` header; a malformed one is
ignored). A run executes in a greenlet of its own, which does not share the request's
context, so the request's trace context travels to it as a plain value in the run's job, and
every span names its parent explicitly. While a model or tool call is in progress its span is
also the greenlet's current one, so spans a model's SDK opens itself nest under it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .models import RunStatus
from .runtime.observe import CallWatch, RunInfo, RunObserver, RunWatch

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer(export: bool) -> trace.Tracer | None:
    """Return the tracer of runs, or None if runs are not traced.

    ``export``: the environment asks for an OTLP export (see config.otel_traces_requested);
    then a tracer provider exporting over OTLP/HTTP is installed, unless the process has one.
    """
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # nobody installed one
        if not export:
            return None
        provider = _exporting_provider()
        trace.set_tracer_provider(provider)
    return provider.get_tracer("agent_runs", __version__)


def _exporting_provider() -> trace.TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; without them the service is ours.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "agent-runs"}))
    provider = TracerProvider(resource=resource)
    # The batch processor exports from a thread of its own (a greenlet, under gevent's
    # worker), so a run never waits for the collector.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing(RunObserver):
    """Traces every run of this worker."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def run_started(self, run: RunInfo) -> RunWatch:
        parent = _PROPAGATOR.extract(dict(run.trace_context)) if run.trace_context else None
        span = self.tracer.start_span(
            f"invoke_agent {run.agent_name}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.id": run.agent_id,
                "gen_ai.agent.name": run.agent_name,
                "gen_ai.conversation.id": run.session_id,
                "gen_ai.provider.name": run.provider,
                "gen_ai.system": run.provider,
                "gen_ai.request.model": run.model,
                "agent_runs.run.id": run.run_id,
                "agent_runs.session.id": run.session_id,
                "agent_runs.org.id": run.org_id,
                "agent_runs.run.resumed": run.resumed,
            },
        )
        return _TracedRun(self.tracer, span, run)


class _TracedRun(RunWatch):
    def __init__(self, tracer: trace.Tracer, span: trace.Span, run: RunInfo) -> None:
        self.tracer = tracer
        self.span = span
        self.run = run
        self.context = trace.set_span_in_context(span)
        # The run's greenlet is the run's alone: its span stays current until the run ends.
        self.token = context.attach(self.context)

    def model_call(
        self, purpose: str, temperature: float | None, max_tokens: int | None
    ) -> CallWatch:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.run.provider,
            "gen_ai.system": self.run.provider,
            "gen_ai.request.model": self.run.model,
            "agent_runs.model_call.purpose": purpose,
        }
        if temperature is not None:
            attributes["gen_ai.request.temperature"] = temperature
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        span = self.tracer.start_span(
            f"chat {self.run.model}",
            context=self.context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        return _TracedCall(span)

    def tool_call(self, call_id: str, name: str, known: bool) -> CallWatch:
        span = self.tracer.start_span(
            f"execute_tool {name}",
            context=self.context,
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call_id,
                "gen_ai.tool.type": "function",
            },
        )
        return _TracedCall(span)

    def ended(
        self,
        status: str,
        usage: Mapping[str, int],
        error_type: str | None = None,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        span = self.span
        span.set_attribute("agent_runs.run.status", status)
        span.set_attribute("gen_ai.usage.input_tokens", usage.get("input_tokens", 0))
        span.set_attribute("gen_ai.usage.output_tokens", usage.get("output_tokens", 0))
        if status == RunStatus.FAILED:
            span.set_attribute("error.type", error_type or "error")
            if exception is not None:
                span.record_exception(exception)
            span.set_status(Status(StatusCode.ERROR, error))
        context.detach(self.token)
        span.end()


class _TracedCall(CallWatch):
    def __init__(self, span: trace.Span) -> None:
        self.span = span
        # Current while the call runs: spans a model's SDK or a tool opens nest under it.
        self.token = context.attach(trace.set_span_in_context(span))

    def ended(
        self,
        *,
        outcome: str = "ok",
        error: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        finish_reason: str | None = None,
    ) -> None:
        span = self.span
        if span.is_recording():
            attributes: dict[str, Any] = {"agent_runs.outcome": outcome}
            if input_tokens or output_tokens:
                attributes["gen_ai.usage.input_tokens"] = input_tokens
                attributes["gen_ai.usage.output_tokens"] = output_tokens
            if finish_reason:
                attributes["gen_ai.response.finish_reasons"] = [finish_reason]
            span.set_attributes(attributes)
            if outcome not in ("ok", "cancelled"):
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR, error))
        context.detach(self.token)
        span.end()
