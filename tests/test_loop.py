"""The agent loop with the scripted model: tools that fail, time out or are slow; model errors."""

import json

import gevent
import pytest

import agent_runs
from agent_runs.providers import ProviderError
from agent_runs.providers.base import PROVIDERS, ContentDelta
from agent_runs.runtime.events import encode_event

from .sse import parse_frames, parse_stream


class BrokenProvider:
    """A model back end whose service answers with an error after a first token."""

    def __init__(self, model, options):
        pass

    def stream(self, request):
        yield ContentDelta("Partial ")
        raise ProviderError("The model service answered 503 Service Unavailable.")


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


PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJ"
    "RU5ErkJggg=="
)


def test_images_reach_a_model_that_takes_them(client, auth):
    body = {
        "message": "what is this?",
        "media": [
            {"type": "image/png", "data": PNG},
            {"type": "image/jpeg", "data": "https://example.com/cat.jpg"},
        ],
    }
    response = client.post("/api/agents/assistant/runs", headers=auth, json=body)
    assert response.status_code == 200
    assert response.json["content"] == "You said: what is this? (with 2 images)"


@pytest.mark.parametrize(
    "media, says",
    [
        ({"type": "application/pdf", "data": PNG}, "Only images"),
        ({"type": "image/png", "data": "not base64!"}, "base64"),
        ({"type": "image/png", "data": "ftp://example.com/x.png"}, "base64"),
        ({"type": "image/png", "data": "https://"}, "URL"),
    ],
)
def test_media_that_is_not_an_image_is_422_saying_why(client, auth, media, says):
    body = {"message": "hi", "media": [media]}
    response = client.post("/api/agents/assistant/runs", headers=auth, json=body)
    assert response.status_code == 422
    assert says in json.dumps(response.json) and "media" in response.json["errors"]


def test_media_for_a_text_only_model_is_422(client, auth, agents):
    agent = agents(
        "texty",
        model="openai:text-model",
        model_options={"vision": False, "base_url": "http://127.0.0.1:9/v1"},
    )
    body = {"message": "hi", "media": [{"type": "image/png", "data": PNG}]}
    response = client.post(f"/api/agents/{agent}/runs", headers=auth, json=body)
    assert response.status_code == 422
    assert "text only" in response.json["detail"]


def test_images_over_the_size_limit_are_422(database_url):
    from agent_runs import create_app

    from .conftest import make_token

    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_MAX_MEDIA_BYTES": 10})
    body = {"message": "hi", "media": [{"type": "image/png", "data": PNG}]}
    response = app.test_client().post("/api/agents/assistant/runs", headers=make_token(), json=body)
    assert response.status_code == 422 and "at most 10 bytes" in json.dumps(response.json)


def test_explained_tool_calls_stream_their_thought_as_reasoning(client, auth, agents):
    def lookup(query: str) -> str:
        return "found"

    agent = agents("explainer", tools=[lookup], explain_tool_calls=True)
    events = run(client, auth, agent)
    types = [e["event"] for e in events]
    start = types.index("TOOL_START")
    assert events[start - 1] == {
        **events[start - 1],
        "event": "REASONING_DELTA",
        "data": "lookup has the answer to this.",
    }
    assert json.loads(events[start]["data"])["arguments"] == {"query": "hi"}
    assert tool_ends(events)[0]["result"] == "found"  # the tool never saw "thought"


def test_long_conversations_are_trimmed_to_the_context_budget():
    from agent_runs.runtime.loop import fit_to_context

    turns = [
        m
        for i in range(50)
        for m in (
            {"role": "user", "content": f"question {i} " + "x" * 400},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": f"c{i}", "name": "t", "arguments": {}}],
            },
            {"role": "tool", "tool_call_id": f"c{i}", "name": "t", "content": "r" * 400},
            {"role": "assistant", "content": "a" * 400},
        )
    ]
    messages = [{"role": "system", "content": "be nice"}, *turns]
    kept = fit_to_context(messages, 2000)
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user"
    assert kept[-4:] == turns[-4:]
    assert 4 < len(kept) < len(messages) and (len(kept) - 1) % 4 == 0
    assert fit_to_context(messages, 10**6) == messages
