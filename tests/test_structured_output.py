"""Structured output: options.responseFormat (or an agent's response_format) makes the answer
JSON valid against a schema, in RunResponse.output and streamed as CONTENT_DELTA text."""

import json

import jsonschema
import pytest

from agent_runs.providers.scripted import instance_of

from . import fake_anthropic as anth
from .fake_anthropic import FakeAnthropic
from .fake_openai import FakeOpenAI, answer, chunk, stream, tool_call, usage_chunk
from .sse import parse_stream

QUOTE = {
    "type": "object",
    "properties": {
        "ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"},
        "price": {"type": "number", "minimum": 0},
        "currency": {"enum": ["USD", "EUR"]},
        "sources": {"type": "array", "items": {"$ref": "#/$defs/source"}, "minItems": 1},
    },
    "required": ["ticker", "price", "currency"],
    "additionalProperties": False,
    "$defs": {"source": {"type": "object", "properties": {"url": {"format": "uri"}}}},
}
NVDA = "What is the current NVDA stock price?"


def json_schema(schema):
    return {"type": "json_schema", "schema": schema}


def sync_run(client, auth, agent, **body):
    body.setdefault("message", NVDA)
    response = client.post(f"/api/agents/{agent}/runs", headers=auth, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def streamed(client, auth, agent, **body):
    body.setdefault("message", NVDA)
    response = client.post(f"/api/agents/{agent}/runs/stream", headers=auth, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse_stream(response.get_data(as_text=True))


def content_of(events):
    return "".join(e["data"] for e in events if e["event"] == "CONTENT_DELTA")


# The scripted model ------------------------------------------------------------------------


def test_the_scripted_model_answers_a_valid_instance_after_its_tool_call(client, auth):
    run = sync_run(client, auth, "finance_agent", options={"responseFormat": json_schema(QUOTE)})
    assert run["status"] == "COMPLETED", run
    jsonschema.validate(run["output"], QUOTE)
    assert run["output"]["ticker"] == "NVDA" and run["output"]["currency"] == "USD"
    assert json.loads(run["content"]) == run["output"]
    assert [tool["name"] for tool in run["tools"]] == ["get_stock_price"]
    status = client.get(f"/api/agents/finance_agent/runs/{run['runId']}/status", headers=auth).json
    assert status["output"] == run["output"]


def test_the_stream_carries_the_json_as_content(client, auth):
    events = streamed(
        client, auth, "assistant", options={"responseFormat": json_schema({"type": "array"})}
    )
    assert json.loads(content_of(events)) == [f"You said: {NVDA}"]
    assert events[-1]["event"] == "STOP"


def test_an_agent_defaults_a_format_a_run_may_turn_off(client, auth, agents):
    agents("quoter", model="scripted", response_format=json_schema(QUOTE))
    run = sync_run(client, auth, "quoter")
    jsonschema.validate(run["output"], QUOTE)
    plain = sync_run(client, auth, "quoter", options={"responseFormat": {"type": "text"}})
    assert plain["output"] is None and plain["content"] == f"You said: {NVDA}"
    other = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    own = sync_run(client, auth, "quoter", options={"responseFormat": json_schema(other)})
    assert own["output"] == {"n": 1}


@pytest.mark.parametrize(
    "schema",
    [
        QUOTE,
        {"type": "string", "minLength": 3, "maxLength": 5},
        {"type": "integer", "exclusiveMinimum": 10, "multipleOf": 5},
        {"anyOf": [{"type": "null"}, {"type": "string", "format": "email"}]},
        {"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}, {"required": []}]},
        {"type": "array", "prefixItems": [{"type": "boolean"}], "minItems": 2, "items": {}},
        {"type": ["null", "object"], "properties": {"when": {"format": "date-time"}}},
        {"const": {"fixed": True}},
    ],
)
def test_the_scripted_instances_are_valid(schema):
    jsonschema.Draft202012Validator(schema).validate(instance_of(schema, "You said: NVDA"))


# Bad schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response_format, field, message",
    [
        (json_schema({"type": "strin"}), "schema", "Not a valid JSON Schema"),
        (json_schema({"minLength": -1}), "schema", "Not a valid JSON Schema"),
        (json_schema([1]), "schema", "Not a valid mapping"),
        (json_schema({"$ref": "https://example.com/s.json"}), "schema", "does not point inside"),
        (json_schema({"$ref": "#/$defs/missing"}), "schema", "does not point inside"),
        (json_schema({"description": "x" * 70_000}), "schema", "at most"),
        ({"type": "json_schema"}, "schema", "Give the JSON Schema"),
        ({"type": "text", "schema": {}}, "schema", "Only for type json_schema"),
        ({"type": "xml"}, "type", "Must be one of"),
        ({"type": "json_schema", "schema": {}, "strict": True}, "strict", "Unknown field"),
    ],
)
def test_a_bad_response_format_is_422_naming_the_field(
    client, auth, response_format, field, message
):
    response = client.post(
        "/api/agents/assistant/runs",
        headers=auth,
        json={"message": "hi", "options": {"responseFormat": response_format}},
    )
    assert response.status_code == 422, response.get_data(as_text=True)
    errors = response.json["errors"]["options"]["responseFormat"]
    assert field in errors and message in json.dumps(errors[field]), errors


# OpenAI-compatible servers -----------------------------------------------------------------


@pytest.fixture
def openai_fake():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def openai_agent(openai_fake, agents):
    def get_price(ticker: str) -> str:
        """Return a stock's price."""
        return "875.40"

    return agents(
        "openai_quoter",
        model="openai:test-model",
        model_options={"base_url": openai_fake.url + "/v1", "api_key": "k", "retry_delay": 0.01},
        tools=[get_price],
    )


GOOD = {"ticker": "NVDA", "price": 875.4, "currency": "USD"}


def tool_then(*answers):
    """A fake model that calls get_price first, then gives ``answers`` one after the other."""
    replies = iter(answers)

    def reply(request):
        if not any(m["role"] == "tool" for m in request["messages"]):
            return stream(
                [
                    chunk(role="assistant", content="Let me look."),
                    chunk(tool_calls=[tool_call(0, id="c1", name="get_price", arguments="")]),
                    chunk(tool_calls=[tool_call(0, arguments='{"ticker": "NVDA"}')]),
                    chunk(finish_reason="tool_calls"),
                    usage_chunk(10, 5),
                ]
            )
        return answer(next(replies), pieces=3)

    return reply


def test_openai_gets_the_schema_as_response_format(client, auth, openai_fake, openai_agent):
    openai_fake.script(*[tool_then(json.dumps(GOOD))] * 2)
    events = streamed(client, auth, openai_agent, options={"responseFormat": json_schema(QUOTE)})
    first, second = openai_fake.requests
    for body in (first, second):
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": QUOTE},
        }
    assert json.loads(content_of(events)) == GOOD
    # The text next to the tool call is reasoning, not part of the JSON answer.
    reasoning = [e["data"] for e in events if e["event"] == "REASONING_DELTA"]
    assert "Let me look." in reasoning
    assert len([e for e in events if e["event"] == "CONTENT_DELTA"]) == 3


def test_an_invalid_answer_is_asked_again_once(client, auth, openai_fake, openai_agent):
    model = tool_then('{"ticker": "nvda"}', json.dumps(GOOD))
    openai_fake.script(model, model, model)
    events = streamed(client, auth, openai_agent, options={"responseFormat": json_schema(QUOTE)})
    assert events[-1]["event"] == "STOP"
    # Only the answer that fits was streamed.
    assert json.loads(content_of(events)) == GOOD
    retry = openai_fake.requests[2]["messages"]
    assert retry[-2] == {"role": "assistant", "content": '{"ticker": "nvda"}'}
    assert retry[-1]["role"] == "user" and "not valid" in retry[-1]["content"]
    assert "tools" not in openai_fake.requests[2]
    run_id = json.loads(events[0]["data"])["runId"]
    run = client.get(f"/api/agents/{openai_agent}/runs/{run_id}/status", headers=auth).json
    assert run["status"] == "COMPLETED" and run["output"] == GOOD
    assert run["usage"]["modelCalls"] == 3


def test_two_invalid_answers_fail_the_run(client, auth, openai_fake, openai_agent):
    model = tool_then("not json at all", '{"ticker": "NVDA", "price": -1, "currency": "USD"}')
    openai_fake.script(model, model, model)
    run = sync_run(client, auth, openai_agent, options={"responseFormat": json_schema(QUOTE)})
    assert run["status"] == "FAILED"
    assert run["error"]["type"] == "invalid_output"
    assert "$.price" in run["error"]["message"] and "minimum" in run["error"]["message"]
    assert run["content"] == "" and run["output"] is None
    events = parse_stream(
        client.get(f"/api/agents/{openai_agent}/runs/{run['runId']}/events", headers=auth).get_data(
            as_text=True
        )
    )
    assert events[-1]["event"] == "ERROR" and "$.price" in events[-1]["data"]
    assert not [e for e in events if e["event"] == "CONTENT_DELTA"]


# Anthropic ---------------------------------------------------------------------------------


@pytest.fixture
def anthropic_fake():
    with FakeAnthropic() as server:
        yield server


def answer_tool_call(pieces, *, said=None):
    """An Anthropic answer that calls the answer tool, its input in ``pieces``."""
    events = [anth.message_start(12)]
    index = 0
    if said:
        events += [anth.text_block(0), anth.text_delta(0, said), anth.block_stop(0)]
        index = 1
    events.append(anth.tool_use_block(index, "toolu_1", "final_answer"))
    events += [anth.input_json(index, piece) for piece in pieces]
    events += [anth.block_stop(index), anth.message_delta("tool_use"), anth.message_stop()]
    return anth.Stream(events)


def anthropic_agent(agents, fake, **kwargs):
    return agents(
        "claude_quoter",
        model="anthropic:claude-test",
        model_options={"base_url": fake.url, "api_key": "k", "retry_delay": 0.01},
        **kwargs,
    )


def test_anthropic_is_made_to_call_an_answer_tool(client, auth, agents, anthropic_fake):
    agent = anthropic_agent(agents, anthropic_fake)
    text = json.dumps(GOOD)
    anthropic_fake.script(answer_tool_call([text[:10], text[10:]], said="Here it is."))
    run = sync_run(client, auth, agent, options={"responseFormat": json_schema(QUOTE)})
    assert run["status"] == "COMPLETED", run
    assert run["output"] == GOOD and run["tools"] == []
    assert run["reasoningSteps"] == ["Here it is."]
    [body] = anthropic_fake.requests
    assert body["tool_choice"] == {"type": "tool", "name": "final_answer"}
    [tool] = body["tools"]
    assert tool["name"] == "final_answer" and tool["input_schema"] == QUOTE


def test_anthropic_with_tools_must_call_one_and_a_list_is_wrapped(
    client, auth, agents, anthropic_fake
):
    def get_price(ticker: str) -> str:
        """Return a stock's price."""
        return "875.40"

    agent = anthropic_agent(agents, anthropic_fake, tools=[get_price])
    prices = {"type": "array", "items": {"type": "number"}}
    anthropic_fake.script(answer_tool_call(['{"value": [1.5, ', "2]}"]))
    run = sync_run(client, auth, agent, options={"responseFormat": json_schema(prices)})
    assert run["status"] == "COMPLETED", run
    assert run["output"] == [1.5, 2] and run["content"] == "[1.5, 2]"
    [body] = anthropic_fake.requests
    assert body["tool_choice"] == {"type": "any"}
    assert [t["name"] for t in body["tools"]] == ["get_price", "final_answer"]
    assert body["tools"][1]["input_schema"] == {
        "type": "object",
        "properties": {"value": prices},
        "required": ["value"],
    }
