"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

from agent_runs import create_app

app = create_app()
