"""Any OpenAI-compatible chat completions server: OpenAI, vLLM, Ollama, llama.cpp, LM Studio...

The model string is ``openai:<model>`` (or ``ollama:<model>``, the same back end pointed at a
local Ollama). The agent's ``model_options`` configure it:

``base_url``
    The server's API root, e.g. ``http://localhost:8000/v1``. Default: the ``OPENAI_BASE_URL``
    environment variable, else ``https://api.openai.com/v1`` (``ollama``:
    ``http://localhost:11434/v1``).
``api_key`` / ``api_key_env``
    The key, or the name of an environment variable that holds it (keeps keys out of agent
    files). Without either, ``OPENAI_API_KEY`` is used, but only when ``base_url`` is not set
    in the options: a key meant for the default server is never sent to a server an agent file
    names. A server that needs no key gets a placeholder.
``timeout``
    Seconds to wait for the connection and for each piece of the answer (default 300); a
    server silent for longer fails the call.
``max_retries``
    Further attempts after a 408, 429, 5xx or connection error (default 2), waiting
    ``retry_delay`` seconds (default 0.5) doubled each time, or what ``Retry-After`` asks,
    capped at 20 s. Only before the first delta is yielded: a stream cut after output reached
    the run fails with :class:`ProviderError`, since a retry would repeat what was said.
``vision``
    Whether the model accepts images (default true); false makes runs with media a 422.
``extra_body``
    A mapping merged into the request body, for server-specific parameters (``top_k``,
    ``chat_template_kwargs``, ``reasoning_effort``...).

Invalid option values raise ValueError when the provider is made; a missing key fails the
model call with :class:`ProviderError`. There are no ``AGENT_RUNS_OPENAI_*`` variables: the
SDK's own ``OPENAI_*`` ones are what users of these servers already set.

The SDK's own retries are off (the policy above is ours). One client per (base_url, api_key)
is shared by every run of the process, so its TLS context and connection pool are made once.
The SDK's synchronous stream closes its connection at ``data: [DONE]`` without reading the
body's last bytes (openai-python #3440), so each call opens a new one. Reading them, to keep
the connection, cost more CPU than the handshakes it saved (``bench/run.py --model openai``,
also over TLS): before every request the pool probes each idle connection through gevent's
cooperative ``poll``.

Reasoning comes from the non-standard ``reasoning_content`` or ``reasoning`` field of a delta
(DeepSeek, vLLM, Ollama, OpenRouter) and from ``<think>...</think>`` inside the content.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Mapping
from typing import Any

import openai

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

OPENAI_BASE_URL = "https://api.openai.com/v1"
OLLAMA_BASE_URL = "http://localhost:11434/v1"
# Sent as the key to servers that need none: the SDK insists on having one.
NO_KEY = "no-key"

DEFAULT_TIMEOUT = 300.0
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"})


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible server."""

    def __init__(
        self,
        model: str,
        options: Mapping[str, Any] | None = None,
        *,
        default_base_url: str | None = None,
        default_api_key: str | None = None,
        network_backend: Any = None,
    ) -> None:
        options = options or {}
        # The guarded backend, for an organisation's agent's own base_url (resolve_model).
        self.network_backend = network_backend
        if not model:
            raise UnknownModel("name the model after the provider, e.g. 'openai:gpt-4o-mini'")
        self.model = model
        self.base_url, self.api_key, self.missing_key = endpoint(
            options,
            default_base_url=default_base_url or OPENAI_BASE_URL,
            base_url_variable=None if default_base_url else "OPENAI_BASE_URL",
            key_variable="OPENAI_API_KEY",
            default_api_key=default_api_key,
        )
        self.timeout = option_number(options, "timeout", DEFAULT_TIMEOUT)
        self.max_retries = option_number(options, "max_retries", DEFAULT_MAX_RETRIES, int)
        self.retry_delay = option_number(options, "retry_delay", DEFAULT_RETRY_DELAY)
        extra_body = options.get("extra_body") or {}
        if not isinstance(extra_body, Mapping):
            raise ValueError("model_options.extra_body must be a mapping")
        self.extra_body = dict(extra_body)
        # Whether the model takes image parts; model_options vision: false marks a text-only
        # model, so a run with media is refused up front rather than failed by the server.
        self.accepts_images = bool(options.get("vision", True))

    def __repr__(self) -> str:
        return f"OpenAIProvider({self.model!r}, base_url={display_url(self.base_url)!r})"

    def stream(self, request: ModelRequest) -> Iterator[Delta]:
        """Call the model and yield its deltas, retrying failures that happen before output."""
        if self.missing_key:
            raise ProviderError(self.missing_key)
        client = shared_client(
            openai.OpenAI,
            self.base_url,
            self.api_key or NO_KEY,
            self.network_backend,
            openai.DefaultHttpxClient,
        )
        body = self._body(request)
        yield from stream_with_retries(
            # The SDK's own request path (auth, headers, errors, SSE decoding), with the chunks
            # left as the JSON objects they arrive as: building the SDK's typed chunk for each
            # token cost more CPU than the rest of the server (bench/run.py --model openai).
            lambda: client.post(
                "/chat/completions",
                cast_to=object,
                body=body,
                # As create() sends it: the API key as a bearer token, and no other credential.
                options={"timeout": self.timeout, "security": {"bearer_auth": True}},
                stream=True,
                stream_cls=openai.Stream[object],
            ),
            _read_stream,
            retry_on=(openai.APIError, StreamTruncated),
            # ValueError: a chunk that is not JSON, i.e. not an OpenAI-compatible server.
            fail_on=(openai.OpenAIError, ValueError),
            retryable=_retryable,
            backoff=self._backoff,
            describe=self._describe,
            max_retries=self.max_retries,
        )

    def _body(self, request: ModelRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [_message(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [_tool(spec) for spec in request.tools]
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.response_schema is not None:
            # Structured outputs; servers that constrain decoding (OpenAI, vLLM, llama.cpp,
            # Ollama) make the answer fit. Not "strict": OpenAI's strict mode takes only a
            # subset of JSON Schema, and the loop validates the answer anyway.
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.response_schema},
            }
        # Merged over the rest, as the SDK merges its extra_body.
        body.update(self.extra_body)
        return body

    def _backoff(self, attempt: int, error: Exception) -> float:
        """Seconds to wait before the next attempt (see sdk.backoff)."""
        headers = error.response.headers if isinstance(error, openai.APIStatusError) else None
        return backoff(self.retry_delay, attempt, headers)

    def _describe(self, error: Exception, *, after_output: bool) -> str:
        """Say what went wrong, without the API key."""
        if isinstance(error, openai.APIStatusError):
            detail = f"HTTP {error.status_code}: {_error_message(error)}"
        elif isinstance(error, openai.APITimeoutError):
            detail = f"no answer within {self.timeout:g} seconds"
        elif isinstance(error, openai.APIConnectionError):
            cause = error.__cause__
            detail = f"connection failed ({cause or error})"
        else:
            detail = str(error) or type(error).__name__
        return failure_message(
            self.model, self.base_url, self.api_key, detail, after_output=after_output
        )


def ollama(
    model: str, options: Mapping[str, Any] | None = None, network_backend: Any = None
) -> OpenAIProvider:
    """Return the OpenAI-compatible provider pointed at a local Ollama (no key needed)."""
    return OpenAIProvider(
        model,
        options,
        default_base_url=OLLAMA_BASE_URL,
        default_api_key=NO_KEY,
        network_backend=network_backend,
    )


def _retryable(error: Exception) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRY_STATUSES or error.status_code >= 500
    return isinstance(error, (openai.APIConnectionError, StreamTruncated))


def _error_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, Mapping):
        # The SDK hands over the "error" object of {"error": {...}} bodies, or the whole body.
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, Mapping) else inner
        if message:
            return str(message)[:500]
    if isinstance(body, str) and body:
        return body[:500]
    return error.response.reason_phrase or "error"


# Requests ----------------------------------------------------------------------------------


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": spec.parameters,
        },
    }


def _image_url(media: Mapping[str, Any]) -> str:
    """Return the URL an image part points at: an http(s) URL as is, base64 as a data: URL."""
    mime = str(media.get("type", "")).lower()
    data = str(media.get("data", "")).strip()
    if mime not in IMAGE_TYPES:
        raise ProviderError(f"This model accepts images only, not {mime or 'untyped'} media.")
    if data.startswith(("http://", "https://", "data:")):
        return data
    compact = "".join(data.split())
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ProviderError(f"An {mime} attachment is neither a URL nor base64 data.") from None
    return f"data:{mime};base64,{compact}"


def _arguments(arguments: Any) -> str:
    """Tool-call arguments as the JSON text the API carries."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Translate one neutral message (see :mod:`.base`) into a chat completions message."""
    role = message["role"]
    content = message.get("content") or ""
    if role == "tool":
        return {"role": "tool", "tool_call_id": message["tool_call_id"], "content": content}
    if role == "assistant":
        translated: dict[str, Any] = {"role": "assistant", "content": content}
        if message.get("tool_calls"):
            translated["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": _arguments(call["arguments"])},
                }
                for call in message["tool_calls"]
            ]
        return translated
    if role == "user" and message.get("media"):
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        parts.extend(
            {"type": "image_url", "image_url": {"url": _image_url(media)}}
            for media in message["media"]
        )
        return {"role": "user", "content": parts}
    return {"role": role, "content": content}


# Responses ---------------------------------------------------------------------------------


def _read_stream(chunks: Any) -> Iterator[Delta]:
    """Turn a stream of chat completion chunks into deltas; usage and finish come last.

    The chunks are the JSON objects the server sent, read leniently: servers that call
    themselves OpenAI-compatible differ in what they leave out, and a field of an unexpected
    type is skipped rather than trusted.
    """
    think = _ThinkSplitter()
    usage: Any = None
    finish: str | None = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise ValueError(f"a chunk that is not a JSON object: {str(chunk)[:100]}")
        if isinstance(chunk.get("usage"), dict):
            # Some servers repeat a running total on every chunk: the last one counts.
            usage = chunk["usage"]
        for choice in _objects(chunk.get("choices")):
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                yield from _deltas(delta, think)
            if isinstance(reason := choice.get("finish_reason"), str) and reason:
                finish = reason
    yield from think.flush()
    if finish is None:
        raise StreamTruncated("the stream ended before the model finished its answer")
    if isinstance(usage, dict):
        details = usage.get("completion_tokens_details")
        yield UsageDelta(
            input_tokens=_count(usage.get("prompt_tokens")),
            output_tokens=_count(usage.get("completion_tokens")),
            reasoning_tokens=_count(details.get("reasoning_tokens"))
            if isinstance(details, dict)
            else 0,
        )
    yield FinishDelta(finish)


def _deltas(delta: dict[str, Any], think: _ThinkSplitter) -> Iterator[Delta]:
    """The deltas of one chunk's ``delta`` object."""
    # Reasoning in a non-standard field: reasoning_content (DeepSeek, vLLM), reasoning
    # (Ollama, OpenRouter).
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        yield ReasoningDelta(reasoning)
    if isinstance(content := delta.get("content"), str) and content:
        yield from think.feed(content)
    if isinstance(refusal := delta.get("refusal"), str) and refusal:
        yield ContentDelta(refusal)
    for position, call in enumerate(_objects(delta.get("tool_calls"))):
        index = call.get("index")
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        name = function.get("name")
        arguments = function.get("arguments")
        yield ToolCallDelta(
            index=index if isinstance(index, int) else position,
            id=call["id"] if isinstance(call.get("id"), str) and call["id"] else None,
            name=name if isinstance(name, str) and name else None,
            # Some servers send the arguments as an object rather than its JSON text.
            arguments=_arguments(arguments or ""),
        )


def _objects(value: Any) -> list[dict[str, Any]]:
    """The JSON objects of a list field; anything else counts as none."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _count(value: Any) -> int:
    """A token count: a positive integer, else 0."""
    return value if type(value) is int and value > 0 else 0


class _ThinkSplitter:
    """Split content into reasoning (inside ``<think>...</think>``) and answer text.

    A tag may arrive cut across chunks, so text that could be the start of a tag is held back
    until the next chunk tells.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self.thinking = False
        self.pending = ""
        # After </think> models put blank lines before the answer; they are not the answer.
        self.strip_next = False

    def feed(self, text: str) -> Iterator[Delta]:
        self.pending += text
        while self.pending:
            tag = self.CLOSE if self.thinking else self.OPEN
            found = self.pending.find(tag)
            if found >= 0:
                yield from self._emit(self.pending[:found])
                self.pending = self.pending[found + len(tag) :]
                self.thinking = not self.thinking
                self.strip_next = not self.thinking
                continue
            keep = _partial_suffix(self.pending, tag)
            yield from self._emit(self.pending[: len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep :]
            break

    def flush(self) -> Iterator[Delta]:
        text, self.pending = self.pending, ""
        yield from self._emit(text)

    def _emit(self, text: str) -> Iterator[Delta]:
        if self.thinking:
            if text:
                yield ReasoningDelta(text)
            return
        if self.strip_next:
            text = text.lstrip()
            if not text:
                return
            self.strip_next = False
        if text:
            yield ContentDelta(text)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the beginning of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
