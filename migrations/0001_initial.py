"""Create the tables for tokens, sessions, runs, their event logs and messages."""

import datetime

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _tables(db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class ApiToken(Base):
        token_hash = CharField(max_length=64, unique=True)
        prefix = CharField(max_length=16)
        name = CharField(max_length=200, default="")
        org_id = CharField(max_length=128)
        user_id = CharField(max_length=128, null=True)
        scopes = CharField(max_length=200, default="runs:read runs:write")
        created_at = DateTimeField(default=_now)
        expires_at = DateTimeField(null=True)
        revoked_at = DateTimeField(null=True)

    class Session(Base):
        uid = CharField(max_length=128)
        org_id = CharField(max_length=128)
        user_id = CharField(max_length=128, default="")
        agent_id = CharField(max_length=128)
        created_at = DateTimeField(default=_now)
        updated_at = DateTimeField(default=_now)
        active_run_id = CharField(max_length=64, null=True)

        class Meta:
            indexes = (
                (("org_id", "user_id", "uid"), True),
                (("org_id", "updated_at"), False),
            )

    class Run(Base):
        id = CharField(max_length=64, primary_key=True)
        org_id = CharField(max_length=128)
        user_id = CharField(max_length=128, default="")
        agent_id = CharField(max_length=128)
        session = ForeignKeyField(Session, on_delete="CASCADE")
        status = CharField(max_length=16, default="RUNNING")
        model = CharField(max_length=200, default="")
        input = TextField(default="")
        request = TextField(null=True)
        content = TextField(default="")
        reasoning_steps = TextField(null=True)
        tool_calls = TextField(null=True)
        followups = TextField(null=True)
        usage = TextField(null=True)
        error_type = CharField(max_length=64, null=True)
        error = TextField(null=True)
        required_action = TextField(null=True)
        pending_calls = TextField(null=True)
        cancel_requested = BooleanField(default=False)
        lease_expires_at = DateTimeField(null=True)
        created_at = DateTimeField(default=_now)
        started_at = DateTimeField(null=True)
        completed_at = DateTimeField(null=True)

        class Meta:
            indexes = (
                (("org_id", "agent_id", "created_at"), False),
                (("status", "lease_expires_at"), False),
                (("session", "created_at"), False),
                (("org_id", "status"), False),
                (("cancel_requested",), False),
            )

    class RunEvent(Base):
        run = ForeignKeyField(Run, on_delete="CASCADE")
        seq = IntegerField()
        type = CharField(max_length=32)
        data = TextField(default="")
        timestamp = BigIntegerField()

        class Meta:
            primary_key = CompositeKey("run", "seq")

    class Message(Base):
        session = ForeignKeyField(Session, on_delete="CASCADE")
        run = ForeignKeyField(Run, null=True, on_delete="CASCADE")
        role = CharField(max_length=16)
        content = TextField(default="")
        tool_calls = TextField(null=True)
        tool_call_id = CharField(max_length=128, null=True)
        name = CharField(max_length=128, null=True)
        created_at = DateTimeField(default=_now)

    return [ApiToken, Session, Run, RunEvent, Message]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(list(reversed(_tables(db))))
