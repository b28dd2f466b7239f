"""Who may do what: registrar callers bound to their own ACS identity, webhook deliveries that
prove they come from our Event Grid subscription. Failures leave a counter and a log line."""

from __future__ import annotations

import hmac
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from ringrelay.auth.apikeys import PREFIX, secret_matches, split_key
from ringrelay.auth.ratelimit import RateLimiter, retry_after_header
from ringrelay.auth.tokens import (
    AuthError,
    JwksKeys,
    PemKey,
    TokenVerifier,
    bearer_token,
    check_event_grid_claims,
    entra_issuers,
)
from ringrelay.config import Settings
from ringrelay.store import Store

log = logging.getLogger("ringrelay.security")


ALL_SCOPES = frozenset({"register", "read", "admin"})


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of the registry API.

    A user (JWT) acts on its own `identity` only; a backend (API key) on any identity, within
    its scopes; with registrar authentication off, everyone is unrestricted.
    """

    identity: str | None
    subject: str
    scopes: frozenset[str] = ALL_SCOPES


OPEN = Principal(identity=None, subject="anonymous (registrar authentication is off)")


def _ssl_for(ca_file: Any) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else True


def registrar_verifier(settings: Settings) -> TokenVerifier | None:
    if not settings.registrar_auth_enabled:
        return None
    assert settings.auth_issuer is not None and settings.auth_audience is not None
    keys: JwksKeys | PemKey
    if settings.auth_jwks_url:
        keys = JwksKeys(
            settings.auth_jwks_url,
            ssl=_ssl_for(settings.auth_jwks_ca_file),
            min_refresh_interval=settings.auth_jwks_min_refresh_seconds,
        )
    else:
        assert settings.auth_public_key_file is not None
        keys = PemKey(settings.auth_public_key_file)
    return TokenVerifier(
        keys, settings.auth_algorithms, [settings.auth_issuer], [settings.auth_audience]
    )


def eventgrid_verifier(settings: Settings) -> TokenVerifier | None:
    tenant = settings.eventgrid_tenant_id
    if not tenant:
        return None
    assert settings.eventgrid_audience is not None
    url = (
        settings.eventgrid_jwks_url
        or f"https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys"
    )
    return TokenVerifier(
        JwksKeys(
            url,
            ssl=_ssl_for(settings.auth_jwks_ca_file),
            min_refresh_interval=settings.auth_jwks_min_refresh_seconds,
        ),
        ["RS256"],
        entra_issuers(tenant),
        [settings.eventgrid_audience],
    )


class Guard:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        # Fixed for the life of the process: revoking the last API key must not open the
        # registry, nor creating the first one close a quickstart server.
        self.required = settings.registrar_auth_required()
        self.per_identity = RateLimiter(settings.rate_limit_per_identity)
        self.per_client = RateLimiter(settings.rate_limit_per_client)
        self.registrar = registrar_verifier(settings)
        self.eventgrid = eventgrid_verifier(settings)
        secrets = [settings.webhook_secret, settings.webhook_secret_next]
        self._secrets = [s.get_secret_value().encode() for s in secrets if s is not None]

    # --- registrar -------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """What the start-up banner and log say about registrar authentication."""
        if not self.required:
            return (
                "off: anyone who can connect may register devices "
                "(RINGRELAY_AUTH_REQUIRED=true requires a JWT or an API key)"
            )
        ways = ["API keys"]
        if self.settings.auth_issuer is not None:
            ways.insert(0, f"JWTs from {self.settings.auth_issuer}")
        return f"required ({', '.join(ways)})"

    async def no_credential_can_pass(self) -> bool:
        """Auth is required, yet nothing could authenticate: no JWT issuer, no active key."""
        return self.registrar is None and await self.store.active_api_keys() == 0

    async def _api_key_principal(self, presented: str) -> Principal:
        parts = split_key(presented)
        record = await self.store.get_api_key(parts[0]) if parts else None
        if parts is None or record is None or not secret_matches(record, parts[1]):
            raise AuthError("unknown API key")
        if record.revoked_at is not None:
            raise AuthError("revoked API key")
        return Principal(None, f"api key {record.key_id} ({record.name})", frozenset(record.scopes))

    async def principal(self, request: Request) -> Principal:
        if not self.required:
            return OPEN
        authorization = request.headers.get("authorization")
        api_key = request.headers.get("x-api-key")
        try:
            if api_key is None and authorization and authorization[7:].startswith(PREFIX):
                api_key = bearer_token(authorization)
            if api_key is not None:
                return await self._api_key_principal(api_key)
            if await self.no_credential_can_pass():
                log.warning(
                    "registrar request refused: authentication is required and no API key is "
                    "active (and no JWT issuer is configured)"
                )
                raise HTTPException(
                    status_code=503,
                    detail=(
                        "registrar authentication is required (RINGRELAY_AUTH_REQUIRED) but "
                        "nothing can authenticate: no JWT issuer is configured and no API key "
                        "is active; an operator must create one (`ringrelay keys create`) or "
                        "configure RINGRELAY_AUTH_ISSUER"
                    ),
                )
            if self.registrar is None:
                raise AuthError("an API key is required (X-API-Key or Authorization: Bearer)")
            claims = await self.registrar.verify(bearer_token(authorization))
        except AuthError as exc:
            log.info("registrar request refused: %s", exc)
            raise HTTPException(
                status_code=401,
                detail=f"unauthenticated: {exc}",
                headers={"WWW-Authenticate": "Bearer"},
            ) from None
        identity = claims.get(self.settings.auth_identity_claim)
        if not isinstance(identity, str) or not identity:
            raise HTTPException(
                status_code=403,
                detail=f"token has no '{self.settings.auth_identity_claim}' identity claim",
            )
        return Principal(
            identity, str(claims.get("sub", identity)), frozenset({"register", "read"})
        )

    async def authorize(
        self, request: Request, scope: str, identity: str | None = None
    ) -> Principal:
        """The caller needs `scope` (or admin); a user may act on its own identity only.
        Every registrar request counts against its client address's rate; a request that is
        allowed also counts against the rate of the identity it acts as."""
        client = request.client.host if request.client else "unknown"
        self._limit(self.per_client, f"client:{client}")
        principal = await self.principal(request)
        if scope not in principal.scopes and "admin" not in principal.scopes:
            log.info("%s lacks the %s scope", principal.subject, scope)
            raise HTTPException(
                status_code=403, detail=f"this credential lacks the {scope!r} scope"
            )
        if identity is not None and principal.identity not in (None, identity):
            log.info("registrar request for another identity refused")
            raise HTTPException(
                status_code=403, detail="the token's identity may only manage its own devices"
            )
        # Counted only now, against the caller's own identity (a backend's key: the identity it
        # manages), so refused requests cannot use up someone else's allowance.
        limited = principal.identity or identity
        if limited is not None:
            self._limit(self.per_identity, f"identity:{limited}")
        return principal

    @staticmethod
    def _limit(limiter: RateLimiter, key: str) -> None:
        wait = limiter.check(key)
        if wait is not None:
            raise HTTPException(
                status_code=429,
                detail="too many requests",
                headers={"Retry-After": retry_after_header(wait)},
            )

    async def authorize_identity(self, request: Request, identity: str) -> Principal:
        write = request.method not in ("GET", "HEAD")
        return await self.authorize(request, "register" if write else "read", identity)

    # --- webhook ---------------------------------------------------------------------------

    @property
    def needs_secret(self) -> bool:
        return bool(self._secrets)

    def webhook_secret_ok(self, given: str | None) -> bool:
        if not self._secrets:
            return True
        if given is None:
            return False
        candidate = given.encode()
        # Compare with every secret (no early exit) in constant time.
        results = [hmac.compare_digest(candidate, secret) for secret in self._secrets]
        return any(results)

    async def webhook_token_error(self, authorization: str | None) -> str | None:
        if self.eventgrid is None:
            return None
        assert self.settings.eventgrid_tenant_id is not None
        try:
            claims = await self.eventgrid.verify(bearer_token(authorization))
            check_event_grid_claims(claims, self.settings.eventgrid_tenant_id)
        except AuthError as exc:
            return str(exc)
        return None
