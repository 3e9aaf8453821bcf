"""Database migrations, applied in numeric order by playhouse.migrations.

Each script declares frozen copies of the tables it creates, independent of agent_runs.models,
so that it keeps meaning the same thing as the models change.
"""
