"""The playground, stream tokens and CORS in a real browser: Debian's Chromium, driven by
playwright-core (tests/browser/scenarios.js), against a real gunicorn on a loopback port.

Each test runs one scenario in a node process and asserts on the JSON it prints. Chromium,
node and npm must be installed (.ci/run installs them): without them these tests fail, they
never skip. Screenshots go to a temporary folder (printed with -s; BROWSER_SHOTS names one).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from .server import GunicornServer

REPO = Path(__file__).resolve().parent.parent
BROWSER = REPO / "tests" / "browser"
CHROMIUM = "/usr/bin/chromium"

AGENTS_YAML = """\
agents:
  - id: assistant
    name: General assistant
    description: Echoes the message.
    model_options: {delay: 0.01}
  - id: finance_agent
    name: Finance assistant
    description: Looks up a stock price, then answers.
    tools:
      - agent_runs.runtime.demo_tools:get_stock_price
    explain_tool_calls: true
    model_options: {delay: 0.03}
  - id: slow
    name: Slow
    description: Answers in a hundred deltas, 30 ms apart.
    model_options: {delay: 0.03, content_deltas: 100}
  - id: banker
    name: Banker
    description: Wires money, with a human's approval.
    tools:
      - {use: "tests.e2e_tools:wire_money", requires_approval: true}
    model_options: {content_deltas: 3}
"""
# Numbered words: text shown twice, or a piece missing, shows in the answer.
NUMBERED = " ".join(f"w{n}" for n in range(1, 61))


@pytest.fixture(scope="session")
def playwright_ready():
    """node, npm and Chromium on the machine, and playwright-core in tests/browser."""
    missing = [name for name in ("node", "npm") if shutil.which(name) is None]
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(CHROMIUM)
    if missing:
        pytest.fail(
            f"the browser tests need {', '.join(missing)}: apt-get install chromium nodejs npm",
            pytrace=False,
        )
    if not (BROWSER / "node_modules" / "playwright-core").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=BROWSER,
            env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
            check=True,
            timeout=300,
        )


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("BROWSER_SHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {folder}")
    return folder


class PageServer:
    """A loopback HTTP server of one static page (tests/browser/cors.html): another origin."""

    def __init__(self) -> None:
        page = (BROWSER / "cors.html").read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                self.send_response(200 if self.path == "/cors.html" else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def pages():
    allowed, denied = PageServer(), PageServer()
    yield allowed, denied
    allowed.close()
    denied.close()


def serve(folder: Path, **env: str) -> GunicornServer:
    agents_file = folder / "agents.yaml"
    agents_file.write_text(AGENTS_YAML, encoding="utf-8")
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return GunicornServer(
        folder,
        env={"AGENT_RUNS_AGENTS_FILE": str(agents_file), "PYTHONPATH": python_path, **env},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, pages, playwright_ready):
    """The server the page talks to; the first page server's origin may call it (CORS)."""
    with serve(tmp_path_factory.mktemp("browser"), AGENT_RUNS_CORS_ORIGINS=pages[0].url) as running:
        yield running


class StreamCutter:
    """A TCP proxy to the server that cuts the first ``cuts`` event streams it forwards
    after ``budget`` bytes of their body, and records the request heads it forwards."""

    def __init__(self, port: int, *, budget: int, cuts: int = 1) -> None:
        self.port = port
        self.budget = budget
        self.cuts_left = cuts
        self.cuts = 0
        self.heads: list[str] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._requests, args=(downstream, upstream)).start()
            threading.Thread(target=self._answers, args=(upstream, downstream)).start()

    def _requests(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self.lock:
                    self.heads.extend(
                        part.split(b"\r\n\r\n")[0].decode("latin-1")
                        for part in re.split(rb"(?=(?:GET|POST|DELETE|OPTIONS|PUT|PATCH) /)", data)
                        if part.strip()
                    )
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source, sink)

    def _answers(self, source: socket.socket, sink: socket.socket) -> None:
        streaming, sent = False, 0
        try:
            while data := source.recv(65536):
                if not streaming and b"Content-Type: text/event-stream" in data:
                    with self.lock:
                        streaming = self.cuts_left > 0
                        self.cuts_left -= 1 if streaming else 0
                if streaming and sent + len(data) >= self.budget:
                    sink.sendall(data[: self.budget - sent])
                    with self.lock:
                        self.cuts += 1
                    return
                sent += len(data) if streaming else 0
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source, sink)


def _close(*ends: socket.socket) -> None:
    for end in ends:
        try:
            end.close()
        except OSError:
            pass


def run_scenario(scenario: str, base: str, token: str, shots: Path, **extra) -> dict:
    config = {"scenario": scenario, "base": base, "token": token, "shots": str(shots), **extra}
    done = subprocess.run(
        ["node", str(BROWSER / "scenarios.js"), json.dumps(config)],
        cwd=BROWSER,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "failed" not in result, result["failed"] + "\n" + done.stderr
    return result


def assert_clean(result: dict, allowed: tuple[str, ...] = ()) -> None:
    """No uncaught exception, no console error or warning (but those named), and the API
    token never in a URL."""
    assert result["errors"] == []
    unexpected = [m for m in result["console"] if not any(a in m for a in allowed)]
    assert unexpected == []


def assert_token_kept_out_of_urls(result: dict, token: str) -> None:
    assert all(token not in request["url"] for request in result["requests"])


def latest_run(server: GunicornServer, agent: str) -> dict:
    page = requests.get(
        f"{server.url}/api/runs", params={"agentId": agent, "limit": 1}, headers=server.headers
    )
    return page.json()["items"][0]


def test_a_run_with_a_tool_call_markdown_and_a_reload(server, shots):
    result = run_scenario("chat", server.url, server.token, shots)
    assert_clean(result)
    assert_token_kept_out_of_urls(result, server.token)
    tool = result["tool"]
    assert tool["status"] == "done" and tool["reasoningShown"] and tool["reasoning"]
    assert len(tool["tools"]) == 1
    assert "get_stock_price" in tool["tools"][0]["text"] and "done" in tool["tools"][0]["className"]
    assert "264.26" in tool["answerText"] and len(tool["followups"]) == 3
    # Markdown became tags; the HTML in the message stayed text.
    markdown = result["markdown"]
    assert markdown["user"] == (
        'Here is **bold**, `code` and <img src=x onerror="window.pwned=1">\n'
        "and a [link](https://example.com/) on a second line"
    )
    assert "<strong>bold</strong>" in markdown["answerHtml"]
    assert "<code>code</code>" in markdown["answerHtml"]
    assert 'href="https://example.com/"' in markdown["answerHtml"]
    assert "&lt;img" in markdown["answerHtml"] and not result["pwned"]
    assert result["followed"]["user"] == markdown["followups"][0]
    # Dark mode is another palette.
    assert result["colours"] != result["darkColours"]
    # The reload kept the conversation, and the session is the one marked in the list.
    assert result["turnsBefore"] == result["turnsAfter"] == 2
    # The list shows the sessions of the agent chosen (assistant: this one).
    assert result["sessions"] == 1 and result["current"] == 1
    assert result["unlabelled"] == []


def test_stop_cancels_the_run(server, shots):
    message = NUMBERED
    result = run_scenario("cancel", server.url, server.token, shots, message=message)
    assert_clean(result)
    turn = result["turn"]
    assert turn["status"] == "cancelled" and "Cancelled" in turn["note"]
    assert result["stopHidden"] and result["sendEnabled"]
    run = latest_run(server, "slow")
    assert run["status"] == "CANCELLED"
    assert f"You said: {message}".startswith(turn["answerText"].strip())


def test_a_paused_run_is_approved_and_then_one_is_rejected(server, shots):
    result = run_scenario("approval", server.url, server.token, shots)
    assert_clean(result)
    assert "wire_money" in result["prompt"] and result["group"] == 1
    approved, rejected = result["approved"], result["rejected"]
    assert approved["status"] == rejected["status"] == "done"
    assert "done" in approved["tools"][0]["className"]
    assert "failed" in rejected["tools"][0]["className"]
    runs = requests.get(
        f"{server.url}/api/runs", params={"agentId": "banker", "limit": 2}, headers=server.headers
    ).json()["items"]
    assert [run["status"] for run in runs] == ["COMPLETED", "COMPLETED"]


def test_a_reload_mid_run_resumes_after_the_last_event_without_repeating_text(server, shots):
    result = run_scenario("reload", server.url, server.token, shots, message=NUMBERED)
    assert_clean(result)
    turn = result["turn"]
    run = latest_run(server, "slow")
    assert run["status"] == "COMPLETED"
    assert turn["answerText"].strip() == run["content"] == f"You said: {NUMBERED}"
    assert result["partial"] and result["partial"] != turn["answerText"]
    assert result["turns"] == 1
    # After the reload the page asked for the events after the last one it had shown.
    resumed = [re.search(r"[?&]after=(\d+)", r["url"]) for r in result["eventsAfterReload"]]
    assert resumed and all(resumed) and int(resumed[0].group(1)) > 1


def test_a_dropped_stream_resumes_by_itself(server, shots):
    cutter = StreamCutter(int(server.url.rsplit(":", 1)[1]), budget=1500)
    try:
        result = run_scenario("drop", cutter.url, server.token, shots, message=NUMBERED)
    finally:
        cutter.close()
    assert_clean(result, allowed=("ERR_INCOMPLETE_CHUNKED_ENCODING",))
    assert cutter.cuts == 1
    assert result["turn"]["answerText"].strip() == f"You said: {NUMBERED}"
    # EventSource reconnected on its own, saying where it was.
    reconnects = [h for h in cutter.heads if "/events?" in h and "last-event-id:" in h.lower()]
    assert len(reconnects) == 1


def test_on_a_phone(server, shots):
    result = run_scenario(
        "phone", server.url, server.token, shots, viewport={"width": 390, "height": 844}
    )
    assert_clean(result)
    assert result["overflow"] <= 0
    assert result["closedRight"] <= 0 < result["openRight"] and result["expanded"] == "true"
    assert result["closedAgain"] <= 0 and result["escaped"] <= 0
    # Sessions begun in other tabs (the other tests') are named after their first message.
    assert "What is NVDA trading at?" in result["titles"]
    assert not any(title.startswith("Session ") for title in result["titles"])
    assert result["unlabelled"] == []
    assert result["turn"]["status"] == "done"


def test_a_wrong_token_says_so(server, shots):
    result = run_scenario("wrongToken", server.url, server.token, shots)
    # The browser itself logs the refused request (401) to the console.
    assert_clean(result, allowed=("status of 401",))
    assert result["loginShown"] and "refused" in result["error"]
    assert "not valid" in result["error"]


def test_native_eventsource_with_a_stream_token_reconnects(server, shots):
    cutter = StreamCutter(int(server.url.rsplit(":", 1)[1]), budget=1200)
    try:
        result = run_scenario(
            "eventSource", cutter.url, server.token, shots, agent="slow", message=NUMBERED
        )
    finally:
        cutter.close()
    assert_clean(
        result, allowed=("ERR_INCOMPLETE_CHUNKED_ENCODING", "status of 401", "status of 404")
    )
    assert cutter.cuts == 1 and result["errors"] == [] and result.get("closed") is None
    ids = [event["id"] for event in result["events"]]
    assert ids == list(range(1, len(ids) + 1))  # each once, in order, across the reconnect
    text = "".join(e["data"] for e in result["events"] if e["event"] == "CONTENT_DELTA")
    assert text == f"You said: {NUMBERED}"
    assert result["events"][-1]["event"] == "STOP"
    # EventSource's own requests (the other two are the page's fetches below).
    opened = [h for h in cutter.heads if "/events?access_token=" in h and "text/event-stream" in h]
    assert len(opened) == 2 and "last-event-id:" in opened[1].lower()
    assert result["grant"]["url"].startswith(f"/api/agents/slow/runs/{result['runId']}/events?")
    # A full API token in a URL, and a stream token of another run.
    assert result["apiToken"]["status"] == 401
    assert result["apiToken"]["type"] == "application/problem+json"
    assert result["otherRun"]["status"] == 404


def test_another_origin_calls_the_api_with_fetch_and_eventsource(server, pages, shots):
    allowed, denied = pages
    result = run_scenario(
        "cors", allowed.url, server.token, shots, api=server.url, deniedBase=denied.url
    )
    assert_clean(result, allowed=("blocked by CORS policy", "Failed to load resource"))
    page = result["allowed"]
    assert "assistant" in page["agents"] and page["status"] == 200
    assert page["events"][0] == "START" and page["events"][-1] == "STOP"
    assert page["replayed"] == page["events"]
    assert result["denied"] == "TypeError"


def test_an_expired_stream_token_is_replaced_by_the_page(tmp_path, shots, playwright_ready):
    # Tokens live one second here; EventSource waits three before it reconnects.
    with serve(tmp_path, AGENT_RUNS_STREAM_TOKEN_TTL="1") as short:
        cutter = StreamCutter(int(short.url.rsplit(":", 1)[1]), budget=1500)
        try:
            result = run_scenario("drop", cutter.url, short.token, shots, message=NUMBERED)
        finally:
            cutter.close()
    assert_clean(result, allowed=("ERR_INCOMPLETE_CHUNKED_ENCODING", "status of 401"))
    assert result["turn"]["answerText"].strip() == f"You said: {NUMBERED}"
    refused = [r for r in result["responses"] if "/events?" in r["url"] and r["status"] == 401]
    grants = [r for r in result["requests"] if r["url"].endswith("/events/token")]
    assert refused and len(grants) >= 2
