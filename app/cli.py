"""The ``agent-runs`` command: serve the API, manage tokens, list agents, chat with one.

Built on Flask's CLI, so ``agent-runs routes`` and ``agent-runs shell`` work too, and a host
application that embeds the extension gets ``flask tokens ...``.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import sys

import click
from flask import current_app
from flask.cli import AppGroup, FlaskGroup

from .auth import SCOPES
from .chat import chat_command
from .db import database

DEFAULT_BIND = "127.0.0.1:8080"
EXAMPLE_MESSAGE = '{"message": "What is the current NVDA stock price?"}'


def _create_app():
    from . import create_app
    from .db import DatabaseUnavailable

    try:
        return create_app({"AGENT_RUNS_LOAD_MODELS_ON_START": False})
    except DatabaseUnavailable as error:
        # A wrong URL or a database out of reach: one line that says so, not a traceback.
        raise click.ClickException(str(error)) from None


cli = FlaskGroup(
    name="agent-runs",
    create_app=_create_app,
    help="Agent Runs: run AI agents over HTTP and stream every run as Server-Sent Events.",
)


def main() -> None:
    cli.main()


tokens = AppGroup("tokens", help="Create, list and revoke API tokens.")
cli.add_command(tokens)
# A client of a running server: it needs no application, and loads none.
cli.add_command(chat_command)


def _duration(text: str) -> datetime.timedelta:
    """Parse a duration such as 90s, 15m, 12h or 30d."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    number, unit = text[:-1], text[-1:]
    # ASCII digits only: str.isdigit() accepts "²", which int() refuses.
    if unit in units and number.isascii() and number.isdigit() and int(number) > 0:
        try:
            return datetime.timedelta(**{units[unit]: int(number)})
        except OverflowError:
            pass
    raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 12h or 30d")


@tokens.command("create")
@click.option("--org", "org_id", required=True, help="The organisation the token acts for.")
@click.option("--user", "user_id", default=None, help="Bind the token to one user.")
@click.option("--name", default="", help="A label to recognise the token by.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(SCOPES),
    help="What the token may do (repeat; default runs:read and runs:write).",
)
@click.option("--expires-in", default=None, help="Make the token expire, e.g. 12h or 30d.")
def create_token_command(
    org_id: str, user_id: str | None, name: str, scopes: tuple[str, ...], expires_in: str | None
) -> None:
    """Create a token. Its secret is printed once, alone on the last line."""
    from .auth import DEFAULT_SCOPES, create_token
    from .models import utcnow

    expires_at = utcnow() + _duration(expires_in) if expires_in else None
    with database.connection_context():
        token, secret = create_token(
            org_id, user_id, name=name, scopes=scopes or DEFAULT_SCOPES, expires_at=expires_at
        )
    who = f"org {org_id!r}" + (f", user {user_id!r}" if user_id else "")
    click.echo(
        f"Created token {token.id} ({token.prefix}...) for {who}. Keep it; it is not shown again:",
        err=True,
    )
    click.echo(secret)


@tokens.command("list")
def list_tokens_command() -> None:
    """List tokens (never their secrets)."""
    from .models import ApiToken, utcnow

    with database.connection_context():
        now = utcnow()
        for token in ApiToken.select().order_by(ApiToken.id):
            if token.revoked_at:
                state = "revoked"
            elif token.expires_at and token.expires_at <= now:
                state = "expired"
            elif token.expires_at:
                state = f"active until {token.expires_at:%Y-%m-%dT%H:%M:%SZ}"
            else:
                state = "active"
            click.echo(
                f"{token.id}\t{token.prefix}...\torg={token.org_id}\t"
                f"user={token.user_id or '-'}\tscopes={token.scopes.replace(' ', ',')}\t"
                f"{state}\t{token.name}"
            )


@tokens.command("revoke")
@click.argument("token_id", type=int)
def revoke_token_command(token_id: int) -> None:
    """Revoke a token by its id (see `tokens list`)."""
    from .models import ApiToken, utcnow

    with database.connection_context():
        updated = (
            ApiToken.update(revoked_at=utcnow())
            .where(ApiToken.id == token_id, ApiToken.revoked_at.is_null())
            .execute()
        )
    if not updated:
        raise click.ClickException(f"No active token with id {token_id}.")
    click.echo(f"Revoked token {token_id}.")


db = AppGroup("db", help="Manage the database.")
cli.add_command(db)


@db.command("upgrade")
def db_upgrade_command() -> None:
    """Apply the migrations the database lacks (for AGENT_RUNS_MIGRATE_ON_START off)."""
    from .db import migrate

    applied = migrate()
    for name in applied:
        click.echo(f"Applied {name}.")
    click.echo("The database is up to date." if not applied else f"{len(applied)} applied.")


@cli.command("agents")
def list_agents_command() -> None:
    """List the agents this server offers."""
    state = current_app.extensions["agent_runs"]
    for agent in state.registry.all():
        tools = ", ".join(t.name for t in agent.tools) or "no tools"
        click.echo(f"{agent.id}\t{agent.model or state.default_model}\t{tools}")


def _gunicorn_config(explicit: str | None) -> str | None:
    """Find gunicorn.conf.py: the option, the working directory, then the project's own.

    The project's copy sits beside app/ in a checkout (an editable install) and under
    share/agent-runs in an installed wheel.
    """
    candidates = [
        explicit,
        os.environ.get("AGENT_RUNS_GUNICORN_CONFIG"),
        "gunicorn.conf.py",
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "gunicorn.conf.py"),
        os.path.join(sys.prefix, "share", "agent-runs", "gunicorn.conf.py"),
    ]
    return next((path for path in candidates if path and os.path.isfile(path)), None)


def _curl_target(bind: str) -> tuple[str, str, str]:
    """How curl reaches a server bound to ``bind``: the command, the URL's origin and a note.

    Reads the address as gunicorn does. A wildcard address is reached on loopback; a port
    (0) or a socket (fd://) gunicorn is handed is only known to it, so the URL says PORT or
    HOST:PORT and the note says where to look.
    """
    if bind.startswith("unix:"):
        path = re.split(r"unix:(?://)?", bind, maxsplit=1)[-1]
        return f"curl -N --unix-socket {shlex.quote(path)}", "http://localhost", ""
    if bind.startswith("fd://"):
        return "curl -N", "http://HOST:PORT", " (HOST:PORT: where that socket listens)"
    host, colon, port = bind.removeprefix("tcp://").rpartition(":")
    if not colon or not port.isdigit():
        host, port = bind.removeprefix("tcp://"), "8000"  # gunicorn's port for a bare host
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    if port == "0":
        return "curl -N", f"http://{host}:PORT", " (PORT: the port in gunicorn's 'Listening at:')"
    return "curl -N", f"http://{host}:{port}", ""


def _announce_first_token(bind: str) -> None:
    """Create and print a token if the server has none, so a first run can be tried at once."""
    from .auth import create_token
    from .models import ApiToken

    with database.connection_context():
        if ApiToken.select().exists():
            return
        _, secret = create_token("default", name="created on first start")
    prefix = current_app.extensions["agent_runs"].config["AGENT_RUNS_URL_PREFIX"].rstrip("/")
    curl, origin, note = _curl_target(bind)
    url = f"{origin}{prefix}/agents/finance_agent/runs/stream"
    playground = ""
    # A browser reaches no Unix socket.
    if current_app.extensions["agent_runs"].config["AGENT_RUNS_PLAYGROUND"] and origin != (
        "http://localhost"
    ):
        playground = f"\nOr chat in a browser, with the same token: {origin}{prefix}/playground\n"
    click.echo(
        "\nNo API token existed, so one was created for organisation 'default'.\n"
        "It is shown only this once:\n\n"
        f"    {secret}\n\n"
        f"Try a streaming run{note}:\n\n"
        f"    {curl} {shlex.quote(url)} \\\n"
        f'      -H "Authorization: Bearer {secret}" \\\n'
        '      -H "Content-Type: application/json" \\\n'
        f"      -d {shlex.quote(EXAMPLE_MESSAGE)}\n"
        f"{playground}"
    )


def _announce_embedded_model() -> None:
    """Load the agents' embedded models before the workers start, and say how it went."""
    from .config import NO_EMBEDDED_MODEL
    from .providers.base import ProviderError
    from .providers.local import amx_opt_in, model_host, model_spec
    from .providers.local_host import CPU_AMX_NOTE

    state = current_app.extensions["agent_runs"]
    os.environ["AGENT_RUNS_SERVE_ANNOUNCED"] = "1"
    models = state.registry.local_models(state.default_model)
    if not models:
        if state.default_model == "scripted" and not os.environ.get("AGENT_RUNS_DEFAULT_MODEL"):
            click.echo(NO_EMBEDDED_MODEL, err=True)
        return
    host = model_host()
    announced: list[dict | str] = []
    for name, options in models:
        try:
            spec = model_spec(name, options)
            if spec in announced:
                continue
            announced.append(spec)
            hello = host.start([spec], lease=False)
            info = host.load(spec)
        except (ValueError, ProviderError) as error:
            if str(error) not in announced:
                announced.append(str(error))
                click.echo(
                    f"Error: the embedded model cannot run: {error}\n"
                    "The server starts anyway; runs of agents on that model fail saying why.",
                    err=True,
                )
            continue
        system = hello.get("system", {})
        buffers = ", ".join(info.get("buffers") or []) or "CPU"
        click.echo(
            f"Embedded model {os.path.basename(info['path'])} loaded in {info['seconds']:.1f} s "
            f"by the model process (pid {hello.get('pid')}, llama-cpp-python "
            f"{system.get('llama_cpp_python')}): weights in {buffers} buffers.",
            err=True,
        )
        if system.get("amx_cpu") and not amx_opt_in():
            click.echo(CPU_AMX_NOTE, err=True)


@cli.command("serve")
@click.option(
    "--bind",
    "-b",
    default=None,
    help=f"Address to listen on (default AGENT_RUNS_BIND or {DEFAULT_BIND}).",
)
@click.option("--workers", "-w", type=int, default=None, help="Number of gunicorn workers.")
@click.option("--config", "-c", "config_path", default=None, help="A gunicorn config file.")
def serve_command(bind: str | None, workers: int | None, config_path: str | None) -> None:
    """Serve the API with gunicorn's gevent worker (the database is migrated first)."""
    bind = bind or os.environ.get("AGENT_RUNS_BIND") or DEFAULT_BIND
    _announce_embedded_model()
    _announce_first_token(bind)
    argv = [sys.executable, "-m", "gunicorn", "--bind", bind]
    config_file = _gunicorn_config(config_path)
    if config_file:
        argv += ["--config", config_file]
    else:
        argv += ["--worker-class", "gevent", "--worker-connections", "10000"]
    if workers:
        argv += ["--workers", str(workers)]
    argv.append("agent_runs:create_app()")
    sys.stdout.flush()
    os.execv(sys.executable, argv)
