"""Drop two indexes that others already cover.

``run_event(run_id)`` is the first column of the event log's primary key (run_id, seq), and
``run(session_id)`` the first of ``run(session_id, created_at)``. Every event written updated
both the key and the first; without it a batch of events costs SQLite about half as much to
commit.
"""


def up(migrator, db):
    migrator.migrate(
        migrator.drop_index("run_event", "run_event_run_id"),
        migrator.drop_index("run", "run_session_id"),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.add_index("run_event", ("run_id",), False),
        migrator.add_index("run", ("session_id",), False),
    )
