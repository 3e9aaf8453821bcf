"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

A database the application cannot use (a wrong URL, a server out of reach) is one line in
gunicorn's log from each worker, and gunicorn stops ("App failed to load."), as
``agent-runs serve`` does, instead of a traceback per worker.
"""

import logging
import sys

from agent_runs import create_app
from agent_runs.db import DatabaseUnavailable

try:
    app = create_app()
except DatabaseUnavailable as error:
    logging.getLogger("gunicorn.error").error("%s", error)
    # gunicorn's exit status for an application that cannot load: its master stops too.
    sys.exit(4)
