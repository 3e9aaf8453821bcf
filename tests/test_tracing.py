"""OpenTelemetry traces of runs, exported by a real gunicorn to a real OTLP/HTTP receiver.

The receiver is a small HTTP server on loopback, started by the test, that decodes each
export with opentelemetry-proto as a collector would. A run gets a span that continues the
request's traceparent, with a child span per model call and per tool call, in the GenAI
semantic conventions; a malformed traceparent is ignored; without OTEL_* variables runs are
not traced.
"""

from __future__ import annotations

import secrets
import time

import gevent
import pytest
import requests
from gevent.pywsgi import WSGIServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent_runs.runtime.observe import Observers
from agent_runs.tracing import Tracing

from .server import GunicornServer
from .sse import parse_stream


def attribute_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [attribute_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.requests = 0
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None)

    def app(self, environ, start_response):
        if environ["PATH_INFO"] != "/v1/traces" or environ["REQUEST_METHOD"] != "POST":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        body = environ["wsgi.input"].read()
        assert environ.get("CONTENT_TYPE") == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            resource = {
                kv.key: attribute_value(kv.value) for kv in resource_spans.resource.attributes
            }
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "status": span.status.code,
                            "attributes": {
                                kv.key: attribute_value(kv.value) for kv in span.attributes
                            },
                            "resource": resource,
                            "scope": scope_spans.scope.name,
                        }
                    )
        payload = ExportTraceServiceResponse().SerializeToString()
        start_response("200 OK", [("Content-Type", "application/x-protobuf")])
        return [payload]

    def __enter__(self) -> Receiver:
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop(timeout=1)

    def spans_of_run(self, run_id: str, count: int, timeout: float = 20) -> list[dict]:
        """Wait for the run's span and ``count`` spans in its trace; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = [s for s in self.spans if s["attributes"].get("agent_runs.run.id") == run_id]
            if runs:
                trace = [s for s in self.spans if s["trace_id"] == runs[0]["trace_id"]]
                if len(trace) >= count:
                    return trace
            gevent.sleep(0.05)
        raise AssertionError(f"no {count} spans of run {run_id} arrived: {self.spans}")


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    with Receiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "agent-runs-under-test",
            # Export within a tenth of a second instead of five.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with GunicornServer(tmp_path_factory.mktemp("traced"), env=env) as server:
            yield server, receiver


def stream(server, headers=None, message="What is the current NVDA stock price?"):
    response = requests.post(
        f"{server.url}/api/agents/finance_agent/runs/stream",
        headers={**server.headers, **(headers or {})},
        json={"message": message},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    events = parse_stream(response.text)
    assert events[-1]["event"] == "STOP"
    return events


def run_id_of(events) -> tuple[str, str]:
    import json

    start = json.loads(events[0]["data"])
    return start["runId"], start["sessionId"]


def test_a_run_is_a_span_with_its_model_and_tool_calls_as_children(traced):
    server, receiver = traced
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    events = stream(server, {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    run_id, session_id = run_id_of(events)
    # The run, its two model calls (one asks for the tool, one answers) and the tool call.
    spans = receiver.spans_of_run(run_id, 4)
    (run,) = [s for s in spans if s["attributes"].get("agent_runs.run.id") == run_id]
    assert run["name"] == "invoke_agent Finance assistant"
    assert run["trace_id"] == trace_id and run["parent_span_id"] == parent_id
    assert run["kind"] == Span.SPAN_KIND_INTERNAL
    attributes = run["attributes"]
    assert attributes["gen_ai.operation.name"] == "invoke_agent"
    assert attributes["gen_ai.agent.id"] == "finance_agent"
    assert attributes["gen_ai.conversation.id"] == session_id
    assert attributes["agent_runs.session.id"] == session_id
    assert attributes["agent_runs.org.id"] == "acme"
    assert attributes["agent_runs.run.status"] == "COMPLETED"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert run["resource"]["service.name"] == "agent-runs-under-test"

    children = [s for s in spans if s["parent_span_id"] == run["span_id"]]
    chats = [s for s in children if s["attributes"]["gen_ai.operation.name"] == "chat"]
    tools = [s for s in children if s["attributes"]["gen_ai.operation.name"] == "execute_tool"]
    assert len(chats) == 2 and len(tools) == 1, children
    for chat in chats:
        assert chat["name"] == "chat scripted" and chat["kind"] == Span.SPAN_KIND_CLIENT
        assert chat["attributes"]["gen_ai.request.model"] == "scripted"
        assert chat["attributes"]["gen_ai.provider.name"] == "scripted"
        assert chat["attributes"]["gen_ai.usage.input_tokens"] > 0
        assert chat["attributes"]["gen_ai.usage.output_tokens"] > 0
    reasons = sorted(c["attributes"]["gen_ai.response.finish_reasons"][0] for c in chats)
    assert reasons == ["stop", "tool_calls"]
    (tool,) = tools
    assert tool["name"] == "execute_tool get_stock_price"
    assert tool["attributes"]["gen_ai.tool.name"] == "get_stock_price"
    assert tool["attributes"]["gen_ai.tool.call.id"] == "call_1"
    assert tool["status"] != 2  # STATUS_CODE_ERROR
    # Usage of the run adds up its model calls'.
    assert attributes["gen_ai.usage.output_tokens"] == sum(
        c["attributes"]["gen_ai.usage.output_tokens"] for c in chats
    )


@pytest.mark.parametrize(
    "traceparent",
    ["00-zzzz-1", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "banana", "00-" + "a" * 500],
)
def test_a_malformed_traceparent_is_ignored(traced, traceparent):
    server, receiver = traced
    events = stream(server, {"traceparent": traceparent})
    run_id, _ = run_id_of(events)
    spans = receiver.spans_of_run(run_id, 4)
    (run,) = [s for s in spans if s["attributes"].get("agent_runs.run.id") == run_id]
    # A trace of its own, with no parent.
    assert run["parent_span_id"] == ""
    assert run["trace_id"] != "0" * 32


def test_runs_are_not_traced_without_otel_variables(app):
    observer = app.extensions["agent_runs"].executor.observer
    assert isinstance(observer, Observers)
    assert not any(isinstance(o, Tracing) for o in observer.observers)
