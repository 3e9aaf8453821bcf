"""The agent loop with the scripted model: tools that fail, time out or are slow; model errors."""

import json

import gevent
import pytest

import agent_runs
from agent_runs.providers import ProviderError
from agent_runs.providers.base import PROVIDERS, ContentDelta
from agent_runs.runtime.agents import unregister_agent
from agent_runs.runtime.events import encode_event

from .sse import parse_frames, parse_stream


class BrokenProvider:
    """A model back end whose service answers with an error after a first token."""

    def __init__(self, model, options):
        pass

    def stream(self, request):
        yield ContentDelta("Partial ")
        raise ProviderError("The model service answered 503 Service Unavailable.")


@pytest.fixture
def agents():
    names = []

    def register(name, **kwargs):
        agent_runs.register_agent(name, **kwargs)
        names.append(name)
        return name

    yield register
    for name in names:
        unregister_agent(name)


def run(client, auth, agent, message="hi"):
    response = client.post(
        f"/api/agents/{agent}/runs/stream", headers=auth, json={"message": message}
    )
    return parse_stream(response.get_data(as_text=True))


def tool_ends(events):
    return [json.loads(e["data"]) for e in events if e["event"] == "TOOL_END"]


def test_a_raising_tool_becomes_an_error_result_and_the_run_goes_on(client, auth, agents):
    def explode(text: str) -> str:
        raise RuntimeError("disk on fire")

    events = run(client, auth, agents("exploding", tools=[explode]))
    [end] = tool_ends(events)
    assert end["error"] == "RuntimeError: disk on fire" and end["result"] is None
    assert events[-1]["event"] == "STOP"
    answer = "".join(e["data"] for e in events if e["event"] == "CONTENT_DELTA")
    assert "Error: RuntimeError: disk on fire" in answer  # the model saw the error


def test_a_slow_tool_is_stopped_at_its_timeout(client, auth, agents):
    @agent_runs.tool(timeout=0.2)
    def dawdle() -> str:
        """Take forever."""
        gevent.sleep(30)
        return "never"

    started = gevent.get_hub().loop.now()
    events = run(client, auth, agents("dawdler", tools=[dawdle]))
    assert gevent.get_hub().loop.now() - started < 5
    [end] = tool_ends(events)
    assert "did not finish within 0.2 seconds" in end["error"]
    assert events[-1]["event"] == "STOP"


def test_tool_results_of_any_json_type_are_kept(client, auth, agents):
    def lookup(key: str) -> dict:
        return {"key": key, "values": [1, 2]}

    events = run(client, auth, agents("looker", tools=[lookup]), message="k")
    [end] = tool_ends(events)
    assert end["result"] == {"key": "k", "values": [1, 2]}


def test_a_model_error_ends_the_run_failed_with_error_last(client, auth, agents):
    PROVIDERS["broken"] = "tests.test_loop:BrokenProvider"
    try:
        events = run(client, auth, agents("fragile", model="broken"))
    finally:
        del PROVIDERS["broken"]
    assert [e["event"] for e in events] == ["START", "CONTENT_DELTA", "ERROR"]
    assert events[-1]["data"] == "The model service answered 503 Service Unavailable."
    run_id = json.loads(events[0]["data"])["runId"]
    status = client.get(f"/api/agents/fragile/runs/{run_id}/status", headers=auth).json
    assert status["status"] == "FAILED"
    assert status["error"] == {"type": "model_error", "message": events[-1]["data"]}
    assert status["content"] == "Partial "


def test_a_failed_run_frees_its_session(client, auth, agents):
    PROVIDERS["broken"] = "tests.test_loop:BrokenProvider"
    try:
        agents("fragile2", model="broken")
        body = {"message": "hi", "sessionId": "s-1"}
        client.post("/api/agents/fragile2/runs", headers=auth, json=body)
        again = client.post("/api/agents/fragile2/runs", headers=auth, json=body)
    finally:
        del PROVIDERS["broken"]
    assert again.status_code == 200 and again.json["status"] == "FAILED"


def test_the_step_limit_forces_an_answer(client, auth, agents):
    def ping() -> str:
        return "pong"

    events = run(client, auth, agents("one_step", tools=[ping], max_steps=1))
    assert not tool_ends(events)
    assert events[-1]["event"] == "STOP"


@pytest.mark.parametrize(
    "data",
    [
        "plain",
        "two\nlines",
        'data: {"event":"STOP"}\n\nid: 99',
        "\r\n\r",
        "emoji \u2603 \U0001f600",
        "",
        " leading space",
        "\u2028\u2029",
    ],
)
def test_any_text_survives_the_sse_encoding(data):
    frame = encode_event(7, "CONTENT_DELTA", data, 1746518400000).decode()
    assert frame.startswith("id: 7\ndata: {") and frame.endswith("\n\n")
    assert frame.count("\n") == 3
    [parsed] = parse_frames(frame)
    assert parsed["id"] == "7"
    assert json.loads(parsed["data"]) == {
        "event": "CONTENT_DELTA",
        "data": data,
        "timestamp": 1746518400000,
    }
