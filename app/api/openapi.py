"""GET {prefix}/openapi.json: the OpenAPI 3.1 document of the API, generated from its schemas.

The document is built from the marshmallow schemas the views load and dump (apispec's
MarshmallowPlugin), with this application's limits and agents, once per application.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, current_app
from werkzeug.http import HTTP_STATUS_CODES

from .. import __version__
from ..errors import PROBLEM_MIMETYPE
from ..runtime.idempotency import MAX_KEY_LENGTH
from ..schemas import (
    AGENT_ID_PATTERN,
    ID_PATTERN,
    MAX_EVENT_ID,
    AgentDefinitionSchema,
    AgentDetailSchema,
    AgentRunSchema,
    AgentSchema,
    AgentStreamEventSchema,
    AgentVersionSchema,
    ContinueRequestSchema,
    EventsQuerySchema,
    NewWebhookSchema,
    ProblemSchema,
    QueuedRunSchema,
    RunListQuerySchema,
    RunPageSchema,
    RunRequestSchema,
    RunResponseSchema,
    SessionDetailSchema,
    SessionListQuerySchema,
    SessionPageSchema,
    SessionQuerySchema,
    SessionRunsPageSchema,
    SessionRunsQuerySchema,
    StreamTokenSchema,
    WebhookRequestSchema,
    WebhookSchema,
)
from . import bp

OPENAPI_VERSION = "3.1.0"
# What the health checks answer when all is well.
HEALTH = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
JSON = "application/json"
EVENT_STREAM = "text/event-stream"

# What each error status means, whatever the operation; operations list the ones they answer.
ERRORS = {
    400: "The body is not valid JSON, or the request sends two tokens.",
    401: "No bearer token, or one that is not valid.",
    403: "The token does not allow this, or the body names another organisation or user.",
    404: "No such agent, run or session for this caller.",
    409: "The session or run is busy, or not in a state that allows this.",
    413: "The body is larger than the server accepts.",
    415: "The body is not sent as application/json.",
    412: "If-Match names another version of the agent than its current one.",
    422: "The body or query is invalid; `errors` says what is wrong with each field.",
    429: "Too many requests or runs; retry after `Retry-After` seconds.",
    503: "Not ready: the database is not reachable, or lacks migrations.",
}
# Every authenticated operation may answer these.
AUTH_ERRORS = (401, 403, 429)
# An operation that reads a JSON body may answer these too.
BODY_ERRORS = (400, 413, 415, 422)


def _problem_name(status: int) -> str:
    """Return the name of the shared response for an error status: 404 is NotFound."""
    return "".join(word.capitalize() for word in HTTP_STATUS_CODES[status].split())


def _problem_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERRORS[status],
        "content": {PROBLEM_MIMETYPE: {"schema": ProblemSchema}},
    }
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status == 429:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return response


def _json_response(description: str, schema: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _run_links() -> dict[str, Any]:
    """Links from an answer that names a run (runId, sessionId) to what can be done with it."""
    run = {"agentId": "$request.path.agentId", "runId": "$response.body#/runId"}
    session = {"sessionId": "$response.body#/sessionId"}
    return {
        "RunStatus": {"operationId": "run_status", "parameters": run},
        "RunEvents": {"operationId": "run_events", "parameters": run},
        "CancelRun": {"operationId": "cancel", "parameters": run},
        "ContinueRun": {"operationId": "continue_paused", "parameters": run},
        "BatchStatus": {
            "operationId": "batch_status",
            "parameters": {"agentId": "$request.path.agentId", "runIds": "$response.body#/runId"},
        },
        "Session": {"operationId": "session_detail", "parameters": session},
        "SessionRuns": {"operationId": "session_runs", "parameters": session},
        "DeleteSession": {"operationId": "remove_session", "parameters": session},
    }


def _event_stream_response(description: str) -> dict[str, Any]:
    # In OpenAPI 3.1 the schema of a text/event-stream describes one event: its fields as an
    # SSE parser reads them. The data field is one AgentStreamEvent as JSON.
    return {
        "description": description,
        "headers": {
            "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
            "X-Accel-Buffering": {"schema": {"type": "string", "const": "no"}},
        },
        "content": {
            EVENT_STREAM: {
                "schema": {
                    "type": "object",
                    "required": ["id", "data"],
                    "properties": {
                        "id": {
                            "type": "string",
                            "pattern": "^[1-9][0-9]*$",
                            "description": "The event's sequence number in its run: 1, 2, 3...",
                        },
                        "event": {"type": "string"},
                        "data": {
                            "type": "string",
                            "contentMediaType": JSON,
                            "contentSchema": {"$ref": "#/components/schemas/AgentStreamEvent"},
                        },
                    },
                }
            }
        },
    }


def _operation(
    *,
    operation_id: str,
    summary: str,
    tag: str,
    responses: Mapping[int, dict[str, Any]],
    errors: tuple[int, ...] = (),
    parameters: list[Any] | None = None,
    body: Any = None,
    public: bool = False,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    statuses = sorted(set(errors) | (set() if public else set(AUTH_ERRORS)))
    operation["responses"] = {
        **{str(status): response for status, response in responses.items()},
        **{str(status): _problem_name(status) for status in statuses},
    }
    if public:
        operation["security"] = []
    return operation


def _path_parameter(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "in": "path",
        "name": name,
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1, **schema},
    }


def _playground_paths() -> dict[str, Any]:
    """The playground's page and files (public: the page asks for a token)."""
    from .playground import ASSETS

    return {
        "/playground": {
            "get": _operation(
                operation_id="playground",
                summary="The playground: chat with the agents in a browser.",
                tag="playground",
                public=True,
                errors=(404,),
                responses={
                    200: {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/playground/{name}": {
            "parameters": [_path_parameter("name", "One of the page's files.", enum=list(ASSETS))],
            "get": _operation(
                operation_id="playground_asset",
                summary="The playground's script or style sheet.",
                tag="playground",
                public=True,
                errors=(404,),
                responses={
                    200: {
                        "description": "The file.",
                        "content": {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                    }
                },
            ),
        },
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"


def build_document(app: Flask) -> dict[str, Any]:
    """Return the OpenAPI document of the API as ``app`` serves it."""
    state = app.extensions["agent_runs"]
    rule = next(r for r in app.url_map.iter_rules() if r.endpoint == "agent_runs.openapi_document")
    prefix = rule.rule.removesuffix("/openapi.json")

    spec = APISpec(
        title="Agent Runs",
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Runs AI agents and streams every run as Server-Sent Events; "
            "runs are durable, queryable, resumable and cancellable."
        },
        servers=[{"url": prefix or "/"}],
        security=[{"bearerAuth": []}],
    )
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme(
        "streamToken",
        {
            "type": "apiKey",
            "in": "query",
            "name": "access_token",
            "description": "A stream token from POST .../runs/{runId}/events/token (RFC 6750 "
            "section 2.3), for a browser's EventSource: read-only, for that run's events "
            "only, valid for "
            f"{state.config['AGENT_RUNS_STREAM_TOKEN_TTL']:g} s. Never an API token.",
        },
    )
    # Schemas that take the application's limits are documented with them.
    spec.components.schema(
        "RunRequest",
        schema=state.run_request_schema,
    )
    spec.components.schema("ContinueRequest", schema=ContinueRequestSchema)
    spec.components.schema("AgentDefinition", schema=AgentDefinitionSchema)
    spec.components.schema("Problem", schema=ProblemSchema)
    spec.components.schema("AgentStreamEvent", schema=AgentStreamEventSchema)
    for status in ERRORS:
        spec.components.response(_problem_name(status), _problem_response(status))

    # The server's agents, or one of the caller's organisation's own (any agent id).
    agent_id = {
        "in": "path",
        "name": "agentId",
        "required": True,
        "description": "One of this server's agents, or of your organisation's own.",
        "schema": {
            "type": "string",
            "anyOf": [
                {"enum": [a.id for a in state.registry.all()]},
                {"pattern": AGENT_ID_PATTERN, "maxLength": 128},
            ],
        },
    }
    if_match = {
        "in": "header",
        "name": "If-Match",
        "required": False,
        "description": 'Change only if the agent is at this version (its ETag: "3").',
        "schema": {"type": "string"},
    }
    etag = {"ETag": {"description": "The agent's version.", "schema": {"type": "string"}}}
    definition = {
        "$ref": "#/components/schemas/AgentDefinition",
    }

    def agent_change(operation_id: str, summary: str, body: Any) -> dict[str, Any]:
        return _operation(
            operation_id=operation_id,
            summary=summary,
            tag="agents",
            body=body,
            parameters=[if_match],
            errors=(*BODY_ERRORS, 404, 409, 412),
            responses={200: {**_json_response("The agent.", AgentDetailSchema), "headers": etag}},
        )

    patch_body = {
        "type": "object",
        "description": "A JSON Merge Patch (RFC 7386) of the agent's definition: keys set "
        "replace, null removes.",
    }
    run_id = _path_parameter(
        "runId", "A run's id, as its START event and status report it.", maxLength=64
    )
    session_id = _path_parameter(
        "sessionId", "A session's id (the runs' sessionId).", pattern=ID_PATTERN
    )
    batch_query = state.batch_status_query_schema
    last_event_id = {
        "in": "header",
        "name": "Last-Event-ID",
        "required": False,
        "description": "Resume after this event id; with `after` too, after the later of the "
        "two (what an EventSource opened on `?after=N` sends when it reconnects).",
        "schema": {"type": "string", "pattern": "^[0-9]+$", "maxLength": len(str(MAX_EVENT_ID))},
    }
    start_errors = (*BODY_ERRORS, 404, 409)
    idempotency_key = {
        "in": "header",
        "name": "Idempotency-Key",
        "required": False,
        "description": "Makes retries safe (IETF httpapi idempotency-key draft): a request "
        "with the key of an earlier one from the organisation, within "
        f"{_hours(state.config['AGENT_RUNS_IDEMPOTENCY_TTL'])}, gets that request's run (the "
        "stream replays its events) instead of a new one, with the header "
        "`Idempotent-Replayed: true`; the same key with anything else in the request is a "
        '422. A Structured Fields string ("...") or the bare key, printable ASCII, '
        f"at most {MAX_KEY_LENGTH} characters.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH + 2},
    }
    webhook_id = _path_parameter("webhookId", "A webhook's id, as registering it answered.")

    paths: dict[str, dict[str, Any]] = {
        "/openapi.json": {
            "get": _operation(
                operation_id="openapi_document",
                summary="This document.",
                tag="meta",
                public=True,
                responses={
                    200: _json_response("The OpenAPI document.", {"type": "object"}),
                },
            )
        },
        "/healthz": {
            "get": _operation(
                operation_id="healthz",
                summary="Whether the server is alive (it asks the database nothing).",
                tag="operations",
                public=True,
                responses={200: _json_response("Alive.", HEALTH)},
            )
        },
        "/readyz": {
            "get": _operation(
                operation_id="readyz",
                summary="Whether the server can serve: its database answers and is migrated.",
                tag="operations",
                public=True,
                errors=(503,),
                responses={200: _json_response("Ready.", HEALTH)},
            )
        },
        "/metrics": {
            "get": _operation(
                operation_id="metrics",
                summary="Prometheus metrics of every worker; needs a token with scope metrics.",
                tag="operations",
                errors=(404,),
                responses={
                    200: {
                        "description": "The metrics, in the Prometheus text format, or "
                        "OpenMetrics if the Accept header asks for it.",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            )
        },
        "/agents": {
            "get": _operation(
                operation_id="list_agents",
                summary="List this server's agents and your organisation's own.",
                tag="agents",
                responses={200: _json_response("The agents.", AgentSchema(many=True))},
            ),
            "post": _operation(
                operation_id="create_agent",
                summary="Store a new agent of your organisation (scope admin).",
                tag="agents",
                body=definition,
                errors=(*BODY_ERRORS, 409),
                responses={
                    201: {
                        **_json_response("The agent, at version 1.", AgentDetailSchema),
                        "headers": {
                            **etag,
                            "Location": {"schema": {"type": "string"}},
                        },
                    }
                },
            ),
        },
        "/agents/{agentId}": {
            "parameters": [agent_id],
            "get": _operation(
                operation_id="show_agent",
                summary="Read one agent; your organisation's own with its definition.",
                tag="agents",
                errors=(404,),
                responses={200: _json_response("The agent.", AgentDetailSchema)},
            ),
            "put": agent_change(
                "replace_agent",
                "Store a new version of your organisation's agent (scope admin).",
                definition,
            ),
            "patch": agent_change(
                "patch_agent",
                "Change your organisation's agent by a merge patch (scope admin).",
                patch_body,
            ),
            "delete": _operation(
                operation_id="delete_agent",
                summary="Delete your organisation's agent; its runs stay (scope admin).",
                tag="agents",
                parameters=[if_match],
                errors=(404, 409, 412),
                responses={204: {"description": "The agent is gone."}},
            ),
        },
        "/agents/{agentId}/versions": {
            "parameters": [agent_id],
            "get": _operation(
                operation_id="agent_versions",
                summary="List the stored versions of your organisation's agent, newest first.",
                tag="agents",
                errors=(404, 409),
                responses={200: _json_response("The versions.", AgentVersionSchema(many=True))},
            ),
        },
        "/agents/{agentId}/runs": {
            "parameters": [agent_id],
            "post": _operation(
                operation_id="create_run",
                parameters=[idempotency_key],
                summary="Run the agent and answer when the run has finished or paused.",
                tag="runs",
                body=RunRequestSchema,
                errors=start_errors,
                responses={
                    200: {
                        **_json_response("The finished run.", RunResponseSchema),
                        "links": _run_links(),
                    }
                },
            ),
        },
        "/agents/{agentId}/runs/stream": {
            "parameters": [agent_id],
            "post": _operation(
                operation_id="stream_run",
                parameters=[idempotency_key],
                summary="Run the agent and stream its events as they happen.",
                tag="runs",
                body=RunRequestSchema,
                errors=start_errors,
                responses={200: _event_stream_response("The run's events, START to STOP.")},
            ),
        },
        "/agents/{agentId}/runs/background": {
            "parameters": [agent_id],
            "post": _operation(
                operation_id="queue_run",
                parameters=[idempotency_key],
                summary="Queue a run; follow it on /events or /status.",
                tag="runs",
                body=RunRequestSchema,
                errors=start_errors,
                responses={
                    202: {
                        **_json_response("The queued run.", QueuedRunSchema),
                        "links": _run_links(),
                    }
                },
            ),
        },
        "/agents/{agentId}/runs/status": {
            "parameters": [agent_id],
            "get": _operation(
                operation_id="batch_status",
                summary="Read several runs; unknown ids are left out.",
                tag="runs",
                parameters=[{"in": "query", "schema": batch_query}],
                errors=(404, 422),
                responses={200: _json_response("The runs found.", AgentRunSchema(many=True))},
            ),
        },
        "/agents/{agentId}/runs/{runId}": {
            "parameters": [agent_id, run_id],
            "delete": _operation(
                operation_id="cancel",
                summary="Cancel a run.",
                tag="runs",
                errors=(404,),
                responses={
                    202: {"description": "The run is stopping."},
                    204: {"description": "The run had already finished."},
                },
            ),
        },
        "/agents/{agentId}/runs/{runId}/status": {
            "parameters": [agent_id, run_id],
            "get": _operation(
                operation_id="run_status",
                summary="Read one run.",
                tag="runs",
                errors=(404,),
                responses={200: _json_response("The run.", AgentRunSchema)},
            ),
        },
        "/agents/{agentId}/runs/{runId}/events": {
            "parameters": [agent_id, run_id],
            "get": {
                **_operation(
                    operation_id="run_events",
                    summary="Stream a run's events: replayed from the log, then live.",
                    tag="runs",
                    parameters=[{"in": "query", "schema": EventsQuerySchema}, last_event_id],
                    errors=(400, 404, 422),
                    responses={200: _event_stream_response("The run's events after the given id.")},
                ),
                # A bearer token, or a stream token in the URL (a browser's EventSource).
                "security": [{"bearerAuth": []}, {"streamToken": []}],
            },
        },
        "/agents/{agentId}/runs/{runId}/events/token": {
            "parameters": [agent_id, run_id],
            "post": _operation(
                operation_id="run_events_token",
                summary="Get a short-lived, read-only token for this run's events, to pass "
                "as access_token (a browser's EventSource cannot send headers).",
                tag="runs",
                errors=(404,),
                responses={
                    200: _json_response("The token and the URL to read with it.", StreamTokenSchema)
                },
            ),
        },
        "/agents/{agentId}/runs/{runId}/continue": {
            "parameters": [agent_id, run_id],
            "post": _operation(
                operation_id="continue_paused",
                summary="Approve or reject a PAUSED run's tool call; answer when it next stops.",
                tag="runs",
                body=ContinueRequestSchema,
                errors=(*BODY_ERRORS, 404, 409),
                responses={
                    200: {
                        **_json_response("The run, finished or paused again.", RunResponseSchema),
                        "links": _run_links(),
                    }
                },
            ),
        },
        **(_playground_paths() if state.config["AGENT_RUNS_PLAYGROUND"] else {}),
        "/webhooks": {
            "get": _operation(
                operation_id="webhooks",
                summary="List the organisation's webhooks (admin).",
                tag="webhooks",
                responses={200: _json_response("The webhooks.", WebhookSchema(many=True))},
            ),
            "post": _operation(
                operation_id="create_webhook",
                summary="Register a webhook for the organisation's run ends (admin).",
                tag="webhooks",
                body=WebhookRequestSchema,
                errors=BODY_ERRORS,
                responses={
                    201: _json_response(
                        "The webhook, with its signing secret: shown this once.",
                        NewWebhookSchema,
                    )
                },
            ),
        },
        "/webhooks/{webhookId}": {
            "parameters": [webhook_id],
            "get": _operation(
                operation_id="webhook_detail",
                summary="Read one webhook (admin).",
                tag="webhooks",
                errors=(404,),
                responses={200: _json_response("The webhook.", WebhookSchema)},
            ),
            "delete": _operation(
                operation_id="remove_webhook",
                summary="Delete a webhook and the deliveries it still had to get (admin).",
                tag="webhooks",
                errors=(404,),
                responses={204: {"description": "The webhook is gone."}},
            ),
        },
        "/runs": {
            "get": _operation(
                operation_id="list_runs",
                summary="List the caller's runs of every agent, newest first.",
                tag="runs",
                parameters=[{"in": "query", "schema": RunListQuerySchema}],
                errors=(422,),
                responses={
                    200: {
                        **_json_response("A page of runs.", RunPageSchema),
                        "links": {
                            "NextPage": {
                                "operationId": "list_runs",
                                "parameters": {"cursor": "$response.body#/nextCursor"},
                            },
                        },
                    }
                },
            )
        },
        "/sessions": {
            "get": _operation(
                operation_id="list_sessions",
                summary="List the caller's sessions, most recently active first.",
                tag="sessions",
                parameters=[{"in": "query", "schema": SessionListQuerySchema}],
                errors=(422,),
                responses={
                    200: {
                        **_json_response("A page of sessions.", SessionPageSchema),
                        "links": {
                            "FirstSession": {
                                "operationId": "session_detail",
                                "parameters": {"sessionId": "$response.body#/items/0/id"},
                            },
                            "NextPage": {
                                "operationId": "list_sessions",
                                "parameters": {"cursor": "$response.body#/nextCursor"},
                            },
                        },
                    }
                },
            )
        },
        "/sessions/{sessionId}": {
            "parameters": [session_id],
            "get": _operation(
                operation_id="session_detail",
                summary="Read a session with its messages.",
                tag="sessions",
                parameters=[{"in": "query", "schema": SessionQuerySchema}],
                errors=(404, 422),
                responses={200: _json_response("The session.", SessionDetailSchema)},
            ),
            "delete": _operation(
                operation_id="remove_session",
                summary="Delete a session with its messages, runs and events.",
                tag="sessions",
                parameters=[{"in": "query", "schema": SessionQuerySchema}],
                errors=(404, 409, 422),
                responses={204: {"description": "The session is gone."}},
            ),
        },
        "/sessions/{sessionId}/runs": {
            "parameters": [session_id],
            "get": _operation(
                operation_id="session_runs",
                summary="List a session's runs, oldest first.",
                tag="sessions",
                parameters=[{"in": "query", "schema": SessionRunsQuerySchema}],
                errors=(404, 422),
                responses={200: _json_response("A page of runs.", SessionRunsPageSchema)},
            ),
        },
    }
    for tag, description in (
        ("agents", "The agents this server runs."),
        ("runs", "Starting, following, cancelling and reading runs."),
        ("sessions", "Conversations and their history."),
        (
            "webhooks",
            "Signed notices of runs that completed, failed, were cancelled or paused "
            "(Standard Webhooks).",
        ),
        ("meta", "About the API itself."),
        ("playground", "A page to chat with the agents in a browser."),
        ("operations", "Health checks and metrics, for those who run the server."),
    ):
        spec.tag({"name": tag, "description": description})
    for path, item in paths.items():
        shared = item.pop("parameters", None)
        spec.path(path=path, operations=item, parameters=shared)
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_document() -> Any:
    """Serve the OpenAPI document; it needs no token."""
    state = current_app.extensions["agent_runs"]
    if state.openapi_document is None:
        state.openapi_document = build_document(current_app)
    return state.openapi_document
