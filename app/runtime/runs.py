"""Starting runs and reading them back, always within one tenant's data.

Every read of runs goes through :func:`runs_of`, the one place that scopes queries to the
caller's organisation (and user, when the caller's token is bound to one).
"""

from __future__ import annotations

import datetime
import functools
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import peewee
from peewee import fn

from ..db import Statement, database, insert_statement
from ..models import Run, RunEvent, RunStatus, Session, utcnow
from ..providers.base import resolve_model
from .agents import EMBEDDED_MODEL_RULE, Agent
from .events import Event, EventType, json_data, now_ms, write_event
from .executor import ActiveRun, Executor, RunJob
from .idempotency import IdempotentRequest, bind_key, claim_key
from .outbox import enqueue_notices
from .store import (
    cancelled_tool_message,
    close_run_log,
    lease_deadline,
    lock_org_starts,
    release_session,
    request_cancel,
    run_notice,
    save_messages,
)

if TYPE_CHECKING:
    from .agent_store import AgentCatalog


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the organisation and user its token is bound to."""

    org_id: str
    user_id: str | None
    scopes: frozenset[str] = frozenset()
    token_id: int | None = None
    # Who is counted for rate limits: one of our tokens, or a JWT's organisation and user.
    subject: str = ""


class RunRequestRejected(Exception):
    """A run request the server understood but will not start. ``field`` names the culprit."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class IdentityMismatch(RunRequestRejected):
    """The body names another organisation or user than the caller's token."""

    status = 403


class SessionBusy(RunRequestRejected):
    """The session already has a run in progress."""

    status = 409


class RunStateConflict(Exception):
    """An action the run's current status does not allow (e.g. continuing a finished run)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyActiveRuns(Exception):
    """The organisation already has as many runs going as it may."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class NotFound(Exception):
    """An agent, run or session that does not exist for this caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class StartedRun:
    """The run a request started, or, for a retry with an Idempotency-Key, the earlier one."""

    run_id: str
    replayed: bool = False


def new_run_id() -> str:
    """Return a new run id: ``run_``, 12 hex digits of Unix milliseconds, 20 random ones.

    Run ids lead the keys of the run table and of the event log. Ids that grow with time keep
    the runs being written at the same moment side by side in those B-trees, so a batch of
    events dirties a few index pages instead of one per run: on SQLite, five times less to
    write at each commit than random ids. 80 random bits keep ids unguessable and unique.
    """
    return f"run_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def get_agent(
    agents: AgentCatalog, org_id: str, agent_id: str, version: int | None = None
) -> Agent:
    """Return the agent a run of the organisation's runs now (or as of ``version``)."""
    agent = agents.get(org_id, agent_id, version)
    if agent is None:
        raise NotFound(f"No agent with id {agent_id!r}.")
    return agent


def check_agent(agents: AgentCatalog, org_id: str, agent_id: str) -> None:
    """Raise NotFound unless the organisation has (or had) the agent: a deleted agent's runs
    can still be read."""
    if not agents.is_known(org_id, agent_id):
        raise NotFound(f"No agent with id {agent_id!r}.")


def _acting_user(principal: Principal, body: dict[str, Any]) -> str:
    """Return the user a run is for; a body that contradicts the token is refused."""
    org_id = body.get("org_id")
    if org_id is not None and org_id != principal.org_id:
        raise IdentityMismatch("orgId", "orgId does not match the organisation of your token.")
    user_id = body.get("user_id")
    if principal.user_id is not None:
        if user_id is not None and user_id != principal.user_id:
            raise IdentityMismatch("userId", "userId does not match the user of your token.")
        return principal.user_id
    return user_id or ""


# The statements every run's start makes, built once (see Statement).
_CLAIM_SESSION = Statement(
    lambda uid, org_id, user_id, agent_id, now, run_id: (
        Session.insert(
            uid=uid,
            org_id=org_id,
            user_id=user_id,
            agent_id=agent_id,
            created_at=now,
            updated_at=now,
            active_run_id=run_id,
        )
        .on_conflict(
            conflict_target=[Session.org_id, Session.user_id, Session.uid],
            update={Session.active_run_id: run_id, Session.updated_at: now},
            where=(Session.active_run_id.is_null() & (Session.agent_id == agent_id)),
        )
        .returning(Session.id, Session.created_at)
    )
)
_COUNT_ACTIVE_RUNS = Statement(
    lambda org_id: Run.select(fn.COUNT(Run.id)).where(
        (Run.org_id == org_id) & Run.status.in_([RunStatus.RUNNING, RunStatus.QUEUED])
    )
)
_INSERT_RUN = insert_statement(
    Run,
    [
        Run.id,
        Run.org_id,
        Run.user_id,
        Run.agent_id,
        Run.session,
        Run.status,
        Run.model,
        Run.agent_version,
        Run.input,
        Run.request,
        Run.content,
        Run.cancel_requested,
        Run.created_at,
        Run.started_at,
        Run.lease_expires_at,
    ],
)


def _claim_session(
    principal: Principal, user_id: str, agent: Agent, uid: str, run_id: str
) -> tuple[int, bool]:
    """Find or create the session and make ``run_id`` its active run, in one statement.

    Returns the session's key and whether this run created it.

    An upsert: a new session is created held by the run; an existing one is taken only if
    no run holds it and it belongs to this agent. Whichever of two racing requests the
    database serves first wins; the other finds the session held.
    """
    now = utcnow()
    claimed = _CLAIM_SESSION.rows(
        uid=uid,
        org_id=principal.org_id,
        user_id=user_id,
        agent_id=agent.id,
        now=now,
        run_id=run_id,
    )
    if claimed:
        return claimed[0]["id"], claimed[0]["created_at"] == now
    owner = (
        Session.select(Session.agent_id)
        .where(
            (Session.org_id == principal.org_id)
            & (Session.user_id == user_id)
            & (Session.uid == uid)
        )
        .scalar()
    )
    if owner != agent.id:
        raise RunRequestRejected("sessionId", f"This session belongs to agent {owner!r}.")
    raise SessionBusy("sessionId", "This session already has a run in progress.")


def _provider_for(
    agent: Agent,
    requested: str | None,
    default_model: str,
    executor: Executor,
    embedded_models: Callable[[], Collection[str]] | None = None,
):
    """Return (model string, provider, provider's model name) for a run of ``agent``.

    A run of an agent that allows any model may choose only the embedded models the server
    offers (``embedded_models``), whoever wrote the agent. An organisation's agent reaches
    the model server its options name only where the address policy allows (the executor's
    guarded backend)."""
    model = agent.model_for(requested, default_model, embedded_models)
    if model is None:
        reason = EMBEDDED_MODEL_RULE if "*" in agent.allowed_models else ""
        raise RunRequestRejected(
            "options.model",
            f"Agent {agent.id!r} does not allow model {requested!r}. {reason}".strip(),
        )
    try:
        backend = executor.guarded_backend if agent.guarded else None
        provider, model_name = resolve_model(model, agent.model_options, backend)
    except ValueError as error:  # UnknownModel, or options the back end refuses
        raise RunRequestRejected("options.model", f"Model {model!r}: {error}") from None
    return model, provider, model_name


def _mcp_headers(agent: Agent, options: dict[str, Any]) -> dict[str, dict[str, str]] | None:
    """Return a run's headers for its agent's MCP servers; refuse those for other servers."""
    headers = options.get("mcp_headers") or {}
    servers = {server.name: server for server in agent.mcp_servers}
    for name in headers:
        where = f"options.mcpHeaders.{name}"
        if name not in servers:
            raise RunRequestRejected(where, f"Agent {agent.id!r} has no MCP server {name!r}.")
        if servers[name].url is None:
            raise RunRequestRejected(
                where, f"MCP server {name!r} is a local command: it takes no headers."
            )
    return headers or None


def response_schema(agent: Agent, options: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a run's answer must fit: the run's own format, else its agent's."""
    chosen = options.get("response_format") or agent.response_format
    if not chosen or chosen.get("type") != "json_schema":
        return None
    return chosen["schema"]


def start_run(
    executor: Executor,
    agent: Agent,
    principal: Principal,
    body: dict[str, Any],
    *,
    default_model: str,
    embedded_models: Callable[[], Collection[str]] | None = None,
    background: bool = False,
    max_active_runs: int = 0,
    trace_context: dict[str, str] | None = None,
    idempotency: IdempotentRequest | None = None,
    idempotency_ttl: float = 86_400.0,
) -> StartedRun:
    """Record a new run of ``agent`` for the caller and start executing (or queue) it.

    ``max_active_runs`` caps the organisation's RUNNING and QUEUED runs (0: no cap). The
    count is taken inside the transaction that inserts the run, after its first write, so
    on SQLite, whose writers take turns, two workers cannot both slip under the cap; on
    PostgreSQL the organisation's starts take turns on an advisory lock held to the commit.

    With ``idempotency``, the key is claimed first in that transaction: a key that already
    names a run of the same request returns that run, started by nobody again (see
    :mod:`.idempotency`).
    ``trace_context`` is the W3C trace context (traceparent, tracestate) of the request, for
    the run's trace. ``embedded_models`` gives the embedded models the server offers
    (:meth:`AgentCatalog.embedded_models`), which bound what ``options.model`` may choose.
    """
    user_id = _acting_user(principal, body)
    options = body.get("options") or {}
    model, provider, model_name = _provider_for(
        agent, options.get("model"), default_model, executor, embedded_models
    )
    mcp_headers = _mcp_headers(agent, options)
    if body.get("media") and not getattr(provider, "accepts_images", False):
        raise RunRequestRejected(
            "media", f"Model {model!r} takes text only; send the message without media."
        )

    run_id = new_run_id()
    uid = body.get("session_id") or str(uuid.uuid4())
    now = utcnow()
    with database.atomic():
        key_id = None
        if idempotency is not None:
            fingerprint = idempotency.fingerprint(agent.id, user_id)
            key_id, earlier = claim_key(
                principal.org_id, idempotency.key, fingerprint, idempotency_ttl
            )
            if earlier is not None:
                return StartedRun(earlier, replayed=True)
        session_pk, new_session = _claim_session(principal, user_id, agent, uid, run_id)
        if max_active_runs:
            lock_org_starts(principal.org_id)
            _check_active_runs(principal.org_id, max_active_runs)
        _INSERT_RUN.execute(
            id=run_id,
            org_id=principal.org_id,
            user_id=user_id,
            agent_id=agent.id,
            session=session_pk,
            status=RunStatus.QUEUED if background else RunStatus.RUNNING,
            model=model,
            agent_version=agent.version,
            input=body["message"],
            request={
                "generateFollowups": body.get("generate_followups", False),
                "media": body.get("media") or [],
                # Not the MCP headers: they are the caller's credentials.
                "options": {
                    k: v for k, v in options.items() if v is not None and k != "mcp_headers"
                },
            },
            content="",
            cancel_requested=False,
            created_at=now,
            started_at=None if background else now,
            lease_expires_at=lease_deadline(executor.settings.lease_seconds),
        )
        save_messages(session_pk, run_id, [{"role": "user", "content": body["message"]}], now)
        # START is written with the run, so its streams get their first event at once.
        start = Event(
            run_id, 1, EventType.START, json_data({"runId": run_id, "sessionId": uid}), now_ms()
        )
        write_event(start)
        if key_id is not None:
            bind_key(key_id, run_id)
    job = RunJob(
        run_id=run_id,
        session_pk=session_pk,
        session_uid=uid,
        agent=agent,
        provider=provider,
        model=model_name,
        org_id=principal.org_id,
        media=body.get("media") or [],
        temperature=options.get("temperature"),
        max_tokens=options.get("max_tokens"),
        generate_followups=body.get("generate_followups", False),
        mcp_headers=mcp_headers,
        response_schema=response_schema(agent, options),
        # A new session's whole conversation is this message: no need to read it back.
        history=[{"role": "user", "content": body["message"]}] if new_session else None,
        model_id=model,
        trace_context=trace_context,
    )
    executor.start(job, start_event=start, background=background)
    return StartedRun(run_id)


def _check_active_runs(org_id: str, cap: int) -> None:
    active = _COUNT_ACTIVE_RUNS.execute(org_id=org_id).fetchone()[0]
    if active >= cap:
        raise TooManyActiveRuns(
            f"Your organisation has {active} runs going, the most it may have at once; "
            "wait for one to finish."
        )


def continue_run(
    executor: Executor,
    agents: AgentCatalog,
    agent_id: str,
    principal: Principal,
    run_id: str,
    action: str,
    *,
    default_model: str,
    mcp_headers: dict[str, dict[str, str]] | None = None,
    trace_context: dict[str, str] | None = None,
) -> ActiveRun:
    """Resume a PAUSED run with a human's APPROVE or REJECT of its pending tool call.

    ``mcp_headers`` are the run's headers for its MCP servers, sent again by the caller. It
    resumes with the agent as it ran: an organisation's agent at the version the run
    recorded, whatever changed since.
    """
    check_agent(agents, principal.org_id, agent_id)
    run = get_run(principal, agent_id, run_id)
    agent = get_agent(agents, principal.org_id, agent_id, run.agent_version)
    headers = _mcp_headers(agent, {"mcp_headers": mcp_headers})
    options = (run.request or {}).get("options") or {}
    model, provider, model_name = _provider_for(
        agent, options.get("model"), default_model, executor, agents.embedded_models
    )
    with database.atomic():
        resumed = (
            Run.update(
                status=RunStatus.RUNNING,
                required_action=None,
                pending_calls=None,
                lease_expires_at=lease_deadline(executor.settings.lease_seconds),
            )
            .where((Run.id == run.id) & (Run.status == RunStatus.PAUSED))
            .execute()
        )
        if not resumed:
            current = Run.select(Run.status).where(Run.id == run.id).scalar()
            raise RunStateConflict(f"Run {run.id} is {current}, not PAUSED: nothing to continue.")
        last_seq = RunEvent.select(fn.MAX(RunEvent.seq)).where(RunEvent.run == run.id).scalar() or 0
    job = RunJob(
        run_id=run.id,
        session_pk=run.session.id,
        session_uid=run.session.uid,
        agent=agent,
        provider=provider,
        model=model_name,
        org_id=run.org_id,
        temperature=options.get("temperature"),
        max_tokens=options.get("max_tokens"),
        generate_followups=(run.request or {}).get("generateFollowups", False),
        response_schema=response_schema(agent, options),
        first_seq=last_seq + 1,
        mcp_headers=headers,
        pending_calls=run.pending_calls,
        decision=action,
        prior={
            "content": run.content,
            "reasoning_steps": run.reasoning_steps,
            "tool_calls": run.tool_calls,
            "usage": run.usage,
        },
        model_id=model,
        trace_context=trace_context,
    )
    return executor.start(job)


def cancel_run(executor: Executor, principal: Principal, agent_id: str, run_id: str) -> bool:
    """Ask a run to stop; False if it had already finished.

    A run executing anywhere gets a cancel flag in the database, which its worker hears of
    from its watcher: at once on PostgreSQL, within a poll interval on SQLite (and at once if
    it executes here). A PAUSED run has no executor: it is
    cancelled on the spot.
    """
    run = get_run(principal, agent_id, run_id)
    if run.status in RunStatus.FINAL:
        return False
    if run.status == RunStatus.PAUSED:
        _cancel_paused(executor, run)
        return True
    request_cancel(run.id)
    executor.cancel(run.id)
    return True


def _cancel_paused(executor: Executor, run: Run) -> None:
    now = utcnow()
    with database.atomic():
        cancelled = (
            Run.update(
                status=RunStatus.CANCELLED,
                required_action=None,
                pending_calls=None,
                completed_at=now,
            )
            .where((Run.id == run.id) & (Run.status == RunStatus.PAUSED))
            .execute()
        )
        if not cancelled:
            return  # continued or cancelled meanwhile
        unanswered = [cancelled_tool_message(call) for call in run.pending_calls or ()]
        save_messages(run.session.id, run.id, unanswered, now)
        close_run_log(run.id, EventType.STOP, json_data({"reason": "cancelled"}))
        release_session(run.session.id, run.id, now)
        run.status, run.completed_at = RunStatus.CANCELLED, now
        enqueue_notices([run_notice(run)])
    executor.observer.run_closed(
        run.id, run.agent_id, RunStatus.CANCELLED, EventType.STOP, "cancelled while paused"
    )


def runs_of(principal: Principal) -> peewee.ModelSelect[Run]:
    """Select the runs the caller may see, each with its session's public id."""
    query = (
        Run.select(Run, Session.id, Session.uid).join(Session).where(Run.org_id == principal.org_id)
    )
    if principal.user_id is not None:
        query = query.where(Run.user_id == principal.user_id)
    return query


def get_run(principal: Principal, agent_id: str, run_id: str) -> Run:
    run = runs_of(principal).where(Run.id == run_id, Run.agent_id == agent_id).first()
    if run is None:
        raise NotFound(f"No run {run_id!r} for agent {agent_id!r}.")
    return run


# What /status reports of a run: read as plain rows, not model instances, since batch status
# answers a hundred of them in a few milliseconds.
STATUS_COLUMNS = (
    Run.id,
    Run.agent_id,
    Session.uid.alias("session_id"),
    Run.user_id,
    Run.org_id,
    Run.status,
    Run.model,
    Run.agent_version,
    Run.content,
    Run.output,
    Run.usage,
    Run.error_type,
    Run.error,
    Run.required_action,
    Run.created_at,
    Run.started_at,
    Run.completed_at,
)


def statuses_of(principal: Principal) -> peewee.ModelSelect[Run]:
    """Select the caller's runs as status rows (see :func:`status_rows`)."""
    return runs_of(principal).select(*STATUS_COLUMNS)


def status_rows(query: peewee.ModelSelect[Run]) -> list[dict[str, Any]]:
    """Run a :func:`statuses_of` query; return rows shaped as AgentRunSchema dumps them."""
    return [_status_row(row) for row in query.dicts()]  # type: ignore[arg-type]


def _status_row(row: dict[str, Any]) -> dict[str, Any]:
    row["user_id"] = row["user_id"] or None
    error_type = row.pop("error_type")
    if error_type is not None or row["error"] is not None:
        row["error"] = {"type": error_type or "error", "message": row["error"] or ""}
    return row


def get_status(principal: Principal, agent_id: str, run_id: str) -> dict[str, Any]:
    rows = get_statuses(principal, agent_id, [run_id])
    if not rows:
        raise NotFound(f"No run {run_id!r} for agent {agent_id!r}.")
    return rows[0]


def get_statuses(principal: Principal, agent_id: str, run_ids: list[str]) -> list[dict[str, Any]]:
    """Return the caller's runs among ``run_ids``, in the order asked, in one query."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(run_ids), _ID_BUCKETS[-1]):
        ids = run_ids[start : start + _ID_BUCKETS[-1]]
        size = next(size for size in _ID_BUCKETS if size >= len(ids))
        # The last id fills the list up to the statement's size: asking twice is harmless.
        padded = {f"id{i}": ids[min(i, len(ids) - 1)] for i in range(size)}
        statement = _statuses_statement(size, principal.user_id is not None)
        rows = statement.rows(
            org_id=principal.org_id, user_id=principal.user_id, agent_id=agent_id, **padded
        )
        found.update((row["id"], _status_row(row)) for row in rows)
    return [found[run_id] for run_id in run_ids if run_id in found]


# Status is polled for up to 100 runs at a time: its statement is built once for each of a
# few list sizes, and a request's ids are padded up to the next one.
_ID_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@functools.cache
def _statuses_statement(size: int, user_bound: bool) -> Statement:
    def build(**slots: Any) -> peewee.Query:
        principal = Principal(
            org_id=slots["org_id"], user_id=slots["user_id"] if user_bound else None
        )
        ids = [slots[f"id{i}"] for i in range(size)]
        return statuses_of(principal).where(Run.id.in_(ids), Run.agent_id == slots["agent_id"])

    return Statement(
        build,
        names=["org_id", "user_id", "agent_id", *(f"id{i}" for i in range(size))],
        # Status only prints its times: utc_timestamp reads SQLite's text form directly.
        as_stored=["created_at", "started_at", "completed_at"],
    )


# Where a page starts: the sort key (timestamp, id) of the last item of the previous page.
Position = tuple[datetime.datetime, Any]


@dataclass(frozen=True)
class Page:
    """Items in order, and the position the next page starts after (None on the last page)."""

    items: list[Any]
    next_cursor: Position | None


def page_of(rows: list[Any], limit: int, key: Callable[[Any], Position]) -> Page:
    """Cut ``rows`` (fetched with one extra to learn whether more follow) to a page."""
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=key(items[-1]))


def list_runs(
    principal: Principal,
    *,
    agent_id: str | None = None,
    statuses: Sequence[str] = (),
    session_id: str | None = None,
    since: datetime.datetime | None = None,
    limit: int = 20,
    after: Position | None = None,
) -> Page:
    """Return a page of the caller's runs, newest first, in one query.

    Pages are keyset pages on (created_at, id), read along the run table's indexes that lead
    with the organisation (see models.Run): a page deep in a million runs costs what the first
    does. ``session_id`` is a session's public id; ``since`` keeps runs created at or after it.
    """
    query = statuses_of(principal)
    if agent_id is not None:
        query = query.where(Run.agent_id == agent_id)
    if statuses:
        query = query.where(Run.status.in_(list(statuses)))
    if session_id is not None:
        # The caller's sessions of that id (several users may each have one): their runs are
        # found through run(session_id, created_at).
        sessions = Session.select(Session.id).where(
            (Session.org_id == principal.org_id) & (Session.uid == session_id)
        )
        if principal.user_id is not None:
            sessions = sessions.where(Session.user_id == principal.user_id)
        query = query.where(Run.session.in_(sessions))
    if since is not None:
        query = query.where(Run.created_at >= since)
    if after is not None:
        created_at, run_id = after
        # The first term bounds the index range; the second breaks ties in created_at.
        query = query.where(
            (Run.created_at <= created_at) & ((Run.created_at < created_at) | (Run.id < run_id))
        )
    rows = status_rows(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1))
    return page_of(rows, limit, lambda run: (run["created_at"], run["id"]))
