"""GET {prefix}/playground: a page to chat with the agents in a browser, with no build step.

Three files of the package (app/playground/) are served as they are; the page asks for a
token, keeps it in the tab's sessionStorage and sends it in headers only. Its streams read
/events with stream tokens (EventSource), so the page uses nothing but the public API.
AGENT_RUNS_PLAYGROUND=false turns it off (404).
"""

from __future__ import annotations

from pathlib import Path

from flask import Response, current_app, send_from_directory

from ..errors import ApiError
from . import bp

FOLDER = Path(__file__).resolve().parent.parent / "playground"
PAGE = "index.html"
ASSETS = ("playground.js", "playground.css")
# Scripts and styles of the page's own origin only, no inline code, no frames: a page that
# renders model output takes no chances. connect-src lets it call the API it came from.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _serve(name: str) -> Response:
    if not current_app.extensions["agent_runs"].config["AGENT_RUNS_PLAYGROUND"]:
        raise ApiError(404, "The playground is turned off (AGENT_RUNS_PLAYGROUND=false).")
    # Revalidated on every load (ETag), so a new version of the package shows at once.
    response = send_from_directory(FOLDER, name, max_age=0)
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("/playground")
def playground() -> Response:
    """Serve the playground's page; it needs no token (it asks for one)."""
    return _serve(PAGE)


@bp.get("/playground/<name>")
def playground_asset(name: str) -> Response:
    """Serve the playground's script or style sheet."""
    if name not in ASSETS:
        raise ApiError(404, f"The playground has no file {name!r}.")
    return _serve(name)
