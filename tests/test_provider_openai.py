"""The OpenAI-compatible provider against a fake server that speaks the real wire protocol."""

from __future__ import annotations

import json
import time

import pytest

from agent_runs.providers.base import (
    ContentDelta,
    FinishDelta,
    ModelRequest,
    ProviderError,
    ReasoningDelta,
    ToolCallDelta,
    ToolSpec,
    UnknownModel,
    UsageDelta,
    resolve_model,
)
from agent_runs.providers.openai import OpenAIProvider

from . import provider_kit as kit
from .fake_openai import Error, FakeOpenAI, answer, chunk, stream, tool_call, usage_chunk
from .provider_kit import PNG_BASE64
from .sse import parse_stream

API_KEY = "sk-test-secret-0123456789"


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def provider_for(fake, **options):
    provider, _ = resolve_model(
        "openai:test-model",
        {"base_url": fake.url + "/v1", "api_key": API_KEY, "retry_delay": 0.01, **options},
    )
    return provider


def ask(text="Hello", **kwargs):
    return ModelRequest(model="test-model", messages=[{"role": "user", "content": text}], **kwargs)


def collect(provider, request=None):
    return kit.collect(provider, request or ask())


# Streaming ---------------------------------------------------------------------------------


def test_streams_content_then_usage_and_finish(fake):
    fake.script(answer("Hello, world!", pieces=3))

    deltas = collect(provider_for(fake))

    assert deltas == [
        ContentDelta("Hello"),
        ContentDelta(", wor"),
        ContentDelta("ld!"),
        UsageDelta(input_tokens=10, output_tokens=3),
        FinishDelta("stop"),
    ]
    assert fake.outcomes == ["done"]


def test_tool_call_fragments_across_chunks_and_in_parallel(fake):
    fake.script(
        stream(
            [
                chunk(role="assistant", content=None),
                chunk(tool_calls=[tool_call(0, id="call_a", name="get_weather", arguments="")]),
                chunk(tool_calls=[tool_call(0, arguments='{"ci')]),
                chunk(tool_calls=[tool_call(0, arguments='ty": "Par')]),
                # The first call's last fragment and the second call's start in one chunk.
                chunk(
                    tool_calls=[
                        tool_call(0, arguments='is"}'),
                        tool_call(1, id="call_b", name="get_time", arguments='{"tz":'),
                    ]
                ),
                chunk(tool_calls=[tool_call(1, arguments=' "UTC"}')]),
                chunk(finish_reason="tool_calls"),
                usage_chunk(20, 15),
            ]
        )
    )

    deltas = collect(provider_for(fake))

    fragments = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert fragments[0] == ToolCallDelta(0, id="call_a", name="get_weather", arguments="")
    assert fragments[4] == ToolCallDelta(1, id="call_b", name="get_time", arguments='{"tz":')
    calls: dict[int, dict] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment.index, {"id": None, "name": None, "arguments": ""})
        call["id"] = fragment.id or call["id"]
        call["name"] = fragment.name or call["name"]
        call["arguments"] += fragment.arguments
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_time", "arguments": '{"tz": "UTC"}'},
    }
    assert deltas[-2:] == [UsageDelta(20, 15), FinishDelta("tool_calls")]


def test_reasoning_content_and_reasoning_fields(fake):
    fake.script(
        stream(
            [
                chunk(role="assistant", content=""),
                chunk(reasoning_content="DeepSeek and vLLM "),
                chunk(reasoning="Ollama and OpenRouter "),
                # A server that sends both names at once says the same thing twice.
                chunk(reasoning_content="once.", reasoning="once."),
                chunk("The answer."),
                chunk(finish_reason="stop"),
                usage_chunk(5, 9),
            ]
        )
    )

    deltas = collect(provider_for(fake))

    assert [d for d in deltas if isinstance(d, ReasoningDelta)] == [
        ReasoningDelta("DeepSeek and vLLM "),
        ReasoningDelta("Ollama and OpenRouter "),
        ReasoningDelta("once."),
    ]
    assert kit.texts(deltas, ContentDelta) == "The answer."
    # Reasoning comes before the answer, as the model said it.
    assert isinstance(deltas[0], ReasoningDelta)


def test_think_tags_split_across_chunks(fake):
    pieces = [
        "<thi",
        "nk>\nThe user",
        " wants 2+2.</th",
        "ink",
        ">\n\nIt is ",
        "4; 1 <",
        " 2 <",
        "t",
    ]
    fake.script(stream([chunk(piece) for piece in pieces] + [chunk(finish_reason="stop")]))

    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ReasoningDelta) == "\nThe user wants 2+2."
    assert kit.texts(deltas, ContentDelta) == "It is 4; 1 < 2 <t"
    # No delta carries a piece of a tag, and reasoning is streamed as it comes, not at the end.
    assert not any("<th" in d.text or "ink>" in d.text for d in deltas if hasattr(d, "text"))
    assert deltas[0] == ReasoningDelta("\nThe user")
    assert deltas[-1] == FinishDelta("stop")


def test_usage_chunk_with_reasoning_tokens(fake):
    fake.script(
        stream([chunk("Hi"), chunk(finish_reason="stop"), usage_chunk(12, 30, reasoning=20)])
    )

    deltas = collect(provider_for(fake))

    assert UsageDelta(input_tokens=12, output_tokens=30, reasoning_tokens=20) in deltas


def test_a_stream_without_usage_still_finishes(fake):
    fake.script(stream([chunk("Hi"), chunk(finish_reason="length")]))

    assert collect(provider_for(fake)) == [ContentDelta("Hi"), FinishDelta("length")]


def test_fields_of_unexpected_types_are_skipped_and_object_arguments_become_json(fake):
    # What servers that call themselves OpenAI-compatible have been seen to send.
    fake.script(
        stream(
            [
                {"id": "x", "choices": None},
                {"id": "x", "choices": ["not an object", {"index": 0, "delta": "text"}]},
                chunk(content=5),
                chunk(reasoning_content=["a", "list"]),
                chunk("Fine."),
                # A second choice is not the answer.
                {"choices": [{"index": 1, "delta": {"content": "other"}}]},
                chunk(
                    tool_calls=[
                        {"index": 0, "id": 7, "function": {"name": "f", "arguments": {"a": 1}}},
                        {"id": "call_b", "function": "not an object"},
                    ]
                ),
                chunk(finish_reason="tool_calls"),
                {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": 4}},
            ]
        )
    )

    deltas = collect(provider_for(fake))

    assert deltas == [
        ContentDelta("Fine."),
        ToolCallDelta(0, id=None, name="f", arguments='{"a": 1}'),
        ToolCallDelta(1, id="call_b", name=None, arguments=""),
        UsageDelta(input_tokens=0, output_tokens=4),
        FinishDelta("tool_calls"),
    ]


def test_a_chunk_that_is_not_a_json_object_fails_the_call(fake):
    fake.script(stream([chunk("Hi"), ["not", "a", "chunk"], chunk(finish_reason="stop")]))

    with pytest.raises(ProviderError, match="not a JSON object"):
        collect(provider_for(fake, max_retries=0))


def test_an_error_object_in_the_stream_fails_the_call_with_its_message(fake):
    fake.script(
        stream([chunk("Hi"), {"error": {"message": "the model is overloaded", "type": "server"}}])
    )

    with pytest.raises(ProviderError, match="the model is overloaded"):
        collect(provider_for(fake, max_retries=0))


# Requests ----------------------------------------------------------------------------------


def test_request_body_translates_messages_tools_and_options(fake):
    fake.script(answer("ok"))
    request = ModelRequest(
        model="test-model",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "Sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {
                "role": "user",
                "content": "And these?",
                "media": [
                    {"type": "image/png", "data": PNG_BASE64},
                    {"type": "image/jpeg", "data": "https://example.com/cat.jpg"},
                ],
            },
        ],
        tools=[
            ToolSpec(
                "get_weather",
                "Return the weather of a city.",
                {"type": "object", "properties": {"city": {"type": "string"}}},
            )
        ],
        temperature=0.2,
        max_tokens=64,
    )

    collect(provider_for(fake), request)

    body = fake.requests[0]
    assert body["model"] == "test-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 64
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Return the weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And these?"},
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:image/png;base64,{PNG_BASE64}"},
                },
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
    ]
    assert fake.headers[0]["authorization"] == f"Bearer {API_KEY}"
    assert fake.headers[0]["content-type"] == "application/json"


def test_unset_options_are_not_sent(fake):
    fake.script(answer("ok"))

    collect(provider_for(fake))

    body = fake.requests[0]
    assert "temperature" not in body
    assert "max_tokens" not in body
    assert "tools" not in body


def test_extra_body_joins_the_request(fake):
    fake.script(answer("ok"))

    collect(provider_for(fake, extra_body={"top_k": 20}))

    assert fake.requests[0]["top_k"] == 20


def test_media_that_is_not_an_image_is_refused_before_calling(fake):
    request = ModelRequest(
        model="test-model",
        messages=[
            {
                "role": "user",
                "content": "Read",
                "media": [{"type": "application/pdf", "data": "JVBE"}],
            }
        ],
    )

    with pytest.raises(ProviderError, match="images only"):
        collect(provider_for(fake), request)
    assert fake.requests == []


# Retries and failures ----------------------------------------------------------------------


def test_rate_limited_then_success_is_retried(fake):
    fake.script(Error(429, "Rate limit reached", headers={"Retry-After": "0.2"}), answer("ok"))

    started = time.monotonic()
    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ContentDelta) == "ok"
    assert len(fake.requests) == 2
    # The server asked for 0.2 s; the provider waited that long, not its own short delay.
    assert time.monotonic() - started >= 0.15


def test_server_errors_three_times_fail_the_call(fake):
    fake.script(*(Error(500, "The server had an error") for _ in range(3)), answer("late"))

    with pytest.raises(ProviderError) as failure:
        collect(provider_for(fake))

    assert len(fake.requests) == 3
    assert "HTTP 500" in str(failure.value)
    assert "The server had an error" in str(failure.value)


def test_max_retries_option(fake):
    fake.script(Error(503, "busy"), Error(503, "busy"), answer("ok"))

    with pytest.raises(ProviderError, match="HTTP 503"):
        collect(provider_for(fake, max_retries=1))
    assert len(fake.requests) == 2


def test_client_errors_are_not_retried(fake):
    fake.script(Error(400, "Invalid 'messages'"), answer("never"))

    with pytest.raises(ProviderError, match="HTTP 400: Invalid 'messages'"):
        collect(provider_for(fake))
    assert len(fake.requests) == 1


def test_connection_cut_after_output_fails_without_retry(fake):
    fake.script(
        stream(
            [chunk(role="assistant", content=""), chunk("The answer "), chunk("is "), chunk("42.")]
            + [chunk(finish_reason="stop")],
            cut_after=3,
        ),
        answer("a second answer must not be asked for"),
    )
    received = []

    with pytest.raises(ProviderError, match="after output had started"):
        for delta in provider_for(fake).stream(ask()):
            received.append(delta)

    assert received == [ContentDelta("The answer "), ContentDelta("is ")]
    assert len(fake.requests) == 1
    assert fake.outcomes == ["cut"]


def test_connection_cut_before_output_is_retried(fake):
    fake.script(
        stream([chunk(role="assistant", content=""), chunk("lost")], cut_after=1), answer("ok")
    )

    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ContentDelta) == "ok"
    assert len(fake.requests) == 2


def test_a_stream_that_ends_without_finishing_is_an_error(fake):
    fake.script(stream([chunk("Half an ans")]))

    with pytest.raises(ProviderError, match="ended before the model finished"):
        collect(provider_for(fake, max_retries=0))


def test_unreachable_server(fake):
    provider, _ = resolve_model(
        "openai:test-model",
        {"base_url": "http://127.0.0.1:9/v1", "api_key": API_KEY, "retry_delay": 0.01},
    )

    with pytest.raises(ProviderError, match="connection failed"):
        collect(provider)


def test_timeout_while_the_server_is_silent(fake):
    fake.script(stream([chunk("slow"), chunk(finish_reason="stop")], delay=2.0))

    started = time.monotonic()
    with pytest.raises(ProviderError, match="no answer within 0.3 seconds"):
        collect(provider_for(fake, timeout=0.3, max_retries=0))
    assert time.monotonic() - started < 1.5


def test_errors_do_not_reveal_the_api_key(fake):
    fake.script(Error(401, f"Incorrect API key provided: {API_KEY}."))

    with pytest.raises(ProviderError) as failure:
        collect(provider_for(fake))

    message = str(failure.value)
    assert "HTTP 401" in message
    assert API_KEY not in message
    assert failure.value.__cause__ is None
    assert len(fake.requests) == 1


def test_closing_the_stream_closes_the_connection(fake):
    fake.script(stream([chunk(f"token {n} ") for n in range(500)], delay=0.01))
    deltas = provider_for(fake).stream(ask())

    assert next(deltas) == ContentDelta("token 0 ")
    deltas.close()  # what a cancelled run does

    assert fake.wait_for_outcomes(1) == ["client closed"]


# Configuration -----------------------------------------------------------------------------


def test_environment_names_the_default_server_and_key(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    fake.script(answer("ok"))

    provider, model = resolve_model("openai:test-model")
    assert kit.texts(collect(provider), ContentDelta) == "ok"

    assert model == "test-model"
    assert fake.headers[0]["authorization"] == "Bearer sk-from-the-environment"


def test_the_environment_key_is_not_sent_to_a_server_an_agent_names(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-for-openai-only")
    fake.script(answer("ok"), answer("ok"))

    provider, _ = resolve_model("openai:test-model", {"base_url": fake.url + "/v1"})
    collect(provider)
    monkeypatch.setenv("LOCAL_SERVER_KEY", "sk-local")
    provider, _ = resolve_model(
        "openai:test-model", {"base_url": fake.url + "/v1", "api_key_env": "LOCAL_SERVER_KEY"}
    )
    collect(provider)

    assert fake.headers[0]["authorization"] == "Bearer no-key"
    assert fake.headers[1]["authorization"] == "Bearer sk-local"


def test_no_key_for_openai_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    provider, _ = resolve_model("openai:gpt-4o-mini")

    with pytest.raises(ProviderError, match="set OPENAI_API_KEY"):
        collect(provider)


def test_an_unset_key_variable_fails_the_call_saying_so(fake, monkeypatch):
    monkeypatch.delenv("UNSET_SERVER_KEY", raising=False)
    provider, _ = resolve_model(
        "openai:test-model", {"base_url": fake.url + "/v1", "api_key_env": "UNSET_SERVER_KEY"}
    )

    with pytest.raises(ProviderError, match="UNSET_SERVER_KEY"):
        collect(provider)
    assert fake.requests == []


def test_ollama_alias_points_at_localhost():
    provider, model = resolve_model("ollama:qwen3")

    assert isinstance(provider, OpenAIProvider)
    assert model == "qwen3"
    assert provider.base_url == "http://localhost:11434/v1"


def test_a_model_name_is_required():
    with pytest.raises(UnknownModel, match="openai:gpt-4o-mini"):
        resolve_model("openai")


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="model_options.timeout"):
        resolve_model("openai:m", {"api_key": "k", "timeout": "soon"})


# Through the API ---------------------------------------------------------------------------


@pytest.fixture
def openai_agent(fake):
    yield from kit.weather_agent(
        "openai_test_agent", "openai:test-model", {"base_url": fake.url + "/v1", "api_key": API_KEY}
    )


def weather_model(request):
    """The fake model: ask for the weather first, then answer with what the tool said."""
    results = [m for m in request["messages"] if m["role"] == "tool"]
    if not results:
        return stream(
            [
                chunk(role="assistant", content=None),
                chunk(reasoning_content="I need the weather tool."),
                chunk(tool_calls=[tool_call(0, id="call_w1", name="get_weather", arguments="")]),
                chunk(tool_calls=[tool_call(0, arguments='{"city": ')]),
                chunk(tool_calls=[tool_call(0, arguments='"Paris"}')]),
                chunk(finish_reason="tool_calls"),
                usage_chunk(50, 12),
            ]
        )
    return stream(
        [chunk(role="assistant", content="")]
        + [chunk(piece) for piece in ("The weather: ", results[-1]["content"], ".")]
        + [chunk(finish_reason="stop"), usage_chunk(80, 9)]
    )


def test_run_through_the_api_with_a_tool_round_trip(client, auth, fake, openai_agent):
    fake.script(weather_model, weather_model)

    response = client.post(
        f"/api/agents/{openai_agent.id}/runs",
        json={"message": "What is the weather in Paris?"},
        headers=auth,
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    run = response.get_json()
    assert run["status"] == "COMPLETED"
    assert run["content"] == "The weather: Sunny, 21 C in Paris."
    assert run["reasoningSteps"] == ["I need the weather tool."]
    assert run["tools"][0]["name"] == "get_weather"
    assert run["tools"][0]["arguments"] == {"city": "Paris"}
    assert run["tools"][0]["result"] == "Sunny, 21 C in Paris"
    assert run["tools"][0]["isError"] is False
    assert run["usage"]["inputTokens"] == 130
    assert run["usage"]["outputTokens"] == 21
    assert run["usage"]["modelCalls"] == 2
    assert run["metadata"]["model"] == "openai:test-model"

    first, second = fake.requests
    assert first["messages"][0] == {"role": "system", "content": "Answer weather questions."}
    assert first["tools"][0]["function"]["name"] == "get_weather"
    assert second["messages"][-2:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_w1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_w1", "content": "Sunny, 21 C in Paris"},
    ]


def test_streamed_run_through_the_api(client, auth, fake, openai_agent):
    fake.script(weather_model, weather_model)
    kit.check_streamed_weather_run(client, auth, openai_agent)


def test_model_failure_through_the_api_fails_the_run(client, auth, fake, openai_agent):
    fake.script(*(Error(502, "Bad gateway upstream") for _ in range(3)))

    response = client.post(
        f"/api/agents/{openai_agent.id}/runs", json={"message": "Hi"}, headers=auth
    )

    run = response.get_json()
    assert run["status"] == "FAILED"
    assert run["error"]["type"] == "model_error"
    assert "HTTP 502: Bad gateway upstream" in run["error"]["message"]
    assert API_KEY not in run["error"]["message"]
    assert len(fake.requests) == 3


def test_cancelling_a_run_closes_the_model_stream(app, client, auth, fake, openai_agent):
    fake.script(stream([chunk(f"word{n} ") for n in range(1000)], delay=0.01))

    response = client.post(
        f"/api/agents/{openai_agent.id}/runs/stream",
        json={"message": "Talk for a long time."},
        headers=auth,
    )
    frames = iter(response.response)
    run_id = None
    for frame in frames:
        event = parse_stream(frame.decode())
        if event and event[0]["event"] == "START":
            run_id = json.loads(event[0]["data"])["runId"]
        if event and event[0]["event"] == "CONTENT_DELTA":
            break
    app.extensions["agent_runs"].executor.cancel(run_id)
    rest = parse_stream(b"".join(frames).decode())
    response.close()

    assert rest[-1]["event"] == "STOP"
    assert json.loads(rest[-1]["data"]) == {"reason": "cancelled"}
    # The model's HTTP stream was dropped, long before its 1,000 chunks were sent.
    assert fake.wait_for_outcomes(1) == ["client closed"]
