"""The HTTP API: one blueprint, thin views, one problem+json error shape.

Every request is authenticated before its view runs and holds a database connection for the
view's duration only; streamed bodies are generators that touch no request state.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, request

from ..auth import authenticate, authenticate_stream_token, require_scope, unauthorized
from ..db import DATABASE_DOWN, database
from ..errors import ApiError, problem, register_error_handlers
from ..logs import LOG_CONTEXT
from ..runtime.agent_store import AgentConflict
from ..runtime.agents import AgentDefinitionError
from ..runtime.idempotency import KeyReused
from ..runtime.runs import (
    NotFound,
    Principal,
    RunRequestRejected,
    RunStateConflict,
    TooManyActiveRuns,
)

bp = Blueprint("agent_runs", __name__)
register_error_handlers(bp)


@bp.errorhandler(NotFound)
def _not_found(error: NotFound) -> Response:
    return problem(404, error.message)


def _database_down(error: Exception) -> Response:
    current_app.logger.warning("the database is unavailable: %s", error)
    return problem(
        503,
        "The database is unavailable right now. Try again shortly.",
        headers={"Retry-After": "1"},
    )


for _error in DATABASE_DOWN:
    bp.register_error_handler(_error, _database_down)


@bp.errorhandler(TooManyActiveRuns)
def _too_many_runs(error: TooManyActiveRuns) -> Response:
    return problem(429, error.message, headers={"Retry-After": str(error.retry_after)})


@bp.errorhandler(RunStateConflict)
def _conflict(error: RunStateConflict) -> Response:
    return problem(409, error.message)


@bp.errorhandler(AgentConflict)
def _agent_conflict(error: AgentConflict) -> Response:
    return problem(error.status, error.message)


@bp.errorhandler(AgentDefinitionError)
def _bad_definition(error: AgentDefinitionError) -> Response:
    # Raised only for definitions sent to the API: the agents file's fail the server's start.
    errors = error.errors or {"_schema": [str(error)]}
    return problem(422, f"Invalid agent definition. {error}", errors=errors)


@bp.errorhandler(RunRequestRejected)
def _rejected(error: RunRequestRejected) -> Response:
    # 422s name the field as validation errors do; 403 and 409 say what is in the way.
    errors = {error.field: [error.message]} if error.status == 422 else None
    return problem(error.status, error.message, errors=errors)


@bp.errorhandler(KeyReused)
def _key_reused(error: KeyReused) -> Response:
    return problem(422, str(error), errors={"Idempotency-Key": [str(error)]})


# Endpoints anyone may call, with no rate limit: the API's description, the health checks and
# the playground's page (which asks for a token, and sends it only in headers).
PUBLIC_ENDPOINTS = frozenset(
    {
        "agent_runs.openapi_document",
        "agent_runs.healthz",
        "agent_runs.readyz",
        "agent_runs.playground",
        "agent_runs.playground_asset",
    }
)
# Endpoints that need a scope of their own (else runs:read to read, runs:write to change).
# A stream token only reads, though asking for one is a POST.
ENDPOINT_SCOPES = {"agent_runs.metrics": "metrics", "agent_runs.run_events_token": "runs:read"}
# The one endpoint that takes a token in its URL (?access_token=, RFC 6750 section 2.3): a
# stream token, for a browser's EventSource, which cannot send an Authorization header.
STREAM_TOKEN_ENDPOINT = "agent_runs.run_events"


def _principal(state: Any) -> Principal:
    """Who the request acts for: its bearer token's principal, or its stream token's."""
    access_token = request.args.get("access_token")
    if access_token is None:
        return authenticate(request.headers.get("Authorization"), state.jwt)
    if request.endpoint != STREAM_TOKEN_ENDPOINT:
        raise unauthorized(
            "access_token is taken by GET .../runs/{runId}/events alone; send the token in "
            "the Authorization header."
        )
    if "Authorization" in request.headers:
        raise ApiError(
            400, "Send one token: in the Authorization header or as access_token, not both."
        )
    run_id = (request.view_args or {}).get("run_id", "")
    return authenticate_stream_token(access_token, run_id, state.stream_token_key())


@bp.before_request
def _open_and_authenticate() -> None:
    # A CORS preflight (OPTIONS) carries no token; Flask answers it, flask-cors adds its
    # headers (see api.cors), and no view runs.
    if request.endpoint in PUBLIC_ENDPOINTS or request.method == "OPTIONS":
        return
    # Bodies carry media inline, so the limit is ours, not the host application's.
    state = current_app.extensions["agent_runs"]
    state.executor.ensure_started()
    request.max_content_length = state.config["AGENT_RUNS_MAX_CONTENT_LENGTH"]
    connection = database.connection_context()
    # Kept for the teardown only once open: a database that is away fails the enter (503).
    connection.__enter__()
    g.agent_runs_db = connection
    g.principal = _principal(state)
    # The request's log lines name the caller's organisation (reset at teardown).
    g.agent_runs_log = LOG_CONTEXT.set({"orgId": g.principal.org_id})
    scope = ENDPOINT_SCOPES.get(request.endpoint or "")
    if scope is None:
        scope = "runs:read" if request.method in ("GET", "HEAD") else "runs:write"
    require_scope(g.principal, scope)
    state.rate_limiter.check(g.principal.subject)


@bp.after_request
def _count_request(response: Response) -> Response:
    counted = current_app.extensions["agent_runs"].metrics
    if counted is not None and request.endpoint:
        counted.count_request(request.endpoint.removeprefix("agent_runs."), response.status_code)
    return response


@bp.teardown_request
def _close_database(exc: BaseException | None) -> None:
    log_context = g.pop("agent_runs_log", None)
    if log_context is not None:
        LOG_CONTEXT.reset(log_context)
    context = g.pop("agent_runs_db", None)
    if context is not None:
        context.__exit__(None, None, None)


# The views register themselves on bp.
from . import (  # noqa: E402,F401
    agents,
    cors,
    health,
    metrics,
    openapi,
    playground,
    runs,
    sessions,
    webhooks,
)
