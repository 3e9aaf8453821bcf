"""The baselines of bench/playground.py: a bare Flask app serving pages, and nothing else.

- ``GET /api/playground`` (and ``/api/playground/<name>``): the playground's own three files,
  taken from the installed package, with the same headers (its Content-Security-Policy and
  the rest) and the same revalidation (``max_age=0``, ETag) as ours: the same page without
  our application around it, so the difference to ours is what our app costs per request.
- ``GET /minimal``: one tiny HTML page with a token field and no script, style sheet or other
  request, revalidated the same way: what any page costs to load in this browser from this
  gunicorn.

    gunicorn -k gevent -w 1 --chdir bench page_baseline:app
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from flask import Flask, Response, abort, request, send_from_directory

app = Flask(__name__)

# Where the installed package keeps the playground, found without importing the package.
_spec = importlib.util.find_spec("agent_runs")
assert _spec is not None and _spec.origin is not None, "agent_runs is not installed"
FOLDER = Path(_spec.origin).resolve().parent / "playground"
ASSETS = ("playground.js", "playground.css")
# A copy of app/api/playground.py's headers: importing it would load the whole package here.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MINIMAL = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Minimal page</title>
  <link rel="icon" href="data:,">
</head>
<body>
  <label for="token">API token</label>
  <input id="token" type="password" autocomplete="off" autofocus>
</body>
</html>
"""


def _serve(name: str) -> Response:
    response = send_from_directory(FOLDER, name, max_age=0)
    response.headers.update(SECURITY_HEADERS)
    return response


@app.get("/api/playground")
def playground() -> Response:
    return _serve("index.html")


@app.get("/api/playground/<name>")
def playground_asset(name: str) -> Response:
    if name not in ASSETS:
        abort(404)
    return _serve(name)


@app.get("/minimal")
def minimal() -> Response:
    response = Response(MINIMAL, content_type="text/html; charset=utf-8")
    response.headers.update(SECURITY_HEADERS)
    # Revalidated like the playground's files, so warm loads compare like with like.
    response.cache_control.no_cache = True
    response.cache_control.max_age = 0
    response.add_etag()
    response.make_conditional(request)
    return response
