"""Sandbox: renders the exact request the direct transport would send, records it, sends nothing.

It refuses what that transport would refuse for its size (APNs 5,120 B VoIP / 4,096 B alert,
FCM 4,096 B of data), so "accepted" in the sandbox means the real transport would take it too.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from ringrelay.models import DeliveryStatus, Platform, PushKind
from ringrelay.payloads import (
    adm_body,
    apns_collapse_id,
    apns_size_error,
    baidu_body,
    encode,
    fcm_size_error,
    fcm_v1_message,
    gcm_legacy_body,
    wns_raw_body,
)
from ringrelay.providers import PushRequest, PushResult
from ringrelay.redact import fingerprint


def render_request(request: PushRequest, now: float) -> dict[str, Any]:
    """What would go on the wire for this registration's platform (token shown as a fingerprint)."""
    reg = request.registration
    content = request.content
    seconds_left = request.expires_at - now
    token_fp = fingerprint(reg.token)
    if reg.platform is Platform.APNS:
        voip = reg.push_kind is PushKind.VOIP
        bundle = reg.app_id or "<bundle id>"
        headers = {
            "apns-push-type": "voip" if voip else "alert",
            "apns-topic": f"{bundle}.voip" if voip else bundle,
            "apns-priority": "10",
            "apns-expiration": str(int(request.expires_at)),
            "apns-id": request.push_id,
        }
        if content.collapse_id is not None:
            headers["apns-collapse-id"] = apns_collapse_id(content.collapse_id)
        return {
            "transport": "apns",
            "target": f"POST /3/device/<{token_fp}>",
            "headers": headers,
            "body": content.apns_payload(),
        }
    if reg.platform is Platform.FCM:
        body = fcm_v1_message(content, seconds_left, token=f"<{token_fp}>")
        return {
            "transport": "fcm",
            "target": "POST /v1/projects/<project id>/messages:send",
            "headers": {"content-type": "application/json"},
            "body": body,
        }
    bodies: dict[Platform, dict[str, Any]] = {
        Platform.GCM: gcm_legacy_body(content, seconds_left),
        Platform.ADM: adm_body(content, seconds_left),
        Platform.BAIDU: baidu_body(content),
        Platform.WNS: wns_raw_body(content),
    }
    return {
        "transport": reg.platform.value,
        "target": f"<{token_fp}>",
        "headers": {},
        "body": bodies[reg.platform],
    }


def size_error(request: PushRequest, rendered: dict[str, Any]) -> str | None:
    """The refusal the transport this sandbox stands in for would give for the payload's size."""
    reg = request.registration
    if reg.platform is Platform.APNS:
        return apns_size_error(encode(rendered["body"]), reg.push_kind is PushKind.VOIP)
    if reg.platform in (Platform.FCM, Platform.GCM):
        body = rendered["body"]
        return fcm_size_error(body.get("message", body))
    return None


class SandboxProvider:
    """Accepts every push the real transport would take, and keeps the newest `capacity`."""

    name = "sandbox"
    description = "sandbox (records pushes, sends nothing)"

    def __init__(self, capacity: int = 1000, max_in_flight: int = 100_000) -> None:
        self.max_in_flight = max_in_flight
        self.pushes: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)

    def supports(self, platform: Platform) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, request: PushRequest) -> PushResult:
        now = time.time()
        record = render_request(request, now)
        too_large = size_error(request, record)
        if too_large is not None:
            return PushResult(status=DeliveryStatus.REJECTED, reason=too_large)
        reg = request.registration
        record.update(
            {
                "push_id": request.push_id,
                "recorded_at": now,
                "event_id": request.event_id,
                "kind": request.content.label,
                "call_id": request.content.call_id,
                "identity": reg.identity,
                "device_id": reg.device_id,
                "platform": reg.platform.value,
            }
        )
        self.pushes.appendleft(record)
        return PushResult(status=DeliveryStatus.ACCEPTED, provider_ref=request.push_id)
