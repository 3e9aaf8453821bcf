"""Keys the server signs its own short-lived tokens with, shared by every worker and host.

- ``signing_key``: one row per purpose. ``stream_token`` signs the read-only tokens a browser's
  EventSource puts in a URL (POST .../events/token); it is made here, once per database, so
  every worker of every host on the database verifies what any of them issued.
"""

import datetime
import secrets

from peewee import CharField, DateTimeField, Model


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _tables(db):
    class SigningKey(Model):
        name = CharField(max_length=64, primary_key=True)
        secret = CharField(max_length=128)
        created_at = DateTimeField(default=_now)

        class Meta:
            database = db
            legacy_table_names = False

    return [SigningKey]


def up(migrator, db):
    (signing_key,) = _tables(db)
    db.create_tables([signing_key])
    signing_key.create(name="stream_token", secret=secrets.token_urlsafe(32))


def down(migrator, db):
    db.drop_tables(list(reversed(_tables(db))))
