"""Agents kept as data, what a run records of its agent and its output, and the run listing.

- ``agent_definition``: an organisation's own agents, one row per version. A change adds a
  version and keeps the old ones (a run of version 3 can be read, or continued after a pause,
  as it ran); a deletion adds a version without a definition.
- ``run.agent_version``: the version of such an agent the run ran (null for the agents file's
  and Python's agents); ``run.output``: the parsed answer of a run with structured output.
- Indexes for GET /runs, newest first within an organisation, optionally a user or a status.
  ``run(org_id, status, created_at)`` replaces ``run(org_id, status)``, which it covers;
  ``session(org_id, uid)`` finds a session by its public id for an organisation-wide token.
"""

import datetime

from peewee import CharField, DateTimeField, IntegerField, Model, TextField


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _tables(db):
    class AgentDefinition(Model):
        org_id = CharField(max_length=128)
        agent_id = CharField(max_length=128)
        version = IntegerField()
        definition = TextField(null=True)
        created_at = DateTimeField(default=_now)
        created_by = CharField(max_length=128, default="")

        class Meta:
            database = db
            legacy_table_names = False
            indexes = ((("org_id", "agent_id", "version"), True),)

    return [AgentDefinition]


def up(migrator, db):
    db.create_tables(_tables(db))
    migrator.migrate(
        migrator.add_column("run", "agent_version", IntegerField(null=True)),
        migrator.add_column("run", "output", TextField(null=True)),
        migrator.drop_index("run", "run_org_id_status"),
        migrator.add_index("run", ("org_id", "status", "created_at"), False),
        migrator.add_index("run", ("org_id", "created_at"), False),
        migrator.add_index("run", ("org_id", "user_id", "created_at"), False),
        migrator.add_index("session", ("org_id", "uid"), False),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index("session", "session_org_id_uid"),
        migrator.drop_index("run", "run_org_id_user_id_created_at"),
        migrator.drop_index("run", "run_org_id_created_at"),
        migrator.drop_index("run", "run_org_id_status_created_at"),
        migrator.add_index("run", ("org_id", "status"), False),
        migrator.drop_column("run", "output"),
        migrator.drop_column("run", "agent_version"),
    )
    db.drop_tables(list(reversed(_tables(db))))
