"""One error shape for the whole API: RFC 9457 problem details as application/problem+json."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, json
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from .schemas import field_messages

PROBLEM_MIMETYPE = "application/problem+json"


class ApiError(Exception):
    """An error the API answers with a problem document of the given status."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.errors = errors
        self.headers = headers or {}


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    errors: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Return a problem+json response."""
    from werkzeug.http import HTTP_STATUS_CODES

    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTP_STATUS_CODES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = _string_keys(errors)
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIMETYPE)
    response.headers.update(headers or {})
    return response


def _string_keys(errors: Any) -> Any:
    """Return marshmallow errors with every key a string, as in the JSON that carries them.

    Errors of list items are keyed by index (``{"media": {0: ..., "_schema": ...}}``); mixed
    with names, int keys would make the sorted JSON encoding fail.
    """
    if isinstance(errors, dict):
        return {str(key): _string_keys(value) for key, value in errors.items()}
    if isinstance(errors, list):
        return [_string_keys(value) for value in errors]
    return errors


def validation_problem(errors: dict[str, Any], where: str = "body") -> Response:
    """Return the 422 for marshmallow errors; its detail names each field and what is wrong."""
    reasons = "; ".join(f"{path}: {message}" for path, message in field_messages(errors))
    return problem(422, f"Invalid request {where}. {reasons}", errors=errors)


def handle_api_error(error: ApiError) -> Response:
    return problem(
        error.status, error.detail, title=error.title, errors=error.errors, headers=error.headers
    )


def handle_validation_error(error: ValidationError) -> Response:
    from flask import request

    messages = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
    return validation_problem(messages, "body" if request.method in ("POST", "PUT") else "query")


def handle_http_exception(error: HTTPException) -> Response:
    """Render werkzeug's HTTP errors (404, 405, 413, malformed JSON...) as problem documents."""
    response = problem(error.code or 500, error.description or error.name)
    if error.code == 405 and hasattr(error, "valid_methods") and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def handle_unexpected_error(error: Exception) -> Response:
    """Log what escaped the views and answer a problem document rather than an HTML page."""
    from flask import current_app

    if isinstance(error, HTTPException):
        return handle_http_exception(error)
    current_app.logger.exception("unhandled error")
    return problem(500, "The server failed to handle this request.")


def register_error_handlers(target: Any) -> None:
    """Register the problem+json handlers on a blueprint or an application."""
    target.register_error_handler(ApiError, handle_api_error)
    target.register_error_handler(ValidationError, handle_validation_error)
    target.register_error_handler(HTTPException, handle_http_exception)


def register_app_error_handlers(app: Flask) -> None:
    """Make the standalone server answer every error, routing ones included, as problem+json."""
    register_error_handlers(app)
    app.register_error_handler(Exception, handle_unexpected_error)
