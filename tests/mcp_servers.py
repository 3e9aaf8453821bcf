"""Start the SDK-built MCP server of ``tests/mcp_server.py`` as a child process on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "mcp_server.py"


class McpServerProcess:
    """``with McpServerProcess() as server:`` serves MCP at ``server.url`` until the block ends."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.base = ""

    def __enter__(self) -> McpServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *self.options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        output = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                self.base = self.url.removesuffix("/mcp")
                return self
        self.stop()
        raise RuntimeError("the MCP server did not start:\n" + "".join(output))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def stdio_server(name: str = "files", **settings: object) -> dict[str, object]:
    """An agent's definition of the same server run as a local command over stdio."""
    return {"name": name, "command": sys.executable, "args": [str(SCRIPT), "--stdio"], **settings}
