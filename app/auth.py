"""Bearer tokens: each maps to an organisation, optionally a user, and a set of scopes.

A token is shown once, when it is created. The database keeps its SHA-256: the lookup is by
that digest, so nothing about the secret leaks through timing, and a stolen database holds no
usable token.
"""

from __future__ import annotations

import hashlib
import secrets

from .errors import ApiError
from .models import ApiToken, utcnow
from .runtime.runs import Principal

TOKEN_PREFIX = "ar_"
DEFAULT_SCOPES = ("runs:read", "runs:write")


def hash_token(secret: str) -> str:
    """Return the digest a token is stored and looked up by."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(
    org_id: str,
    user_id: str | None = None,
    *,
    name: str = "",
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
) -> tuple[ApiToken, str]:
    """Create a token; return its row and the secret, which is not stored anywhere."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.create(
        token_hash=hash_token(secret),
        prefix=secret[:10],
        name=name,
        org_id=org_id,
        user_id=user_id,
        scopes=" ".join(scopes),
    )
    return token, secret


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, headers={"WWW-Authenticate": 'Bearer realm="agent-runs"'})


def authenticate(authorization: str | None) -> Principal:
    """Resolve an Authorization header to a principal, or raise a 401."""
    if not authorization:
        raise unauthorized("Send an Authorization: Bearer <token> header.")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise unauthorized("The Authorization header must be 'Bearer <token>'.")
    token = ApiToken.get_or_none(ApiToken.token_hash == hash_token(secret))
    now = utcnow()
    if (
        token is None
        or token.revoked_at is not None
        or (token.expires_at is not None and token.expires_at <= now)
    ):
        raise unauthorized("The bearer token is not valid.")
    return Principal(
        org_id=token.org_id,
        user_id=token.user_id,
        scopes=frozenset(token.scopes.split()),
        token_id=token.id,
    )
