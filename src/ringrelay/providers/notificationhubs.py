"""Azure Notification Hubs Direct Send over one pool of keep-alive connections (`http1.py`).

Request shape: learn.microsoft.com/rest/api/notificationhubs/direct-send; SAS token:
learn.microsoft.com/rest/api/notificationhubs/common-concepts (HMAC-SHA256 over the URL-encoded,
lower-cased resource URI, a newline and the expiry; the key is used as its UTF-8 bytes).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import time
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from ringrelay.config import NotificationHubsConnection
from ringrelay.models import DeliveryStatus, Platform, PushKind
from ringrelay.payloads import (
    NOTIFICATION_HUBS_APNS_MAX_BYTES,
    adm_body,
    apns_collapse_id,
    baidu_body,
    encode,
    fcm_v1_message,
    gcm_legacy_body,
    wns_raw_body,
)
from ringrelay.providers import PushRequest, PushResult, certificate_result, parse_retry_after
from ringrelay.providers.http1 import CertificateError, Http1Pool, HttpError, pool_for

log = logging.getLogger("ringrelay.notificationhubs")

# ServiceBusNotification-Format per platform (direct-send reference; `fcmv1` from the FCM v1
# migration guide and the Azure JS SDK).
FORMATS: dict[Platform, str] = {
    Platform.APNS: "apple",
    Platform.FCM: "fcmv1",
    Platform.GCM: "gcm",
    Platform.WNS: "windows",
    Platform.ADM: "adm",
    Platform.BAIDU: "baidu",
}

JSON_CONTENT_TYPE = "application/json;charset=utf-8"


def make_sas_token(resource_uri: str, key_name: str, key: str, expiry: int) -> str:
    """`SharedAccessSignature sr=..&sig=..&se=..&skn=..` for `resource_uri` until `expiry`."""
    encoded_uri = quote_plus(resource_uri.lower(), safe="").lower()
    to_sign = f"{encoded_uri}\n{expiry}".encode()
    digest = hmac.new(key.encode("utf-8"), to_sign, hashlib.sha256).digest()
    signature = quote(base64.b64encode(digest).decode("ascii"), safe="")
    return (
        f"SharedAccessSignature sr={encoded_uri}&sig={signature}&se={expiry}"
        f"&skn={quote(key_name, safe='')}"
    )


class SasTokenCache:
    """One token shared by every push, minted again when a fifth of its life is left."""

    def __init__(self, conn: NotificationHubsConnection, resource_uri: str, ttl: int) -> None:
        self._conn = conn
        self._resource_uri = resource_uri
        self._ttl = ttl
        self._token = ""
        self._expiry = 0.0
        self.minted = 0

    def token(self, now: float) -> str:
        if now >= self._expiry - self._ttl / 5:
            expiry = int(now) + self._ttl
            self._token = make_sas_token(
                self._resource_uri, self._conn.key_name, self._conn.key, expiry
            )
            self._expiry = float(expiry)
            self.minted += 1
        return self._token


@functools.lru_cache(maxsize=4)
def _w3c_datetime(ts: int) -> str:
    # ServiceBusNotification-Apns-Expiry uses W3C DTF (send-apns-native-notification reference).
    # Cached: every push of the same second shares the string.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def build_direct_send(request: PushRequest, now: float) -> tuple[dict[str, str], bytes]:
    """Headers (without Authorization) and body for one direct send."""
    reg = request.registration
    call = request.content
    seconds_left = request.expires_at - now
    headers = {
        "ServiceBusNotification-Format": FORMATS[reg.platform],
        "ServiceBusNotification-DeviceHandle": reg.token,
        "Content-Type": JSON_CONTENT_TYPE,
    }
    body: dict[str, Any]
    if reg.platform is Platform.APNS:
        body = call.apns_payload()
        push_type = "voip" if reg.push_kind is PushKind.VOIP else "alert"
        headers.update(
            {
                # The ACS tutorial's header and the raw APNs one NH passes through; VoIP must be
                # explicit or NH infers `alert` (learn.microsoft.com notification-hubs/voip-apns).
                "ServiceBusNotification-Apns-Push-Type": push_type,
                "apns-push-type": push_type,
                "apns-priority": "10",
                "apns-expiration": str(int(request.expires_at)),
                "ServiceBusNotification-Apns-Expiry": _w3c_datetime(int(request.expires_at)),
                "apns-id": request.push_id,
            }
        )
        if call.collapse_id is not None:
            headers["apns-collapse-id"] = apns_collapse_id(call.collapse_id)
    elif reg.platform is Platform.FCM:
        body = fcm_v1_message(call, seconds_left)
    elif reg.platform is Platform.GCM:
        body = gcm_legacy_body(call, seconds_left)
    elif reg.platform is Platform.WNS:
        body = wns_raw_body(call)
        headers["X-WNS-Type"] = "wns/raw"
        headers["Content-Type"] = "application/octet-stream"
    elif reg.platform is Platform.ADM:
        body = adm_body(call, seconds_left)
    else:
        body = baidu_body(call)
    return headers, encode(body)


def _notification_id(location: str | None) -> str | None:
    # Location: https://{ns}.servicebus.windows.net/{hub}/messages/{notificationId}?api-version=..
    if not location:
        return None
    path = location.split("?", 1)[0].rstrip("/")
    if path.count("/") < 5:  # scheme://host/hub/messages/id has at least five
        return None
    return path.rsplit("/", 1)[1] or None


class NotificationHubsProvider:
    name = "notificationhubs"

    def __init__(
        self,
        conn: NotificationHubsConnection,
        messages_url: str,
        resource_uri: str,
        api_version: str,
        *,
        timeout: float = 5.0,
        sas_ttl: int = 3600,
        ca_file: str | None = None,
        max_connections: int = 100,
        max_in_flight: int = 1000,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.messages_url = f"{messages_url}?direct&api-version={api_version}"
        self.api_version = api_version
        self.description = f"Notification Hubs ({urlsplit(messages_url).netloc})"
        self.sas = SasTokenCache(conn, resource_uri, sas_ttl)
        self._timeout = timeout
        self._ca_file = ca_file
        self._max_connections = max_connections
        self._pool: Http1Pool | None = None
        self.target = ""

    def supports(self, platform: Platform) -> bool:
        return platform in FORMATS

    async def start(self) -> None:
        self._pool, self.target = pool_for(
            self.messages_url,
            self._ca_file,
            max_connections=self._max_connections,
            connect_timeout=self._timeout,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def send(self, request: PushRequest) -> PushResult:
        assert self._pool is not None, "provider not started"
        now = time.time()
        headers, body = build_direct_send(request, now)
        if (
            request.registration.platform is Platform.APNS
            and len(body) > NOTIFICATION_HUBS_APNS_MAX_BYTES
        ):
            return PushResult(
                DeliveryStatus.REJECTED,
                f"payload {len(body)} bytes exceeds Notification Hubs' APNs limit "
                f"of {NOTIFICATION_HUBS_APNS_MAX_BYTES}",
            )
        headers["Authorization"] = self.sas.token(now)
        headers["x-ms-version"] = self.api_version
        try:
            resp = await self._pool.request(
                "POST", self.target, headers, body, min(self._timeout, request.timeout)
            )
        except TimeoutError:
            return PushResult(DeliveryStatus.TRANSIENT, "timeout")
        except CertificateError as exc:
            result = certificate_result(f"the hub ({exc.where})", exc.error, "RINGRELAY_NH_CA_FILE")
            log.error("Notification Hubs: %s", result.reason)
            return result
        except HttpError as exc:
            return PushResult(DeliveryStatus.TRANSIENT, f"connection error: {exc}")
        except ValueError as exc:  # a header value with a line break: never sent
            return PushResult(DeliveryStatus.REJECTED, str(exc))
        status = resp.status
        ref = _notification_id(resp.headers.get("location")) or resp.headers.get("trackingid")
        if status in (200, 201):  # the common case: nothing else to read
            return PushResult(DeliveryStatus.ACCEPTED, http_status=status, provider_ref=ref)
        text = resp.body[:200].decode(errors="replace") if status >= 300 else ""
        retry_after = parse_retry_after(resp.headers.get("retry-after"))
        return classify(status, text, retry_after, ref)


def classify(status: int, text: str, retry_after: float | None, ref: str | None) -> PushResult:
    """Direct-send status codes (direct-send reference, "Response codes")."""
    detail = f"HTTP {status}" + (f": {text.strip()}" if text.strip() else "")
    if status in (200, 201):
        return PushResult(DeliveryStatus.ACCEPTED, http_status=status, provider_ref=ref)
    if status in (401, 403, 404):
        meaning = {
            401: "authorization failed: check the connection string's key",
            403: "forbidden (quota or entity): check the hub's tier and the access rule",
            404: "hub not found: check the hub name / URL",
        }[status]
        return PushResult(DeliveryStatus.CONFIG_ERROR, f"{meaning} ({detail})", http_status=status)
    if status in (400, 413):
        return PushResult(DeliveryStatus.REJECTED, detail, http_status=status)
    if status in (408, 429) or status >= 500:
        return PushResult(
            DeliveryStatus.TRANSIENT, detail, http_status=status, retry_after=retry_after
        )
    return PushResult(DeliveryStatus.REJECTED, detail, http_status=status)
