"""Sandbox: renders the exact request the direct transport would send, records it, sends nothing."""

from __future__ import annotations

import collections
import time
from typing import Any

from ringrelay.models import DeliveryStatus, Platform
from ringrelay.payloads import (
    CallPush,
    adm_body,
    apns_voip_body,
    baidu_body,
    fcm_v1_message,
    gcm_legacy_body,
    wns_raw_body,
)
from ringrelay.providers import PushRequest, PushResult
from ringrelay.redact import fingerprint


def render_request(request: PushRequest, now: float) -> dict[str, Any]:
    """What would go on the wire for this registration's platform (token shown as a fingerprint)."""
    reg = request.registration
    call: CallPush = request.call
    seconds_left = request.expires_at - now
    token_fp = fingerprint(reg.token)
    if reg.platform is Platform.APNS:
        topic = f"{reg.app_id}.voip" if reg.app_id else "<bundle id>.voip"
        return {
            "transport": "apns",
            "target": f"POST /3/device/<{token_fp}>",
            "headers": {
                "apns-push-type": "voip",
                "apns-topic": topic,
                "apns-priority": "10",
                "apns-expiration": str(int(request.expires_at)),
                "apns-id": request.push_id,
            },
            "body": apns_voip_body(call),
        }
    if reg.platform is Platform.FCM:
        body = fcm_v1_message(call, seconds_left, token=f"<{token_fp}>")
        return {
            "transport": "fcm",
            "target": "POST /v1/projects/<project id>/messages:send",
            "headers": {"content-type": "application/json"},
            "body": body,
        }
    bodies: dict[Platform, dict[str, Any]] = {
        Platform.GCM: gcm_legacy_body(call, seconds_left),
        Platform.ADM: adm_body(call, seconds_left),
        Platform.BAIDU: baidu_body(call),
        Platform.WNS: wns_raw_body(call),
    }
    return {
        "transport": reg.platform.value,
        "target": f"<{token_fp}>",
        "headers": {},
        "body": bodies[reg.platform],
    }


class SandboxProvider:
    """Accepts every push and keeps the newest `capacity` of them in memory."""

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
        reg = request.registration
        record.update(
            {
                "push_id": request.push_id,
                "recorded_at": now,
                "event_id": request.event_id,
                "call_id": request.call.call_id,
                "identity": reg.identity,
                "device_id": reg.device_id,
                "platform": reg.platform.value,
            }
        )
        self.pushes.appendleft(record)
        return PushResult(status=DeliveryStatus.ACCEPTED, provider_ref=request.push_id)
