"""Agent Runs: an HTTP server that runs AI agents and streams every run as Server-Sent Events.

Run it standalone with :func:`create_app` (``agent-runs serve``), or mount the API on your own
Flask application with the :class:`AgentRuns` extension::

    from agent_runs import AgentRuns

    AgentRuns(app, url_prefix="/agents-api")

Talk to a running server with :class:`agent_runs.client.AgentRunsClient`.

The names below are imported when first used, so that ``import agent_runs.client`` does not
load Flask, gevent and the database layer into a program that only calls the API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRuns",
    "Tool",
    "create_app",
    "register_agent",
    "register_tool",
    "tool",
]

# Where each public name lives.
_EXPORTS = {
    "Agent": ".runtime.agents",
    "AgentRuns": ".extension",
    "Tool": ".runtime.agents",
    "create_app": ".extension",
    "register_agent": ".runtime.agents",
    "register_tool": ".runtime.agents",
    "tool": ".runtime.agents",
}

if TYPE_CHECKING:
    from .extension import AgentRuns, create_app
    from .runtime.agents import Agent, Tool, register_agent, register_tool, tool


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
