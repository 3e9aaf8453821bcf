"""The interface every model back end implements: a request in, a stream of deltas out.

A provider turns one model call into an iterator of small typed deltas: reasoning text, answer
text, fragments of tool calls, token usage, and how the call finished. The agent loop turns
them into run events; it never sees a back end's own wire format.

Messages are plain dictionaries in one neutral form, whatever the back end:

- ``{"role": "system" | "user", "content": str}``; a user message may carry
  ``"media": [{"type": mime, "data": base64-or-url}]``
- ``{"role": "assistant", "content": str, "tool_calls": [{"id", "name", "arguments": dict}]}``
- ``{"role": "tool", "tool_call_id": str, "name": str, "content": str}``
"""

from __future__ import annotations

import importlib
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call. Fragments with the same ``index`` make one call."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class UsageDelta:
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FinishDelta:
    reason: str


Delta = ReasoningDelta | ContentDelta | ToolCallDelta | UsageDelta | FinishDelta


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model is told about it."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass
class ModelRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[ToolSpec] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    # "answer" for the agent's turns, "followups" for the call that suggests next questions.
    purpose: str = "answer"
    # A JSON Schema the final answer must be an instance of (the run's structured output),
    # or None for free text. A back end that can constrain its output to it should: a
    # grammar, a forced tool, the server's own ``response_format``. The loop validates the
    # answer whatever the back end did.
    response_schema: dict[str, Any] | None = None


class ProviderError(Exception):
    """A model call that failed; the run ends FAILED with this message."""

    # The run's errorType.
    error_type = "model_error"


class ModelCrashed(ProviderError):
    """The process running the model died during the call."""

    error_type = "model_crashed"


class UnknownModel(ValueError):
    """A model string that names no back end this server has."""


class Provider(Protocol):
    def stream(self, request: ModelRequest) -> Generator[Delta, None, None]:
        """Call the model and yield its deltas as they arrive.

        A generator, so that closing it (a cancelled run does) ends the model call at once.
        """
        ...


# provider name -> "module:factory"; the factory takes (model name, options) and returns a
# Provider. Imported on first use, so an extra's SDK is needed only when it is used.
PROVIDERS: dict[str, str] = {
    "scripted": "agent_runs.providers.scripted:ScriptedProvider",
    "local": "agent_runs.providers.local:LocalProvider",
    "openai": "agent_runs.providers.openai:OpenAIProvider",
    "anthropic": "agent_runs.providers.anthropic:AnthropicProvider",
    # An OpenAI-compatible server on localhost:11434 that needs no key.
    "ollama": "agent_runs.providers.openai:ollama",
}
# The back ends that connect to a server their options may name (``base_url``); their
# factories take a ``network_backend`` (httpcore2's) for those connections.
REMOTE_PROVIDERS = frozenset({"openai", "anthropic", "ollama"})


def resolve_model(
    model: str, options: Mapping[str, Any] | None = None, network_backend: Any = None
) -> tuple[Provider, str]:
    """Return the provider for a ``provider:model`` string and the model name it is given.

    ``network_backend`` makes the connections to a server the options name (an
    organisation's agent's ``base_url``: only where the address policy allows).
    """
    provider_name, _, model_name = model.partition(":")
    try:
        module_name, _, factory_name = PROVIDERS[provider_name].partition(":")
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise UnknownModel(
            f"unknown model provider {provider_name!r} in {model!r} (known: {known})"
        ) from None
    factory = getattr(importlib.import_module(module_name), factory_name)
    extra = {}
    # Only for a server the options name: the operator's own (OPENAI_BASE_URL, Ollama on
    # localhost, the SDKs' defaults) are reached as they are.
    if (
        network_backend is not None
        and provider_name in REMOTE_PROVIDERS
        and (options or {}).get("base_url")
    ):
        extra["network_backend"] = network_backend
    return factory(model_name, dict(options or {}), **extra), model_name or provider_name
