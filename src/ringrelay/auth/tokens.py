"""Bearer-token verification: registrar JWTs from the app's identity provider, and the Microsoft
Entra ID tokens Event Grid sends to a secured webhook.

Signature, expiry, issuer and audience checks are PyJWT's; this module adds where the keys come
from (a JWKS URL, cached and refreshed when an unknown `kid` appears, or a PEM file), which
algorithms are acceptable (asymmetric only: never `none`, never HS256 — a public key used as an
HMAC secret would let anyone sign), and the Entra-specific claim checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

from ringrelay.redact import fingerprint

log = logging.getLogger("ringrelay.auth")

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)

# Event Grid's service principal (learn.microsoft.com azure/event-grid/secure-webhook-delivery):
# Azure public cloud and Azure Government.
EVENT_GRID_APP_IDS = frozenset(
    {"4962773b-9cdb-44cf-a8bf-237846a00ab7", "54316b56-3481-47f9-8f30-0300f5542a7b"}
)
EVENT_GRID_ROLE = "AzureEventGridSecureWebhookSubscriber"


class AuthError(Exception):
    """The credential is missing or invalid; the message is safe to log (no token in it)."""


def check_algorithms(algorithms: Iterable[str]) -> list[str]:
    chosen = [a.strip() for a in algorithms if a.strip()]
    bad = [a for a in chosen if a not in ASYMMETRIC_ALGORITHMS]
    if bad or not chosen:
        raise ValueError(
            f"unsupported algorithm(s) {bad or chosen}: use asymmetric ones such as RS256, ES256"
        )
    return chosen


class JwksKeys:
    """Signing keys from a JWKS URL: fetched on first use, refreshed every `max_age` seconds and
    when a token names an unknown `kid` (no more often than `min_refresh_interval`)."""

    def __init__(
        self,
        url: str,
        *,
        max_age: float = 24 * 3600,
        min_refresh_interval: float = 30.0,
        ssl: Any = True,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._max_age = max_age
        self._min_refresh = min_refresh_interval
        self._ssl = ssl
        self._timeout = timeout
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def _refresh(self) -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout)) as session,
            session.get(self.url, ssl=self._ssl) as resp,
        ):
            if resp.status != 200:
                raise AuthError(f"JWKS at {self.url} answered HTTP {resp.status}")
            doc = await resp.json(content_type=None)
        keys: dict[str, PyJWK] = {}
        for entry in doc.get("keys", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type we cannot use; others may still serve
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys
        self._fetched_at = time.monotonic()
        self.fetches += 1

    async def key_for(self, kid: str) -> PyJWK:
        now = time.monotonic()
        stale = now - self._fetched_at > self._max_age
        if kid not in self._keys or stale:
            async with self._lock:
                # Another request may have refreshed while this one waited.
                now = time.monotonic()
                if (kid not in self._keys and now - self._fetched_at >= self._min_refresh) or (
                    now - self._fetched_at > self._max_age
                ):
                    try:
                        await self._refresh()
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        if not self._keys:
                            raise AuthError(f"cannot fetch JWKS: {type(exc).__name__}") from None
                        log.warning("JWKS refresh failed (%s); using cached keys", exc)
        key = self._keys.get(kid)
        if key is None:
            raise AuthError(f"unknown signing key id {kid!r}")
        return key


class PemKey:
    """One public key from a PEM file, whatever the token's `kid`."""

    def __init__(self, path: str | Path) -> None:
        self.pem = Path(path).read_bytes()

    async def key_for(self, kid: str) -> Any:
        return self.pem


@dataclass
class TokenVerifier:
    keys: JwksKeys | PemKey
    algorithms: Sequence[str]
    issuers: Sequence[str]
    audiences: Sequence[str]
    leeway: float = 30.0

    def __post_init__(self) -> None:
        self.algorithms = check_algorithms(self.algorithms)

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError(f"algorithm {alg!r} is not accepted")
        key = await self.keys.key_for(str(header.get("kid", "")))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=list(self.audiences),
                issuer=list(self.issuers),
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token ({type(exc).__name__})") from None
        return claims


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization is not a bearer token")
    return token.strip()


def entra_issuers(tenant_id: str) -> list[str]:
    # v1.0 and v2.0 access tokens (learn.microsoft.com entra identity-platform
    # access-token-claims-reference, "iss").
    return [
        f"https://sts.windows.net/{tenant_id}/",
        f"https://login.microsoftonline.com/{tenant_id}/v2.0",
    ]


def check_event_grid_claims(claims: dict[str, Any], tenant_id: str) -> None:
    """Entra claims that make a token Event Grid's: its app id, the tenant, the webhook role."""
    caller = claims.get("appid") or claims.get("azp")
    if caller not in EVENT_GRID_APP_IDS:
        raise AuthError("token was not issued to Event Grid")
    if "tid" in claims and claims["tid"] != tenant_id:
        raise AuthError("token from another tenant")
    roles = claims.get("roles")
    if roles is not None and EVENT_GRID_ROLE not in roles:
        raise AuthError(f"token lacks the {EVENT_GRID_ROLE} role")


def describe(token: str) -> str:
    """How a token may appear in logs."""
    return fingerprint(token)
