"""Tools for the agents of the end-to-end resilience tests, imported by the gunicorn workers.

Each call is recorded as one JSON line in the file named by ``E2E_TOOL_LOG`` (when set), so a
test can tell from outside the server whether, how often and how far a tool really ran:
``{"tool", "argument", "phase": "start"|"done"|"interrupted", "pid", "exception"?}``.
The scripted model passes the user's message as the (only) string argument, so a test that
puts a unique word in its message finds its own calls.
"""

from __future__ import annotations

import json
import os
import re
import time

from agent_runs import tool


def _record(name: str, argument: str, phase: str, **extra: object) -> None:
    path = os.environ.get("E2E_TOOL_LOG")
    if not path:
        return
    line = json.dumps(
        {"tool": name, "argument": argument, "phase": phase, "pid": os.getpid(), **extra}
    )
    # One small O_APPEND write per line: lines of several workers never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_tool_log(path: str) -> list[dict]:
    """Return the recorded calls (the test side of ``_record``)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@tool
def lookup(query: str) -> str:
    """Look something up (instantly)."""
    _record("lookup", query, "done")
    return f"found {len(query)} characters"


@tool
def slow_lookup(query: str) -> str:
    """Look something up, slowly: sleeps the seconds named by 'sleep=N' in the query."""
    match = re.search(r"sleep=(\d+(?:\.\d+)?)", query)
    seconds = float(match.group(1)) if match else 5.0
    _record("slow_lookup", query, "start")
    try:
        # time.sleep, not gevent.sleep: the worker is monkey-patched, so this yields, and a
        # cancel must be able to interrupt a tool that knows nothing about gevent.
        time.sleep(seconds)
    except BaseException as exc:
        _record("slow_lookup", query, "interrupted", exception=type(exc).__name__)
        raise
    _record("slow_lookup", query, "done")
    return "slowly found"


@tool
def wire_money(amount: str) -> str:
    """Send money (needs a human's approval in the agents that use it)."""
    _record("wire_money", amount, "done")
    return f"sent {amount}"
