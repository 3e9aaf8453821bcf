"""The embedded model's own process: llama-cpp-python behind a Unix socket.

Native code in a model can crash (a segfault in ggml, an abort, the kernel's OOM killer). In
this process it takes down only this process: the server's workers, and the hundreds of runs
of other models they stream, stay up, and a run that was using the model ends FAILED with
``model_crashed``. One such process serves every worker of a server (and every server started
from the same installation), so the weights are loaded once, not once per worker.

:class:`agent_runs.providers.local.ModelHost` starts it (detached, so it outlives the worker
that happened to start it), holds a lease on it from every worker, and starts it again if it
dies. It exits by itself once no worker has held a lease for ``--grace`` seconds.

The protocol is one JSON object per line, each way, one request per connection:

- ``{"op": "hello"}`` -> ``{"pid", "system", "models": {key: {"status", ...}}}``
- ``{"op": "load", "spec": {...}}`` -> ``{"ok": true, "info": {...}}`` once the model is loaded
- ``{"op": "tokenize", "spec", "text"}`` -> ``{"ok": true, "count": N}``
- ``{"op": "chat", "spec", "args"}`` -> ``{"t": text, "f": finish}`` per chunk, then
  ``{"done": true}``; a client that closes the connection stops the generation
- ``{"op": "lease"}`` -> ``{"ok": true}``, then nothing until either side closes

An error answers ``{"error": message}``. This module imports no gevent and nothing of the
server: it runs in plain threads, one per connection, and one generation at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger("agent_runs.model_host")

GGUF_MAGIC = b"GGUF"
# The arguments of create_chat_completion a client may set; everything else is the host's.
# The longest request line the host reads (a conversation of the context's size is far less).
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# How often a chat request waiting for its turn says so.
WAITING_INTERVAL = 5.0
CHAT_ARGUMENTS = frozenset({"messages", "temperature", "max_tokens", "response_format", "seed"})
# How the host's first process exits when it did not start: another host holds the lock, or
# it could not listen. (Not 3 or 4: a gunicorn master that reaps an orphaned host, as PID 1 in
# a container, takes those for a worker or app that failed to boot.)
EXIT_ERROR = 1
EXIT_ALREADY_RUNNING = 2


CPU_AMX_NOTE = (
    "This CPU has AMX, whose llama.cpp kernels crash on every generation (llama.cpp issue "
    "#20824), so the embedded model runs without ggml's extra buffer types. Once your "
    "llama.cpp has the fix, AGENT_RUNS_LOCAL_AMX=true turns them back on."
)


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """Return the CPU feature flags the kernel reports (empty where it reports none)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def amx_repack_is_safe(flags: set[str], opt_in: bool) -> bool:
    """Whether to let ggml repack weights into its extra buffer types (AMX among them).

    On CPUs with AMX, llama.cpp's AMX matrix multiply segfaults on every generation
    (llama.cpp issue #20824): such CPUs load without the extra buffer types unless the
    operator opts back in (AGENT_RUNS_LOCAL_AMX=true) with a llama.cpp that has the fix.
    """
    return opt_in or "amx_tile" not in flags


@contextlib.contextmanager
def extra_buffer_types(enabled: bool) -> Iterator[None]:
    """Load llama-cpp-python models, inside the block, with or without the extra buffer types.

    Llama() takes no argument for llama.cpp's ``use_extra_bufts`` (its "no repack" switch) and
    builds its model parameters from ``llama_model_default_params()`` inside its constructor,
    so the defaults it gets here have the switch set. Not thread-safe: loads take turns.
    """
    import llama_cpp.llama_cpp as bindings  # the module Llama() calls it from

    defaults = bindings.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = enabled
        return params

    bindings.llama_model_default_params = model_params
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


def check_gguf(path: str) -> str | None:
    """Return why ``path`` cannot be a GGUF model, or None if it looks like one."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        return f"no model file at {path}"
    except IsADirectoryError:
        return f"{path} is a directory, not a GGUF model file"
    except OSError as error:
        return f"the model file {path} cannot be read: {error.strerror or error}"
    if magic != GGUF_MAGIC:
        return f"{path} is not a GGUF model file (it does not start with 'GGUF')"
    return None


def spec_key(spec: Mapping[str, Any]) -> str:
    """Name a model load (a file and the settings it is loaded with) as one string."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


class LoadLog:
    """Collects what llama.cpp says while it loads a model: its buffer types, its errors.

    llama-cpp-python prints llama.cpp's log to stderr when verbose and drops it otherwise; the
    host keeps the lines that name where the weights went ("CPU_REPACK model buffer size") and
    passes warnings and errors to its own log.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.capturing = False
        # Kept on the instance: llama.cpp holds only the C pointer, the object must stay alive.
        import llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", "replace").rstrip()
            if self.capturing and line:
                self.lines.append(line)
            if level in (3, 4) and line:  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                logger.warning("llama.cpp: %s", line)

        self._callback = callback
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def buffer_types(self) -> list[str]:
        """Return the buffer types the last load put weights in, in the order logged."""
        found: list[str] = []
        for line in self.lines:
            name, marker, _ = line.partition(" model buffer size")
            if marker:
                buffer = name.rsplit(":", 1)[-1].strip()
                if buffer and buffer not in found:
                    found.append(buffer)
        return found


class Models:
    """The models this host has loaded, by spec, and the one lock generations take turns on."""

    def __init__(self, allow_amx: bool) -> None:
        self.allow_amx = allow_amx
        self.flags = cpu_flags()
        self.loaded: dict[str, Any] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.loading = threading.Lock()
        self.generating = threading.Lock()
        self._log: LoadLog | None = None

    def system(self) -> dict[str, Any]:
        """Describe the backend: llama.cpp's build features and the AMX decision."""
        import llama_cpp

        return {
            "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
            "features": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
            "amx_cpu": "amx_tile" in self.flags,
            "extra_buffers": amx_repack_is_safe(self.flags, self.allow_amx),
        }

    def load(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Load the model ``spec`` names (once); return its status, or raise ValueError."""
        key = spec_key(spec)
        with self.loading:
            status = self.status.get(key)
            if status is None or status["status"] != "ready":
                status = self._load(key, spec)
        if status["status"] != "ready":
            raise ValueError(status["error"])
        return status

    def _load(self, key: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        path = str(spec["path"])
        self.status[key] = {"status": "loading", "path": path}
        problem = check_gguf(path)
        if problem:
            self.status[key] = {"status": "failed", "path": path, "error": problem}
            return self.status[key]
        from llama_cpp import Llama

        if self._log is None:
            self._log = LoadLog()
        extra_buffers = amx_repack_is_safe(self.flags, self.allow_amx)
        started = time.monotonic()
        self._log.lines.clear()
        self._log.capturing = True
        try:
            with extra_buffer_types(extra_buffers):
                model = Llama(
                    model_path=path,
                    n_ctx=int(spec.get("n_ctx", 4096)),
                    n_threads=int(spec["n_threads"]) if spec.get("n_threads") else None,
                    verbose=False,
                )
        except Exception as error:
            self.status[key] = {"status": "failed", "path": path, "error": str(error)}
            return self.status[key]
        finally:
            self._log.capturing = False
        self.loaded[key] = model
        self.status[key] = {
            "status": "ready",
            "path": path,
            "buffers": self._log.buffer_types(),
            "extra_buffers": extra_buffers,
            "seconds": round(time.monotonic() - started, 3),
        }
        logger.info(
            "loaded %s in %.2f s: weights in %s buffers%s",
            os.path.basename(path),
            self.status[key]["seconds"],
            ", ".join(self.status[key]["buffers"]) or "unnamed",
            "" if extra_buffers else " (extra buffer types off: this CPU has AMX)",
        )
        return self.status[key]


class Host:
    """Serves the protocol on a Unix socket until no lease has been held for ``grace``."""

    def __init__(self, path: str, models: Models, grace: float) -> None:
        self.path = path
        self.models = models
        self.grace = grace
        self.leases = 0
        self.requests = 0
        self.last_lease = time.monotonic()
        self.lock = threading.Lock()
        self._lock_fd = -1
        self._inode = 0

    def bind(self) -> socket.socket:
        """Take the host lock and listen on the socket; raise OSError if either fails.

        The lock (a file beside the socket, held for the host's whole life) is how a starter
        tells a live host that is slow to answer from a dead one: only a dead host's socket
        may be replaced.
        """
        self._lock_fd = os.open(self.path + ".host", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead host's: the live one would hold the lock
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(128)
        self._inode = os.stat(self.path).st_ino
        return listener

    def serve(self, listener: socket.socket, preload: list[dict[str, Any]]) -> None:
        """Start loading ``preload`` in the background, and answer until idle."""
        for spec in preload:
            threading.Thread(target=self._preload, args=(spec,), daemon=True).start()
        threading.Thread(target=self._exit_when_idle, daemon=True).start()
        system = self.models.system()
        logger.info(
            "model host %d listening on %s; llama-cpp-python %s, llama.cpp CPU backend: %s",
            os.getpid(),
            self.path,
            system["llama_cpp_python"],
            system["features"],
        )
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                break  # closed: idle, or a signal
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _preload(self, spec: dict[str, Any]) -> None:
        try:
            self.models.load(spec)
        except ValueError as error:
            logger.error("the model %s could not be loaded: %s", spec.get("path"), error)

    def _exit_when_idle(self) -> None:
        while True:
            time.sleep(min(1.0, self.grace / 4))
            with self.lock:
                unused = self.leases == 0 and self.requests == 0
                idle = unused and time.monotonic() - self.last_lease > self.grace
            if idle:
                logger.info("model host %d: no server holds it, exiting", os.getpid())
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == self._inode:  # still ours
                        os.unlink(self.path)
                os._exit(0)

    def _handle(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as reader:
            op = None
            try:
                line = reader.readline(MAX_REQUEST_BYTES)
                request = json.loads(line) if line else None
                if not isinstance(request, dict):
                    return
                op = request.get("op")
                if op == "lease":
                    self._lease(connection, reader)
                    return
                with self.lock:
                    self.requests += 1
                try:
                    for answer in self._answer(op, request, connection):
                        connection.sendall(_line(answer))
                finally:
                    with self.lock:
                        self.requests -= 1
                        self.last_lease = max(self.last_lease, time.monotonic())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away: a cancelled run
            except Exception as error:
                # A bad request (ValueError), or llama-cpp-python refusing one (a chat
                # template that fails on its messages): the run fails saying so, at once.
                if not isinstance(error, ValueError):
                    logger.exception("model host: a %s request failed", op)
                message = str(error) if isinstance(error, ValueError) else repr(error)
                with contextlib.suppress(OSError):
                    connection.sendall(_line({"error": message}))

    def _lease(self, connection: socket.socket, reader: Any) -> None:
        with self.lock:
            self.leases += 1
        try:
            connection.sendall(_line({"ok": True, "pid": os.getpid()}))
            while reader.read(1024):
                pass
        finally:
            with self.lock:
                self.leases -= 1
                self.last_lease = time.monotonic()

    def _answer(
        self, op: Any, request: dict[str, Any], connection: socket.socket
    ) -> Iterator[dict[str, Any]]:
        if op == "hello":
            yield {
                "pid": os.getpid(),
                "system": self.models.system(),
                "models": dict(self.models.status),  # a copy: loads add to it meanwhile
            }
        elif op == "load":
            yield {"ok": True, "info": self.models.load(_spec(request))}
        elif op == "tokenize":
            spec = _spec(request)
            self.models.load(spec)
            model = self.models.loaded[spec_key(spec)]
            text = str(request.get("text", "")).encode("utf-8")
            # Tokenizing reads only the vocabulary: it need not wait for a generation.
            count = len(model.tokenize(text, add_bos=False))
            yield {"ok": True, "count": count}
        elif op == "chat":
            yield from self._chat(request, connection)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _chat(self, request: dict[str, Any], connection: socket.socket) -> Iterator[dict[str, Any]]:
        spec = _spec(request)
        self.models.load(spec)
        model = self.models.loaded[spec_key(spec)]
        args = request.get("args")
        if not isinstance(args, dict) or not isinstance(args.get("messages"), list):
            raise ValueError("chat needs args.messages")
        arguments = {k: v for k, v in args.items() if k in CHAT_ARGUMENTS}
        # One generation at a time: while this one waits its turn, the client hears that it
        # does, so that a long queue is not taken for a host that stopped answering.
        while not self.models.generating.acquire(timeout=WAITING_INTERVAL):
            yield {"waiting": True}
        try:
            if _closed(connection):
                return  # cancelled while it waited its turn
            chunks = model.create_chat_completion(stream=True, **arguments)
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    yield {
                        "t": choice.get("delta", {}).get("content") or "",
                        "f": choice.get("finish_reason"),
                    }
            finally:
                chunks.close()
        finally:
            self.models.generating.release()
        yield {"done": True}


def _spec(request: Mapping[str, Any]) -> dict[str, Any]:
    spec = request.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise ValueError("the request names no model (spec.path)")
    return spec


def _closed(connection: socket.socket) -> bool:
    """Whether the client has closed its end (it sends nothing after its request)."""
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _line(answer: Mapping[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode("utf-8") + b"\n"


def main(argv: list[str] | None = None) -> None:
    """Run the model host (started by the server; not meant to be run by hand)."""
    parser = argparse.ArgumentParser(prog="python -m agent_runs.providers.local_host")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--preload", default="[]", help="JSON list of model specs to load")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds to live unleased")
    parser.add_argument("--allow-amx", action="store_true", help="repack weights for AMX too")
    parser.add_argument("--detach", action="store_true", help="fork into a new session")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s] [%(process)d] [%(levelname)s] model host: %(message)s",
        stream=sys.stderr,
    )
    try:
        preload = json.loads(args.preload)
    except ValueError:
        preload = []
    host = Host(args.socket, Models(allow_amx=args.allow_amx), grace=args.grace)
    # Bound before it detaches, so the starter learns from the exit code whether the host
    # listens, another one already does, or it cannot (the reason is in the log).
    try:
        listener = host.bind()
    except BlockingIOError:
        sys.exit(EXIT_ALREADY_RUNNING)
    except OSError as error:
        logger.error("cannot listen on %s: %s", args.socket, error)
        sys.exit(EXIT_ERROR)
    if args.detach:
        # The starter waits for this first process to exit; the host itself is then nobody's
        # child but init's, and no worker's exit or reaping touches it. The lock and the
        # listening socket go with it.
        if os.fork():
            os._exit(0)
        os.setsid()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    host.serve(listener, [spec for spec in preload if isinstance(spec, dict)])


if __name__ == "__main__":
    main()
