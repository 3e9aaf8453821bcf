"""AGENT_RUNS_LOG_FORMAT=json: every line of a real server's log is one JSON object.

A run's start and end are logged once each, the end with status, duration and token counts; a
failed run's error once; whatever a run's greenlet logs names the run; gunicorn's own lines
are JSON too; the message's text and the bearer token appear nowhere.
"""

from __future__ import annotations

import json
import logging

import pytest
import requests

from agent_runs.logs import TextFormatter, configure

from .server import GunicornServer
from .sse import parse_stream

SECRET_TEXT = "Kumquat-7781-never-logged"
AGENTS_YAML = """\
agents:
  - id: noisy
    name: Noisy
    description: Calls a tool that logs a line.
    instructions: Use the tool.
    tools:
      - logging_tools:lookup
  - id: broken
    name: Broken
    description: Its model has no API key, so every run fails.
    model: openai:gpt-4o-mini
"""
TOOLS = '''\
import logging

from agent_runs import tool


@tool
def lookup(query: str) -> str:
    """Look something up."""
    logging.getLogger("logging_tools").warning("the lookup tool was called")
    return "found"
'''


@pytest.fixture(scope="module")
def json_log(tmp_path_factory):
    """Run a noisy run and a failing one on a server logging JSON; return its log's lines."""
    folder = tmp_path_factory.mktemp("json-logs")
    (folder / "agents.yaml").write_text(AGENTS_YAML, encoding="utf-8")
    (folder / "logging_tools.py").write_text(TOOLS, encoding="utf-8")
    env = {
        "AGENT_RUNS_LOG_FORMAT": "json",
        "AGENT_RUNS_ACCESS_LOG": "-",
        "AGENT_RUNS_AGENTS_FILE": str(folder / "agents.yaml"),
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        # The agents' tool module, for the agent-runs command (gunicorn imports from its
        # working directory, the folder, by itself).
        "PYTHONPATH": str(folder),
    }
    with GunicornServer(folder, workers=2, env=env) as server:
        stream = requests.post(
            f"{server.url}/api/agents/noisy/runs/stream",
            headers=server.headers,
            json={"message": f"Find {SECRET_TEXT} please"},
            timeout=30,
        )
        assert stream.status_code == 200 and '"event":"STOP"' in stream.text
        failed = requests.post(
            f"{server.url}/api/agents/broken/runs",
            headers=server.headers,
            json={"message": SECRET_TEXT},
            timeout=30,
        )
        assert failed.status_code == 200 and failed.json()["status"] == "FAILED"
    # The server has stopped: its log is complete.
    text = server.log_path.read_text(encoding="utf-8")
    return {
        "text": text,
        "lines": [line for line in text.splitlines() if line.strip()],
        "token": server.token,
        "noisy": json.loads(parse_stream(stream.text)[0]["data"])["runId"],
        "broken": failed.json()["runId"],
    }


def records(json_log):
    return [json.loads(line) for line in json_log["lines"]]


def test_every_line_is_one_json_object_with_time_level_and_message(json_log):
    assert json_log["lines"]
    for line in json_log["lines"]:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "message"} <= set(record), line
        assert record["time"].endswith("+00:00")


def test_gunicorn_lines_are_json_too(json_log):
    found = records(json_log)
    assert any(
        r.get("logger") == "gunicorn.error" and "Booting worker" in r["message"] for r in found
    )
    access = [r for r in found if r.get("logger") == "gunicorn.access"]
    assert any("/api/agents/noisy/runs/stream" in r["message"] for r in access)


def test_a_run_logs_its_start_and_end_once_each(json_log):
    run = [r for r in records(json_log) if r.get("runId") == json_log["noisy"]]
    started = [r for r in run if r["message"].startswith("run started")]
    ended = [r for r in run if "status" in r]
    assert len(started) == 1 and len(ended) == 1, run
    end = ended[0]
    assert end["level"] == "INFO" and end["status"] == "COMPLETED"
    assert end["agentId"] == "noisy" and end["orgId"] == "acme" and end["sessionId"]
    assert isinstance(end["durationMs"], int) and end["durationMs"] >= 0
    assert end["inputTokens"] > 0 and end["outputTokens"] > 0
    # What the run's tool logged, in the run's greenlet, names the run.
    tool_lines = [r for r in run if r.get("logger") == "logging_tools"]
    assert len(tool_lines) == 1
    assert tool_lines[0]["sessionId"] == end["sessionId"] and tool_lines[0]["agentId"] == "noisy"


def test_a_failed_run_logs_its_error_once(json_log):
    run = [r for r in records(json_log) if r.get("runId") == json_log["broken"]]
    errors = [r for r in run if r["level"] == "ERROR"]
    assert len(errors) == 1, run
    assert errors[0]["status"] == "FAILED" and errors[0]["errorType"] == "model_error"
    assert len([r for r in run if r["message"].startswith("run started")]) == 1


def test_neither_the_message_nor_the_token_is_logged(json_log):
    assert SECRET_TEXT not in json_log["text"]
    assert json_log["token"] not in json_log["text"]


def test_the_text_format_names_the_run_after_the_message():
    record = logging.LogRecord(
        "agent_runs.runs", logging.INFO, __file__, 1, "run started", (), None
    )
    record.runId, record.orgId = "run_1", "acme"
    line = TextFormatter().format(record)
    assert "[INFO] agent_runs.runs: run started [runId=run_1 orgId=acme]" in line


def test_an_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="AGENT_RUNS_LOG_FORMAT"):
        configure("xml", "info")
