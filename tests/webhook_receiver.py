"""A webhook receiver for tests: an HTTP endpoint on 127.0.0.1 that records what it is sent.

It answers each request with what ``reply(n)`` says for the n-th request (from 1): a status
code, or ``HANG`` to read the request and never answer, holding the connection until the
sender closes it (the time it did lands in ``closed``).
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

HANG = "hang"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message_id(self) -> str:
        return self.headers["webhook-id"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        receiver = self.server.receiver
        reply = receiver._record(
            Received({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
        )
        if reply == HANG:
            self.close_connection = True
            self.connection.settimeout(120)
            try:
                # Nothing more comes from the sender: this returns when it closes.
                while self.connection.recv(1024):
                    pass
            except OSError:
                pass
            receiver.closed.append(time.monotonic())
            return
        data = b'{"ok":true}'
        self.send_response(int(reply))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


class Receiver:
    """``with Receiver() as receiver:`` serves until the block ends; ``receiver.url`` is its
    address, ``receiver.received`` what it got, in order."""

    def __init__(self, reply: Callable[[int], int | str] = lambda n: 200) -> None:
        self.reply = reply
        self.received: list[Received] = []
        self.closed: list[float] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def _record(self, received: Received) -> int | str:
        with self._lock:
            self.received.append(received)
            return self.reply(len(self.received))

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until ``count`` requests have come (or the timeout); return all received."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)

    def events(self, type: str | None = None) -> list[dict[str, Any]]:
        """The bodies received, of one event type if given."""
        return [r.json for r in self.received if type is None or r.json["type"] == type]

    def __enter__(self) -> Self:
        thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (as far as anyone can tell)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
