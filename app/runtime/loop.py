"""The agent loop: call the model, stream what it says, call the tools it asks for, repeat.

One :class:`AgentLoop` drives one run. It turns the provider's deltas into run events through
the ``emit`` callback, executes tool calls between model calls, and keeps everything the run
produced so far on itself, so a run that is cancelled or fails still has its partial answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import gevent
import jsonschema

from ..providers.base import (
    ContentDelta,
    FinishDelta,
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    ToolCallDelta,
    ToolSpec,
    UsageDelta,
)
from .agents import Agent, Tool
from .events import EventType, json_data
from .mcp import McpTool, McpToolbox
from .observe import NO_CALL, NO_RUN, RunWatch

logger = logging.getLogger(__name__)

THOUGHT = "thought"
THOUGHT_DESCRIPTION = "One sentence: why you are calling this tool now."

FOLLOWUPS_INSTRUCTIONS = (
    "Suggest exactly three short follow-up questions the user might ask next about this "
    "conversation. Write one question per line and nothing else."
)

Emit = Callable[[str, str], None]


class RunCancelled(BaseException):
    """Raised inside the loop when the run was asked to stop.

    A BaseException, like gevent's Timeout and GreenletExit: the executor may raise it at any
    point where the run waits (a model's socket, a tool's sleep), and a tool's or a back end's
    ``except Exception`` must not swallow it.
    """


class RunPaused(Exception):
    """Raised when the next tool call needs a human's approval; ``calls`` are still to run."""

    def __init__(self, calls: list[dict[str, Any]]) -> None:
        super().__init__(calls[0]["name"])
        self.calls = calls

    @property
    def required_action(self) -> dict[str, Any]:
        call = self.calls[0]
        return {
            "type": "TOOL_APPROVAL",
            "toolCallId": call["id"],
            "tool": call["name"],
            "arguments": call["arguments"],
        }


class InvalidOutput(Exception):
    """The model's answer did not fit the run's response schema, even when asked again."""


APPROVE, REJECT = "APPROVE", "REJECT"
REJECTED_RESULT = "A human reviewer rejected this tool call; it was not run."
# Said to a model whose answer did not fit the response schema, before its one more try.
RETRY_INSTRUCTIONS = (
    "Your answer is not valid: {problem} Answer again with only a JSON document that is "
    "valid against the JSON Schema you were given, and nothing else."
)


def answer_problem(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """Parse an answer and validate it against a response schema: (value, None) if it fits,
    else (None, what is wrong, with where)."""
    try:
        value = json.loads(text)
    except ValueError as error:
        return None, f"it is not JSON ({error})."
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    worst = jsonschema.exceptions.best_match(validator_class(schema).iter_errors(value))
    if worst is None:
        return value, None
    return None, f"at {worst.json_path}: {worst.message}"


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    model_calls: int = 0

    def add(self, delta: UsageDelta) -> None:
        self.input_tokens += delta.input_tokens
        self.output_tokens += delta.output_tokens
        self.reasoning_tokens += delta.reasoning_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "model_calls": self.model_calls,
        }


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class AgentLoop:
    """Runs one agent over a conversation; read its fields for what the run produced."""

    agent: Agent
    provider: Provider
    model: str
    emit: Emit
    is_cancelled: Callable[[], bool] = lambda: False
    # Called before each delta of the model is handled; the executor lets the event loop serve
    # waiting requests there (see turns.step_aside).
    step_aside: Callable[[], None] = lambda: None
    temperature: float | None = None
    max_tokens: int | None = None
    tool_timeout: float = 30.0
    generate_followups: bool = False
    # The run's MCP tools, when its agent lists MCP servers.
    mcp: McpToolbox | None = None
    # A tool result longer than this (as the model reads it) is cut, with a note saying so.
    max_result_chars: int = 100_000
    # A JSON Schema the final answer must be valid against (structured output), or None.
    response_schema: dict[str, Any] | None = None
    # Told of each model call and tool call (see observe).
    watch: RunWatch = NO_RUN

    content: list[str] = field(default_factory=list)
    reasoning_steps: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    followups: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    # What this run adds to the conversation, in order: assistant turns and tool results.
    new_messages: list[dict[str, Any]] = field(default_factory=list)
    # The final answer parsed, with a response schema.
    output: Any = None
    # With a response schema, the model's text is held here until it proves to be a valid
    # answer: a stream never carries an answer that fails validation, or a retry's repeat.
    _held: list[str] | None = None
    # Why the model call in progress finished, as its back end said.
    finish_reason: str | None = None

    @property
    def answer(self) -> str:
        return "".join(self.content)

    def run(
        self,
        history: list[dict[str, Any]],
        pending_calls: list[dict[str, Any]] | None = None,
        decision: str | None = None,
    ) -> None:
        """Run the agent on a conversation ending with the user's message.

        A run resumed after a pause passes the tool calls still to run, the first of them
        approved or rejected by ``decision``.
        """
        system = [{"role": "system", "content": self.agent.instructions}]
        conversation = fit_to_context(
            (system if self.agent.instructions else []) + history, self.agent.context_tokens
        )
        tools = [self._spec(t) for t in self.agent.tools]
        if self.mcp is not None:
            taken = {t.name for t in self.agent.tools}
            tools += [self._spec(t) for t in self.mcp.list(taken)]
        if pending_calls:
            self._call_tools(pending_calls, decision)
        for step in range(self.agent.max_steps):
            # On the last step the model gets no tools, so it has to answer.
            last_step = step == self.agent.max_steps - 1
            request = ModelRequest(
                model=self.model,
                messages=conversation + self.new_messages,
                tools=[] if last_step else tools,
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                response_schema=self.response_schema,
            )
            text, calls = self._call_model(request)
            if not calls:
                if self.response_schema is not None:
                    text = self._structured_answer(request, text)
                self.new_messages.append({"role": "assistant", "content": text})
                break
            for call in calls:
                call["arguments"] = _parse_arguments(call["arguments"])
                self._explain(call)
            self.new_messages.append({"role": "assistant", "content": text, "tool_calls": calls})
            self._call_tools(calls)
        if self.generate_followups:
            self._suggest_followups(conversation)

    def _tool(self, name: str) -> Tool | McpTool | None:
        tool = self.agent.tool(name)
        if tool is None and self.mcp is not None:
            return self.mcp.tools.get(name)
        return tool

    def _spec(self, tool: Tool | McpTool) -> ToolSpec:
        """Describe a tool to the model, with the optional "thought" argument if asked for."""
        spec = tool.spec
        if not self.agent.explain_tool_calls:
            return spec
        parameters = dict(spec.parameters)
        parameters["properties"] = {
            **parameters.get("properties", {}),
            THOUGHT: {"type": "string", "description": THOUGHT_DESCRIPTION},
        }
        return ToolSpec(spec.name, spec.description, parameters)

    def _explain(self, call: dict[str, Any]) -> None:
        """Stream a call's "thought" argument as reasoning, and take it out of the call."""
        arguments = call["arguments"]
        if not (self.agent.explain_tool_calls and isinstance(arguments, dict)):
            return
        thought = arguments.pop(THOUGHT, None)
        if isinstance(thought, str) and thought.strip():
            self.reasoning_steps.append(thought)
            self.emit(EventType.REASONING_DELTA, thought)

    def _check_cancelled(self) -> None:
        if self.is_cancelled():
            raise RunCancelled()

    def _call_tools(self, calls: list[dict[str, Any]], decision: str | None = None) -> None:
        """Run the calls of one model step in order; pause before one that needs approval.

        ``decision`` is a human's answer about the first call, given when a paused run resumes.
        """
        for index, call in enumerate(calls):
            self._check_cancelled()
            tool = self._tool(call["name"])
            decided = index == 0 and decision is not None
            if tool is not None and tool.requires_approval and not decided:
                raise RunPaused(calls[index:])
            self._call_tool(call, rejected=decided and decision == REJECT)

    def _structured_answer(self, request: ModelRequest, text: str) -> str:
        """Check a final answer against the response schema, asking once more if it fails.

        Streams the answer that fits as CONTENT_DELTA text, in the pieces the model sent it;
        raises InvalidOutput if the second answer does not fit either.
        """
        assert self.response_schema is not None
        value, problem = answer_problem(text, self.response_schema)
        if problem is not None:
            retry = ModelRequest(
                model=self.model,
                messages=[
                    *request.messages,
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": RETRY_INSTRUCTIONS.format(problem=problem)},
                ],
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                response_schema=self.response_schema,
            )
            text, calls = self._call_model(retry)
            value, problem = answer_problem(text, self.response_schema)
            if calls:
                problem = "it called a tool instead of answering."
            if problem is not None:
                raise InvalidOutput(
                    f"The model's answer does not fit the response schema, asked twice: {problem}"
                )
        for piece in self._held or ():
            self.content.append(piece)
            self.emit(EventType.CONTENT_DELTA, piece)
        self._held = None
        self.output = value
        return text

    def _call_model(self, request: ModelRequest) -> tuple[str, list[dict[str, Any]]]:
        """Stream one model call into events; return its text and the tool calls it made."""
        self.usage.model_calls += 1
        text: list[str] = []
        reasoning: list[str] = []
        pending: dict[int, _PendingCall] = {}
        if self.response_schema is not None:
            self._held = []
        with self._watching_model(request):
            # closing(): a cancelled run closes the back end's stream (and its HTTP
            # response) now.
            with closing(self.provider.stream(request)) as deltas:
                for delta in deltas:
                    self._consume(delta, text, reasoning, pending)
        if pending and self._held:
            # Text next to tool calls is the model thinking aloud, not the answer the schema
            # is for: it goes out as reasoning.
            said = "".join(self._held)
            reasoning.append(said)
            self.emit(EventType.REASONING_DELTA, said)
            self._held = None
        if reasoning:
            self.reasoning_steps.append("".join(reasoning))
        calls = [
            {
                "id": call.id or f"call_{self.usage.model_calls}_{index}",
                "name": call.name,
                "arguments": call.arguments,
            }
            for index, call in sorted(pending.items())
        ]
        return "".join(text), calls

    def _consume(
        self,
        delta: Any,
        text: list[str],
        reasoning: list[str],
        pending: dict[int, _PendingCall],
    ) -> None:
        """Turn one delta into events and into the step's text, reasoning and tool calls."""
        self.step_aside()
        self._check_cancelled()
        if isinstance(delta, ContentDelta):
            if delta.text:
                text.append(delta.text)
                if self._held is not None:
                    self._held.append(delta.text)
                else:
                    self.content.append(delta.text)
                    self.emit(EventType.CONTENT_DELTA, delta.text)
        elif isinstance(delta, ReasoningDelta):
            if delta.text:
                reasoning.append(delta.text)
                self.emit(EventType.REASONING_DELTA, delta.text)
        elif isinstance(delta, ToolCallDelta):
            call = pending.setdefault(delta.index, _PendingCall())
            call.id = delta.id or call.id
            call.name = delta.name or call.name
            call.arguments += delta.arguments
        elif isinstance(delta, UsageDelta):
            self.usage.add(delta)
        elif isinstance(delta, FinishDelta):
            self.finish_reason = delta.reason

    @contextlib.contextmanager
    def _watching_model(self, request: ModelRequest) -> Iterator[None]:
        """Tell the watch of a model call: its start, and its end with the tokens it used."""
        call = self.watch.model_call(request.purpose, request.temperature, request.max_tokens)
        if call is NO_CALL:
            yield
            return
        input_before, output_before = self.usage.input_tokens, self.usage.output_tokens
        self.finish_reason = None
        outcome, error = "ok", None
        try:
            yield
        except RunCancelled:
            outcome = "cancelled"
            raise
        except BaseException as exc:
            outcome = "error"
            error = str(exc) if isinstance(exc, ProviderError) else type(exc).__name__
            raise
        finally:
            call.ended(
                outcome=outcome,
                error=error,
                input_tokens=self.usage.input_tokens - input_before,
                output_tokens=self.usage.output_tokens - output_before,
                finish_reason=self.finish_reason,
            )

    def _call_tool(self, call: dict[str, Any], *, rejected: bool = False) -> None:
        """Run one tool call between TOOL_START and TOOL_END; a failure becomes its result."""
        name = call["name"]
        arguments = call["arguments"]
        self.emit(
            EventType.TOOL_START,
            json_data({"id": call["id"], "name": name, "arguments": call["arguments"]}),
        )
        started = time.monotonic()
        result: Any = None
        error: str | None = None
        tool = self._tool(name)
        watch = self.watch.tool_call(call["id"], name, tool is not None)
        outcome = "error"
        if rejected:
            error, outcome = REJECTED_RESULT, "rejected"
        elif tool is None:
            error = (self.mcp and self.mcp.unavailable_reason(name)) or f"Unknown tool {name!r}."
        elif not isinstance(arguments, dict):
            error = f"The arguments are not a JSON object: {str(arguments)[:200]}"
        else:
            timeout = tool.timeout or self.tool_timeout
            try:
                with gevent.Timeout(timeout):
                    if isinstance(tool, McpTool):
                        assert self.mcp is not None
                        result, error = self.mcp.call(tool, arguments, timeout)
                    else:
                        result = tool.function(**arguments)
                outcome = "ok" if error is None else "error"
            except gevent.Timeout:
                error, outcome = f"The tool did not finish within {timeout:g} seconds.", "timeout"
            except Exception as exc:  # a tool's failure is a result the model can react to
                error = f"{type(exc).__name__}: {exc}"
            except BaseException:
                watch.ended(outcome="cancelled")
                raise
        watch.ended(outcome=outcome, error=error)
        duration_ms = int((time.monotonic() - started) * 1000)
        if result is not None and not isinstance(result, (str, int, float, bool, list, dict)):
            result = str(result)
        result = cut(result, self.max_result_chars)
        if error is not None:
            error = cut(error, self.max_result_chars)
        end: dict[str, Any] = {"id": call["id"], "name": name, "result": result}
        if error is not None:
            end["error"] = error
        self.emit(EventType.TOOL_END, json_data(end))
        self.tool_calls.append(
            {
                "name": name,
                "arguments": call["arguments"],
                "result": error if error is not None else result,
                "duration_ms": duration_ms,
                "is_error": error is not None,
            }
        )
        content = result if isinstance(result, str) else json_data(result)
        self.new_messages.append(
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "name": name,
                "content": f"Error: {error}" if error is not None else content,
            }
        )

    def _suggest_followups(self, conversation: list[dict[str, Any]]) -> None:
        """Ask the model for three next questions; a failure here costs only the followups."""
        request = ModelRequest(
            model=self.model,
            messages=[
                {"role": "system", "content": FOLLOWUPS_INSTRUCTIONS},
                *conversation[1 if self.agent.instructions else 0 :],
                {"role": "assistant", "content": self.answer},
                {"role": "user", "content": FOLLOWUPS_INSTRUCTIONS},
            ],
            temperature=self.temperature,
            max_tokens=200,
            purpose="followups",
        )
        self.usage.model_calls += 1
        text = []
        try:
            with self._watching_model(request):
                for delta in self.provider.stream(request):
                    self._check_cancelled()
                    if isinstance(delta, ContentDelta):
                        text.append(delta.text)
                    elif isinstance(delta, UsageDelta):
                        self.usage.add(delta)
                    elif isinstance(delta, FinishDelta):
                        self.finish_reason = delta.reason
        except Exception:
            logger.exception("suggesting followups failed")
            return
        lines = (
            re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip()
            for line in "".join(text).splitlines()
        )
        self.followups = [line for line in lines if line][:3]


def cut(result: Any, limit: int) -> Any:
    """Cut a tool result the model would read as more than ``limit`` characters, saying so.

    A JSON value that long becomes the start of its text.
    """
    if isinstance(result, str):
        text = result
    elif isinstance(result, (list, dict)):
        text = json_data(result)
    else:
        return result
    if len(text) <= limit:
        return result
    return (
        f"{text[:limit]}\n[The result was cut: it had {len(text)} characters, of which only "
        f"the first {limit} are shown.]"
    )


def _parse_arguments(raw: str) -> Any:
    """Return a tool call's arguments as a dict, or the raw text if they are not a JSON object."""
    try:
        arguments = json.loads(raw or "{}")
    except ValueError:
        return raw
    return arguments if isinstance(arguments, dict) else raw


def estimate_tokens(message: dict[str, Any]) -> int:
    """Estimate a message's size in tokens: about four characters each, plus some framing."""
    size = len(message.get("content") or "")
    for call in message.get("tool_calls") or ():
        size += len(call.get("name", "")) + len(json.dumps(call.get("arguments"), default=str))
    return size // 4 + 4


def fit_to_context(messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Drop the oldest turns until the conversation fits the budget.

    A turn is a user message and what followed it (assistant messages, tool calls and their
    results), so a tool call is never separated from its result. System messages and the
    current turn are always kept.
    """
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    starts = [0] + [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
    turns = [rest[a:b] for a, b in zip(starts, starts[1:] + [len(rest)], strict=True)]
    used = sum(estimate_tokens(m) for m in system)
    kept: list[list[dict[str, Any]]] = []
    for turn in reversed(turns):
        size = sum(estimate_tokens(m) for m in turn)
        if kept and used + size > budget:
            break
        kept.append(turn)
        used += size
    return system + [m for turn in reversed(kept) for m in turn]
