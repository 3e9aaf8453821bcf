"""``python -m agent_runs`` is the ``agent-runs`` command."""

from .cli import main

main()
