"""``agent-runs chat`` against a real gunicorn: piped (stdin not a terminal) and in tmux."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from agent_runs.client import AgentRunsClient

from .client_server import serve_agents


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_agents(tmp_path_factory.mktemp("chat")) as running:
        yield running


def chat(*args: str, stdin: str = "hi\n", env: dict[str, str] | None = None):
    """Run ``agent-runs chat`` with stdin from a pipe."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("AGENT_RUNS_")
    }
    return subprocess.run(
        [sys.executable, "-m", "agent_runs", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )


def flags(server) -> list[str]:
    return ["--url", server.url, "--token", server.token]


def latest_run(server, agent_id: str) -> dict:
    with AgentRunsClient(server.url, server.token) as client:
        session = next(client.sessions(agent_id=agent_id))
        return list(client.session_runs(session["id"]))[-1]


# Piped ------------------------------------------------------------------------------------


def test_a_piped_message_prints_the_answer_and_exits_0(server):
    env = {"AGENT_RUNS_URL": server.url, "AGENT_RUNS_TOKEN": server.token}
    result = chat("assistant", stdin="hi\n", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "You said: hi\n"
    # Reasoning goes to stderr, so stdout holds the answer alone.
    assert "No tool is needed" in result.stderr


def test_tool_calls_go_to_stderr_one_line_each(server):
    result = chat("finance_agent", *flags(server), stdin="What is NVDA trading at?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("get_stock_price returned ")
    tool_lines = [line for line in result.stderr.splitlines() if line.startswith("⚙")]
    assert len(tool_lines) == 1
    assert tool_lines[0].startswith('⚙ get_stock_price({"ticker": "NVDA"}) → ')


def test_session_continues_a_conversation(server):
    first = chat("assistant", *flags(server), stdin="first words")
    assert first.returncode == 0, first.stderr
    session_id = latest_run(server, "assistant")["sessionId"]
    second = chat("assistant", *flags(server), "--session", session_id, stdin="second words")
    assert second.returncode == 0, second.stderr
    assert second.stdout == "(turn 2) You said: second words\n"


def test_a_paused_run_piped_says_so_and_exits_1(server):
    result = chat("banker", *flags(server), stdin="wire 10")
    assert result.returncode == 1
    assert "PAUSED" in result.stderr and "Traceback" not in result.stderr
    assert latest_run(server, "banker")["status"] == "PAUSED"


def test_a_failed_run_exits_1_with_its_error(server):
    result = chat("broken", *flags(server))
    assert result.returncode == 1
    assert "error: Model call" in result.stderr and "Traceback" not in result.stderr


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown agent", "No agent with id 'nope'. [404]"),
        ("wrong token", "[401] (check --token or AGENT_RUNS_TOKEN)"),
        ("server down", "Cannot reach http://127.0.0.1:"),
        ("no token", "no token: pass --token or set AGENT_RUNS_TOKEN"),
        ("empty stdin", "stdin held no message to send"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_failure(server, case, expected):
    args, stdin = ["assistant", *flags(server)], "hi"
    if case == "unknown agent":
        args[0] = "nope"
    elif case == "wrong token":
        args[-1] = "ar_not_a_token"
    elif case == "server down":
        args[2] = f"http://127.0.0.1:{closed_port()}"
    elif case == "no token":
        args = args[:3]
    elif case == "empty stdin":
        stdin = "  \n"
    result = chat(*args, stdin=stdin)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr


# In a terminal ----------------------------------------------------------------------------


class Tmux:
    """A private tmux server running one command in a 100x30 window."""

    def __init__(self, folder, command: list[str]) -> None:
        # Fails, rather than skips, where tmux is missing: .ci/run installs it.
        assert shutil.which("tmux"), "tmux is needed: apt-get install tmux"
        self.socket = str(folder / "tmux.sock")
        # The pane stays after the command ends, showing how it ended.
        script = f"{shlex.join(command)}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-x", "100", "-y", "30", script)

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args], capture_output=True, text=True, check=True
        ).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_for(self, text: str, timeout: float = 20, count: int = 1) -> str:
        """Return the screen once it shows ``text`` (``count`` times)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not on the screen within {timeout} s:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def terminal(server, tmp_path):
    opened = []

    def start(agent_id: str) -> Tmux:
        command = [
            "env",
            f"AGENT_RUNS_URL={server.url}",
            f"AGENT_RUNS_TOKEN={server.token}",
            *(sys.executable, "-m", "agent_runs", "chat", agent_id),
        ]
        opened.append(Tmux(tmp_path, command))
        opened[-1].wait_for("you›")
        return opened[-1]

    yield start
    for tmux in opened:
        tmux.close()


def test_terminal_chat_streams_and_ctrl_c_cancels_the_run(server, terminal):
    tmux = terminal("chatty")
    tmux.keys("tell me a long story " * 8, "Enter")
    # Reasoning, then the answer streaming in on its own line.
    tmux.wait_for("No tool is needed; I will answer directly.\nYou said: tell")
    tmux.keys("C-c")
    tmux.wait_for("[cancelled]")
    assert latest_run(server, "chatty")["status"] == "CANCELLED"
    # The chat goes on: the next message is answered in the same session.
    tmux.keys("again", "Enter")
    tmux.wait_for("(turn 2) You said: ")
    tmux.keys("C-c")
    tmux.wait_for("[cancelled]\nyou›", count=2)
    assert latest_run(server, "chatty")["status"] == "CANCELLED"
    # Ctrl-C at the prompt quits.
    tmux.keys("C-c")
    screen = tmux.wait_for("EXIT=130")
    assert "Traceback" not in screen


def test_terminal_chat_spins_while_a_tool_runs_and_shows_it_in_one_line(terminal):
    tmux = terminal("slowtool")
    tmux.keys("look up sleep=2", "Enter")
    tmux.wait_for("running slow_lookup")
    screen = tmux.wait_for("⚙ slow_lookup")
    line = next(line for line in screen.splitlines() if line.startswith("⚙"))
    assert line == '⚙ slow_lookup({"query": "look up sleep=2"}) → slowly found'
    tmux.wait_for("slow_lookup returned slowly found.\nyou›")
    assert "running slow_lookup" not in tmux.screen()
    tmux.keys("/exit", "Enter")
    screen = tmux.wait_for("EXIT=0")
    assert "continue with: agent-runs chat slowtool --session" in screen.replace("\n", " ")


def test_terminal_chat_asks_to_approve_a_paused_run(server, terminal):
    tmux = terminal("banker")
    tmux.keys("wire 300", "Enter")
    tmux.wait_for('Allow wire_money({"amount": "wire 300"})? [y/n]')
    assert latest_run(server, "banker")["status"] == "PAUSED"
    tmux.keys("y", "Enter")
    tmux.wait_for("wire_money returned sent wire 300.")
    assert latest_run(server, "banker")["status"] == "COMPLETED"
    tmux.keys("wire 400", "Enter")
    tmux.wait_for('Allow wire_money({"amount": "wire 400"})? [y/n]')
    tmux.keys("n", "Enter")
    tmux.wait_for("✗ A human reviewer rejected this tool call")
    tmux.wait_for("you›\n", timeout=20)
    run = latest_run(server, "banker")
    assert run["status"] == "COMPLETED" and "rejected" in run["content"]
