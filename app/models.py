"""Peewee models: runs, their event logs, conversation sessions and messages, API tokens.

The tables are created and changed only by the scripts in migrations/; these classes describe
the current schema for queries.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import peewee

from .db import database


def utcnow() -> datetime.datetime:
    """Return the current time as a naive UTC datetime, the form every timestamp is stored in."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# Built once: json.dumps with options builds a JSONEncoder on every call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class JSONField(peewee.TextField):
    """A JSON document stored as text."""

    def db_value(self, value: Any) -> str | None:
        if value is None:
            return None
        return _encode_json(value)

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class RunStatus:
    """The states of a run. QUEUED runs wait for the executor; the last three are final."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    ALL = (QUEUED, RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED)
    ACTIVE = (QUEUED, RUNNING, PAUSED)
    FINAL = (COMPLETED, FAILED, CANCELLED)


class ApiToken(BaseModel):
    """A bearer token. Only the SHA-256 of the secret is stored."""

    id = peewee.AutoField()
    token_hash = peewee.CharField(max_length=64, unique=True)
    # The first characters of the secret, so an operator can tell tokens apart in a listing.
    prefix = peewee.CharField(max_length=16)
    name = peewee.CharField(max_length=200, default="")
    org_id = peewee.CharField(max_length=128)
    user_id = peewee.CharField(max_length=128, null=True)
    scopes = peewee.CharField(max_length=200, default="runs:read runs:write")
    created_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField(null=True)
    revoked_at = peewee.DateTimeField(null=True)


class Session(BaseModel):
    """A conversation: the runs of one agent for one tenant, and their messages.

    ``uid`` is the sessionId clients see. It is unique within an (org, user) pair rather than
    globally, so two tenants who both pick the seed's example UUID never share a conversation.
    """

    id = peewee.AutoField()
    uid = peewee.CharField(max_length=128)
    org_id = peewee.CharField(max_length=128)
    # "" when the run was not made for a particular user; kept non-null so the unique key holds.
    user_id = peewee.CharField(max_length=128, default="")
    agent_id = peewee.CharField(max_length=128)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)
    # The run that holds the session now. Claimed with a conditional UPDATE, so at most one run
    # is active per session whatever the number of workers.
    active_run_id = peewee.CharField(max_length=64, null=True)

    class Meta:
        indexes = (
            (("org_id", "user_id", "uid"), True),
            (("org_id", "updated_at"), False),
            # GET /runs?sessionId= for an organisation-wide token, which names no user.
            (("org_id", "uid"), False),
        )


class Run(BaseModel):
    """One execution of an agent: its status, its output and how it got there."""

    id = peewee.CharField(max_length=64, primary_key=True)
    org_id = peewee.CharField(max_length=128)
    user_id = peewee.CharField(max_length=128, default="")
    agent_id = peewee.CharField(max_length=128)
    # Indexed by (session, created_at) below, which serves lookups by session alone too.
    session = peewee.ForeignKeyField(Session, backref="runs", on_delete="CASCADE", index=False)
    status = peewee.CharField(max_length=16, default=RunStatus.RUNNING)
    model = peewee.CharField(max_length=200, default="")
    # The version of an organisation's own agent this run ran; None for the agents file's and
    # Python's agents, which have no versions.
    agent_version = peewee.IntegerField(null=True)
    input = peewee.TextField(default="")
    request = JSONField(null=True)
    content = peewee.TextField(default="")
    # The answer parsed, for a run asked for structured output (options.responseFormat).
    output = JSONField(null=True)
    reasoning_steps = JSONField(null=True)
    tool_calls = JSONField(null=True)
    followups = JSONField(null=True)
    usage = JSONField(null=True)
    error_type = peewee.CharField(max_length=64, null=True)
    error = peewee.TextField(null=True)
    required_action = JSONField(null=True)
    # The tool calls a PAUSED run still has to make, the first awaiting approval.
    pending_calls = JSONField(null=True)
    cancel_requested = peewee.BooleanField(default=False)
    # Renewed by the executor while the run works; an expired lease means its worker died.
    lease_expires_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    started_at = peewee.DateTimeField(null=True)
    completed_at = peewee.DateTimeField(null=True)

    class Meta:
        indexes = (
            (("org_id", "agent_id", "created_at"), False),
            (("status", "lease_expires_at"), False),
            (("session", "created_at"), False),
            # GET /runs, newest first: the organisation's, a user's, or those in a status
            # (which also counts an organisation's active runs).
            (("org_id", "created_at"), False),
            (("org_id", "user_id", "created_at"), False),
            (("org_id", "status", "created_at"), False),
            (("cancel_requested",), False),
        )


class RunEvent(BaseModel):
    """One entry of a run's event log: what its stream carried, in order."""

    # No index of its own: the primary key (run, seq) serves every lookup by run.
    run = peewee.ForeignKeyField(Run, backref="events", on_delete="CASCADE", index=False)
    seq = peewee.IntegerField()
    type = peewee.CharField(max_length=32)
    data = peewee.TextField(default="")
    timestamp = peewee.BigIntegerField()

    class Meta:
        primary_key = peewee.CompositeKey("run", "seq")


class Message(BaseModel):
    """One message of a session's conversation, in the order the model saw it."""

    id = peewee.AutoField()
    session = peewee.ForeignKeyField(Session, backref="messages", on_delete="CASCADE")
    run = peewee.ForeignKeyField(Run, null=True, on_delete="CASCADE")
    role = peewee.CharField(max_length=16)
    content = peewee.TextField(default="")
    # Assistant messages that call tools: [{id, name, arguments}]. Tool results: the call's id.
    tool_calls = JSONField(null=True)
    tool_call_id = peewee.CharField(max_length=128, null=True)
    name = peewee.CharField(max_length=128, null=True)
    created_at = peewee.DateTimeField(default=utcnow)


class IdempotencyKey(BaseModel):
    """An Idempotency-Key an organisation sent with a run request, and the run it started.

    Unique per organisation in the database itself, so of two requests racing with one key
    (on any worker) one inserts it, in the transaction that records its run, and the other
    finds it.
    """

    id = peewee.AutoField()
    org_id = peewee.CharField(max_length=128)
    key = peewee.CharField(max_length=255)
    # SHA-256 of what was asked: the user, the operation, the agent and the request's body.
    fingerprint = peewee.CharField(max_length=64)
    # Set in the transaction that inserts the key; a deleted run takes its key with it.
    run = peewee.ForeignKeyField(Run, null=True, on_delete="CASCADE")
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = (
            (("org_id", "key"), True),
            (("created_at",), False),
        )


class Webhook(BaseModel):
    """An endpoint an organisation registered to be told of its runs' ends, and its secret.

    The secret is kept as given to the organisation (``whsec_`` and base64): the server
    signs every delivery with it.
    """

    id = peewee.CharField(max_length=64, primary_key=True)
    org_id = peewee.CharField(max_length=128)
    url = peewee.TextField()
    # The event types it gets, such as ["run.completed", "run.failed"].
    events = JSONField()
    secret = peewee.CharField(max_length=128)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("org_id", "created_at"), False),)


class DeliveryStatus:
    """The states of a webhook delivery: PENDING until a 2xx, or until its retries run out."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class WebhookDelivery(BaseModel):
    """One message to one webhook: a row of the outbox that the deliverers send and retry.

    Written in the transaction that records the run's end, so a run that ended is announced
    and one whose end was rolled back is not.
    """

    id = peewee.AutoField()
    # Indexed by (webhook, message_id) below, which serves lookups by webhook alone too.
    webhook = peewee.ForeignKeyField(Webhook, on_delete="CASCADE", index=False)
    # The webhook-id header: the same on every attempt, so a receiver can drop repeats.
    message_id = peewee.CharField(max_length=64)
    event = peewee.CharField(max_length=32)
    # The body, byte for byte as every attempt sends (and signs) it.
    payload = peewee.TextField()
    status = peewee.CharField(max_length=16, default=DeliveryStatus.PENDING)
    attempts = peewee.IntegerField(default=0)
    # When the next attempt is due. A deliverer that claims the row moves it past the end of
    # its attempt: should the deliverer die, the row is due again then.
    next_attempt_at = peewee.DateTimeField(default=utcnow)
    # Who holds the row's current attempt: only the holder may record its result.
    claim = peewee.CharField(max_length=32, null=True)
    last_status = peewee.IntegerField(null=True)
    last_error = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    delivered_at = peewee.DateTimeField(null=True)

    class Meta:
        indexes = (
            (("status", "next_attempt_at"), False),
            (("webhook", "message_id"), True),
        )


class AgentDefinition(BaseModel):
    """One version of an organisation's own agent, as stored through the API.

    Every change adds a version; old ones stay, so a run can be read and continued as the
    version it ran. ``definition`` is the agents file's form of the agent (see
    schemas.AgentDefinitionSchema); None marks a deletion.
    """

    id = peewee.AutoField()
    org_id = peewee.CharField(max_length=128)
    agent_id = peewee.CharField(max_length=128)
    version = peewee.IntegerField()
    definition = JSONField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    # The user whose token made the change ("" for an organisation-wide token).
    created_by = peewee.CharField(max_length=128, default="")

    class Meta:
        indexes = ((("org_id", "agent_id", "version"), True),)


class SigningKey(BaseModel):
    """A key the server signs its own tokens with (stream tokens), made by a migration."""

    name = peewee.CharField(max_length=64, primary_key=True)
    secret = peewee.CharField(max_length=128)
    created_at = peewee.DateTimeField(default=utcnow)


MODELS = (
    ApiToken,
    Session,
    Run,
    RunEvent,
    Message,
    IdempotencyKey,
    Webhook,
    WebhookDelivery,
    AgentDefinition,
    SigningKey,
)
