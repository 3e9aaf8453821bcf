"""What the fake vendor servers for tests share: a loopback HTTP server that records requests
and answers each with the next scripted reply, as JSON or as a chunked event stream that may be
cut short. Each fake (:mod:`.fake_openai`, :mod:`.fake_anthropic`) adds its wire protocol.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Stream:
    """A 200 text/event-stream reply made of these events (JSON objects).

    ``cut_after`` drops the connection after that many events, mid-body; ``delay`` paces them.
    """

    events: list[dict[str, Any]]
    cut_after: int | None = None
    delay: float = 0.0


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers ``POST route`` with the fake's next scripted reply, as :meth:`send_reply` says."""

    protocol_version = "HTTP/1.1"
    route = "/"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != self.route:
            self.not_found()
            return
        request = json.loads(body)
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = self.server.fake._record(request, headers, self.client_address)
        if callable(reply):
            reply = reply(request)
        self.send_reply(request, reply)

    def not_found(self) -> None:
        """Answer a request for a path other than ``route``."""
        raise NotImplementedError

    def send_reply(self, request: dict[str, Any], reply: Any) -> None:
        """Send a scripted reply (already called, if it was a function of the request)."""
        raise NotImplementedError

    def send_json(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_events(
        self, reply: Stream, encode: Callable[[dict[str, Any]], bytes], end: bytes = b""
    ) -> None:
        """Send ``reply``, each event as ``encode`` writes it in an HTTP chunk, then ``end``.

        The fake's ``outcomes`` get how the stream ended.
        """
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        outcome = "done"
        try:
            for number, event in enumerate(reply.events):
                if reply.cut_after is not None and number == reply.cut_after:
                    outcome = "cut"
                    break
                if reply.delay:
                    time.sleep(reply.delay)
                self._write_chunk(encode(event))
            else:
                if end:
                    self._write_chunk(end)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            outcome = "client closed"
        if outcome != "done":
            # End the connection without the last chunk of the body: an interrupted stream.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.fake._finished(outcome)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer


class FakeServer:
    """A scripted server on 127.0.0.1, on a port the kernel picks, answering with ``handler``.

    ``requests`` holds the JSON bodies received, ``headers`` their headers (lower-case names),
    ``outcomes`` how each stream ended: ``"done"``, ``"cut"`` (scripted) or ``"client closed"``,
    ``connections`` the client addresses requests came from (one per connection).
    """

    handler: type[ScriptedHandler] = ScriptedHandler

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.outcomes: list[str] = []
        self.connections: set[tuple[str, int]] = set()
        self._replies: list[Any] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self.handler)
        self._server.fake = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *replies: Any) -> None:
        """Queue replies, served one per request in order."""
        with self._lock:
            self._replies.extend(replies)

    def unscripted(self) -> Any:
        """Return the reply to a request when none is left in the script."""
        raise NotImplementedError

    def wait_for_outcomes(self, count: int, timeout: float = 5.0) -> list[str]:
        """Wait until ``count`` streams have ended; return how they ended."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.outcomes)

    def _record(
        self, request: dict[str, Any], headers: dict[str, str], client: tuple[str, int]
    ) -> Any:
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)
            self.connections.add(client)
            if not self._replies:
                return self.unscripted()
            return self._replies.pop(0)

    def _finished(self, outcome: str) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
