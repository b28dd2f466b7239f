"""APNs direct: token-based HTTP/2 provider API, one provider per configured app.

Facts from Apple's "Sending notification requests to APNs", "Establishing a token-based connection
to APNs" and "Handling notification responses from APNs" (../shared/notes/protocols.md §3).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ringrelay.models import DeliveryStatus, Platform, PushKind
from ringrelay.payloads import apns_collapse_id, apns_size_error, encode
from ringrelay.providers import PushRequest, PushResult, parse_retry_after
from ringrelay.providers.http2 import (
    Header,
    Http2CertificateError,
    Http2ConnectionLost,
    Http2Error,
    Http2Pool,
)

log = logging.getLogger("ringrelay.apns")

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
PORT = 443

# Provider tokens: "Refresh your token no more than once every 20 minutes and no less than once
# every 60 minutes"; older than an hour is rejected (403 ExpiredProviderToken). Renewing at 40
# minutes keeps the clock-skew margin both ways.
TOKEN_RENEW_AFTER = 40 * 60
TOKEN_MIN_AGE = 20 * 60


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The team's `.p8` key: a PKCS#8 PEM P-256 key, for ES256."""
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("not an EC P-256 private key (download the .p8 from Apple again)")
    return key


class ProviderToken:
    """The ES256 JWT for one signing key, shared by every connection and app that uses the key."""

    def __init__(self, team_id: str, key_id: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.team_id = team_id
        self.key_id = key_id
        self._key = key
        self._header = ""
        self._issued_at = 0.0
        self.minted = 0

    def header(self, now: float) -> str:
        if now - self._issued_at >= TOKEN_RENEW_AFTER:
            self._mint(now)
        return self._header

    def renew_if_allowed(self, now: float) -> bool:
        """After 403 ExpiredProviderToken: a new token, unless the current one is under 20 min
        old (then the clock is wrong and renewing would earn 429 TooManyProviderTokenUpdates)."""
        if now - self._issued_at < TOKEN_MIN_AGE:
            return False
        self._mint(now)
        return True

    def _mint(self, now: float) -> None:
        token = jwt.encode(
            {"iss": self.team_id, "iat": int(now)},
            self._key,
            algorithm="ES256",
            headers={"kid": self.key_id},
        )
        self._header = f"bearer {token}"
        self._issued_at = now
        self.minted += 1


@dataclass(frozen=True, slots=True)
class ApnsOutcome:
    status: DeliveryStatus
    remove_token: bool = False


# (status, reason) -> what it means for the push and the token. Reasons from Apple's table in
# "Handling notification responses from APNs"; token removal as Sygnal's TOKEN_ERRORS, except that
# DeviceTokenNotForTopic/TopicDisallowed point at our configuration (wrong app), not a dead token.
_REASONS: dict[str, ApnsOutcome] = {
    "BadDeviceToken": ApnsOutcome(DeliveryStatus.REJECTED, remove_token=True),
    "Unregistered": ApnsOutcome(DeliveryStatus.REJECTED, remove_token=True),
    "ExpiredToken": ApnsOutcome(DeliveryStatus.REJECTED, remove_token=True),
    "DeviceTokenNotForTopic": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "TopicDisallowed": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "BadTopic": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "MissingTopic": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "InvalidProviderToken": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "MissingProviderToken": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "ExpiredProviderToken": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "Forbidden": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "BadCertificate": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "BadCertificateEnvironment": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "BadEnvironmentKeyIdInToken": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "BadEnvironmentKeyInToken": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "UnrelatedKeyIdInToken": ApnsOutcome(DeliveryStatus.CONFIG_ERROR),
    "IdleTimeout": ApnsOutcome(DeliveryStatus.TRANSIENT),
    "TooManyRequests": ApnsOutcome(DeliveryStatus.TRANSIENT),
    "TooManyProviderTokenUpdates": ApnsOutcome(DeliveryStatus.TRANSIENT),
    "InternalServerError": ApnsOutcome(DeliveryStatus.TRANSIENT),
    "ServiceUnavailable": ApnsOutcome(DeliveryStatus.TRANSIENT),
    "Shutdown": ApnsOutcome(DeliveryStatus.TRANSIENT),
}


# Apple: after these the connection is idle-closed (IdleTimeout), unusable
# (TooManyProviderTokenUpdates), shutting down (503), or tied to another key
# (UnrelatedKeyIdInToken): continue on a new connection.
_NEW_CONNECTION_REASONS = (
    "IdleTimeout",
    "TooManyProviderTokenUpdates",
    "ServiceUnavailable",
    "Shutdown",
    "UnrelatedKeyIdInToken",
)


def classify(status: int, body: bytes, apns_id: str) -> tuple[PushResult, float | None]:
    """APNs answer -> result; also returns the 410 timestamp (unix seconds) when there is one."""
    if status == 200:
        return PushResult(DeliveryStatus.ACCEPTED, http_status=200, provider_ref=apns_id), None
    reason = ""
    timestamp: float | None = None
    try:
        parsed = orjson.loads(body) if body else {}
        if isinstance(parsed, dict):
            reason = str(parsed.get("reason", ""))[:100]
            if isinstance(parsed.get("timestamp"), int | float):
                timestamp = parsed["timestamp"] / 1000.0  # milliseconds since the epoch
    except orjson.JSONDecodeError:
        pass
    detail = f"APNs {status} {reason}".strip()
    known = _REASONS.get(reason)
    if known is not None:
        outcome = known
    elif status == 403:
        outcome = ApnsOutcome(DeliveryStatus.CONFIG_ERROR)
    elif status == 429 or status >= 500:
        outcome = ApnsOutcome(DeliveryStatus.TRANSIENT)
    elif status == 410:  # no reason given: still "no longer active for the topic"
        outcome = ApnsOutcome(DeliveryStatus.REJECTED, remove_token=True)
    else:  # 400 request errors, 404, 405, 413: a resend would fail the same way
        outcome = ApnsOutcome(DeliveryStatus.REJECTED)
    result = PushResult(
        outcome.status,
        detail,
        http_status=status,
        provider_ref=apns_id,
        remove_token=outcome.remove_token,
    )
    return result, timestamp


def endpoint_of(environment: str, endpoint: str | None) -> tuple[str, int]:
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parts.hostname:
            raise ValueError(f"endpoint {endpoint!r} has no host")
        return parts.hostname, parts.port or PORT
    return (PRODUCTION_HOST if environment == "production" else SANDBOX_HOST), PORT


class ApnsProvider:
    """Pushes to one app's devices over a small pool of long-lived HTTP/2 connections."""

    name = "apns"

    def __init__(
        self,
        *,
        app_id: str,
        bundle_id: str,
        token: ProviderToken,
        environment: str = "production",
        endpoint: str | None = None,
        ca_file: str | None = None,
        timeout: float = 5.0,
        max_connections: int = 8,
        max_in_flight: int = 1000,
    ) -> None:
        self.app_id = app_id
        self.bundle_id = bundle_id
        self.token = token
        self.host, self.port = endpoint_of(environment, endpoint)
        self.description = f"APNs {environment} ({bundle_id} via {self.host}:{self.port})"
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        authority = self.host if self.port == PORT else f"{self.host}:{self.port}"
        self.pool = Http2Pool(f"https://{authority}", ca_file, max_connections=max_connections)
        self._voip: list[Header] = [
            ("apns-push-type", "voip", False),
            ("apns-topic", f"{bundle_id}.voip", False),
            ("apns-priority", "10", False),
        ]
        self._alert: list[Header] = [
            ("apns-push-type", "alert", False),
            ("apns-topic", bundle_id, False),
            ("apns-priority", "10", False),
        ]

    def supports(self, platform: Platform) -> bool:
        return platform is Platform.APNS

    async def start(self) -> None:
        pass  # connections open on the first push; Apple allows one stream until it succeeds

    async def close(self) -> None:
        await self.pool.close()

    def _headers(self, request: PushRequest, now: float) -> list[Header]:
        voip = request.registration.push_kind is PushKind.VOIP
        headers = [
            # Apple: send authorization and the per-push values as literals never indexed.
            ("authorization", self.token.header(now), True),
            *(self._voip if voip else self._alert),
            # Never deliver after the phone stopped ringing (0 would mean "once, now or never").
            ("apns-expiration", str(int(request.expires_at)), True),
            ("apns-id", request.push_id, True),
        ]
        collapse_id = request.content.collapse_id
        if collapse_id is not None:
            headers.append(("apns-collapse-id", apns_collapse_id(collapse_id), True))
        return headers

    def _certificate_failure(self, exc: Http2CertificateError) -> PushResult:
        """The endpoint's certificate did not verify: our configuration, settled at once."""
        result = PushResult(
            DeliveryStatus.CONFIG_ERROR,
            f"TLS certificate of APNs ({exc.where}) not trusted ({exc.error.verify_message}): "
            f"check the endpoint, or trust the CA that signed it with ca_file in the [[apns]] "
            f"app {self.app_id}",
        )
        log.error("APNs app %s: %s", self.app_id, result.reason)
        return result

    async def send(self, request: PushRequest) -> PushResult:
        voip = request.registration.push_kind is PushKind.VOIP
        body = encode(request.content.apns_payload())
        too_large = apns_size_error(body, voip)
        if too_large is not None:
            return PushResult(DeliveryStatus.REJECTED, too_large)
        path = "/3/device/" + request.registration.token
        renewed = False
        while True:
            now = time.time()
            try:
                response = await self.pool.request(
                    "POST",
                    path,
                    self._headers(request, now),
                    body,
                    min(self.timeout, request.timeout),
                )
            except TimeoutError:
                return PushResult(DeliveryStatus.TRANSIENT, "timeout")
            except Http2CertificateError as exc:
                return self._certificate_failure(exc)
            except Http2ConnectionLost as exc:
                return PushResult(DeliveryStatus.TRANSIENT, str(exc))
            except Http2Error as exc:
                return PushResult(DeliveryStatus.TRANSIENT, f"HTTP/2 error: {exc}")
            apns_id = response.headers.get("apns-id") or request.push_id
            result, timestamp = classify(response.status, response.body, apns_id)
            if result.reason.endswith("ExpiredProviderToken") and not renewed:
                renewed = True
                if self.token.renew_if_allowed(time.time()):
                    continue  # once, with a fresh token
                result.reason += " (token is under 20 minutes old: check this server's clock)"
            if result.reason.endswith(_NEW_CONNECTION_REASONS):
                response.lane.retire()  # the retry goes out on a fresh connection
            if result.status is DeliveryStatus.TRANSIENT:
                result.retry_after = parse_retry_after(response.headers.get("retry-after"))
            result.removed_after = timestamp
            if result.status is DeliveryStatus.CONFIG_ERROR:
                log.error("APNs app %s: %s", self.app_id, result.reason)
            return result
