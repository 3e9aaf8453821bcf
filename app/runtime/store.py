"""The run store: what the database holds of runs, read and written in one place.

The executor executes runs; the store owns their state (rq's shape: a worker executes, a
registry owns job state and the clean-up of abandoned jobs). Everything the executor and
:mod:`.runs` read or write of a run's lifecycle outside the event log's batches goes through
here: leases, cancel requests, the conversation read back, the events read back for a
follower, a run's final writes, and the sweep of runs whose worker died.

Call these inside ``with database.connection_context():`` (the callers hold one).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..db import Statement, database, insert_statement, is_postgres
from ..models import Message, Run, RunEvent, RunStatus, Session, utcnow
from .events import Event, EventType, now_ms, write_event
from .observe import RunObserver
from .outbox import RunNotice, enqueue_notices

logger = logging.getLogger(__name__)

LOST_MESSAGE = "The worker executing this run stopped; the run did not finish."
SWEPT_REASON = "its worker stopped before it finished (its lease expired)"

# On PostgreSQL, the store tells every worker of every host what changed, on this channel
# (see pg_watch): NOTIFY reaches the sessions of one database, so a server's database is its
# channel. A payload is at most 8,000 bytes.
NOTIFY_CHANNEL = "agent_runs"
MAX_PAYLOAD = 7_900
# The first key of the advisory locks that serialise the starts of one organisation's runs.
ORG_LOCK_CLASS = 0x41520001


def lease_deadline(seconds: float) -> datetime.datetime:
    return utcnow() + datetime.timedelta(seconds=seconds)


def mark_started(run_id: str) -> None:
    """Move a queued run to RUNNING as its turn comes (unless it was cancelled meanwhile)."""
    (
        Run.update(status=RunStatus.RUNNING, started_at=utcnow())
        .where((Run.id == run_id) & (Run.status == RunStatus.QUEUED))
        .execute()
    )


def renew_leases(run_ids: list[str], seconds: float) -> None:
    """Extend the leases of runs executing here by ``seconds`` from now."""
    until = lease_deadline(seconds)
    for chunk in _chunks(run_ids):
        Run.update(lease_expires_at=until).where(Run.id.in_(chunk)).execute()


def request_cancel(run_id: str) -> None:
    """Flag a run to stop; the worker executing it, wherever it is, hears of it."""
    with database.atomic():
        Run.update(cancel_requested=True).where(Run.id == run_id).execute()
        _notify("c", [run_id])


def announce_events(latest: dict[str, int]) -> None:
    """Tell followers elsewhere that runs have events up to these seqs (PostgreSQL).

    Called in the transaction that wrote them: PostgreSQL delivers the notification when it
    commits, never before the events can be read.
    """
    if latest:
        _notify("e", [f"{run_id}:{seq}" for run_id, seq in latest.items()])


def _notify(kind: str, items: list[str]) -> None:
    """Send ``kind item item ...`` on the channel, in as few notifications as fit."""
    if not is_postgres():
        return  # SQLite's watcher polls
    payloads: list[str] = []
    current = kind
    for item in items:
        if len(current) + 1 + len(item) > MAX_PAYLOAD:
            payloads.append(current)
            current = kind
        current += " " + item
    payloads.append(current)
    database.execute_sql(
        "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload",
        (NOTIFY_CHANNEL, payloads),
    )


def lock_org_starts(org_id: str) -> None:
    """Make the organisation's run starts take turns until this transaction ends.

    So the count of its active runs that follows cannot be passed by a start committing
    meanwhile: on PostgreSQL, a transaction-scoped advisory lock (its default isolation lets
    two transactions each count the other's run out). SQLite's writers take turns already.
    """
    if is_postgres():
        database.execute_sql(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ORG_LOCK_CLASS, org_id)
        )


def cancel_requested_ids() -> list[str]:
    """Return the runs someone asked to stop that have not ended yet.

    The flag is cleared when a run ends, so the indexed query reads only the few runs being
    cancelled right now, however many are running.
    """
    return [run.id for run in Run.select(Run.id).where(Run.cancel_requested == True)]  # noqa: E712


def is_settled(run_id: str) -> bool:
    """Whether a run will emit nothing more now: ended, paused, or unknown."""
    run = Run.select(Run.status).where(Run.id == run_id).first()
    return run is None or run.status in (*RunStatus.FINAL, RunStatus.PAUSED)


def read_events(run_id: str, after: int, limit: int = 500) -> list[Event]:
    """Return up to ``limit`` of a run's stored events after seq ``after``, in order."""
    rows = (
        RunEvent.select()
        .where((RunEvent.run == run_id) & (RunEvent.seq > after))
        .order_by(RunEvent.seq)
        .limit(limit)
    )
    return [Event(run_id, row.seq, row.type, row.data, row.timestamp) for row in rows]


def read_history(session_pk: int) -> list[dict[str, Any]]:
    """Return a session's conversation in the providers' neutral message form."""
    rows = Message.select().where(Message.session == session_pk).order_by(Message.id)
    history: list[dict[str, Any]] = []
    for row in rows:
        message: dict[str, Any] = {"role": row.role, "content": row.content}
        if row.tool_calls:
            message["tool_calls"] = row.tool_calls
        if row.role == "tool":
            message["tool_call_id"] = row.tool_call_id
            message["name"] = row.name
        history.append(message)
    return history


def cancelled_tool_message(call: dict[str, Any]) -> dict[str, Any]:
    """The answer a tool call gets in the conversation when its run was cancelled first."""
    return {
        "role": "tool",
        "tool_call_id": call["id"],
        "name": call["name"],
        "content": "Error: the run was cancelled before this tool call ran.",
    }


def _chunks(ids: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


# The statements every run's end makes, built once (see Statement).
_INSERT_MESSAGE = insert_statement(
    Message,
    [
        Message.session,
        Message.run,
        Message.role,
        Message.content,
        Message.tool_calls,
        Message.tool_call_id,
        Message.name,
        Message.created_at,
    ],
)
_RELEASE_SESSION = Statement(
    lambda session_id, run_id, now: Session.update(
        {Session.active_run_id: None, Session.updated_at: now}
    ).where((Session.id == session_id) & (Session.active_run_id == run_id))
)
_OUTCOME_FIELDS = (
    Run.status,
    Run.content,
    Run.output,
    Run.reasoning_steps,
    Run.tool_calls,
    Run.followups,
    Run.usage,
    Run.error_type,
    Run.error,
    Run.cancel_requested,
    Run.required_action,
    Run.pending_calls,
    Run.lease_expires_at,
    Run.completed_at,
)
_RECORD_OUTCOME = Statement(
    lambda **slots: Run.update({f: slots[f.name] for f in _OUTCOME_FIELDS}).where(
        Run.id == slots["run_id"]
    ),
    convert={f.name: f.db_value for f in _OUTCOME_FIELDS},
    names=[*(f.name for f in _OUTCOME_FIELDS), "run_id"],
)


@dataclass
class RunEnding:
    """A run's final writes: its outcome, its new messages, its session released, and what
    its organisation's webhooks are told."""

    outcome: dict[str, Any]
    messages: list[dict[str, Any]]
    release: dict[str, Any] | None
    notice: RunNotice | None = None


def record_run_endings(endings: list[RunEnding]) -> None:
    """Write the final state of runs that ended: a few prepared statements for them all.

    The event log calls this in the transaction of their last events, with every run that
    ended since its last batch (or, if that fails, with each on its own). Their webhook
    messages join the same transaction.
    """
    _RECORD_OUTCOME.execute_many([ending.outcome for ending in endings])
    _INSERT_MESSAGE.execute_many([row for ending in endings for row in ending.messages])
    _RELEASE_SESSION.execute_many([e.release for e in endings if e.release is not None])
    enqueue_notices([ending.notice for ending in endings if ending.notice is not None])


def message_rows(
    session_pk: int, run_id: str, messages: list[dict[str, Any]], now: datetime.datetime
) -> list[dict[str, Any]]:
    return [
        {
            "session": session_pk,
            "run": run_id,
            "role": message["role"],
            "content": message.get("content") or "",
            "tool_calls": message.get("tool_calls"),
            "tool_call_id": message.get("tool_call_id"),
            "name": message.get("name"),
            "created_at": now,
        }
        for message in messages
    ]


def save_messages(
    session_pk: int, run_id: str, messages: list[dict[str, Any]], now: datetime.datetime
) -> None:
    _INSERT_MESSAGE.execute_many(message_rows(session_pk, run_id, messages, now))


def release_session(session_pk: int, run_id: str, now: datetime.datetime) -> None:
    """Let the session take its next run, if this run still holds it."""
    _RELEASE_SESSION.execute(session_id=session_pk, run_id=run_id, now=now)


def close_run_log(run_id: str, type: str, data: str) -> None:
    """Append a final event to the log of a run no executor holds (inside a transaction)."""
    last = (
        RunEvent.select(RunEvent.seq)
        .where(RunEvent.run == run_id)
        .order_by(RunEvent.seq.desc())
        .first()
    )
    seq = (last.seq if last else 0) + 1
    write_event(Event(run_id, seq, type, data, now_ms()))
    announce_events({run_id: seq})


def sweep_expired_runs(observer: RunObserver | None = None) -> list[str]:
    """Fail every run whose lease expired: its worker died. Returns their ids.

    Each is marked FAILED with errorType worker_lost, its log closed with an ERROR event and
    its session released, in one transaction per run; the status guard in the UPDATE makes a
    sweep that races another (or the run's own end) a no-op.
    """
    now = utcnow()
    expired = [
        (run.id, run.agent_id)
        for run in Run.select(Run.id, Run.agent_id).where(
            Run.status.in_([RunStatus.RUNNING, RunStatus.QUEUED]) & (Run.lease_expires_at < now)
        )
    ]
    swept = []
    for run_id, agent_id in expired:
        with database.atomic():
            updated = (
                Run.update(
                    status=RunStatus.FAILED,
                    error_type="worker_lost",
                    error=LOST_MESSAGE,
                    cancel_requested=False,
                    completed_at=now,
                    lease_expires_at=None,
                )
                .where(
                    (Run.id == run_id)
                    & Run.status.in_([RunStatus.RUNNING, RunStatus.QUEUED])
                    & (Run.lease_expires_at < now)
                )
                .execute()
            )
            if not updated:
                continue
            close_run_log(run_id, EventType.ERROR, LOST_MESSAGE)
            run = (
                Run.select(Run, Session.id, Session.uid).join(Session).where(Run.id == run_id).get()
            )
            release_session(run.session.id, run_id, now)
            enqueue_notices([run_notice(run)])
        swept.append(run_id)
        if observer is not None:
            observer.run_closed(run_id, agent_id, RunStatus.FAILED, EventType.ERROR, SWEPT_REASON)
        else:
            logger.warning("run %s failed: %s", run_id, SWEPT_REASON)
    return swept


def run_notice(run: Run) -> RunNotice:
    """The webhook notice of a run read with its session, in the state just written."""
    return RunNotice(
        run_id=run.id,
        org_id=run.org_id,
        agent_id=run.agent_id,
        session_id=run.session.uid,
        status=run.status,
        usage=run.usage,
        completed_at=run.completed_at,
    )


def prune_events(retention_days: float) -> int:
    """Delete the events of runs that finished more than ``retention_days`` ago."""
    cutoff = utcnow() - datetime.timedelta(days=retention_days)
    finished = Run.select(Run.id).where(
        Run.status.in_(RunStatus.FINAL) & (Run.completed_at < cutoff)
    )
    return RunEvent.delete().where(RunEvent.run.in_(finished)).execute()
