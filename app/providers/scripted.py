"""A deterministic model for tests, demos and client developers who want a predictable stream.

It reads the conversation like a model would, but answers by rule:

1. If the agent has tools and none was called since the user's last message, it reasons about
   calling the first tool and calls it once, with arguments drawn from the user's message
   (for a string argument with a ``pattern``, the first word of the message that matches).
2. Otherwise it answers: with the tool results it got, or by echoing the user's message, in
   several content deltas.

Options (the agent's ``model_options``): ``delay`` seconds between deltas (default 0),
``content_deltas`` to split the answer into exactly that many deltas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import gevent

from .base import (
    ContentDelta,
    Delta,
    FinishDelta,
    ModelRequest,
    ReasoningDelta,
    ToolCallDelta,
    ToolSpec,
    UsageDelta,
)


def _count_tokens(text: str) -> int:
    return len(text.split())


def _split(text: str, parts: int | None) -> list[str]:
    """Split text into word-sized deltas, or into exactly ``parts`` pieces."""
    if parts is None:
        return re.findall(r"\S+\s*", text) or [text]
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _argument_value(name: str, schema: dict[str, Any], message: str) -> Any:
    kind = schema.get("type")
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return True
    pattern = schema.get("pattern")
    if pattern:
        for word in re.findall(r"[\w.-]+", message):
            if re.fullmatch(pattern.strip("^$"), word):
                return word
    return message


def _arguments(spec: ToolSpec, message: str) -> dict[str, Any]:
    properties = spec.parameters.get("properties", {})
    required = spec.parameters.get("required", list(properties))
    return {name: _argument_value(name, properties.get(name, {}), message) for name in required}


class ScriptedProvider:
    # It cannot see images, but acknowledges them, so clients can test sending media.
    accepts_images = True

    def __init__(self, model: str = "", options: dict[str, Any] | None = None) -> None:
        options = options or {}
        self.delay = float(options.get("delay", 0))
        parts = options.get("content_deltas")
        self.content_deltas = int(parts) if parts else None

    def _pace(self) -> None:
        if self.delay:
            gevent.sleep(self.delay)

    def stream(self, request: ModelRequest) -> Iterator[Delta]:
        messages = request.messages
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        message = messages[last_user]["content"]
        tool_results = [m for m in messages[last_user + 1 :] if m["role"] == "tool"]
        input_tokens = sum(_count_tokens(m.get("content") or "") for m in messages)

        if request.purpose == "followups":
            # The request ends with the instruction to suggest questions; the topic is the
            # user's own message before it.
            asked = [m["content"] for m in messages if m["role"] == "user"]
            yield from self._followups(asked[-2] if len(asked) > 1 else message, input_tokens)
            return

        if request.tools and not tool_results:
            spec = request.tools[0]
            for text in (f'The user asks: "{message[:200]}". ', f"I should call {spec.name}."):
                self._pace()
                yield ReasoningDelta(text)
            values = _arguments(spec, message)
            if "thought" in spec.parameters.get("properties", {}):
                # The loop's optional explanation argument, filled as a model would.
                values["thought"] = f"{spec.name} has the answer to this."
            arguments = json.dumps(values)
            middle = len(arguments) // 2
            self._pace()
            yield ToolCallDelta(0, id="call_1", name=spec.name, arguments=arguments[:middle])
            yield ToolCallDelta(0, arguments=arguments[middle:])
            yield UsageDelta(input_tokens, _count_tokens(arguments))
            yield FinishDelta("tool_calls")
            return

        if tool_results:
            answer = " ".join(f"{m['name']} returned {m['content']}." for m in tool_results)
        else:
            self._pace()
            yield ReasoningDelta("No tool is needed; I will answer directly.")
            turn = sum(1 for m in messages if m["role"] == "user")
            answer = f"You said: {message}" if turn == 1 else f"(turn {turn}) You said: {message}"
            images = len(messages[last_user].get("media") or ())
            if images:
                answer += f" (with {images} image{'s' if images > 1 else ''})"
        for piece in _split(answer, self.content_deltas):
            self._pace()
            yield ContentDelta(piece)
        yield UsageDelta(input_tokens, _count_tokens(answer))
        yield FinishDelta("stop")

    def _followups(self, message: str, input_tokens: int) -> Iterator[Delta]:
        topic = message[:60].rstrip("?.! ")
        text = (
            f"Can you tell me more about {topic}?\n"
            f"What are the risks related to {topic}?\n"
            f"How has {topic} changed recently?"
        )
        yield ContentDelta(text)
        yield UsageDelta(input_tokens, _count_tokens(text))
        yield FinishDelta("stop")
