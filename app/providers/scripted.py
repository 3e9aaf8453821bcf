"""A deterministic model for tests, demos and client developers who want a predictable stream.

It reads the conversation like a model would, but answers by rule:

1. If the agent has tools and none was called since the user's last message, it reasons about
   calling the first tool and calls it once, with arguments drawn from the user's message
   (for a string argument with a ``pattern``, the first word of the message that matches).
2. Otherwise it answers: with the tool results it got, or by echoing the user's message, in
   several content deltas. Asked for structured output (a response schema), it answers with
   a JSON instance of the schema instead, built from it (:func:`instance_of`): the strings
   say what the plain answer would have said.

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


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    """Follow a local ``$ref`` ("#/$defs/x"), as many times as it takes."""
    for _ in range(32):
        if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str)):
            break
        target: Any = root
        for part in schema["$ref"].removeprefix("#").strip("/").split("/"):
            if part:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target[int(part)] if isinstance(target, list) else target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _string(schema: dict[str, Any], text: str, words: str) -> str:
    formats = {
        "date-time": "2026-05-06T10:00:00Z",
        "date": "2026-05-06",
        "time": "10:00:00Z",
        "email": "user@example.com",
        "uri": "https://example.com/",
        "uuid": "550e8400-e29b-41d4-a716-446655440000",
    }
    value = formats.get(schema.get("format", ""), text)
    pattern = schema.get("pattern")
    if pattern and not re.search(pattern, value):
        # A word of the text that matches, as the tool arguments do; else the pattern's
        # own literal characters, which often match it.
        found = [w for w in re.findall(r"[\w.@:/-]+", words) if re.search(pattern, w)]
        value = found[0] if found else re.sub(r"\\(.)|[\^$()\[\]{}*+?|]", r"\1", pattern)
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if len(value) < low:
        value = value.ljust(low, "x")
    if high is not None:
        value = value[:high]
    return value


def _number(schema: dict[str, Any], integer: bool) -> float | int:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 1 if low is None else low
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        value = schema["exclusiveMinimum"] + 1
    if high is not None and value > high:
        value = high
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        value = schema["exclusiveMaximum"] - (1 if integer else 0.5)
    step = schema.get("multipleOf")
    if step:
        value = -(-value // step) * step
    return int(value) if integer else float(value)


def instance_of(
    schema: Any, text: str = "", words: str = "", root: Any = None, depth: int = 0
) -> Any:
    """Build a JSON value valid against ``schema``, its strings made of ``text``; a string
    with a ``pattern`` is the first word of ``text`` or ``words`` that matches it.

    Covers what response schemas use: types, properties and required, items and lengths,
    enum and const, bounds, formats, simple patterns, anyOf/oneOf (the first choice), allOf
    (merged) and local $refs. What it cannot honour (an intricate pattern, say) the loop's
    validation reports, as it would of any model.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            # The first choice that is not null: a null answer would show a client little.
            choices = schema[key]
            choice = next((c for c in choices if c.get("type") != "null"), choices[0])
            rest = {k: v for k, v in schema.items() if k != key}
            return instance_of({**rest, **choice}, text, words, root, depth + 1)
    if schema.get("allOf"):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(part, root)
            merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
            merged["required"] = [*merged.get("required", []), *part.get("required", [])]
            merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
        return instance_of(merged, text, words, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties = schema.get("properties") or {}
        names = list(dict.fromkeys([*schema.get("required", []), *properties]))
        value = {
            name: instance_of(properties.get(name, {}), text, words, root, depth + 1)
            for name in names
        }
        return value
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        if schema.get("maxItems") is not None:
            count = min(count, schema["maxItems"])
        prefix = schema.get("prefixItems") or []
        items = [instance_of(item, text, words, root, depth + 1) for item in prefix[:count]]
        rest = schema.get("items", {})
        items += [
            instance_of(rest, text, words, root, depth + 1) for _ in range(count - len(items))
        ]
        if schema.get("uniqueItems") and len(items) > 1 and isinstance(items[0], (int, float)):
            items = [item + index for index, item in enumerate(items)]
        return items
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema, text, f"{text} {words}")


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
            if request.response_schema is not None:
                answer = json.dumps(instance_of(request.response_schema, answer, message))
        else:
            self._pace()
            yield ReasoningDelta("No tool is needed; I will answer directly.")
            turn = sum(1 for m in messages if m["role"] == "user")
            answer = f"You said: {message}" if turn == 1 else f"(turn {turn}) You said: {message}"
            images = len(messages[last_user].get("media") or ())
            if images:
                answer += f" (with {images} image{'s' if images > 1 else ''})"
            if request.response_schema is not None:
                answer = json.dumps(instance_of(request.response_schema, answer, message))
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
