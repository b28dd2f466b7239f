"""Call traces over the wire: `/v1/calls/{callId}` and `ringrelay trace` tell each delivery of
each event, every attempt per device and its final state, and what that state means."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, register


async def deliver(http: Any, server: Any, event: dict[str, Any], count: int) -> tuple[int, Any]:
    async with http.post(
        f"{server.url}/api/events",
        data=json.dumps([event]).encode(),
        headers={"Content-Type": "application/json", "aeg-delivery-count": str(count)},
    ) as resp:
        return resp.status, await resp.json()


async def trace(http: Any, server: Any, call_id: str) -> dict[str, Any]:
    async with http.get(f"{server.url}/v1/calls/{call_id}") as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringrelay", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


async def test_trace_tells_deliveries_attempts_and_first_push(
    http, make_server, fake_nh, nh_settings
) -> None:
    server = make_server(**nh_settings)
    callee = acs_id("traced")
    await register(http, server, callee, "iphone")
    fake_nh.respond(500, times=1)
    event = incoming_call_event(callee)
    status, _ = await deliver(http, server, event, 0)
    assert status == 200
    status, _ = await deliver(http, server, event, 1)  # Event Grid's duplicate: not pushed again
    call_id = event["data"]["correlationId"]

    doc = await trace(http, server, call_id)
    (ev,) = doc["events"]
    assert ev["status"] == "delivered" and "platform" in ev["explanation"]
    assert [r["delivery_count"] for r in ev["receipts"]] == [0, 1]
    assert all(r["instance"] == doc["instance"] for r in ev["receipts"])
    assert ev["event_time"] is not None and ev["devices_found"] == 1
    assert ev["first_push_after_event_seconds"] >= 0
    assert ev["first_push_after_receipt_seconds"] >= 0
    (device,) = ev["deliveries"]
    assert device["status"] == "accepted" and device["attempts"] == 2
    log = device["attempt_log"]
    assert [a["status"] for a in log] == ["transient", "accepted"]
    assert log[0]["http_status"] == 500 and log[1]["provider_ref"]
    assert all(a["provider"] == "notificationhubs" and a["latency_ms"] > 0 for a in log)
    assert log[1]["provider_ref"] == device["provider_ref"]

    # The command, against the running server.
    done = cli("trace", call_id, "--server", server.url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"call {call_id}" in out
    assert "Event Grid delivery count 0" in out and "Event Grid delivery count 1" in out
    assert "#1" in out and "transient" in out and "#2" in out
    assert "s after eventTime" in out
    assert "device iphone [apns] accepted via notificationhubs after 2 attempt(s)" in out


async def test_trace_from_the_store_without_a_server(http, make_server, tmp_path) -> None:
    db = tmp_path / "trace.db"
    server = make_server(database_url=f"sqlite:///{db}")
    callee = acs_id("stored")
    await register(http, server, callee, "phone")
    event = incoming_call_event(callee)
    await deliver(http, server, event, 0)
    call_id = event["data"]["correlationId"]
    done = cli("trace", call_id, "--json", env={"RINGRELAY_DATABASE_URL": f"sqlite:///{db}"})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["events"][0]["deliveries"][0]["status"] == "accepted"
    missing = cli("trace", "no-such-call", env={"RINGRELAY_DATABASE_URL": f"sqlite:///{db}"})
    assert missing.returncode == 1 and "no event recorded" in missing.stderr


async def test_trace_no_registration(http, sandbox_server) -> None:
    event = incoming_call_event(acs_id("unregistered"))
    await deliver(http, sandbox_server, event, 0)
    (ev,) = (await trace(http, sandbox_server, event["data"]["correlationId"]))["events"]
    assert ev["status"] == "no_devices" and "doctor --identity" in ev["explanation"]


async def test_trace_ring_window_over(http, sandbox_server) -> None:
    callee = acs_id("too-late")
    await register(http, sandbox_server, callee, "phone")
    event = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=60))
    await deliver(http, sandbox_server, event, 1)
    (ev,) = (await trace(http, sandbox_server, event["data"]["correlationId"]))["events"]
    assert ev["status"] == "expired" and "ring window" in ev["reason"]
    assert ev["receipts"][0]["delivery_count"] == 1
    assert ev["deliveries"][0]["attempt_log"] == []  # never attempted


async def test_trace_config_error(http, make_server, fake_nh, nh_settings) -> None:
    server = make_server(**nh_settings)
    callee = acs_id("badkey")
    await register(http, server, callee, "iphone")
    fake_nh.respond(401, times=10)
    event = incoming_call_event(callee)
    await deliver(http, server, event, 0)
    (ev,) = (await trace(http, server, event["data"]["correlationId"]))["events"]
    (device,) = ev["deliveries"]
    assert device["status"] == "config_error" and "ringrelay doctor" in device["explanation"]
    assert [a["http_status"] for a in device["attempt_log"]] == [401]


async def test_trace_push_expired_while_retrying(http, make_server, fake_nh, nh_settings) -> None:
    server = make_server(**nh_settings, ring_window_seconds=5)
    callee = acs_id("flaky-hub")
    await register(http, server, callee, "iphone")
    fake_nh.respond(503, times=1000)
    event = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=4))
    await deliver(http, server, event, 0)
    (ev,) = (await trace(http, server, event["data"]["correlationId"]))["events"]
    (device,) = ev["deliveries"]
    assert device["status"] == "expired" and "ring window ended" in device["explanation"]
    assert len(device["attempt_log"]) >= 2
    assert {a["status"] for a in device["attempt_log"]} == {"transient"}
    assert ev["first_push_at"] is None


def test_call_log_keeps_the_newest_events_only() -> None:
    from ringrelay.models import DeliveryStatus, Platform, PushKind, Registration
    from ringrelay.ops.calllog import CallLog
    from ringrelay.providers import PushResult

    class Provider:
        name, app_id = "apns", "com.contoso.calling"

    log = CallLog(max_events=3, max_attempts_per_event=2)
    reg = Registration("8:acs:x", "d", Platform.APNS, "ab" * 32, PushKind.VOIP, None, 0, 0, 9e9)
    ok = PushResult(DeliveryStatus.ACCEPTED, http_status=200, provider_ref="ref")
    for n in range(5):
        log.receipt(f"e{n}", float(n), n, float(n) - 0.5)
        for attempt in (1, 2, 3):
            log.attempt(f"e{n}", reg, attempt, Provider(), ok, 0.002, float(n) + 0.1)
    assert log.attempts_for("e0") == [] and log.receipts_for("e1") == []
    assert [a.attempt for a in log.attempts_for("e4")] == [1, 2]  # per-event cap
    (a, _) = log.attempts_for("e4")
    assert (a.provider, a.app, a.status, a.latency_ms, a.provider_ref) == (
        "apns", "com.contoso.calling", "accepted", 2.0, "ref",
    )  # fmt: skip
    assert log.first_accepted("e4") == 4.1 and log.first_accepted("e0") is None
    latencies = sorted(log.first_push_latencies())
    assert [at for at, _ in latencies] == [2.1, 3.1, 4.1]
    assert all(abs(seconds - 0.6) < 1e-9 for _, seconds in latencies)


def test_push_ids_are_canonical_random_uuids() -> None:
    import uuid

    from ringrelay.delivery.dispatcher import new_push_id

    ids = [new_push_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
