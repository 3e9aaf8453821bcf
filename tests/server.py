"""Start the real server under gunicorn on 127.0.0.1, on a port the kernel picks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")


def wait_until_serving(process: subprocess.Popen, log_path: Path, timeout: float = 30) -> str:
    """Return the base URL once gunicorn listens and a worker answers HTTP; raise if it dies.

    Waiting for an answer rather than for the "Booting worker" line matters: a worker that
    gets SIGTERM while still loading the application misses it, and gunicorn then waits the
    whole graceful timeout before killing it.
    """
    deadline = time.monotonic() + timeout
    url = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            url = f"http://127.0.0.1:{match.group(1)}"
            try:
                with urllib.request.urlopen(url + "/api/agents", timeout=2):
                    pass
            except urllib.error.HTTPError as answer:
                # The 401 of an unauthenticated request: the worker is serving. Close it, or
                # the idle keep-alive connection holds up a graceful shutdown.
                answer.close()
                return url
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"the server did not start:\n{log_path.read_text(errors='replace')}")


class GunicornServer:
    """``with GunicornServer(folder) as server:`` runs gunicorn until the block ends.

    ``server.url`` is the base URL, ``server.token`` a token for org "acme", ``server.env``
    the environment the server runs with (for the ``agent-runs`` CLI against the same data).
    """

    def __init__(self, folder: Path, *, workers: int = 1, env: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.workers = workers
        self.env = {
            **os.environ,
            "AGENT_RUNS_DATABASE_URL": f"sqlite:///{self.folder / 'server.sqlite3'}",
            "AGENT_RUNS_ACCESS_LOG": "",
            **(env or {}),
        }
        self.log_path = self.folder / "gunicorn.log"
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.token = ""

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run the agent-runs command against this server's database."""
        return subprocess.run(
            [sys.executable, "-m", "agent_runs", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    def __enter__(self) -> GunicornServer:
        self.token = self.cli("tokens", "create", "--org", "acme").stdout.strip().splitlines()[-1]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                str(REPO / "gunicorn.conf.py"),
                "--bind",
                "127.0.0.1:0",
                "--workers",
                str(self.workers),
                "agent_runs:create_app()",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        try:
            self.url = wait_until_serving(self.process, self.log_path)
        except RuntimeError:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def __exit__(self, *exc_info: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
