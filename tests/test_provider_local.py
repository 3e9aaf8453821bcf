"""The embedded model (SmolLM2-135M through llama-cpp-python), end to end and over HTTP."""

import json
import os
import subprocess
import sys
import time

import pytest

import agent_runs
from agent_runs.providers.local import bundled_model_path, is_available
from agent_runs.runtime.agents import unregister_agent

from .sse import parse_stream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_embedded_model_is_installed():
    # The test extra installs it: every test below runs it for real.
    assert is_available() and os.path.isfile(bundled_model_path())


@pytest.fixture
def local_agent():
    from agent_runs.runtime.demo_tools import get_stock_price

    agent_runs.register_agent(
        "local_finance",
        model="local",
        instructions="You are a financial assistant. Answer in one short sentence.",
        tools=[get_stock_price],
        model_options={"tool_choice": "required", "default_max_tokens": 48},
    )
    agent_runs.register_agent(
        "local_chat", model="local", model_options={"default_max_tokens": 400}
    )
    yield
    unregister_agent("local_finance")
    unregister_agent("local_chat")


def test_local_model_streams_real_tokens_and_a_tool_call_that_parses(client, auth, local_agent):
    response = client.post(
        "/api/agents/local_finance/runs/stream",
        headers=auth,
        json={"message": "What is the current NVDA stock price?", "options": {"maxTokens": 32}},
    )
    events = parse_stream(response.get_data(as_text=True))
    types = [e["event"] for e in events]
    assert types[0] == "START" and types[-1] == "STOP", types
    start = json.loads(events[types.index("TOOL_START")]["data"])
    assert start["name"] == "get_stock_price"
    assert isinstance(start["arguments"], dict)
    assert start["arguments"]["ticker"].isalpha() and start["arguments"]["ticker"].isupper()
    end = json.loads(events[types.index("TOOL_END")]["data"])
    assert "error" not in end and float(end["result"]) > 0
    deltas = [e["data"] for e in events if e["event"] == "CONTENT_DELTA"]
    assert len(deltas) > 3 and "".join(deltas).strip()
    run_id = json.loads(events[0]["data"])["runId"]
    status = client.get(f"/api/agents/local_finance/runs/{run_id}/status", headers=auth).json
    assert status["status"] == "COMPLETED" and status["model"] == "local"
    assert status["usage"]["inputTokens"] > 0 and status["usage"]["outputTokens"] >= len(deltas)


def test_cancel_stops_local_generation_within_a_token(client, auth, local_agent):
    response = client.post(
        "/api/agents/local_chat/runs/stream",
        headers=auth,
        json={"message": "Write a long story about a lighthouse keeper."},
    )
    chunks = iter(response.response)
    text = next(chunks).decode()
    run_id = json.loads(parse_stream(text)[0]["data"])["runId"]
    while text.count("CONTENT_DELTA") < 3:
        text += next(chunks).decode()
    started = time.monotonic()
    assert client.delete(f"/api/agents/local_chat/runs/{run_id}", headers=auth).status_code == 202
    rest = parse_stream("".join(chunk.decode() for chunk in chunks))
    assert time.monotonic() - started < 1
    assert json.loads(rest[-1]["data"]) == {"reason": "cancelled"}
    # The model is free for the next run at once.
    again = client.post(
        "/api/agents/local_chat/runs",
        headers=auth,
        json={"message": "Say hi.", "options": {"maxTokens": 8}},
    )
    assert again.json["status"] == "COMPLETED" and again.json["content"]


@pytest.fixture(scope="module")
def llama_server():
    """llama-cpp-python's own OpenAI-compatible server, serving the embedded model."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "llama_server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        port = int(process.stdout.readline().strip())
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        import urllib.request

        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/models", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_openai_provider_against_llama_cpp_server(client, auth, llama_server):
    agent_runs.register_agent(
        "via_llama_server",
        model="openai:smollm2",
        model_options={"base_url": llama_server, "api_key": "none", "vision": False},
    )
    try:
        response = client.post(
            "/api/agents/via_llama_server/runs/stream",
            headers=auth,
            json={"message": "Name a colour.", "options": {"maxTokens": 16, "temperature": 0}},
        )
        events = parse_stream(response.get_data(as_text=True))
        assert events[-1]["event"] == "STOP", events[-1]
        deltas = [e["data"] for e in events if e["event"] == "CONTENT_DELTA"]
        assert len(deltas) > 1 and "".join(deltas).strip()
        run_id = json.loads(events[0]["data"])["runId"]
        status = client.get(f"/api/agents/via_llama_server/runs/{run_id}/status", headers=auth).json
        assert status["status"] == "COMPLETED" and status["content"] == "".join(deltas)
    finally:
        unregister_agent("via_llama_server")
