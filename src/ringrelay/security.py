"""Who may do what: registrar callers bound to their own ACS identity, webhook deliveries that
prove they come from our Event Grid subscription. Failures leave a counter and a log line."""

from __future__ import annotations

import hmac
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from ringrelay.auth import (
    AuthError,
    JwksKeys,
    PemKey,
    TokenVerifier,
    bearer_token,
    check_event_grid_claims,
    entra_issuers,
)
from ringrelay.config import Settings

log = logging.getLogger("ringrelay.security")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of the registry API; `identity` None means unrestricted."""

    identity: str | None
    subject: str


OPEN = Principal(identity=None, subject="anonymous (no registrar auth configured)")


def _ssl_for(ca_file: Any) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else True


def registrar_verifier(settings: Settings) -> TokenVerifier | None:
    if not settings.registrar_auth_enabled:
        return None
    assert settings.auth_issuer is not None and settings.auth_audience is not None
    keys: JwksKeys | PemKey
    if settings.auth_jwks_url:
        keys = JwksKeys(settings.auth_jwks_url, ssl=_ssl_for(settings.auth_jwks_ca_file))
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
        JwksKeys(url, ssl=_ssl_for(settings.auth_jwks_ca_file)),
        ["RS256"],
        entra_issuers(tenant),
        [settings.eventgrid_audience],
    )


class Guard:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registrar = registrar_verifier(settings)
        self.eventgrid = eventgrid_verifier(settings)
        secrets = [settings.webhook_secret, settings.webhook_secret_next]
        self._secrets = [s.get_secret_value().encode() for s in secrets if s is not None]

    # --- registrar -------------------------------------------------------------------------

    async def principal(self, request: Request) -> Principal:
        if self.registrar is None:
            return OPEN
        try:
            claims = await self.registrar.verify(bearer_token(request.headers.get("authorization")))
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
        return Principal(identity=identity, subject=str(claims.get("sub", identity)))

    async def authorize_identity(self, request: Request, identity: str) -> Principal:
        """The caller may act on `identity`'s devices only if its token names that identity."""
        principal = await self.principal(request)
        if principal.identity is not None and principal.identity != identity:
            log.info("registrar request for another identity refused")
            raise HTTPException(
                status_code=403, detail="the token's identity may only manage its own devices"
            )
        return principal

    # --- webhook ---------------------------------------------------------------------------

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
