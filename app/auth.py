"""Who a request acts for: bearer tokens of our own, or JWTs from an identity provider.

Our tokens map to an organisation, optionally a user, scopes and an optional expiry. A token
is shown once, when it is created. The database keeps its SHA-256: the lookup is by that
digest, so nothing about the secret leaks through timing, and a stolen database holds no
usable token. Secrets are never logged.

JWTs are accepted when the server is configured with a key (AGENT_RUNS_JWT_SECRET for HS256,
AGENT_RUNS_JWT_PUBLIC_KEY for RS256): signature, ``exp``, and ``aud``/``iss`` when
configured are checked by PyJWT, and claims map to organisation, user and scopes.

Stream tokens are JWTs of our own, for the one place a token must travel in a URL: a
browser's EventSource, which cannot send headers, reading GET .../runs/{runId}/events with
``?access_token=`` (RFC 6750 section 2.3). Each is read-only, bound to one run and short-lived;
they are signed (HS256) with a key a migration stored in the database, so every worker and
host verifies what any of them issued, and no setting is needed.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from marshmallow import ValidationError

from .db import Statement
from .errors import ApiError
from .models import ApiToken, SigningKey, utcnow
from .runtime.runs import Principal
from .schemas import text

# The longest organisation or user id the tables hold (their columns' max_length).
MAX_ID_LENGTH = 128

TOKEN_PREFIX = "ar_"
# metrics: GET {prefix}/metrics alone, for a Prometheus server's scrapes.
SCOPES = ("runs:read", "runs:write", "metrics", "admin")
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
    expires_at: datetime.datetime | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; return its row and the secret, which is not stored anywhere."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {', '.join(SCOPES)}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.create(
        token_hash=hash_token(secret),
        prefix=secret[:10],
        name=name,
        org_id=org_id,
        user_id=user_id,
        scopes=" ".join(scopes),
        expires_at=expires_at,
    )
    return token, secret


@dataclass(frozen=True)
class JWTSettings:
    """How JWT bearer tokens are verified and mapped to a principal."""

    key: str
    algorithm: str
    audience: str | None = None
    issuer: str | None = None
    org_claim: str = "org_id"
    user_claim: str = "sub"
    scopes_claim: str = "scope"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> JWTSettings | None:
        """Return the settings if the server is configured for JWTs, else None."""
        secret = config.get("AGENT_RUNS_JWT_SECRET")
        public_key = config.get("AGENT_RUNS_JWT_PUBLIC_KEY")
        if not secret and not public_key:
            return None
        if public_key and not public_key.lstrip().startswith("-----BEGIN"):
            with open(public_key, encoding="utf-8") as handle:  # a path to a PEM file
                public_key = handle.read()
        return cls(
            key=str(public_key or secret),
            algorithm="RS256" if public_key else "HS256",
            audience=config.get("AGENT_RUNS_JWT_AUDIENCE") or None,
            issuer=config.get("AGENT_RUNS_JWT_ISSUER") or None,
            org_claim=config.get("AGENT_RUNS_JWT_ORG_CLAIM") or "org_id",
            user_claim=config.get("AGENT_RUNS_JWT_USER_CLAIM") or "sub",
            scopes_claim=config.get("AGENT_RUNS_JWT_SCOPES_CLAIM") or "scope",
        )


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, headers={"WWW-Authenticate": 'Bearer realm="agent-runs"'})


def authenticate(authorization: str | None, jwt_settings: JWTSettings | None = None) -> Principal:
    """Resolve an Authorization header to a principal, or raise a 401."""
    if not authorization:
        raise unauthorized("Send an Authorization: Bearer <token> header.")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise unauthorized("The Authorization header must be 'Bearer <token>'.")
    if jwt_settings is not None and secret.count(".") == 2:
        return _from_jwt(secret, jwt_settings)
    return _from_api_token(secret)


# Every request looks its token up: the statement is built once (see Statement).
_TOKEN_BY_HASH = Statement(
    lambda digest: ApiToken.select(
        ApiToken.id,
        ApiToken.org_id,
        ApiToken.user_id,
        ApiToken.scopes,
        ApiToken.expires_at,
        ApiToken.revoked_at,
    ).where(ApiToken.token_hash == digest)
)


def _from_api_token(secret: str) -> Principal:
    digest = hash_token(secret)
    found = _TOKEN_BY_HASH.rows(digest=digest)
    token = found[0] if found else None
    if (
        token is None
        or token["revoked_at"] is not None
        or (token["expires_at"] is not None and token["expires_at"] <= utcnow())
    ):
        raise unauthorized("The bearer token is not valid.")
    return Principal(
        org_id=token["org_id"],
        user_id=token["user_id"],
        scopes=frozenset(token["scopes"].split()),
        token_id=token["id"],
        subject=f"token:{token['id']}",
    )


def _from_jwt(encoded: str, settings: JWTSettings) -> Principal:
    try:
        claims = jwt.decode(
            encoded,
            settings.key,
            algorithms=[settings.algorithm],
            audience=settings.audience,
            issuer=settings.issuer,
            options={"require": ["exp"], "verify_aud": settings.audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized("The bearer token has expired.") from None
    except jwt.InvalidTokenError as error:
        raise unauthorized(f"The bearer token is not valid: {error}.") from None
    org_id = _claimed_id(claims, settings.org_claim)
    if org_id is None:
        raise unauthorized(f"The bearer token has no {settings.org_claim!r} claim.")
    user_id = _claimed_id(claims, settings.user_claim)
    raw_scopes = claims.get(settings.scopes_claim, " ".join(DEFAULT_SCOPES))
    if isinstance(raw_scopes, str):
        scopes = raw_scopes.split()
    elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
        scopes = raw_scopes
    else:
        raise unauthorized(
            f"The bearer token's {settings.scopes_claim!r} claim must be a string or a list "
            "of strings."
        )
    return Principal(
        org_id=org_id,
        user_id=user_id,
        scopes=frozenset(scopes),
        subject=f"jwt:{org_id}:{user_id or ''}",
    )


def _claimed_id(claims: Mapping[str, Any], claim: str) -> str | None:
    """An organisation or user id from a JWT claim (a number is taken as its digits); None if
    absent or empty. An id the database could not store answers 401, not a failure later."""
    value = claims.get(claim)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise unauthorized(f"The bearer token's {claim!r} claim must be a string.")
    value = str(value)
    try:
        text(value)
    except ValidationError:
        valid = False
    else:
        valid = len(value) <= MAX_ID_LENGTH
    if not valid:
        raise unauthorized(
            f"The bearer token's {claim!r} claim must be at most {MAX_ID_LENGTH} characters "
            "of valid text."
        )
    return value


def require_scope(principal: Principal, scope: str) -> None:
    """Refuse (403) a request whose token lacks the scope it needs; admin has them all."""
    if scope not in principal.scopes and "admin" not in principal.scopes:
        raise ApiError(403, f"This token lacks the {scope!r} scope this request needs.")


# Stream tokens: the audience says what a token is for; a token of ours for anything else,
# or anyone else's JWT, fails the check.
STREAM_TOKEN_AUDIENCE = "agent-runs:run-events"
STREAM_TOKEN_KEY = "stream_token"


def stream_token_key() -> str:
    """Return the key stream tokens are signed with (call within a connection)."""
    row = SigningKey.get_or_none(SigningKey.name == STREAM_TOKEN_KEY)
    if row is None:
        # Made by migration 0006; a database migrated by other means gets one now (the first
        # writer's key wins a race: an insert that finds one ignores itself).
        (
            SigningKey.insert(name=STREAM_TOKEN_KEY, secret=secrets.token_urlsafe(32))
            .on_conflict_ignore()
            .execute()
        )
        row = SigningKey.get(SigningKey.name == STREAM_TOKEN_KEY)
    return row.secret


def issue_stream_token(
    principal: Principal, run_id: str, key: str, ttl: float
) -> tuple[str, datetime.datetime]:
    """Return a read-only token for one run's events, and when it expires (naive UTC)."""
    issued = time.time()
    # JWT times are whole seconds: rounded up, a token lives at least ``ttl`` seconds.
    expires = math.ceil(issued + ttl)
    claims: dict[str, Any] = {
        "aud": STREAM_TOKEN_AUDIENCE,
        "run": run_id,
        "org": principal.org_id,
        "usr": principal.user_id,
        "sub": principal.subject,
        "iat": int(issued),
        "exp": expires,
    }
    if principal.token_id is not None:
        claims["tid"] = principal.token_id
    expires_at = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
    return jwt.encode(claims, key, algorithm="HS256"), expires_at.replace(tzinfo=None)


_TOKEN_BY_ID = Statement(
    lambda token_id: ApiToken.select(ApiToken.expires_at, ApiToken.revoked_at).where(
        ApiToken.id == token_id
    )
)


def authenticate_stream_token(token: str, run_id: str, key: str) -> Principal:
    """Resolve an ``access_token`` of a URL to the principal it reads ``run_id``'s events as.

    401 for anything but a valid stream token (an API token above all: those never belong in
    a URL), 404 for a stream token of another run, as for a run the caller cannot see.
    """
    if token.startswith(TOKEN_PREFIX):
        raise unauthorized(
            "An API token is never accepted in a URL: send it in the Authorization header, "
            "or get a stream token from POST .../events/token for access_token."
        )
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            audience=STREAM_TOKEN_AUDIENCE,
            options={"require": ["exp", "aud", "run", "org", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized(
            "The stream token has expired: get a new one from POST .../events/token."
        ) from None
    except jwt.InvalidTokenError:
        raise unauthorized(
            "access_token must be a stream token from POST .../events/token."
        ) from None
    if claims["run"] != run_id:
        raise ApiError(404, "This stream token is for another run.")
    token_id = claims.get("tid")
    if token_id is not None:
        # The API token that issued it must still be valid: revoking it cuts its stream tokens.
        issuer = _TOKEN_BY_ID.rows(token_id=token_id)
        if (
            not issuer
            or issuer[0]["revoked_at"] is not None
            or (issuer[0]["expires_at"] is not None and issuer[0]["expires_at"] <= utcnow())
        ):
            raise unauthorized("The token that issued this stream token is no longer valid.")
    return Principal(
        org_id=claims["org"],
        user_id=claims.get("usr"),
        scopes=frozenset({"runs:read"}),
        token_id=token_id,
        subject=claims["sub"],
    )
