"""What a push may carry and how long it may live, over the wire: the sandbox refuses what the
transport it stands in for would refuse, and an eventTime far ahead does not make a push live
for years."""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, post_events, register

CALLEE = acs_id("limits")


async def test_sandbox_refuses_payloads_the_real_transports_would(http, sandbox_server) -> None:
    await register(http, sandbox_server, CALLEE, "iphone")
    await register(http, sandbox_server, CALLEE, "pixel", platform="fcm", token="fcm-limits")
    huge_cc = base64.b64encode(os.urandom(500_000)).decode()  # 666,668 characters
    status, body = await post_events(
        http, sandbox_server, [incoming_call_event(CALLEE, cc=huge_cc)]
    )
    assert status == 200, body
    outcomes = {d["device_id"]: d for d in body["events"][0]["deliveries"]}
    assert outcomes["iphone"]["status"] == "rejected"
    assert "exceeds APNs' 5120" in outcomes["iphone"]["reason"]
    assert outcomes["pixel"]["status"] == "rejected"
    assert "exceeds FCM's 4096" in outcomes["pixel"]["reason"]
    async with http.get(f"{sandbox_server.url}/v1/sandbox/pushes") as resp:
        assert (await resp.json())["pushes"] == []  # nothing "delivered"


async def test_an_event_time_far_ahead_is_clamped_to_receipt(http, sandbox_server) -> None:
    await register(http, sandbox_server, CALLEE, "iphone")
    await register(http, sandbox_server, CALLEE, "pixel", platform="fcm", token="fcm-limits")
    event = incoming_call_event(CALLEE, event_time=datetime(9999, 12, 31, 23, 59, tzinfo=UTC))
    before = time.time()
    status, body = await post_events(http, sandbox_server, [event])
    assert status == 200, body
    async with http.get(f"{sandbox_server.url}/v1/sandbox/pushes") as resp:
        pushes = {p["device_id"]: p for p in (await resp.json())["pushes"]}
    window = sandbox_server.settings.ring_window_seconds
    expiration = int(pushes["iphone"]["headers"]["apns-expiration"])
    assert before < expiration <= time.time() + window + 1
    ttl = pushes["pixel"]["body"]["message"]["android"]["ttl"]
    assert int(ttl.rstrip("s")) <= window + 1
