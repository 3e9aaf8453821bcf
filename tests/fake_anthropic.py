"""A small Anthropic Messages API server for tests: it replays scripted streaming replies.

It speaks the Messages streaming wire protocol (``POST /v1/messages`` with ``"stream": true``
answered by Server-Sent Events, each an ``event: <type>`` line and a ``data: <json>`` line, or
by an error status with a ``{"type": "error", "error": {...}}`` body), so the provider under
test runs the real SDK and its HTTP client against it. Each request takes the next scripted
reply; a reply may also be a function of the request body.

    with FakeAnthropic() as fake:
        fake.script(answer("Hi"))
        ... base_url = fake.url ...
        fake.requests[0]["messages"]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fake_http import FakeServer, ScriptedHandler, Stream

MODEL = "claude-test"


@dataclass
class Error:
    """An error reply as Anthropic sends it: ``{"type": "error", "error": {type, message}}``."""

    status: int
    message: str = "error"
    type: str = "api_error"
    headers: dict[str, str] = field(default_factory=dict)


Reply = Stream | Error | Callable[[dict[str, Any]], "Stream | Error"]


# Events ------------------------------------------------------------------------------------


def message_start(input_tokens: int = 10, **usage: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
        },
    }


def text_block(index: int) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "text", "text": ""},
    }


def thinking_block(index: int) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }


def redacted_thinking_block(index: int, data: str) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "redacted_thinking", "data": data},
    }


def tool_use_block(index: int, id: str, name: str) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}},
    }


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def text_delta(index: int, text: str) -> dict[str, Any]:
    return _delta(index, {"type": "text_delta", "text": text})


def thinking_delta(index: int, thinking: str) -> dict[str, Any]:
    return _delta(index, {"type": "thinking_delta", "thinking": thinking})


def signature_delta(index: int, signature: str) -> dict[str, Any]:
    return _delta(index, {"type": "signature_delta", "signature": signature})


def input_json(index: int, partial_json: str) -> dict[str, Any]:
    return _delta(index, {"type": "input_json_delta", "partial_json": partial_json})


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, output_tokens: int = 5) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


def message_stop() -> dict[str, Any]:
    return {"type": "message_stop"}


def ping() -> dict[str, Any]:
    return {"type": "ping"}


def error_event(type: str = "overloaded_error", message: str = "Overloaded") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type, "message": message}}


def api_key(headers: dict[str, str]) -> str | None:
    """The key a request carried: ``x-api-key``, or a bearer token (SDK releases from 2.0)."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


def stream(events: list[dict[str, Any]], **kwargs: Any) -> Stream:
    return Stream(events, **kwargs)


def answer(text: str, *, pieces: int = 1, input_tokens: int = 10, **kwargs: Any) -> Stream:
    """A plain streamed answer: one text block with the text in ``pieces``, end_turn."""
    size = max(1, -(-len(text) // pieces))
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return Stream(
        [message_start(input_tokens), text_block(0), ping()]
        + [text_delta(0, part) for part in parts]
        + [block_stop(0), message_delta("end_turn", len(parts)), message_stop()],
        **kwargs,
    )


# The server --------------------------------------------------------------------------------


class _Handler(ScriptedHandler):
    route = "/v1/messages"

    def not_found(self) -> None:
        self._error(Error(404, f"no route {self.path}", "not_found_error"))

    def send_reply(self, request: dict[str, Any], reply: Stream | Error) -> None:
        if not request.get("stream"):
            reply = Error(400, "this fake server only streams", "invalid_request_error")
        if isinstance(reply, Error):
            self._error(reply)
        else:
            self.send_events(reply, _event)

    def _error(self, error: Error) -> None:
        body = {"type": "error", "error": {"type": error.type, "message": error.message}}
        self.send_json(error.status, body, error.headers)


def _event(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event: its type on the ``event:`` line, the JSON on ``data:``."""
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode())


class FakeAnthropic(FakeServer):
    """An Anthropic Messages API server on a loopback port; see :class:`.fake_http.FakeServer`."""

    handler = _Handler

    def unscripted(self) -> Error:
        return Error(500, "the fake server has no reply scripted for this request")
