"""Create the tables of idempotency keys, webhooks and the webhook deliveries' outbox."""

import datetime

from peewee import (
    AutoField,
    CharField,
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

    # Stands for the run table made by 0001, for the foreign key; never created here.
    class Run(Base):
        id = CharField(max_length=64, primary_key=True)

    class IdempotencyKey(Base):
        id = AutoField()
        org_id = CharField(max_length=128)
        key = CharField(max_length=255)
        fingerprint = CharField(max_length=64)
        run = ForeignKeyField(Run, null=True, on_delete="CASCADE")
        created_at = DateTimeField(default=_now)

        class Meta:
            indexes = (
                (("org_id", "key"), True),
                (("created_at",), False),
            )

    class Webhook(Base):
        id = CharField(max_length=64, primary_key=True)
        org_id = CharField(max_length=128)
        url = TextField()
        events = TextField()
        secret = CharField(max_length=128)
        created_at = DateTimeField(default=_now)

        class Meta:
            indexes = ((("org_id", "created_at"), False),)

    class WebhookDelivery(Base):
        id = AutoField()
        webhook = ForeignKeyField(Webhook, on_delete="CASCADE", index=False)
        message_id = CharField(max_length=64)
        event = CharField(max_length=32)
        payload = TextField()
        status = CharField(max_length=16, default="PENDING")
        attempts = IntegerField(default=0)
        next_attempt_at = DateTimeField(default=_now)
        claim = CharField(max_length=32, null=True)
        last_status = IntegerField(null=True)
        last_error = TextField(null=True)
        created_at = DateTimeField(default=_now)
        delivered_at = DateTimeField(null=True)

        class Meta:
            indexes = (
                (("status", "next_attempt_at"), False),
                (("webhook", "message_id"), True),
            )

    return [IdempotencyKey, Webhook, WebhookDelivery]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(list(reversed(_tables(db))))
