"""A real gunicorn serving the agents the client and chat tests talk to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .server import GunicornServer

REPO_ROOT = str(Path(__file__).resolve().parent.parent)

AGENTS_YAML = """\
agents:
  - id: assistant
    name: General assistant
    description: Echoes the message, in a few deltas.
  - id: finance_agent
    name: Finance assistant
    description: Looks up a stock price, then answers.
    tools:
      - agent_runs.runtime.demo_tools:get_stock_price
  - id: paced
    name: Paced
    description: Answers in eighty deltas, 10 ms apart.
    model_options: {delay: 0.01, content_deltas: 80}
  - id: chatty
    name: Chatty
    description: Talks for twenty seconds unless cancelled.
    model_options: {delay: 0.1, content_deltas: 200}
  - id: slowtool
    name: Slow tool
    description: Calls a tool that sleeps for the seconds its query names.
    tools:
      - tests.e2e_tools:slow_lookup
  - id: banker
    name: Banker
    description: Wires money, with a human's approval.
    tools:
      - {use: "tests.e2e_tools:wire_money", requires_approval: true}
    model_options: {content_deltas: 3}
  - id: broken
    name: Broken
    description: Its model server is not there, so every run fails.
    model: openai:gpt-4o-mini
    model_options: {base_url: "http://127.0.0.1:9/v1", api_key: "none", retry_delay: 0.01}
"""


@contextmanager
def serve_agents(folder: Path) -> Iterator[GunicornServer]:
    """Run gunicorn (one worker) on AGENTS_YAML, able to import tests.e2e_tools."""
    agents_file = folder / "agents.yaml"
    agents_file.write_text(AGENTS_YAML, encoding="utf-8")
    python_path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {"AGENT_RUNS_AGENTS_FILE": str(agents_file), "PYTHONPATH": python_path}
    with GunicornServer(folder, env=env) as server:
        yield server
