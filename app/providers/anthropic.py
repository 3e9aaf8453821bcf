"""Anthropic's Messages API (Claude), through the ``anthropic`` SDK (the ``anthropic`` extra).

The model string is ``anthropic:<model>``, e.g. ``anthropic:claude-sonnet-4-5``. The agent's
``model_options`` configure it:

``base_url``
    The API root, e.g. ``https://api.anthropic.com``. Default: the ``ANTHROPIC_BASE_URL``
    environment variable, else ``https://api.anthropic.com``.
``api_key`` / ``api_key_env``
    The key, or the name of an environment variable that holds it. Without either,
    ``ANTHROPIC_API_KEY`` is used, but only when ``base_url`` is not set in the options: a key
    meant for Anthropic is never sent to a server an agent file names.
``timeout``, ``max_retries``, ``retry_delay``
    As for the OpenAI-compatible provider: seconds to wait for the connection and for each
    piece of the answer (default 300); further attempts after a 408, 409, 429, 5xx (529
    "overloaded" included), a connection error or an ``error`` event in the stream (default
    2), waiting ``retry_delay`` seconds (default 0.5) doubled each time, or what
    ``Retry-After`` asks, capped at 20 s. Only before the first delta is yielded: a stream
    that fails after output reached the run fails with :class:`ProviderError`.
``default_max_tokens``
    Anthropic requires a limit on the answer's length; this one (default 4096) applies when
    the run does not set ``maxTokens``.
``thinking_budget``
    Tokens of extended thinking (at least 1024), streamed as reasoning. They come on top of
    the answer's ``max_tokens`` (Anthropic counts both in one limit), temperature is not sent
    (thinking accepts none), and the short call for followups does not think.

``temperature`` reaches the model only through SDK releases before 2.0: the API version that
later ones speak refuses sampling parameters.

Invalid option values raise ValueError when the provider is made; a missing key fails the
model call with :class:`ProviderError`. The SDK's own retries are off; one client per
(base_url, api_key) is shared by every run of the process.

Structured output (a request's ``response_schema``): the answer is the input of a tool,
``final_answer``, whose input schema is the response schema (a schema whose root is not an
object is wrapped in one, under ``value``). The model is made to call a tool (that one, when it
has no other); a call to it comes out as the answer's text, and text the model wrote beside it
as reasoning. Extended thinking allows no forced tool, so a thinking model is only offered it.

Thinking and tools: Anthropic wants the signed thinking blocks of a tool-using answer sent back
with its tool results, and the neutral messages of :mod:`.base` have no place for them. So the
blocks are remembered here, by tool call id, for the next call of the same run; a call whose
blocks are unknown (a run resumed by another process) is made without thinking.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import anthropic

from .base import (
    ContentDelta,
    Delta,
    FinishDelta,
    ModelRequest,
    ProviderError,
    ReasoningDelta,
    ToolCallDelta,
    ToolSpec,
    UnknownModel,
    UsageDelta,
)
from .sdk import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_DELAY,
    RETRY_STATUSES,
    StreamTruncated,
    backoff,
    display_url,
    endpoint,
    failure_message,
    option_number,
    shared_client,
    stream_with_retries,
)

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# Sent as the key to servers that need none: the SDK insists on having one.
NO_KEY = "no-key"

DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_TOKENS = 4096
MIN_THINKING_BUDGET = 1024
# The types of an error event in a stream that a new attempt may cure.
RETRY_ERROR_TYPES = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
# API version 2026-10-21, which the SDK speaks from release 2.0 on, refuses sampling parameters
# and those releases no longer take them; older ones speak 2023-06-01, which accepts them.
TAKES_TEMPERATURE = (
    "temperature" in inspect.signature(anthropic.resources.Messages.create).parameters
)
# Structured output's tool (see the module's docstring), and the key that wraps an answer whose
# schema is not an object's.
ANSWER_TOOL = "final_answer"
ANSWER_KEY = "value"
# How many tool-using answers' thinking blocks are remembered (see the module's docstring).
THINKING_MEMORY = 1024


def _http_library() -> Any:
    """Return the HTTP library the SDK is built on: httpx, or its successor in newer releases.

    The SDK turns network errors into its own only while it sends the request; a connection
    lost or silent while the stream is read raises the library's own errors.
    """
    for cls in anthropic.DefaultHttpxClient.__mro__:
        if cls.__name__ == "Client":
            return sys.modules[cls.__module__.partition(".")[0]]
    raise ImportError("cannot tell which HTTP library the anthropic SDK uses")


_http = _http_library()
NetworkError: type[Exception] = _http.TransportError
TIMEOUT_ERRORS: tuple[type[Exception], ...] = (anthropic.APITimeoutError, _http.TimeoutException)

# tool call id -> the thinking blocks of the answer that made the call, as the API sent them.
_thinking: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()


class AnthropicProvider:
    """Streams messages from Anthropic's Messages API."""

    def __init__(
        self, model: str, options: Mapping[str, Any] | None = None, network_backend: Any = None
    ) -> None:
        options = options or {}
        # The guarded backend, for an organisation's agent's own base_url (resolve_model).
        self.network_backend = network_backend
        if not model:
            raise UnknownModel(
                "name the model after the provider, e.g. 'anthropic:claude-sonnet-4-5'"
            )
        self.model = model
        self.base_url, self.api_key, self.missing_key = endpoint(
            options,
            default_base_url=ANTHROPIC_BASE_URL,
            base_url_variable="ANTHROPIC_BASE_URL",
            key_variable="ANTHROPIC_API_KEY",
        )
        self.timeout = option_number(options, "timeout", DEFAULT_TIMEOUT)
        self.max_retries = option_number(options, "max_retries", DEFAULT_MAX_RETRIES, int)
        self.retry_delay = option_number(options, "retry_delay", DEFAULT_RETRY_DELAY)
        self.default_max_tokens = option_number(
            options, "default_max_tokens", DEFAULT_MAX_TOKENS, int
        )
        if self.default_max_tokens < 1:
            raise ValueError("model_options.default_max_tokens must be at least 1")
        self.thinking_budget: int | None = option_number(options, "thinking_budget", 0, int) or None
        if self.thinking_budget is not None and self.thinking_budget < MIN_THINKING_BUDGET:
            raise ValueError(
                f"model_options.thinking_budget must be at least {MIN_THINKING_BUDGET} tokens"
            )

    def __repr__(self) -> str:
        return f"AnthropicProvider({self.model!r}, base_url={display_url(self.base_url)!r})"

    def stream(self, request: ModelRequest) -> Iterator[Delta]:
        """Call the model and yield its deltas, retrying failures that happen before output."""
        if self.missing_key:
            raise ProviderError(self.missing_key)
        client = shared_client(
            anthropic.Anthropic,
            self.base_url,
            self.api_key or NO_KEY,
            self.network_backend,
            anthropic.DefaultHttpxClient,
        )
        params = self._params(request)
        schema = request.response_schema
        wrapped = None if schema is None else _wraps(schema)
        yield from stream_with_retries(
            lambda: client.messages.create(**params),
            lambda events: _read_stream(events, wrapped),
            retry_on=(anthropic.APIError, StreamTruncated, NetworkError),
            # ValueError: an event that is not JSON, i.e. not the Messages API.
            fail_on=(anthropic.AnthropicError, ValueError),
            retryable=_retryable,
            backoff=self._backoff,
            describe=self._describe,
            max_retries=self.max_retries,
        )

    def _params(self, request: ModelRequest) -> dict[str, Any]:
        budget = self.thinking_budget
        if request.purpose != "answer" or not _thinking_known(request.messages):
            budget = None
        system, messages = _messages(request.messages, thinking=budget is not None)
        max_tokens = request.max_tokens or self.default_max_tokens
        params: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "timeout": self.timeout,
        }
        if system:
            params["system"] = system
        if request.tools:
            params["tools"] = [_tool(spec) for spec in request.tools]
        if request.response_schema is not None:
            params["tools"] = [*params.get("tools", ()), _answer_tool(request.response_schema)]
            if budget is None:
                params["tool_choice"] = (
                    {"type": "any"} if request.tools else {"type": "tool", "name": ANSWER_TOOL}
                )
        if budget is not None:
            params["thinking"] = {"type": "enabled", "budget_tokens": budget}
            params["max_tokens"] = max_tokens + budget
        elif request.temperature is not None and TAKES_TEMPERATURE:
            params["temperature"] = request.temperature
        return params

    def _backoff(self, attempt: int, error: Exception) -> float:
        """Seconds to wait before the next attempt (see sdk.backoff)."""
        headers = error.response.headers if isinstance(error, anthropic.APIStatusError) else None
        return backoff(self.retry_delay, attempt, headers)

    def _describe(self, error: Exception, *, after_output: bool) -> str:
        """Say what went wrong, without the API key."""
        if isinstance(error, anthropic.APIStatusError):
            kind, message = _error_body(error)
            if error.status_code >= 400:
                detail = f"HTTP {error.status_code}: {message}"
            else:
                # An "error" event inside a stream that had begun with 200 OK.
                detail = f"the server reported {kind or 'an error'}: {message}"
        elif isinstance(error, TIMEOUT_ERRORS):
            detail = f"no answer within {self.timeout:g} seconds"
        elif isinstance(error, anthropic.APIConnectionError):
            detail = f"connection failed ({error.__cause__ or error})"
        elif isinstance(error, NetworkError):
            detail = f"connection failed ({error})"
        else:
            detail = str(error) or type(error).__name__
        return failure_message(
            self.model, self.base_url, self.api_key, detail, after_output=after_output
        )


def _retryable(error: Exception) -> bool:
    if isinstance(error, anthropic.APIStatusError):
        if error.status_code < 400:
            return _error_body(error)[0] in RETRY_ERROR_TYPES
        return error.status_code in RETRY_STATUSES or error.status_code >= 500
    return isinstance(error, (anthropic.APIConnectionError, StreamTruncated, NetworkError))


def _error_body(error: anthropic.APIStatusError) -> tuple[str | None, str]:
    """Return the type and message of an error: ``{"type": "error", "error": {...}}``."""
    body = error.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            kind = inner.get("type")
            message = inner.get("message") or kind or "error"
            return (str(kind) if kind else None), str(message)[:500]
    if isinstance(body, str) and body:
        return None, body[:500]
    return None, error.response.reason_phrase or "error"


# Requests ----------------------------------------------------------------------------------


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "input_schema": spec.parameters}


def _wraps(schema: Mapping[str, Any]) -> bool:
    """Whether a response schema must be wrapped in an object to be a tool's input schema."""
    return schema.get("type") != "object"


def _answer_tool(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The tool whose input is a structured answer (see the module's docstring)."""
    if _wraps(schema):
        # Definitions stay at the root, where the schema's "#/$defs/..." references look.
        moved = ("$defs", "definitions", "$schema")
        inner = {k: v for k, v in schema.items() if k not in moved}
        outer = {k: v for k, v in schema.items() if k in moved}
        schema = {
            **outer,
            "type": "object",
            "properties": {ANSWER_KEY: inner},
            "required": [ANSWER_KEY],
        }
    return {
        "name": ANSWER_TOOL,
        "description": "Give your final answer to the user: call this once you are done, "
        "with the answer as the input.",
        "input_schema": dict(schema),
    }


def _image(media: Mapping[str, Any]) -> dict[str, Any]:
    """Return an image block: an http(s) URL as a URL source, base64 (or a data: URL) inline."""
    mime = str(media.get("type", "")).lower()
    if mime == "image/jpg":
        mime = "image/jpeg"
    data = str(media.get("data", "")).strip()
    if mime not in IMAGE_TYPES:
        raise ProviderError(f"This model accepts images only, not {mime or 'untyped'} media.")
    if data.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": data}}
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ProviderError(f"An {mime} data: URL is not base64.")
    compact = "".join(data.split())
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ProviderError(f"An {mime} attachment is neither a URL nor base64 data.") from None
    return {"type": "image", "source": {"type": "base64", "media_type": mime, "data": compact}}


def _tool_input(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as the object the API carries (text that is not one becomes {})."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            return {}
    return arguments if isinstance(arguments, dict) else {}


def _blocks(message: Mapping[str, Any], *, thinking: bool) -> tuple[str, list[dict[str, Any]]]:
    """Translate one neutral message (see :mod:`.base`) into a role and content blocks.

    With ``thinking``, a tool-using answer starts with the thinking blocks it came with.
    """
    role = message["role"]
    content = message.get("content") or ""
    if role == "tool":
        result: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": message["tool_call_id"],
            "content": content,
        }
        if content.startswith("Error:"):
            result["is_error"] = True
        return "user", [result]
    # The API refuses empty text blocks.
    blocks = [{"type": "text", "text": content}] if content else []
    if role == "assistant":
        if thinking and message.get("tool_calls"):
            blocks[:0] = _remembered(message) or []
        blocks.extend(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": call["name"],
                "input": _tool_input(call.get("arguments")),
            }
            for call in message.get("tool_calls") or ()
        )
        return "assistant", blocks
    blocks.extend(_image(media) for media in message.get("media") or ())
    return "user", blocks


def _messages(
    neutral: list[dict[str, Any]], *, thinking: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """Return the system prompt and the Messages API messages for a neutral conversation.

    System messages, wherever they are, join the system prompt. Roles must alternate, so
    consecutive messages of one role (tool results above all) merge into one message, tool
    results first as the API requires.
    """
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in neutral:
        if message["role"] == "system":
            if message.get("content"):
                system.append(message["content"])
            continue
        role, blocks = _blocks(message, thinking=thinking)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    for message in messages:
        if message["role"] == "user":
            message["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n\n".join(system), messages


def _remembered(message: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Return the thinking blocks of the answer that made these tool calls, if remembered."""
    for call in message.get("tool_calls") or ():
        blocks = _thinking.get(call.get("id") or "")
        if blocks is not None:
            return blocks
    return None


def _thinking_known(neutral: list[dict[str, Any]]) -> bool:
    """Whether the tool-using answers since the user last spoke all have their thinking.

    A turn thinks throughout or not at all: a call in the middle of one whose blocks are lost
    is made without thinking rather than be refused.
    """
    known = True
    for message in neutral:
        if message["role"] == "user":
            known = True
        elif message["role"] == "assistant" and message.get("tool_calls"):
            known = known and _remembered(message) is not None
    return known


def _remember_thinking(tool_ids: list[str], blocks: list[dict[str, Any]]) -> None:
    for tool_id in tool_ids:
        _thinking[tool_id] = blocks
        _thinking.move_to_end(tool_id)
    while len(_thinking) > THINKING_MEMORY:
        _thinking.popitem(last=False)


# Responses ---------------------------------------------------------------------------------


def _read_stream(events: Any, wrapped: bool | None = None) -> Iterator[Delta]:
    """Turn a stream of Messages API events into deltas; usage and finish come last.

    ``wrapped`` is None without structured output; else whether the answer tool's input
    wraps the answer (see :func:`_answer_tool`), whose input is then the answer's text.
    """
    structured = wrapped is not None
    # Structured output: the answer tool's input, and the text beside it, both in pieces.
    answer: dict[int, list[str]] = {}
    said: list[str] = []
    input_tokens = output_tokens = 0
    stop_reason: str | None = None
    # content block index -> position among this answer's tool calls
    tool_index: dict[int, int] = {}
    tool_ids: list[str] = []
    # content block index -> a thinking block being received, to be sent back with tool results
    thinking: dict[int, dict[str, Any]] = {}
    for event in events:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            usage = getattr(getattr(event, "message", None), "usage", None)
            input_tokens = _input_tokens(usage) or input_tokens
            output_tokens = getattr(usage, "output_tokens", None) or output_tokens
        elif kind == "content_block_start":
            index, block = event.index, event.content_block
            if block.type == "text" and getattr(block, "text", ""):
                if structured:
                    said.append(block.text)
                else:
                    yield ContentDelta(block.text)
            elif structured and block.type == "tool_use" and block.name == ANSWER_TOOL:
                answer[index] = []
            elif block.type == "thinking":
                signature = getattr(block, "signature", None) or ""
                thinking[index] = {"type": "thinking", "thinking": "", "signature": signature}
                if getattr(block, "thinking", ""):
                    thinking[index]["thinking"] += block.thinking
                    yield ReasoningDelta(block.thinking)
            elif block.type == "redacted_thinking":
                thinking[index] = {"type": "redacted_thinking", "data": block.data}
            elif block.type == "tool_use":
                tool_index[index] = len(tool_index)
                tool_ids.append(block.id)
                yield ToolCallDelta(tool_index[index], id=block.id, name=block.name)
        elif kind == "content_block_delta":
            index, delta = event.index, event.delta
            if delta.type == "text_delta" and delta.text:
                if structured:
                    said.append(delta.text)
                else:
                    yield ContentDelta(delta.text)
            elif delta.type == "input_json_delta" and index in answer:
                if wrapped:
                    answer[index].append(delta.partial_json or "")
                elif delta.partial_json:
                    yield ContentDelta(delta.partial_json)
            elif delta.type == "thinking_delta" and delta.thinking:
                if index in thinking:
                    thinking[index]["thinking"] += delta.thinking
                yield ReasoningDelta(delta.thinking)
            elif delta.type == "signature_delta" and index in thinking:
                thinking[index]["signature"] += delta.signature
            elif delta.type == "input_json_delta" and index in tool_index:
                yield ToolCallDelta(tool_index[index], arguments=delta.partial_json or "")
        elif kind == "message_delta":
            stop_reason = getattr(event.delta, "stop_reason", None) or stop_reason
            usage = getattr(event, "usage", None)
            # Counts in message_delta are totals so far, not increments.
            input_tokens = _input_tokens(usage) or input_tokens
            output_tokens = getattr(usage, "output_tokens", None) or output_tokens
    if stop_reason is None:
        raise StreamTruncated("the stream ended before the model finished its answer")
    if structured:
        yield from _structured_text(answer, said, bool(wrapped))
        if answer and not tool_ids:
            stop_reason = "end_turn"
    if tool_ids and thinking:
        _remember_thinking(tool_ids, [thinking[index] for index in sorted(thinking)])
    yield UsageDelta(input_tokens=input_tokens, output_tokens=output_tokens)
    yield FinishDelta(STOP_REASONS.get(stop_reason, stop_reason))


def _structured_text(
    answer: dict[int, list[str]], said: list[str], wrapped: bool
) -> Iterator[Delta]:
    """The text of a structured answer: the answer tool's input, unwrapped; what the model
    wrote beside it is reasoning. Without a call of the tool, the text is the answer."""
    if not answer:
        if said:
            yield ContentDelta("".join(said))
        return
    if said:
        yield ReasoningDelta("".join(said))
    if wrapped:
        for pieces in answer.values():
            text = "".join(pieces)
            try:
                text = json.dumps(json.loads(text)[ANSWER_KEY])
            except (ValueError, TypeError, KeyError):
                pass  # left as it came, for the loop's validation to report
            yield ContentDelta(text)


def _input_tokens(usage: Any) -> int:
    """All the input the model read: fresh, written to the prompt cache, read from it."""
    return sum(
        getattr(usage, name, None) or 0
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
