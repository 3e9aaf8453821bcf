"""GET {prefix}/metrics: the server's Prometheus metrics, for a token with scope metrics."""

from __future__ import annotations

from flask import Response, current_app, request

from ..errors import ApiError
from . import bp


@bp.get("/metrics")
def metrics() -> Response:
    """Serve every worker's metrics in the Prometheus text format (or OpenMetrics)."""
    if current_app.extensions["agent_runs"].metrics is None:
        raise ApiError(404, "Metrics are turned off on this server (AGENT_RUNS_METRICS).")
    from ..metrics import exposition

    body, content_type = exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type)
