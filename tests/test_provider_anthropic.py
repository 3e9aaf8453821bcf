"""The Anthropic provider against a fake server that speaks the Messages streaming protocol."""

from __future__ import annotations

import time

import pytest

from agent_runs.providers.anthropic import TAKES_TEMPERATURE, AnthropicProvider
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

from . import provider_kit as kit
from .fake_anthropic import (
    Error,
    FakeAnthropic,
    answer,
    api_key,
    block_stop,
    error_event,
    input_json,
    message_delta,
    message_start,
    message_stop,
    ping,
    redacted_thinking_block,
    signature_delta,
    stream,
    text_block,
    text_delta,
    thinking_block,
    thinking_delta,
    tool_use_block,
)
from .provider_kit import PNG_BASE64

API_KEY = "sk-ant-test-secret-0123456789"
WEATHER_TOOL = ToolSpec(
    "get_weather",
    "Return the weather of a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)


@pytest.fixture
def fake():
    with FakeAnthropic() as server:
        yield server


def provider_for(fake, **options):
    provider, _ = resolve_model(
        "anthropic:claude-test",
        {"base_url": fake.url, "api_key": API_KEY, "retry_delay": 0.01, **options},
    )
    return provider


def ask(text="Hello", **kwargs):
    return ModelRequest(model="claude-test", messages=[{"role": "user", "content": text}], **kwargs)


def collect(provider, request=None):
    return kit.collect(provider, request or ask())


def tool_use_answer(*calls, thinking=None, input_tokens=20):
    """A streamed answer that (optionally thinks, then) calls tools, each input in pieces."""
    events = [message_start(input_tokens)]
    index = 0
    if thinking:
        events += [thinking_block(0), thinking_delta(0, thinking), signature_delta(0, "sig-1")]
        events.append(block_stop(0))
        index = 1
    for tool_id, name, pieces in calls:
        events.append(tool_use_block(index, tool_id, name))
        events += [input_json(index, piece) for piece in pieces]
        events.append(block_stop(index))
        index += 1
    return stream(events + [message_delta("tool_use", 30), message_stop()])


# Streaming ---------------------------------------------------------------------------------


def test_streams_text_then_usage_and_finish(fake):
    fake.script(answer("Hello, world!", pieces=3, input_tokens=12))

    deltas = collect(provider_for(fake))

    assert deltas == [
        ContentDelta("Hello"),
        ContentDelta(", wor"),
        ContentDelta("ld!"),
        UsageDelta(input_tokens=12, output_tokens=3),
        FinishDelta("stop"),
    ]
    assert fake.outcomes == ["done"]


def test_thinking_deltas_are_reasoning(fake):
    fake.script(
        stream(
            [
                message_start(8),
                thinking_block(0),
                thinking_delta(0, "The user greets me. "),
                ping(),
                thinking_delta(0, "Greet back."),
                signature_delta(0, "EqQBCgIYAhIM"),
                block_stop(0),
                text_block(1),
                text_delta(1, "Hi there!"),
                block_stop(1),
                message_delta("end_turn", 40),
                message_stop(),
            ]
        )
    )

    deltas = collect(provider_for(fake))

    assert deltas == [
        ReasoningDelta("The user greets me. "),
        ReasoningDelta("Greet back."),
        ContentDelta("Hi there!"),
        UsageDelta(input_tokens=8, output_tokens=40),
        FinishDelta("stop"),
    ]


def test_two_tool_uses_with_input_split_across_chunks(fake):
    fake.script(
        stream(
            [
                message_start(25),
                text_block(0),
                text_delta(0, "Let me check."),
                block_stop(0),
                tool_use_block(1, "toolu_a", "get_weather"),
                input_json(1, ""),
                input_json(1, '{"ci'),
                input_json(1, 'ty": "Par'),
                input_json(1, 'is"}'),
                block_stop(1),
                tool_use_block(2, "toolu_b", "get_time"),
                input_json(2, '{"tz":'),
                input_json(2, ' "UTC"}'),
                block_stop(2),
                message_delta("tool_use", 60),
                message_stop(),
            ]
        )
    )

    deltas = collect(provider_for(fake))

    assert deltas[0] == ContentDelta("Let me check.")
    fragments = [d for d in deltas if isinstance(d, ToolCallDelta)]
    # Tool calls are numbered among themselves, not by content block.
    assert fragments[0] == ToolCallDelta(0, id="toolu_a", name="get_weather")
    assert fragments[5] == ToolCallDelta(1, id="toolu_b", name="get_time")
    calls: dict[int, dict] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment.index, {"id": None, "name": None, "arguments": ""})
        call["id"] = fragment.id or call["id"]
        call["name"] = fragment.name or call["name"]
        call["arguments"] += fragment.arguments
    assert calls == {
        0: {"id": "toolu_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_b", "name": "get_time", "arguments": '{"tz": "UTC"}'},
    }
    assert deltas[-2:] == [UsageDelta(25, 60), FinishDelta("tool_calls")]


def test_usage_counts_cached_input_and_the_last_output_total(fake):
    fake.script(
        stream(
            [
                message_start(5, cache_creation_input_tokens=100, cache_read_input_tokens=1000),
                text_block(0),
                text_delta(0, "Hi"),
                block_stop(0),
                # output_tokens in message_delta is the running total; the last one counts.
                message_delta("max_tokens", 7),
                message_delta("max_tokens", 9),
                message_stop(),
            ]
        )
    )

    deltas = collect(provider_for(fake))

    assert deltas[-2:] == [UsageDelta(input_tokens=1105, output_tokens=9), FinishDelta("length")]


def test_a_stream_that_ends_without_finishing_is_an_error(fake):
    fake.script(stream([message_start(), text_block(0), text_delta(0, "Half an ans")]))

    with pytest.raises(ProviderError, match="ended before the model finished"):
        collect(provider_for(fake, max_retries=0))


# Requests ----------------------------------------------------------------------------------


def test_request_translation(fake):
    fake.script(answer("ok"))
    request = ModelRequest(
        model="claude-test",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use metric units."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {"id": "toolu_1", "name": "get_weather", "arguments": {"city": "Paris"}},
                    {"id": "toolu_2", "name": "get_weather", "arguments": {"city": "Rome"}},
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "Sunny"},
            {
                "role": "tool",
                "tool_call_id": "toolu_2",
                "name": "get_weather",
                "content": "Error: TimeoutError: no answer",
            },
            {"role": "assistant", "content": "Paris is sunny; Rome did not answer."},
            {
                "role": "user",
                "content": "And these?",
                "media": [
                    {"type": "image/png", "data": PNG_BASE64},
                    {"type": "image/jpeg", "data": "https://example.com/cat.jpg"},
                    {"type": "image/webp", "data": f"data:image/webp;base64,{PNG_BASE64}"},
                ],
            },
        ],
        tools=[WEATHER_TOOL],
        temperature=0.2,
        max_tokens=64,
    )

    collect(provider_for(fake), request)

    body = fake.requests[0]
    assert body["model"] == "claude-test"
    assert body["stream"] is True
    assert body["max_tokens"] == 64
    assert body.get("temperature") == (0.2 if TAKES_TEMPERATURE else None)
    assert "thinking" not in body
    assert body["system"] == "Be brief.\n\nUse metric units."
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Return the weather of a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking both."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        # Both results in one user message; a result that is an error says so.
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "Error: TimeoutError: no answer",
                    "is_error": True,
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Paris is sunny; Rome did not answer."}],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And these?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG_BASE64},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/webp",
                        "data": PNG_BASE64,
                    },
                },
            ],
        },
    ]
    assert api_key(fake.headers[0]) == API_KEY
    assert "anthropic-version" in fake.headers[0]


def test_consecutive_messages_of_one_role_merge_and_tool_results_come_first(fake):
    fake.script(answer("ok"))
    request = ModelRequest(
        model="claude-test",
        messages=[
            {"role": "user", "content": "First."},
            {"role": "user", "content": "Second."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "toolu_1", "name": "get_weather", "arguments": "{}"}],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "Rain"},
            {"role": "user", "content": "Thanks, and tomorrow?"},
        ],
    )

    collect(provider_for(fake), request)

    assert fake.requests[0]["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "First."}, {"type": "text", "text": "Second."}],
        },
        # An empty text is left out: the API refuses empty text blocks.
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Rain"},
                {"type": "text", "text": "Thanks, and tomorrow?"},
            ],
        },
    ]


def test_max_tokens_defaults_and_unset_options_are_not_sent(fake):
    fake.script(answer("ok"), answer("ok"))

    collect(provider_for(fake))
    collect(provider_for(fake, default_max_tokens=1000))

    first, second = fake.requests
    assert first["max_tokens"] == 4096
    assert second["max_tokens"] == 1000
    for absent in ("temperature", "tools", "system", "thinking"):
        assert absent not in first


def test_thinking_option(fake):
    fake.script(answer("ok"), answer("ok"))
    provider = provider_for(fake, thinking_budget=2048)

    collect(provider, ask(temperature=0.3, max_tokens=500))
    collect(provider, ask(purpose="followups", max_tokens=200, temperature=0.3))

    thinking, followups = fake.requests
    assert thinking["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    # The budget comes on top of the answer's tokens; thinking takes no temperature.
    assert thinking["max_tokens"] == 2548
    assert "temperature" not in thinking
    # The short followups call does not think.
    assert "thinking" not in followups
    assert followups["max_tokens"] == 200
    assert followups.get("temperature") == (0.3 if TAKES_TEMPERATURE else None)


def test_thinking_blocks_go_back_with_tool_results(fake):
    fake.script(
        tool_use_answer(("toolu_t1", "get_weather", ['{"city": "Oslo"}']), thinking="Need data."),
        answer("Cold."),
        answer("Later."),
    )
    provider = provider_for(fake, thinking_budget=1024)
    conversation = [{"role": "user", "content": "Weather in Oslo?"}]

    first = collect(provider, ModelRequest("claude-test", conversation, tools=[WEATHER_TOOL]))
    assert ReasoningDelta("Need data.") in first
    conversation += [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "toolu_t1", "name": "get_weather", "arguments": {"city": "Oslo"}}
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_t1", "name": "get_weather", "content": "-5 C"},
    ]
    collect(provider, ModelRequest("claude-test", conversation, tools=[WEATHER_TOOL]))
    # The same turn in a process that does not know the thinking blocks: no thinking.
    lost = [{**message} for message in conversation]
    lost[1] = {
        **lost[1],
        "tool_calls": [{"id": "toolu_lost", "name": "get_weather", "arguments": {}}],
    }
    collect(provider, ModelRequest("claude-test", lost, tools=[WEATHER_TOOL]))

    second, third = fake.requests[1:]
    assert second["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert second["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Need data.", "signature": "sig-1"},
            {
                "type": "tool_use",
                "id": "toolu_t1",
                "name": "get_weather",
                "input": {"city": "Oslo"},
            },
        ],
    }
    assert "thinking" not in third
    assert third["messages"][1]["content"][0]["type"] == "tool_use"


def test_redacted_thinking_is_kept_for_the_next_call(fake):
    fake.script(
        stream(
            [
                message_start(),
                redacted_thinking_block(0, "EmwKAhgBEgy3va3pzix"),
                block_stop(0),
                tool_use_block(1, "toolu_r1", "get_weather"),
                input_json(1, "{}"),
                block_stop(1),
                message_delta("tool_use"),
                message_stop(),
            ]
        ),
        answer("ok"),
    )
    provider = provider_for(fake, thinking_budget=1024)
    conversation = [{"role": "user", "content": "Weather?"}]

    collect(provider, ModelRequest("claude-test", conversation, tools=[WEATHER_TOOL]))
    conversation += [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "toolu_r1", "name": "get_weather", "arguments": {}}],
        },
        {"role": "tool", "tool_call_id": "toolu_r1", "name": "get_weather", "content": "Fog"},
    ]
    collect(provider, ModelRequest("claude-test", conversation, tools=[WEATHER_TOOL]))

    assert fake.requests[1]["messages"][1]["content"][0] == {
        "type": "redacted_thinking",
        "data": "EmwKAhgBEgy3va3pzix",
    }


def test_media_that_is_not_an_image_is_refused_before_calling(fake):
    request = ModelRequest(
        model="claude-test",
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


def test_overloaded_then_success_is_retried(fake):
    fake.script(Error(529, "Overloaded", "overloaded_error"), answer("ok"))

    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ContentDelta) == "ok"
    assert len(fake.requests) == 2


def test_rate_limited_waits_what_the_server_asks(fake):
    fake.script(
        Error(429, "Rate limited", "rate_limit_error", headers={"Retry-After": "0.2"}),
        answer("ok"),
    )

    started = time.monotonic()
    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ContentDelta) == "ok"
    assert time.monotonic() - started >= 0.15


def test_server_errors_three_times_fail_the_call(fake):
    fake.script(*(Error(500, "Internal server error") for _ in range(3)), answer("late"))

    with pytest.raises(ProviderError) as failure:
        collect(provider_for(fake))

    assert len(fake.requests) == 3
    assert "HTTP 500: Internal server error" in str(failure.value)


def test_client_errors_are_not_retried(fake):
    fake.script(Error(400, "max_tokens: Field required", "invalid_request_error"), answer("never"))

    with pytest.raises(ProviderError, match="HTTP 400: max_tokens: Field required"):
        collect(provider_for(fake))
    assert len(fake.requests) == 1


def test_an_error_event_before_output_is_retried(fake):
    fake.script(
        stream([message_start(), ping(), error_event("overloaded_error", "Overloaded")]),
        answer("ok"),
    )

    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ContentDelta) == "ok"
    assert len(fake.requests) == 2


def test_an_error_event_after_output_fails_without_retry(fake):
    fake.script(
        stream(
            [
                message_start(),
                text_block(0),
                text_delta(0, "The answer "),
                error_event("overloaded_error", "Overloaded"),
            ]
        ),
        answer("a second answer must not be asked for"),
    )
    received = []

    with pytest.raises(ProviderError) as failure:
        for delta in provider_for(fake).stream(ask()):
            received.append(delta)

    assert received == [ContentDelta("The answer ")]
    message = str(failure.value)
    assert "after output had started" in message
    assert "overloaded_error: Overloaded" in message
    assert len(fake.requests) == 1


def test_an_error_event_that_a_retry_cannot_cure_is_not_retried(fake):
    fake.script(
        stream([message_start(), error_event("invalid_request_error", "Bad input")]),
        answer("never"),
    )

    with pytest.raises(ProviderError, match="invalid_request_error: Bad input"):
        collect(provider_for(fake))
    assert len(fake.requests) == 1


def test_connection_cut_after_output_fails_without_retry(fake):
    fake.script(
        answer("The answer is 42.", pieces=4, cut_after=5),
        answer("a second answer must not be asked for"),
    )
    received = []

    with pytest.raises(ProviderError, match="after output had started: connection failed"):
        for delta in provider_for(fake).stream(ask()):
            received.append(delta)

    assert kit.texts(received, ContentDelta) == "The answer"
    assert len(fake.requests) == 1
    assert fake.outcomes == ["cut"]


def test_connection_cut_before_output_is_retried(fake):
    fake.script(answer("lost", cut_after=2), answer("ok"))

    deltas = collect(provider_for(fake))

    assert kit.texts(deltas, ContentDelta) == "ok"
    assert len(fake.requests) == 2


def test_unreachable_server():
    provider, _ = resolve_model(
        "anthropic:claude-test",
        {"base_url": "http://127.0.0.1:9", "api_key": API_KEY, "retry_delay": 0.01},
    )

    with pytest.raises(ProviderError, match="connection failed"):
        collect(provider)


def test_timeout_while_the_server_is_silent(fake):
    fake.script(answer("slow", delay=2.0))

    started = time.monotonic()
    with pytest.raises(ProviderError, match="no answer within 0.3 seconds"):
        collect(provider_for(fake, timeout=0.3, max_retries=0))
    assert time.monotonic() - started < 1.5


def test_errors_do_not_reveal_the_api_key(fake):
    fake.script(Error(401, f"invalid x-api-key: {API_KEY}", "authentication_error"))

    with pytest.raises(ProviderError) as failure:
        collect(provider_for(fake))

    message = str(failure.value)
    assert "HTTP 401" in message
    assert API_KEY not in message
    assert failure.value.__cause__ is None
    assert len(fake.requests) == 1


def test_calls_one_after_another_share_one_connection(fake):
    fake.script(*(answer("ok") for _ in range(3)))
    provider = provider_for(fake)

    for _ in range(3):
        assert collect(provider)[-1] == FinishDelta("stop")

    assert len(fake.connections) == 1


def test_closing_the_stream_closes_the_connection(fake):
    events = [message_start(), text_block(0)] + [text_delta(0, f"token {n} ") for n in range(500)]
    fake.script(stream(events, delay=0.01))
    deltas = provider_for(fake).stream(ask())

    assert next(deltas) == ContentDelta("token 0 ")
    deltas.close()  # what a cancelled run does

    assert fake.wait_for_outcomes(1) == ["client closed"]


# Configuration -----------------------------------------------------------------------------


def test_environment_names_the_default_server_and_key(fake, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-the-environment")
    fake.script(answer("ok"))

    provider, model = resolve_model("anthropic:claude-test")
    assert kit.texts(collect(provider), ContentDelta) == "ok"

    assert model == "claude-test"
    assert isinstance(provider, AnthropicProvider)
    assert api_key(fake.headers[0]) == "sk-ant-from-the-environment"


def test_the_environment_key_is_not_sent_to_a_server_an_agent_names(fake, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-for-anthropic-only")
    monkeypatch.setenv("PROXY_KEY", "sk-proxy")
    fake.script(answer("ok"), answer("ok"))

    provider, _ = resolve_model("anthropic:claude-test", {"base_url": fake.url})
    collect(provider)
    provider, _ = resolve_model(
        "anthropic:claude-test", {"base_url": fake.url, "api_key_env": "PROXY_KEY"}
    )
    collect(provider)

    assert api_key(fake.headers[0]) == "no-key"
    assert api_key(fake.headers[1]) == "sk-proxy"


def test_no_key_for_anthropic_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    provider, _ = resolve_model("anthropic:claude-test")

    with pytest.raises(ProviderError, match="set ANTHROPIC_API_KEY"):
        collect(provider)


def test_an_unset_key_variable_fails_the_call_saying_so(fake, monkeypatch):
    monkeypatch.delenv("UNSET_ANTHROPIC_KEY", raising=False)
    provider, _ = resolve_model(
        "anthropic:claude-test", {"base_url": fake.url, "api_key_env": "UNSET_ANTHROPIC_KEY"}
    )

    with pytest.raises(ProviderError, match="UNSET_ANTHROPIC_KEY"):
        collect(provider)
    assert fake.requests == []


def test_a_model_name_is_required():
    with pytest.raises(UnknownModel, match="anthropic:claude"):
        resolve_model("anthropic")


@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", "soon"), ("thinking_budget", 100), ("default_max_tokens", 0)],
)
def test_invalid_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"model_options.{option}"):
        resolve_model("anthropic:m", {"api_key": "k", option: value})


# Through the API ---------------------------------------------------------------------------


@pytest.fixture
def anthropic_agent(fake):
    yield from kit.weather_agent(
        "anthropic_test_agent", "anthropic:claude-test", {"base_url": fake.url, "api_key": "test"}
    )


def weather_model(request):
    """The fake model: ask for the weather first, then answer with what the tool said."""
    results = [
        block
        for message in request["messages"]
        if message["role"] == "user"
        for block in message["content"]
        if block["type"] == "tool_result"
    ]
    if not results:
        return stream(
            [
                message_start(50),
                thinking_block(0),
                thinking_delta(0, "I need the weather tool."),
                signature_delta(0, "sig-w"),
                block_stop(0),
                tool_use_block(1, "toolu_w1", "get_weather"),
                input_json(1, '{"city": '),
                input_json(1, '"Paris"}'),
                block_stop(1),
                message_delta("tool_use", 12),
                message_stop(),
            ]
        )
    return stream(
        [message_start(80), text_block(0)]
        + [text_delta(0, piece) for piece in ("The weather: ", results[-1]["content"], ".")]
        + [block_stop(0), message_delta("end_turn", 9), message_stop()]
    )


def test_run_through_the_api_with_a_tool_round_trip(client, auth, fake, anthropic_agent):
    fake.script(weather_model, weather_model)

    response = client.post(
        f"/api/agents/{anthropic_agent.id}/runs",
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
    assert run["usage"]["inputTokens"] == 130
    assert run["usage"]["outputTokens"] == 21
    assert run["usage"]["modelCalls"] == 2
    assert run["metadata"]["model"] == "anthropic:claude-test"

    first, second = fake.requests
    assert first["system"] == "Answer weather questions."
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]}
    ]
    assert first["tools"][0]["name"] == "get_weather"
    assert first["tools"][0]["input_schema"]["properties"]["city"] == {"type": "string"}
    assert second["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_w1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_w1",
                    "content": "Sunny, 21 C in Paris",
                }
            ],
        },
    ]


def test_streamed_run_through_the_api(client, auth, fake, anthropic_agent):
    fake.script(weather_model, weather_model)
    kit.check_streamed_weather_run(client, auth, anthropic_agent)


def test_overloaded_model_through_the_api_fails_the_run(client, auth, fake, anthropic_agent):
    fake.script(*(Error(529, "Overloaded", "overloaded_error") for _ in range(3)))

    response = client.post(
        f"/api/agents/{anthropic_agent.id}/runs", json={"message": "Hi"}, headers=auth
    )

    run = response.get_json()
    assert run["status"] == "FAILED"
    assert run["error"]["type"] == "model_error"
    assert "HTTP 529: Overloaded" in run["error"]["message"]
    assert len(fake.requests) == 3
