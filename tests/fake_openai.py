"""A small OpenAI-compatible server for tests: it replays scripted streaming replies over HTTP.

It speaks the chat completions wire protocol (``POST /v1/chat/completions`` answered by
``data: {chunk}`` Server-Sent Events and ``data: [DONE]``, or by an error status with an
``{"error": {...}}`` body), so the provider under test runs its real HTTP client against it.
Each request takes the next scripted reply; a reply may also be a function of the request body.

    with FakeOpenAI() as fake:
        fake.script(stream([chunk(content="Hi"), chunk(finish_reason="stop")]))
        ... base_url = fake.url + "/v1" ...
        fake.requests[0]["messages"]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fake_http import FakeServer, ScriptedHandler, Stream


@dataclass
class Error:
    """An error reply in the OpenAI shape: ``{"error": {"message", "type", "code"}}``."""

    status: int
    message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)


Reply = Stream | Error | Callable[[dict[str, Any]], "Stream | Error"]


def stream(chunks: list[dict[str, Any]], **kwargs: Any) -> Stream:
    return Stream(chunks, **kwargs)


def chunk(
    content: str | None = None,
    *,
    finish_reason: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    role: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice; ``extra`` joins its delta."""
    delta: dict[str, Any] = dict(extra)
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1746518400,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def tool_call(
    index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None
) -> dict[str, Any]:
    """A tool-call fragment as it appears in a chunk's ``delta.tool_calls``."""
    fragment: dict[str, Any] = {"index": index}
    function: dict[str, Any] = {}
    if id is not None:
        fragment.update(id=id, type="function")
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        fragment["function"] = function
    return fragment


def usage_chunk(prompt: int, completion: int, reasoning: int | None = None) -> dict[str, Any]:
    """The last chunk ``stream_options.include_usage`` asks for: no choices, the usage."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1746518400,
        "model": "test-model",
        "choices": [],
        "usage": usage,
    }


def answer(text: str, *, pieces: int = 1) -> Stream:
    """A plain streamed answer: the role, the text in ``pieces``, stop, usage."""
    size = max(1, -(-len(text) // pieces))
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return Stream(
        [chunk(role="assistant", content="")]
        + [chunk(part) for part in parts]
        + [chunk(finish_reason="stop"), usage_chunk(10, len(parts))]
    )


class _Handler(ScriptedHandler):
    route = "/v1/chat/completions"

    def not_found(self) -> None:
        self._error(Error(404, f"no route {self.path}"))

    def send_reply(self, request: dict[str, Any], reply: Stream | Error) -> None:
        if isinstance(reply, Error):
            self._error(reply)
        else:
            # The chunks, then [DONE].
            self.send_events(reply, _event, end=b"data: [DONE]\n\n")

    def _error(self, error: Error) -> None:
        body = {"error": {"message": error.message, "type": "fake_error", "code": error.status}}
        self.send_json(error.status, body, error.headers)


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class FakeOpenAI(FakeServer):
    """An OpenAI-compatible server on a loopback port; see :class:`.fake_http.FakeServer`."""

    handler = _Handler

    def unscripted(self) -> Error:
        return Error(500, "the fake server has no reply scripted for this request")
