"""Starting runs (synchronous and streamed) and reading their status."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import Response, current_app, g, request

from ..errors import ApiError
from ..runtime.runs import get_agent, get_run, get_runs, start_run
from ..schemas import AgentRunSchema, BatchStatusQuerySchema, RunRequestSchema, RunResponseSchema
from . import bp

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state() -> Any:
    return current_app.extensions["agent_runs"]


def _json_body() -> dict[str, Any]:
    """Return the request's JSON object, or raise the 4xx that says what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "Send the request body as JSON with Content-Type: application/json.")
    body = request.get_json(silent=True)
    if request.content_length is None:
        # A chunked body is cut at the size limit rather than refused; reading one byte past
        # the limit raises the 413 it deserves.
        request.stream.read(1)
    if body is None:
        raise ApiError(400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        raise ApiError(
            422,
            "The request body must be a JSON object.",
            errors={"_schema": ["Must be a JSON object."]},
        )
    return body


def _start(agent_id: str):
    state = _state()
    agent = get_agent(state.registry, agent_id)
    body = RunRequestSchema(
        max_message_length=state.config["AGENT_RUNS_MAX_MESSAGE_LENGTH"],
        max_media=state.config["AGENT_RUNS_MAX_MEDIA"],
    ).load(_json_body())
    return start_run(state.executor, agent, g.principal, body, default_model=state.default_model)


def event_stream(frames: Iterable[bytes]) -> Response:
    """Return a text/event-stream response that sends each frame as soon as it is produced."""
    return Response(
        frames, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True
    )


@bp.post("/agents/<agent_id>/runs")
def create_run(agent_id: str) -> Any:
    """Run the agent and answer when the run has finished."""
    started = _start(agent_id)
    started.greenlet.join()
    run = get_run(g.principal, agent_id, started.run.id)
    return RunResponseSchema().dump(run)


@bp.post("/agents/<agent_id>/runs/stream")
def stream_run(agent_id: str) -> Response:
    """Run the agent and stream its events as they happen."""
    started = _start(agent_id)
    return event_stream(_state().executor.follow(started.channel))


@bp.get("/agents/<agent_id>/runs/status")
def batch_status(agent_id: str) -> Any:
    state = _state()
    get_agent(state.registry, agent_id)
    query = BatchStatusQuerySchema(max_ids=state.config["AGENT_RUNS_MAX_BATCH_IDS"]).load(
        request.args.to_dict()
    )
    runs = get_runs(g.principal, agent_id, query["run_ids"])
    return AgentRunSchema(many=True).dump(runs)


@bp.get("/agents/<agent_id>/runs/<run_id>/status")
def run_status(agent_id: str, run_id: str) -> Any:
    get_agent(_state().registry, agent_id)
    return AgentRunSchema().dump(get_run(g.principal, agent_id, run_id))
