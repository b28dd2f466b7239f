"""FCM HTTP v1 direct: one provider per Firebase project (service account).

Endpoint, body and error model from firebase.google.com/docs/reference/fcm/rest/v1/projects.messages
and /docs/reference/fcm/rest/v1/ErrorCode (../shared/notes/protocols.md §4).

Over HTTP/2 (`http2.py`, the APNs client), as Google's front ends offer it and as FCM senders
use it for volume (e.g. firebase-php 7.10, "FCM Messages are now sent ... with HTTP/2"): FCM v1
takes one message per request, so many concurrent requests share a few connections instead of
one connection each. Measured on this project's machine: relay CPU at 2,000 events/s 70-78 %
against 76-81 % on the HTTP/1.1 hub path, alternating runs (bench/README, "Session 6").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import urllib3
from google.auth.exceptions import GoogleAuthError, RefreshError, TransportError
from google.auth.transport.urllib3 import Request as Urllib3Request
from google.oauth2 import service_account

from ringrelay.models import DeliveryStatus, Platform
from ringrelay.payloads import FCM_MAX_BYTES, fcm_size_error, fcm_v1_message
from ringrelay.providers import (
    PushRequest,
    PushResult,
    certificate_error,
    certificate_result,
    parse_retry_after,
)
from ringrelay.providers.http2 import (
    Http2Answer,
    Http2CertificateError,
    Http2ConnectionLost,
    Http2Error,
    Http2Pool,
)

log = logging.getLogger("ringrelay.fcm")

DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
# The narrowest scope that can send (FCM "Authorize send requests").
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# Renew the access token this long before it expires, in the background.
REFRESH_MARGIN = 300.0

_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


def read_service_account(path: Path) -> dict[str, Any]:
    info = json.loads(path.read_text())
    if not isinstance(info, dict):
        raise ValueError("not a JSON object")
    missing = [
        k for k in ("project_id", "client_email", "private_key", "token_uri") if not info.get(k)
    ]
    if missing:
        raise ValueError(f"service account file lacks {', '.join(missing)}")
    return info


class AccessToken:
    """OAuth2 access token from google-auth, refreshed in a worker thread (google-auth's transports
    are blocking) before it expires, one refresh at a time."""

    def __init__(self, info: dict[str, Any], ca_file: str | None) -> None:
        # google-auth is untyped; the credentials sign the JWT assertion and keep the token.
        self.credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[SCOPE]
        )
        self._http = urllib3.PoolManager(ca_certs=ca_file) if ca_file else urllib3.PoolManager()
        self._expires_at = 0.0  # unix time
        self._refreshing: asyncio.Task[None] | None = None
        self.refreshes = 0

    def _refresh_blocking(self) -> None:
        self.credentials.refresh(Urllib3Request(self._http))  # type: ignore[no-untyped-call]

    async def _refresh(self) -> None:
        await asyncio.to_thread(self._refresh_blocking)
        expiry = self.credentials.expiry  # naive UTC datetime
        self._expires_at = (
            expiry.replace(tzinfo=UTC).timestamp() if expiry is not None else time.time() + 3000
        )
        self.refreshes += 1

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
            self._refreshing.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._refreshing

    async def header(self) -> str:
        now = time.time()
        if now >= self._expires_at - 30 or self.credentials.token is None:
            await asyncio.shield(self._start_refresh())
        elif now >= self._expires_at - REFRESH_MARGIN:
            self._start_refresh()  # in the background; the current token is still good
        return f"Bearer {self.credentials.token}"

    def invalidate(self, refused: str) -> None:
        """Refresh before the next push, unless the refused header is no longer the current one:
        concurrent pushes refused with the old token must not throw away its replacement (each
        would cost another token exchange)."""
        if self.credentials.token is not None and refused == f"Bearer {self.credentials.token}":
            self._expires_at = 0.0


def classify(status: int, body: bytes, retry_after: float | None) -> PushResult:
    """FCM v1 answer -> result. Token removal per FCM "Manage registration tokens"."""
    if status == 200:
        name = None
        try:
            name = orjson.loads(body).get("name")
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return PushResult(DeliveryStatus.ACCEPTED, http_status=200, provider_ref=name)
    rpc_status, error_code, message, fields = "", "", "", []
    try:
        error = orjson.loads(body).get("error", {})
        rpc_status = str(error.get("status", ""))
        message = str(error.get("message", ""))[:200]
        for detail in error.get("details", []) or []:
            if detail.get("@type") == _FCM_ERROR_TYPE:
                error_code = str(detail.get("errorCode", ""))
            elif detail.get("@type") == _BAD_REQUEST_TYPE:
                fields += [str(v.get("field", "")) for v in detail.get("fieldViolations", [])]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    code = error_code or rpc_status
    reason = f"FCM {status} {code}".strip() + (f": {message}" if message else "")
    remove = False
    if error_code == "UNREGISTERED" or (status == 404 and not error_code):
        verdict, remove = DeliveryStatus.REJECTED, True
    elif error_code == "SENDER_ID_MISMATCH":
        verdict, remove = DeliveryStatus.REJECTED, True  # the token belongs to another project
    elif status == 400:
        # Only a violation naming the token proves the token bad; anything else is our payload.
        remove = any(f in ("message.token", "message.fid") for f in fields)
        verdict = DeliveryStatus.REJECTED
    elif error_code in ("THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR") or status in (401, 403):
        verdict = DeliveryStatus.CONFIG_ERROR
    elif status == 429 or status >= 500:
        verdict = DeliveryStatus.TRANSIENT
    else:
        verdict = DeliveryStatus.REJECTED
    return PushResult(
        verdict, reason, http_status=status, retry_after=retry_after, remove_token=remove
    )


class FcmProvider:
    name = "fcm"

    def __init__(
        self,
        *,
        app_id: str,
        service_account_file: Path,
        endpoint: str | None = None,
        ca_file: str | None = None,
        timeout: float = 5.0,
        max_connections: int = 8,
        max_in_flight: int = 1000,
    ) -> None:
        info = read_service_account(service_account_file)
        self.app_id = app_id
        self.project_id = str(info["project_id"])
        origin = urlsplit((endpoint or DEFAULT_ENDPOINT).rstrip("/"))
        if origin.scheme != "https" or not origin.hostname:
            raise ValueError(f"FCM endpoint must be https://host[:port], not {endpoint!r}")
        _ = origin.port  # a malformed port raises ValueError here, at start-up
        self.description = f"FCM v1 (project {self.project_id} via {origin.netloc})"
        self.token = AccessToken(info, ca_file)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.pool = Http2Pool(f"https://{origin.netloc}", ca_file, max_connections=max_connections)
        self._path = f"/v1/projects/{self.project_id}/messages:send"

    def supports(self, platform: Platform) -> bool:
        return platform is Platform.FCM

    async def start(self) -> None:
        pass  # connections open on the first push

    async def close(self) -> None:
        await self.pool.close()

    def _certificate_failure(self, exc: Http2CertificateError) -> PushResult:
        """The endpoint's certificate did not verify: our configuration, settled at once."""
        result = PushResult(
            DeliveryStatus.CONFIG_ERROR,
            f"TLS certificate of FCM ({exc.where}) not trusted ({exc.error.verify_message}): "
            f"check the endpoint, or trust the CA that signed it with ca_file in the [[fcm]] "
            f"app {self.app_id}",
        )
        log.error("FCM app %s: %s", self.app_id, result.reason)
        return result

    async def post_message(
        self, authorization: str, payload: bytes, time_limit: float
    ) -> Http2Answer:
        """One messages:send request (the push, or `ringrelay doctor`'s validate_only probe)."""
        return await self.pool.request(
            "POST",
            self._path,
            (("content-type", "application/json", False), ("authorization", authorization, True)),
            payload,
            time_limit,
        )

    async def send(self, request: PushRequest) -> PushResult:
        reg = request.registration
        body = fcm_v1_message(request.content, request.expires_at - time.time(), reg.token)
        payload = orjson.dumps(body)
        # FCM's limit is on the data's keys and values: within it whenever the whole message is.
        if len(payload) > FCM_MAX_BYTES:
            too_large = fcm_size_error(body["message"])
            if too_large is not None:
                return PushResult(DeliveryStatus.REJECTED, too_large)
        for attempt in (1, 2):
            try:
                authorization = await self.token.header()
            except (RefreshError, ValueError) as exc:
                # The token endpoint refused our assertion: wrong or revoked key.
                log.error("FCM app %s: OAuth token refused: %s", self.app_id, exc)
                return PushResult(DeliveryStatus.CONFIG_ERROR, f"OAuth token refused: {exc}")
            except (TransportError, GoogleAuthError, OSError) as exc:
                bad_certificate = certificate_error(exc)
                if bad_certificate is not None:
                    result = certificate_result(
                        "the OAuth token endpoint",
                        bad_certificate,
                        f"ca_file in the [[fcm]] app {self.app_id}",
                    )
                    log.error("FCM app %s: %s", self.app_id, result.reason)
                    return result
                return PushResult(DeliveryStatus.TRANSIENT, f"OAuth token endpoint: {exc}")
            try:
                resp = await self.post_message(
                    authorization, payload, min(self.timeout, request.timeout)
                )
            except TimeoutError:
                return PushResult(DeliveryStatus.TRANSIENT, "timeout")
            except Http2CertificateError as exc:
                return self._certificate_failure(exc)
            except Http2ConnectionLost as exc:
                return PushResult(DeliveryStatus.TRANSIENT, str(exc))
            except Http2Error as exc:
                return PushResult(DeliveryStatus.TRANSIENT, f"HTTP/2 error: {exc}")
            status = resp.status
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            result = classify(status, resp.body, retry_after)
            # A 401 without an FCM error code is our access token (expired or revoked early):
            # refresh once and resend.
            if (
                status == 401
                and result.reason.startswith("FCM 401 UNAUTHENTICATED")
                and attempt == 1
            ):
                self.token.invalidate(authorization)
                continue
            if result.status is DeliveryStatus.CONFIG_ERROR:
                log.error("FCM app %s: %s", self.app_id, result.reason)
            return result
        raise AssertionError("unreachable")  # pragma: no cover
