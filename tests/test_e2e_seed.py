"""The seed's own clients against a real gunicorn: its curl command and its TypeScript example.

Both are taken from the seed page at test time, so the examples the API contract shows are the
examples that run; only the host and the token are substituted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time

import requests

from .e2e_frames import assert_complete, content_of, parse_frames

SEED_FILE = "000_3c079e67fe4d8ff8.txt"
SEED_HOST = "http://localhost:8080"
SEED_SESSION = "550e8400-e29b-41d4-a716-446655440000"
NODE_FALLBACK = "/usr/bin/node"


def seed_text(repo_root: str) -> str:
    with open(os.path.join(repo_root, "..", "shared", "seed", SEED_FILE), encoding="utf-8") as f:
        return f.read()


def code_block(text: str, opening: str, must_contain: str) -> str:
    """Return the first fenced block whose opening line starts with ``opening``, dedented."""
    pattern = re.compile(
        r"^[ \t]*" + re.escape(opening) + r"[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M
    )
    for match in pattern.finditer(text):
        if must_contain in match.group(1):
            return textwrap.dedent(match.group(1))
    raise AssertionError(f"the seed has no {opening} block containing {must_contain!r}")


def substitute(code: str, server) -> str:
    assert SEED_HOST in code and "{token}" in code
    return code.replace(SEED_HOST, server.url).replace("{token}", server.token)


def seed_curl(repo_root: str, server) -> str:
    return substitute(code_block(seed_text(repo_root), "```bash cURL", "runs/stream"), server)


def run_shell(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, timeout=30)


def get_status(server, run_id: str, agent: str = "finance_agent") -> dict:
    response = requests.get(
        f"{server.url}/api/agents/{agent}/runs/{run_id}/status",
        headers=server.headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_seed_curl_command_gets_the_seed_stream(server, repo_root):
    script = seed_curl(repo_root, server)
    # The command is the seed's, flag for flag.
    assert script.startswith("curl --request POST")
    assert '--header "Accept: text/event-stream"' in script
    before = int(time.time() * 1000)
    result = run_shell(script)
    after = int(time.time() * 1000)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    body = result.stdout.decode("utf-8")

    frames = parse_frames(body)
    assert_complete(frames)
    events = [frame.event for frame in frames]
    # START, reasoning, one tool call, content deltas, STOP: the order the seed's example shows.
    assert re.fullmatch(
        r"START( REASONING_DELTA)+ TOOL_START TOOL_END( CONTENT_DELTA)+ STOP", " ".join(events)
    ), events
    assert all(before - 1000 <= frame.timestamp <= after + 1000 for frame in frames)

    start = frames[0].json_data()
    assert list(start) == ["runId", "sessionId"]
    assert start["sessionId"] == SEED_SESSION
    assert isinstance(start["runId"], str) and start["runId"]

    reasoning = "".join(frame.data for frame in frames if frame.event == "REASONING_DELTA")
    assert "get_stock_price" in reasoning

    tool_start = next(frame for frame in frames if frame.event == "TOOL_START").json_data()
    assert tool_start["name"] == "get_stock_price"
    assert tool_start["arguments"] == {"ticker": "NVDA"}
    tool_end = next(frame for frame in frames if frame.event == "TOOL_END").json_data()
    assert tool_end["name"] == "get_stock_price"
    assert re.fullmatch(r"\d+\.\d\d", tool_end["result"]), tool_end
    assert "error" not in tool_end

    content = content_of(frames)
    assert tool_end["result"] in content
    assert frames[-1].data == ""

    # What was streamed is what the run recorded.
    status = get_status(server, start["runId"])
    assert status["status"] == "COMPLETED"
    assert status["sessionId"] == SEED_SESSION
    assert status["content"] == content


def test_seed_curl_command_sees_the_streaming_headers(server, repo_root):
    result = run_shell(seed_curl(repo_root, server).rstrip() + " --include")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    head, separator, body = result.stdout.decode("utf-8").partition("\r\n\r\n")
    assert separator, result.stdout[:500]
    status_line, *header_lines = head.split("\r\n")
    assert status_line.startswith("HTTP/1.1 200"), status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert headers["content-type"].split(";")[0].strip() == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert "content-length" not in headers  # streamed, not buffered
    frames = parse_frames(body)
    assert_complete(frames)
    assert frames[0].json_data()["sessionId"] == SEED_SESSION


def node_script(repo_root: str, server) -> str:
    code = code_block(seed_text(repo_root), "```typescript", "streamAgent(")
    signature = re.compile(r"^(async function streamAgent\()([^)]*)(\))", re.M)
    assert signature.search(code), "the seed's streamAgent signature changed"
    # The only TypeScript in the example is the parameter annotations.
    code = signature.sub(
        lambda m: m.group(1) + re.sub(r"\s*:\s*string\b", "", m.group(2)) + m.group(3), code
    )
    assert "async function streamAgent(agentId, message)" in code
    return substitute(code, server)


def test_seed_typescript_example_runs_under_node(server, repo_root, tmp_path):
    node = shutil.which("node") or NODE_FALLBACK
    assert os.path.exists(node), "node is required to run the seed's TypeScript example"
    script = tmp_path / "stream_agent.mjs"
    script.write_text(node_script(repo_root, server), encoding="utf-8")

    result = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Stream error:" not in result.stderr, result.stderr
    out = result.stdout

    markers = [
        "Stream started:",
        "[thinking...]",
        "[calling tool: get_stock_price]",
        "[tool get_stock_price complete]",
        "[response]",
        "[stream complete]",
        "Full response:",
    ]
    positions = [out.find(marker) for marker in markers]
    assert -1 not in positions, out
    assert positions == sorted(positions), out

    # console.log of the parsed START data: { runId: '...', sessionId: '...' }
    started = re.search(r"Stream started: \{\s*runId: '([^']+)',\s*sessionId: '([^']+)'\s*\}", out)
    assert started, out
    run_id, session_id = started.groups()
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", session_id
    )

    status = get_status(server, run_id)
    assert status["status"] == "COMPLETED" and status["sessionId"] == session_id
    content = status["content"]
    assert re.fullmatch(r"get_stock_price returned \d+\.\d\d\.", content), content
    # The deltas were written as they came, and the concatenation is the full answer.
    assert f"[response]\n{content}\n[stream complete]\n" in out, out
    assert out.endswith(f"Full response: {content}\n"), out


def test_multi_turn_session_over_http(server):
    session_id = "e2e-multi-turn-7d4c"
    url = f"{server.url}/api/agents/assistant/runs"

    first = requests.post(
        url,
        json={"message": "My name is Ada.", "sessionId": session_id},
        headers=server.headers,
        timeout=30,
    )
    assert first.status_code == 200, first.text
    assert first.headers["Content-Type"] == "application/json"
    first_body = first.json()
    assert first_body["status"] == "COMPLETED"
    assert first_body["sessionId"] == session_id
    assert first_body["content"] == "You said: My name is Ada."

    second = requests.post(
        url,
        json={"message": "What is my name?", "sessionId": session_id},
        headers=server.headers,
        timeout=30,
    )
    assert second.status_code == 200, second.text
    second_body = second.json()
    assert second_body["sessionId"] == session_id
    assert second_body["runId"] != first_body["runId"]
    # The model saw the first turn: this is the second user message of the conversation.
    assert second_body["content"] == "(turn 2) You said: What is my name?"

    # Without the sessionId the same question starts a conversation of its own.
    fresh = requests.post(
        url, json={"message": "What is my name?"}, headers=server.headers, timeout=30
    )
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["sessionId"] != session_id
    assert fresh.json()["content"] == "You said: What is my name?"

    for body in (first_body, second_body):
        status = get_status(server, body["runId"], agent="assistant")
        assert status["sessionId"] == session_id and status["status"] == "COMPLETED"
        assert status["content"] == body["content"]
