"""Starting, following, cancelling and continuing runs, and reading their status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, g, jsonify, request, url_for
from werkzeug.exceptions import BadRequest

from ..auth import issue_stream_token
from ..errors import ApiError
from ..runtime.executor import Executor
from ..runtime.idempotency import IdempotentRequest, KeyInvalid, parse_key
from ..runtime.runs import (
    StartedRun,
    cancel_run,
    check_agent,
    continue_run,
    get_agent,
    get_run,
    get_status,
    get_statuses,
    list_runs,
    start_run,
)
from ..schemas import (
    MAX_EVENT_ID,
    ContinueRequestSchema,
    EventsQuerySchema,
    QueuedRunSchema,
    RunListQuerySchema,
    RunPageSchema,
    RunResponseSchema,
    StreamTokenSchema,
    run_status_views,
)
from . import bp

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Set on the answer to a retry that an Idempotency-Key matched to an earlier run.
REPLAYED_HEADER = "Idempotent-Replayed"


def _state() -> Any:
    return current_app.extensions["agent_runs"]


def _json_body() -> dict[str, Any]:
    """Return the request's JSON object, or raise the 4xx that says what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "Send the request body as JSON with Content-Type: application/json.")
    try:
        body = request.get_json()
    except BadRequest:
        raise ApiError(400, "The request body is not valid JSON.") from None
    except RecursionError:
        # json.loads recurses once per nesting level: "[[[[..." exhausts the stack.
        raise ApiError(400, "The request body is not valid JSON: nested too deeply.") from None
    if request.content_length is None:
        # A chunked body is cut at the size limit rather than refused; reading one byte past
        # the limit raises the 413 it deserves.
        request.stream.read(1)
    if not isinstance(body, dict):
        raise ApiError(
            422,
            "The request body must be a JSON object.",
            errors={"_schema": ["Must be a JSON object."]},
        )
    return body


def _idempotency(body: dict[str, Any]) -> IdempotentRequest | None:
    """Return the request's Idempotency-Key with what it asked, or None if it sent none."""
    header = request.headers.get("Idempotency-Key")
    if header is None:
        return None
    try:
        key = parse_key(header)
    except KeyInvalid as error:
        raise ApiError(
            422, f"Idempotency-Key: {error}", errors={"Idempotency-Key": [str(error)]}
        ) from None
    return IdempotentRequest(key, request.endpoint or "", body)


def _start(agent_id: str, *, background: bool = False) -> tuple[StartedRun, dict[str, Any]]:
    state = _state()
    agent = get_agent(state.agents, g.principal.org_id, agent_id)
    body = state.run_request_schema.load(_json_body())
    started = start_run(
        state.executor,
        agent,
        g.principal,
        body,
        default_model=state.default_model,
        embedded_models=state.agents.embedded_models,
        background=background,
        max_active_runs=state.config["AGENT_RUNS_MAX_ACTIVE_RUNS_PER_ORG"],
        idempotency=_idempotency(body),
        idempotency_ttl=state.config["AGENT_RUNS_IDEMPOTENCY_TTL"],
        trace_context=_trace_context(),
    )
    return started, body


def _replayed(response: Response, started: StartedRun) -> Response:
    if started.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


def _trace_context() -> dict[str, str] | None:
    """The request's W3C trace context headers, for the run's trace; None without one."""
    traceparent = request.headers.get("traceparent")
    if not traceparent:
        return None
    context = {"traceparent": traceparent}
    tracestate = request.headers.get("tracestate")
    if tracestate:
        context["tracestate"] = tracestate
    return context


def event_stream(frames: Iterator[bytes]) -> Response:
    """Return a text/event-stream response that sends each frame as soon as it is produced."""
    return Response(
        frames, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True
    )


def _follow_or_cancel(executor: Executor, run_id: str) -> Iterator[bytes]:
    """Follow a run; if the client leaves before the end, cancel the run."""
    finished = False
    try:
        yield from executor.follow(run_id)
        finished = True
    finally:
        if not finished:
            executor.cancel(run_id)


def _run_response(agent_id: str, run_id: str) -> Any:
    """Wait for the run to stop, then answer its RunResponse."""
    # The request gives its database connection back while it waits: a run may take minutes.
    g.agent_runs_db.__exit__(None, None, None)
    try:
        _state().executor.wait(run_id)
    finally:
        g.agent_runs_db.__enter__()
    return RunResponseSchema().dump(get_run(g.principal, agent_id, run_id))


@bp.post("/agents/<agent_id>/runs")
def create_run(agent_id: str) -> Any:
    """Run the agent and answer when the run has finished (or paused for approval)."""
    started, _ = _start(agent_id)
    return _replayed(jsonify(_run_response(agent_id, started.run_id)), started)


@bp.post("/agents/<agent_id>/runs/stream")
def stream_run(agent_id: str) -> Response:
    """Run the agent and stream its events as they happen (a retry: the same run's events)."""
    started, body = _start(agent_id)
    executor = _state().executor
    if (body.get("options") or {}).get("on_disconnect") == "cancel":
        frames = _follow_or_cancel(executor, started.run_id)
    else:
        frames = executor.follow(started.run_id)
    return _replayed(event_stream(frames), started)


@bp.post("/agents/<agent_id>/runs/background")
def queue_run(agent_id: str) -> Any:
    """Queue a run and answer at once; follow it on /events or /status."""
    started, _ = _start(agent_id, background=True)
    run = get_run(g.principal, agent_id, started.run_id)
    response = jsonify(QueuedRunSchema().dump(run))
    response.status_code = 202
    return _replayed(response, started)


@bp.get("/agents/<agent_id>/runs/<run_id>/events")
def run_events(agent_id: str, run_id: str) -> Response:
    """Stream a run's events: those after Last-Event-ID (or ?after=N), then live ones."""
    check_agent(_state().agents, g.principal.org_id, agent_id)
    # access_token (a stream token) was taken by the authentication.
    query = EventsQuerySchema().load(
        {k: v for k, v in request.args.to_dict().items() if k != "access_token"}
    )
    header = request.headers.get("Last-Event-ID", "").strip()
    # ASCII digits only (str.isdigit() accepts "²", which int() refuses), and an id the
    # event log can hold (int() refuses thousands of digits, too).
    valid = header.isascii() and header.isdigit() and len(header) <= len(str(MAX_EVENT_ID))
    if header and not (valid and int(header) <= MAX_EVENT_ID):
        raise ApiError(
            422,
            "Last-Event-ID must be the id of an event this stream sent (an integer).",
            errors={"Last-Event-ID": ["Must be a non-negative integer."]},
        )
    # With both, the later: an EventSource opened on ?after=N sends Last-Event-ID when it
    # reconnects, and the URL it reconnects to still says N.
    after = max(query.get("after") or 0, int(header) if header else 0)
    run = get_run(g.principal, agent_id, run_id)
    return event_stream(_state().executor.follow(run.id, after))


@bp.post("/agents/<agent_id>/runs/<run_id>/events/token")
def run_events_token(agent_id: str, run_id: str) -> Any:
    """Issue a short-lived, read-only token for one run's events, for a URL's access_token."""
    state = _state()
    check_agent(state.agents, g.principal.org_id, agent_id)
    run = get_run(g.principal, agent_id, run_id)
    token, expires_at = issue_stream_token(
        g.principal, run.id, state.stream_token_key(), state.config["AGENT_RUNS_STREAM_TOKEN_TTL"]
    )
    url = url_for("agent_runs.run_events", agent_id=agent_id, run_id=run.id, access_token=token)
    return StreamTokenSchema().dump({"token": token, "expires_at": expires_at, "url": url})


@bp.delete("/agents/<agent_id>/runs/<run_id>")
def cancel(agent_id: str, run_id: str) -> Any:
    """Cancel a run: 202 while it stops, 204 if it had already finished."""
    check_agent(_state().agents, g.principal.org_id, agent_id)
    stopping = cancel_run(_state().executor, g.principal, agent_id, run_id)
    return ("", 202) if stopping else ("", 204)


@bp.post("/agents/<agent_id>/runs/<run_id>/continue")
def continue_paused(agent_id: str, run_id: str) -> Any:
    """Approve or reject a PAUSED run's tool call; answer when the run next stops."""
    state = _state()
    body = ContinueRequestSchema().load(_json_body())
    active = continue_run(
        state.executor,
        state.agents,
        agent_id,
        g.principal,
        run_id,
        body["action"],
        default_model=state.default_model,
        mcp_headers=body["options"].get("mcp_headers"),
        trace_context=_trace_context(),
    )
    return _run_response(agent_id, active.job.run_id)


@bp.get("/agents/<agent_id>/runs/status")
def batch_status(agent_id: str) -> Any:
    state = _state()
    check_agent(state.agents, g.principal.org_id, agent_id)
    query = state.batch_status_query_schema.load(request.args.to_dict())
    return run_status_views(get_statuses(g.principal, agent_id, query["run_ids"]))


@bp.get("/agents/<agent_id>/runs/<run_id>/status")
def run_status(agent_id: str, run_id: str) -> Any:
    check_agent(_state().agents, g.principal.org_id, agent_id)
    return run_status_views([get_status(g.principal, agent_id, run_id)])[0]


@bp.get("/runs")
def runs() -> Any:
    """List the caller's runs of every agent, newest first, a page at a time."""
    query = RunListQuerySchema().load(request.args.to_dict())
    page = list_runs(
        g.principal,
        agent_id=query.get("agent_id"),
        statuses=query.get("status") or (),
        session_id=query.get("session_id"),
        since=query.get("since"),
        limit=query["limit"],
        after=query.get("cursor"),
    )
    return RunPageSchema().dump(page)
