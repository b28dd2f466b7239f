"""POST /api/events over the wire: schemas, handshakes, secret, limits, batches, ring window,
duplicates. Delivery here is the sandbox; tests/test_notificationhubs.py covers the real wire."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from ringrelay.api import webhook
from ringrelay.simulate import incoming_call_event
from tests.conftest import FIXTURES, RunningServer, acs_id, load_fixture, post_events, register

VALIDATION = [
    {
        "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic": "/subscriptions/xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        "subject": "",
        "data": {
            "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
            "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/x",
        },
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2022-10-28T04:23:35.1981776Z",
        "metadataVersion": "1",
        "dataVersion": "1",
    }
]


async def sandbox_pushes(http: aiohttp.ClientSession, server: RunningServer, **params: Any) -> list:
    query = {"reveal": "true", "limit": "1000", **params}
    async with http.get(f"{server.url}/v1/sandbox/pushes", params=query) as resp:
        assert resp.status == 200
        return (await resp.json())["pushes"]


async def metric_value(http: aiohttp.ClientSession, server: RunningServer, prefix: str) -> float:
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


# --- handshakes ---------------------------------------------------------------------------


async def test_event_grid_validation_handshake(http, sandbox_server) -> None:
    status, body = await post_events(http, sandbox_server, VALIDATION)
    assert status == 200
    assert body == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}


@pytest.mark.parametrize(("rate", "granted"), [("120", "120"), (None, "*")])
async def test_cloudevents_options_handshake(http, sandbox_server, rate, granted) -> None:
    headers = {"WebHook-Request-Origin": "eventgrid.azure.net"}
    if rate:
        headers["WebHook-Request-Rate"] = rate
    async with http.options(f"{sandbox_server.url}/api/events", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
        assert resp.headers["WebHook-Allowed-Rate"] == granted
        assert "POST" in resp.headers["Allow"]


# --- the secret ---------------------------------------------------------------------------


async def test_secret_is_required_when_set(http, make_server) -> None:
    server = make_server(webhook_secret="letmein")
    callee = acs_id("secret")
    await register(http, server, callee, "phone")
    event = incoming_call_event(callee)
    for query in ("", "?code=wrong", "?code=letmei", "?code=letmein2"):
        status, _ = await post_events(http, server, [event], query=query)
        assert status == 401, query
    async with http.options(
        f"{server.url}/api/events", headers={"WebHook-Request-Origin": "eventgrid.azure.net"}
    ) as resp:
        assert resp.status == 401
    status, _ = await post_events(http, server, VALIDATION)
    assert status == 401
    assert await sandbox_pushes(http, server) == []

    status, body = await post_events(http, server, [event], query="?code=letmein")
    assert status == 200, body
    assert len(await sandbox_pushes(http, server)) == 1


# --- bad bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty body"),
        (b"{not json", "not JSON"),
        (b'{"id": "x"}', "expected a JSON array"),
        (b"42", "expected a JSON array"),
        (b'"text"', "expected a JSON array"),
    ],
)
async def test_unusable_body_is_400_with_reason(http, sandbox_server, body, reason) -> None:
    async with http.post(
        f"{sandbox_server.url}/api/events", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert reason in (await resp.json())["error"]


async def test_body_over_one_mib_is_413(http, sandbox_server) -> None:
    big = json.dumps([{"id": "x", "data": "a" * (1024 * 1024)}]).encode()
    async with http.post(f"{sandbox_server.url}/api/events", data=big) as resp:
        assert resp.status == 413

    async def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(20):
            yield b"a" * 65536

    async with http.post(f"{sandbox_server.url}/api/events", data=chunks()) as resp:
        assert resp.status == 413


# --- every fixture ------------------------------------------------------------------------

STOPPING_EVENTS = (
    "Microsoft.Communication.CallEnded",
    "Microsoft.Communication.CallParticipantAdded",
)
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("push."))


@pytest.mark.parametrize("name", FIXTURE_FILES)
async def test_every_fixture_is_acknowledged_and_classified(http, sandbox_server, name) -> None:
    doc = load_fixture(name)
    cloud = ".cloudevents." in name
    events = doc if isinstance(doc, list) else [doc]
    if cloud:
        status, body = await post_events(
            http, sandbox_server, doc, content_type="application/cloudevents+json"
        )
    else:
        status, body = await post_events(http, sandbox_server, events)
    assert status == 200, body
    reports = body["events"]
    assert len(reports) == len(events)
    for report in reports:
        if report["type"] == "Microsoft.Communication.IncomingCall":
            # The fixtures carry placeholders or the docs' corrupted context: rejected, with
            # the field named, never a crash.
            assert report["status"] == "rejected"
            assert "data.incomingCallContext" in report["reason"]
        elif report["type"] in STOPPING_EVENTS:
            # Nothing rang for these calls: recorded, and nothing to stop.
            assert report["status"] == "no_devices", report
            assert "no device rang for this call" in report["reason"]
        elif report["type"] == "Microsoft.Communication.ChatMessageReceived":
            # A chat push for a recipient without an alert registration (tests/test_chat_*).
            assert report["status"] == "no_devices", report
        else:
            assert report["status"] == "ignored"
    assert await sandbox_pushes(http, sandbox_server) == []


async def test_unknown_event_types_are_counted(http, sandbox_server) -> None:
    chat = load_fixture("chatmessagereceived.eventgrid.azure-docs.json")
    for event in chat:  # a type ringrelay does not handle
        event["eventType"] = "Microsoft.Communication.ChatThreadCreated"
    before = await metric_value(
        http,
        sandbox_server,
        'ringrelay_events_total{status="ignored",type="Microsoft.Communication.ChatThreadCreated"}',
    )
    status, _ = await post_events(http, sandbox_server, chat + chat)
    assert status == 200
    after = await metric_value(
        http,
        sandbox_server,
        'ringrelay_events_total{status="ignored",type="Microsoft.Communication.ChatThreadCreated"}',
    )
    assert after - before == 2


# --- real deliveries ------------------------------------------------------------------------


async def test_incoming_call_reaches_every_device_with_the_sdk_payload(
    http, sandbox_server
) -> None:
    callee = acs_id("alice")
    await register(http, sandbox_server, callee, "iphone", platform="apns", app_id="com.x.app")
    await register(http, sandbox_server, callee, "pixel", platform="fcm", token="fcm:tok-1")
    await register(http, sandbox_server, acs_id("bob"), "other", platform="fcm", token="fcm:tok-2")
    event = incoming_call_event(callee, "4:+18557047380", "Bob Phone")
    status, body = await post_events(http, sandbox_server, [event])
    assert status == 200
    (report,) = body["events"]
    assert report["status"] == "delivered"
    assert sorted(d["device_id"] for d in report["deliveries"]) == ["iphone", "pixel"]

    pushes = {p["device_id"]: p for p in await sandbox_pushes(http, sandbox_server)}
    assert set(pushes) == {"iphone", "pixel"}
    apns = pushes["iphone"]
    assert apns["headers"]["apns-push-type"] == "voip"
    assert apns["headers"]["apns-topic"] == "com.x.app.voip"
    assert apns["headers"]["apns-priority"] == "10"
    data = apns["body"]["data"]
    assert apns["body"]["aps"] == {}
    assert data["eventId"] == 111  # PSTN caller
    assert data["callId"] == event["data"]["correlationId"]
    assert data["recipientId"] == callee
    assert data["callerId"] == "4:+18557047380"
    assert data["displayName"] == "Bob Phone"
    ring_end = datetime.fromisoformat(event["eventTime"].replace("0Z", "+00:00")).timestamp() + 45
    assert int(apns["headers"]["apns-expiration"]) == int(ring_end)
    fcm = pushes["pixel"]["body"]["message"]
    assert fcm["data"]["eventId"] == "111"
    assert fcm["data"]["cp"] == data["cp"]
    assert fcm["android"]["priority"] == "HIGH"

    # The call context is masked unless asked for.
    masked = await sandbox_pushes(http, sandbox_server, reveal="false")
    assert all(p["body"].get("data", {}).get("cp", "sha256:").startswith("sha256:") for p in masked)

    async with http.get(f"{sandbox_server.url}/v1/calls/{data['callId']}") as resp:
        assert resp.status == 200
        record = await resp.json()
    (ev,) = record["events"]
    assert ev["status"] == "delivered"
    assert {d["device_id"]: d["status"] for d in ev["deliveries"]} == {
        "iphone": "accepted",
        "pixel": "accepted",
    }
    assert all(d["token"].startswith("sha256:") for d in ev["deliveries"])


async def test_callee_without_devices_is_recorded(http, sandbox_server) -> None:
    event = incoming_call_event(acs_id("nobody"))
    status, body = await post_events(http, sandbox_server, [event])
    assert status == 200
    assert body["events"][0]["status"] == "no_devices"
    async with http.get(f"{sandbox_server.url}/v1/calls/{event['data']['correlationId']}") as r:
        assert (await r.json())["events"][0]["status"] == "no_devices"


async def test_cloudevents_single_and_batch(http, sandbox_server) -> None:
    callee = acs_id("carol")
    await register(http, sandbox_server, callee, "phone")
    cloud = load_fixture("incomingcall.cloudevents.azure-rest-api-specs.json")

    def as_cloud(eg: dict) -> dict:
        ce = copy.deepcopy(cloud)
        ce.update(id=eg["id"], data=eg["data"], time=eg["eventTime"])
        return ce

    single = as_cloud(incoming_call_event(callee))
    status, body = await post_events(
        http, sandbox_server, single, content_type="application/cloudevents+json; charset=utf-8"
    )
    assert status == 200 and body["events"][0]["status"] == "delivered", body
    batch = [as_cloud(incoming_call_event(callee)) for _ in range(3)]
    status, body = await post_events(
        http, sandbox_server, batch, content_type="application/cloudevents-batch+json"
    )
    assert status == 200
    assert [e["status"] for e in body["events"]] == ["delivered"] * 3
    assert len(await sandbox_pushes(http, sandbox_server)) == 4


async def test_batch_with_good_and_bad_events(http, sandbox_server) -> None:
    callee = acs_id("dave")
    await register(http, sandbox_server, callee, "phone")
    good = incoming_call_event(callee)
    no_cc = incoming_call_event(callee)
    no_cc["data"]["incomingCallContext"] = "e30.eyJzaHJUb2tlbiI6IngifQ."  # {"shrToken":"x"}
    no_time = incoming_call_event(callee)
    del no_time["eventTime"]
    chat = load_fixture("chatmessagereceived.eventgrid.azure-docs.json")[0]
    batch = [no_cc, good, 42, chat, no_time, {"eventType": "x"}]
    status, body = await post_events(http, sandbox_server, batch)
    assert status == 200
    statuses = [(e["status"], e.get("reason", "")) for e in body["events"]]
    assert statuses[0] == ("rejected", "data.incomingCallContext: no 'cc' claim")
    assert statuses[1][0] == "delivered"
    assert statuses[2] == ("rejected", "event[2]: not a JSON object")
    assert statuses[3][0] == "no_devices"  # a chat message for someone with no alert device
    assert statuses[4] == ("rejected", "event[4]: eventTime: missing")
    assert statuses[5][0] == "rejected" and "id" in statuses[5][1]
    pushes = await sandbox_pushes(http, sandbox_server)
    assert [p["event_id"] for p in pushes] == [good["id"]]
    # The rejection is recorded for the call.
    async with http.get(f"{sandbox_server.url}/v1/calls/{no_cc['data']['correlationId']}") as r:
        assert r.status == 404  # rejected before its callId could be trusted
    async with http.get(f"{sandbox_server.url}/v1/calls/{good['data']['correlationId']}") as r:
        assert r.status == 200


async def test_call_older_than_the_ring_window_is_expired_not_pushed(http, sandbox_server) -> None:
    callee = acs_id("erin")
    await register(http, sandbox_server, callee, "phone")
    old = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=46))
    status, body = await post_events(http, sandbox_server, [old])
    assert status == 200
    (report,) = body["events"]
    assert report["status"] == "expired"
    assert "ring window" in report["reason"]
    assert [d["status"] for d in report["deliveries"]] == ["expired"]
    assert await sandbox_pushes(http, sandbox_server) == []
    recent = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=30))
    status, body = await post_events(http, sandbox_server, [recent])
    assert body["events"][0]["status"] == "delivered"


async def test_duplicate_deliveries_push_once(http, sandbox_server) -> None:
    callee = acs_id("frank")
    for device in ("a", "b", "c"):
        await register(http, sandbox_server, callee, device)
    event = incoming_call_event(callee)
    first = await post_events(http, sandbox_server, [event])
    second = await post_events(http, sandbox_server, [event])
    assert first[0] == second[0] == 200
    assert second[1]["events"][0]["status"] == "delivered"
    assert all(d["status"] == "accepted" for d in second[1]["events"][0]["deliveries"])
    concurrent_event = incoming_call_event(callee)
    results = await asyncio.gather(
        *(post_events(http, sandbox_server, [concurrent_event]) for _ in range(5))
    )
    assert all(status == 200 for status, _ in results)
    pushes = await sandbox_pushes(http, sandbox_server)
    per_event: dict[str, int] = {}
    for p in pushes:
        per_event[p["event_id"]] = per_event.get(p["event_id"], 0) + 1
    assert per_event == {event["id"]: 3, concurrent_event["id"]: 3}


async def test_redelivery_after_the_ring_keeps_the_earlier_outcome(http, make_server) -> None:
    server = make_server(ring_window_seconds=5)
    callee = acs_id("grace")
    await register(http, server, callee, "phone")
    event = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=4))
    status, body = await post_events(http, server, [event])
    assert body["events"][0]["status"] == "delivered"
    await asyncio.sleep(1.2)  # the ring window has now ended; Event Grid redelivers
    status, body = await post_events(http, server, [event])
    assert status == 200
    assert body["events"][0]["status"] == "delivered"
    assert [d["status"] for d in body["events"][0]["deliveries"]] == ["accepted"]
    assert len(await sandbox_pushes(http, server)) == 1


# --- limits on a delivery's events (issue 17 items 4, 5) -------------------------------------


async def test_more_events_than_event_grid_sends_is_413_and_nothing_recorded(
    http, sandbox_server
) -> None:
    before = await metric_value(http, sandbox_server, "ringrelay_events_total")
    # The report's body: 349,524 empty objects in 1 MiB.
    body = b"[" + b",".join([b"{}"] * 349_524) + b"]"
    async with http.post(f"{sandbox_server.url}/api/events", data=body) as resp:
        assert resp.status == 413
        reason = (await resp.json())["error"]
    assert "349524 events" in reason and "at most 5000" in reason
    assert "RINGRELAY_MAX_EVENTS_PER_DELIVERY" in reason
    status, body_json = await post_events(http, sandbox_server, [{}] * 5001)
    assert status == 413, body_json
    assert await metric_value(http, sandbox_server, "ringrelay_events_total") == before


async def test_the_largest_batch_is_handled_event_by_event(http, sandbox_server) -> None:
    callee = acs_id("batch")
    await register(http, sandbox_server, callee, "phone")
    calls = [incoming_call_event(callee) for _ in range(3)]
    batch: list[Any] = [{}] * 4997 + calls
    status, body = await post_events(http, sandbox_server, batch)
    assert status == 200
    reports = body["events"]
    assert len(reports) == 5000
    assert [r["status"] for r in reports[-3:]] == ["delivered"] * 3
    assert {r["status"] for r in reports[:-3]} == {"rejected"}
    assert len(await sandbox_pushes(http, sandbox_server)) == 3


async def test_a_deeply_nested_event_does_not_sink_its_neighbour(http, sandbox_server) -> None:
    callee = acs_id("nested")
    await register(http, sandbox_server, callee, "phone")
    good = incoming_call_event(callee)
    depth = 1000  # orjson reads 1,024 levels but writes only 254
    nested = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    body = b"[" + nested + b"," + json.dumps(good).encode() + b"]"
    ids = set()
    for _ in range(2):  # a redelivery names the malformed event the same way
        async with http.post(
            f"{sandbox_server.url}/api/events",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            first, second = (await resp.json())["events"]
        assert first["status"] == "rejected" and "id" in first["reason"]
        assert second["status"] == "delivered"
        ids.add(first["id"])
    assert len(ids) == 1 and ids.pop().startswith("invalid-")
    async with http.get(f"{sandbox_server.url}/v1/calls/{good['data']['correlationId']}") as r:
        assert r.status == 200
    assert len(await sandbox_pushes(http, sandbox_server)) == 1


async def test_a_validation_event_beside_a_call_does_not_drop_the_call(
    http, sandbox_server
) -> None:
    callee = acs_id("mixed")
    await register(http, sandbox_server, callee, "phone")
    call = incoming_call_event(callee)
    status, body = await post_events(http, sandbox_server, [*VALIDATION, call])
    assert status == 200, body
    assert body["validationResponse"] == VALIDATION[0]["data"]["validationCode"]
    validation, report = body["events"]
    assert validation["status"] == "ignored"
    assert report["status"] == "delivered"
    assert [p["event_id"] for p in await sandbox_pushes(http, sandbox_server)] == [call["id"]]


async def test_ids_and_types_postgresql_cannot_store_are_rejected_not_retried(tmp_path) -> None:
    """U+0000 in an event's id, type, callee or call id made its record fail on PostgreSQL: 503
    for the whole batch, on every retry. Now such an event is rejected with the field named."""
    from tests.test_postgres_instances import pg_instances

    async with pg_instances(tmp_path, 1) as (urls, _, _), aiohttp.ClientSession() as http:
        url = urls[0]
        callee = acs_id("nul")
        token = {"platform": "apns", "token": "ab" * 32}
        async with http.put(f"{url}/v1/identities/{callee}/devices/p", json=token) as resp:
            assert resp.status == 201
        good = incoming_call_event(callee)
        bad_id = dict(incoming_call_event(callee), id="call\u0000")
        bad_type = {"id": "t", "eventType": "X\u0000", "eventTime": good["eventTime"]}
        bad_callee = incoming_call_event(callee + "\u0000")
        bad_call_id = incoming_call_event(callee)
        bad_call_id["data"]["correlationId"] += "\u0000"
        body = json.dumps([bad_id, bad_type, bad_callee, bad_call_id, good]).encode()
        async with http.post(
            f"{url}/api/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            reports = (await resp.json())["events"]
        assert [r["status"] for r in reports] == ["rejected"] * 4 + ["delivered"]
        assert reports[0]["reason"].startswith("event[0]: id: ")
        assert reports[1]["reason"].startswith("event[1]: eventType: ")
        assert reports[2]["reason"] == "data.to.rawId: contains a control character"
        assert reports[3]["reason"] == "data.correlationId: contains a control character"
        assert "\u0000" not in reports[0]["id"] + reports[1]["type"]


async def test_the_declared_route_gives_the_short_paths_answers(http, sandbox_server) -> None:
    """RelayApp answers /api/events on bare ASGI; the FastAPI route declared for the OpenAPI
    schema must give the same answers should a host route to it instead."""
    callee = acs_id("declared-route")
    await register(http, sandbox_server, callee, "phone")
    event = incoming_call_event(callee)
    status, short = await post_events(http, sandbox_server, [event])
    sandbox_server.app.webhook = None  # the request now goes through FastAPI's routing
    try:
        status_again, declared = await post_events(http, sandbox_server, [event])
        assert (status, status_again) == (200, 200)
        assert declared == short  # a redelivery: the same report, nothing pushed twice
        assert [d["status"] for d in declared["events"][0]["deliveries"]] == ["accepted"]
        status, body = await post_events(http, sandbox_server, VALIDATION)
        assert status == 200 and body == {
            "validationResponse": VALIDATION[0]["data"]["validationCode"]
        }
        async with http.options(
            f"{sandbox_server.url}/api/events", headers={"WebHook-Request-Origin": "eg.example"}
        ) as resp:
            assert resp.status == 200 and resp.headers["WebHook-Allowed-Origin"] == "eg.example"
        async with http.post(f"{sandbox_server.url}/api/events", data=b"[") as resp:
            assert resp.status == 400 and "not JSON" in (await resp.json())["error"]
    finally:
        sandbox_server.app.webhook = webhook.asgi_endpoint
