"""Who a request acts for: bearer tokens of our own, or JWTs from an identity provider.

Our tokens map to an organisation, optionally a user, scopes and an optional expiry. A token
is shown once, when it is created. The database keeps its SHA-256: the lookup is by that
digest, so nothing about the secret leaks through timing, and a stolen database holds no
usable token. Secrets are never logged.

JWTs are accepted when the server is configured with a key (AGENT_RUNS_JWT_SECRET for HS256,
AGENT_RUNS_JWT_PUBLIC_KEY for RS256): signature, ``exp``, and ``aud``/``iss`` when
configured are checked by PyJWT, and claims map to organisation, user and scopes.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from marshmallow import ValidationError

from .db import Statement
from .errors import ApiError
from .models import ApiToken, utcnow
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
