"""``agent-runs chat AGENT``: a terminal chat with an agent of a running server.

On a terminal it is a conversation: the answer streams in as it is written, a spinner turns
while the model thinks or a tool runs, reasoning is dimmed, each tool call is one line.
Ctrl-C cancels the run in progress (a second Ctrl-C quits); a run paused before a tool call
asks for approval. With stdin not a terminal it sends what stdin holds as one message, writes
the answer to stdout (reasoning and tool calls to stderr) and exits: 0 when the run
completed, 1 otherwise.

Built on :mod:`agent_runs.client` and rich; it never loads the server's application.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import click
from rich.console import Console
from rich.status import Status
from rich.text import Text

from .client import (
    AgentRunsClient,
    AgentRunsError,
    ApiError,
    ContentDelta,
    ErrorEvent,
    Event,
    ReasoningDelta,
    RunStream,
    Start,
    Stop,
    ToolEnd,
    ToolStart,
)

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_WORDS = frozenset(("/exit", "/quit", "exit", "quit"))


class Transcript:
    """Writes a run's events to the terminal: the answer to ``out``, the rest to ``side``.

    Interactive, both are the terminal; piped, ``side`` is stderr so that stdout holds the
    answer alone. A line of streamed text left open is ended before anything else is written.
    """

    def __init__(self, out: Console, side: Console, *, spinner: bool) -> None:
        self.out = out
        self.side = side
        self._status: Status | None = Status("", console=out, spinner="dots") if spinner else None
        self._spinning = False
        # Where streamed text left a line open: its console and what it was (reasoning...).
        self._open_line: tuple[Console, str] | None = None
        # TOOL_END names the tool but not its arguments: kept from TOOL_START, by name.
        self._arguments: dict[str, Any] = {}

    def spin(self, text: str) -> None:
        """Show a spinner with ``text`` until the next output."""
        if self._status is None:
            return
        self.end_line()
        self._status.update(Text(text, style="dim"))
        if not self._spinning:
            self._status.start()
            self._spinning = True

    def quiet(self) -> None:
        if self._status is not None and self._spinning:
            self._status.stop()
            self._spinning = False

    def end_line(self) -> None:
        if self._open_line is not None:
            self._open_line[0].out("")
            self._open_line = None

    def write(self, console: Console, kind: str, text: str, style: str | None = None) -> None:
        """Write streamed text without ending the line (no markup: it is the model's text)."""
        self.quiet()
        if self._open_line != (console, kind):
            self.end_line()
        console.out(text, style=style, end="", highlight=False)
        console.file.flush()
        self._open_line = (console, kind)

    def line(self, text: Text) -> None:
        """Write a whole line to the side console, cut to a terminal's width (a file's: whole)."""
        self.quiet()
        self.end_line()
        if self.side.is_terminal:
            self.side.print(text, no_wrap=True, overflow="ellipsis", crop=True)
        else:
            self.side.print(text, soft_wrap=True)

    def note(self, text: str, style: str = "dim") -> None:
        self.line(Text(text, style=style))

    def show(self, event: Event) -> None:
        """Write one event."""
        if isinstance(event, ContentDelta):
            self.write(self.out, "content", event.text)
        elif isinstance(event, ReasoningDelta):
            self.write(self.side, "reasoning", event.text, style="dim")
        elif isinstance(event, Start):
            self.spin("thinking…")
        elif isinstance(event, ToolStart):
            self._arguments[event.name] = event.arguments
            self.spin(f"running {event.name}({_brief(event.arguments)})…")
        elif isinstance(event, ToolEnd):
            self.line(_tool_line(event, self._arguments.pop(event.name, None)))
            self.spin("thinking…")
        elif isinstance(event, Stop):
            self.quiet()
            self.end_line()
            if event.reason == "cancelled":
                self.note("[cancelled]", style="yellow")
            for followup in event.followups:
                self.note(f"→ {followup}")
        elif isinstance(event, ErrorEvent):
            self.quiet()
            self.end_line()
            self.note(f"error: {event.message}", style="bold red")


def _brief(value: Any, limit: int = 200) -> str:
    """Return a tool's arguments or result as one short line of text."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tool_line(event: ToolEnd, arguments: Any) -> Text:
    line = Text("⚙ ", style="cyan")
    line.append(event.name, style="bold cyan")
    if arguments is not None:
        line.append(f"({_brief(arguments)})", style="cyan")
    if event.error is not None:
        line.append(f" ✗ {_brief(event.error)}", style="red")
    else:
        line.append(f" → {_brief(event.result)}", style="dim")
    return line


class Chat:
    """One conversation with an agent: its session carries over from turn to turn."""

    def __init__(
        self,
        client: AgentRunsClient,
        agent_id: str,
        transcript: Transcript,
        *,
        session_id: str | None = None,
        interactive: bool,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.transcript = transcript
        self.session_id = session_id
        self.interactive = interactive

    def turn(self, message: str) -> Event | None:
        """Send a message and show the run to its end; return its last event."""
        self.transcript.spin("sending…")
        try:
            stream = self.client.stream(self.agent_id, message, session_id=self.session_id)
        finally:
            self.transcript.quiet()
        last = self._follow(stream)
        while isinstance(last, Stop) and last.paused and stream.run_id:
            action = self._ask_approval(last.required_action or {})
            if action is None:
                self.transcript.note(
                    f"Run {stream.run_id} is PAUSED, waiting for a tool call's approval; "
                    "continue it with POST …/continue.",
                    style="yellow",
                )
                return last
            last = self._continue(stream.run_id, action, last.id)
        return last

    def _follow(self, stream: RunStream) -> Event | None:
        """Show a stream's events; on Ctrl-C cancel the run and show it stop."""
        last: Event | None = None
        try:
            for event in stream:
                if isinstance(event, Start):
                    self.session_id = event.session_id
                self.transcript.show(event)
                last = event
            return last
        except KeyboardInterrupt:
            stream.close()
            if stream.run_id is None:
                raise
            self.transcript.quiet()
            self.transcript.note("cancelling… (Ctrl-C again to quit)", style="yellow")
            self.client.cancel(self.agent_id, stream.run_id)
            # The rest of the run, from where the screen stopped, to its CANCELLED end. A second
            # Ctrl-C raises out of here, and the command quits.
            rest = self.client.events(self.agent_id, stream.run_id, after=stream.last_id)
            for event in rest:
                self.transcript.show(event)
                last = event
            return last
        finally:
            self.transcript.quiet()
            self.transcript.end_line()

    def _ask_approval(self, action: dict[str, Any]) -> str | None:
        """Ask whether the paused tool call may run: APPROVE, REJECT, or None if none can say."""
        if not self.interactive:
            return None
        call = f"{action.get('tool', 'a tool')}({_brief(action.get('arguments'))})"
        console = self.transcript.out
        while True:
            answer = console.input(
                Text.assemble("Allow ", (call, "bold"), "? [y/n] ", style="yellow")
            )
            if answer.strip().lower() in ("y", "yes"):
                return "APPROVE"
            if answer.strip().lower() in ("n", "no"):
                return "REJECT"

    def _continue(self, run_id: str, action: str, after: int) -> Event | None:
        """Send the approval and show the rest of the run as it happens."""
        failed: list[AgentRunsError] = []

        def send() -> None:
            try:
                self.client.continue_run(self.agent_id, run_id, action)  # type: ignore[arg-type]
            except AgentRunsError as error:
                failed.append(error)

        # The continue request answers only once the run stops again, so its events are
        # followed alongside, from when the run has left PAUSED: /events asked before that
        # would end at the pause.
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        self.transcript.spin("thinking…")
        while sender.is_alive() and self.client.status(self.agent_id, run_id)["status"] == "PAUSED":
            time.sleep(0.1)
        if failed:
            raise failed[0]
        return self._follow(self.client.events(self.agent_id, run_id, after=after))


def _fail(message: str) -> None:
    """Print one line to stderr and exit 1: what a user can act on, no traceback."""
    Console(stderr=True).print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    sys.exit(1)


def _describe(error: AgentRunsError) -> str:
    if isinstance(error, ApiError):
        hint = ""
        if error.status == 401:
            hint = " (check --token or AGENT_RUNS_TOKEN)"
        return f"{error.detail or error.title} [{error.status}]{hint}"
    return str(error)


@click.command("chat")
@click.argument("agent_id")
@click.option(
    "--url",
    envvar="AGENT_RUNS_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The server's address (or AGENT_RUNS_URL).",
)
@click.option(
    "--token", envvar="AGENT_RUNS_TOKEN", default=None, help="A bearer token (or AGENT_RUNS_TOKEN)."
)
@click.option(
    "--prefix",
    envvar="AGENT_RUNS_URL_PREFIX",
    default="/api",
    show_default=True,
    help="Where the API is mounted on the server.",
)
@click.option("--session", "session_id", default=None, help="Continue this session.")
def chat_command(
    agent_id: str, url: str, token: str | None, prefix: str, session_id: str | None
) -> None:
    """Chat with AGENT on a running server (reads one message from stdin if it is not a tty)."""
    if not token:
        _fail("no token: pass --token or set AGENT_RUNS_TOKEN (see `agent-runs tokens create`)")
    assert token is not None
    interactive = sys.stdin.isatty()
    out = Console(highlight=False)
    side = out if interactive else Console(stderr=True, highlight=False)
    transcript = Transcript(out, side, spinner=interactive and out.is_terminal)
    with AgentRunsClient(url, token, prefix=prefix) as client:
        chat = Chat(client, agent_id, transcript, session_id=session_id, interactive=interactive)
        try:
            if interactive:
                _converse(chat)
            else:
                message = sys.stdin.read().strip()
                if not message:
                    _fail("stdin held no message to send")
                last = chat.turn(message)
                sys.exit(0 if isinstance(last, Stop) and last.reason is None else 1)
        except AgentRunsError as error:
            transcript.quiet()
            transcript.end_line()
            _fail(_describe(error))
        except KeyboardInterrupt:
            transcript.quiet()
            transcript.end_line()
            sys.exit(130)


def _converse(chat: Chat) -> None:
    """Read messages at a prompt and answer each, until EOF, /exit or Ctrl-C at the prompt."""
    console = chat.transcript.out
    agent = chat.client.agent(chat.agent_id)  # an unknown agent or a bad token fail here
    console.print(
        Text.assemble(
            ("Chatting with ", "dim"),
            (agent.get("name") or chat.agent_id, "bold"),
            (". Ctrl-C cancels a run, Ctrl-D or /exit quits.", "dim"),
        )
    )
    while True:
        try:
            message = console.input(Text("you› ", style="bold green")).strip()
        except EOFError:
            break
        if not message:
            continue
        if message in EXIT_WORDS:
            break
        try:
            chat.turn(message)
        except ApiError as error:
            # A refused message (a 409 while the session is busy, a 422...) ends only that turn.
            if error.status in (401, 404):
                raise
            chat.transcript.note(f"error: {_describe(error)}", style="bold red")
    if chat.session_id:
        console.print(
            Text(
                f"session {chat.session_id} — continue with: agent-runs chat {chat.agent_id} "
                f"--session {chat.session_id}",
                style="dim",
            )
        )
