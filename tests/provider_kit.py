"""What the tests of the model back ends share: requests, deltas, and a run through the API."""

from __future__ import annotations

from collections.abc import Iterator

import agent_runs
from agent_runs.runtime.agents import Agent, unregister_agent

from .sse import parse_stream

# A 1x1 PNG.
PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAC"
    "hwGA60e6kgAAAABJRU5ErkJggg=="
)


def collect(provider, request) -> list:
    return list(provider.stream(request))


def texts(deltas, kind) -> str:
    return "".join(d.text for d in deltas if isinstance(d, kind))


def get_weather(city: str) -> str:
    """Return today's weather for a city."""
    return f"Sunny, 21 C in {city}"


def weather_agent(agent_id: str, model: str, model_options: dict) -> Iterator[Agent]:
    """Register an agent answering weather questions with get_weather; for a fixture."""
    agent = agent_runs.register_agent(
        agent_id,
        instructions="Answer weather questions.",
        model=model,
        model_options={"retry_delay": 0.01, **model_options},
        tools=[get_weather],
    )
    yield agent
    unregister_agent(agent.id)


def check_streamed_weather_run(client, auth, agent: Agent) -> None:
    """Stream a run whose model calls get_weather, then answers with what it said."""
    response = client.post(
        f"/api/agents/{agent.id}/runs/stream",
        json={"message": "Weather in Paris?"},
        headers=auth,
    )

    events = parse_stream(response.get_data(as_text=True))
    kinds = [event["event"] for event in events]
    assert kinds[0] == "START"
    assert kinds[-1] == "STOP"
    assert kinds.index("REASONING_DELTA") < kinds.index("TOOL_START") < kinds.index("TOOL_END")
    assert kinds.index("TOOL_END") < kinds.index("CONTENT_DELTA")
    content = "".join(e["data"] for e in events if e["event"] == "CONTENT_DELTA")
    assert content == "The weather: Sunny, 21 C in Paris."
