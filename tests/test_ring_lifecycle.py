"""The ring lifecycle over the wire: a call that is answered elsewhere, ended, or stopped through
the API sends one StopRinging (110) push to every device that rang, and to no other."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from ringrelay.simulate import call_ended_event, incoming_call_event, participant_added_event
from tests.conftest import RunningServer, acs_id, load_fixture, post_events, register
from tests.test_direct_delivery import (  # noqa: F401  (fixtures)
    _apns_session,
    _fcm_session,
    direct_settings,
    fake_apns,
    fake_fcm,
    fcm_token,
    keys,
)

CALLEE = acs_id("lifecycle-callee")
CALLER = acs_id("lifecycle-caller")


async def pushes(http: aiohttp.ClientSession, server: RunningServer, call_id: str) -> list[Any]:
    async with http.get(
        f"{server.url}/v1/sandbox/pushes", params={"call_id": call_id, "limit": "1000"}
    ) as resp:
        assert resp.status == 200
        return list((await resp.json())["pushes"])


def by_event_id(found: list[Any]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for push in found:
        body = push["body"].get("message", push["body"])  # FCM: {"message": {"data": …}}
        out.setdefault(int(body["data"]["eventId"]), []).append(push["device_id"])
    return {k: sorted(v) for k, v in out.items()}


async def ring(
    http: aiohttp.ClientSession, server: RunningServer, call_id: str, to: str = CALLEE, **kw: Any
) -> dict[str, Any]:
    status, body = await post_events(
        http, server, [incoming_call_event(to, CALLER, correlation_id=call_id, **kw)]
    )
    assert status == 200, body
    return dict(body["events"][0])


async def stop_api(
    http: aiohttp.ClientSession, server: RunningServer, call_id: str, **body: Any
) -> tuple[int, Any]:
    async with http.post(f"{server.url}/v1/calls/{call_id}/stop-ringing", json=body) as resp:
        return resp.status, await resp.json()


async def call_record(http: aiohttp.ClientSession, server: RunningServer, call_id: str) -> Any:
    async with http.get(f"{server.url}/v1/calls/{call_id}") as resp:
        assert resp.status == 200
        return await resp.json()


async def three_devices(http: aiohttp.ClientSession, server: RunningServer) -> None:
    for device in ("iphone", "ipad", "pixel"):
        body: dict[str, Any] = (
            {"platform": "fcm", "token": fcm_token(7)} if device == "pixel" else {}
        )
        assert (await register(http, server, CALLEE, device, **body)).status == 201


async def test_answered_on_one_device_stops_the_others_once(http, sandbox_server) -> None:
    call_id = str(uuid.uuid4())
    await three_devices(http, sandbox_server)
    assert (await ring(http, sandbox_server, call_id))["status"] == "delivered"

    status, answer = await stop_api(http, sandbox_server, call_id, answered_device="ipad")
    assert status == 200, answer
    assert answer["status"] == "delivered"
    found = by_event_id(await pushes(http, sandbox_server, call_id))
    assert found == {107: ["ipad", "iphone", "pixel"], 110: ["iphone", "pixel"]}

    # The call then ends, and Event Grid delivers CallEnded twice: nothing more is pushed, and
    # the device that answered never gets a stop.
    ended = call_ended_event(call_id)
    for _ in range(2):
        status, body = await post_events(http, sandbox_server, [ended])
        assert status == 200, body
    status, body = await post_events(http, sandbox_server, [call_ended_event(call_id)])
    assert status == 200, body
    assert by_event_id(await pushes(http, sandbox_server, call_id))[110] == ["iphone", "pixel"]

    record = await call_record(http, sandbox_server, call_id)
    devices = {d["device_id"]: d for d in record["devices"]}
    assert devices["ipad"]["ring"]["status"] == "accepted"
    assert devices["ipad"]["stop"]["status"] == "cancelled"
    assert "answered on this device" in devices["ipad"]["stop"]["reason"]
    assert devices["iphone"]["stop"]["status"] == "accepted"
    assert devices["iphone"]["stop"]["reason"] == "answered elsewhere (API)"
    assert record["stopped"]["by"] == "answered elsewhere (API)"


async def test_call_ended_stops_every_device_that_rang(http, sandbox_server) -> None:
    call_id = str(uuid.uuid4())
    await three_devices(http, sandbox_server)
    await ring(http, sandbox_server, call_id)
    # The docs' CallEnded example, pointed at this call.
    ended = load_fixture("callended.eventgrid.azure-docs.json")[0]
    ended["data"]["correlationId"] = call_id
    ended["eventTime"] = datetime.now(UTC).isoformat()
    status, body = await post_events(http, sandbox_server, [ended])
    assert status == 200, body
    report = body["events"][0]
    assert report["status"] == "delivered", report
    assert report["reason"] == "call ended"
    found = await pushes(http, sandbox_server, call_id)
    assert by_event_id(found)[110] == ["ipad", "iphone", "pixel"]
    stop = next(p for p in found if p["device_id"] == "iphone" and p["kind"] == "stop")
    assert stop["headers"]["apns-push-type"] == "voip"
    assert stop["headers"]["apns-collapse-id"] == call_id
    data = stop["body"]["data"]
    assert (data["callId"], data["recipientId"], data["callerId"]) == (call_id, CALLEE, CALLER)


async def test_participant_added_naming_the_callee_stops_it_not_the_caller(
    http, sandbox_server
) -> None:
    call_id = str(uuid.uuid4())
    await three_devices(http, sandbox_server)
    await ring(http, sandbox_server, call_id)
    # The caller joining is no answer.
    status, body = await post_events(
        http, sandbox_server, [participant_added_event(call_id, CALLER)]
    )
    assert status == 200, body
    assert body["events"][0]["status"] == "no_devices"
    assert 110 not in by_event_id(await pushes(http, sandbox_server, call_id))
    # The callee joining from one of its devices: every device that rang stops.
    status, body = await post_events(
        http, sandbox_server, [participant_added_event(call_id, CALLEE)]
    )
    assert status == 200, body
    assert body["events"][0]["reason"] == "answered elsewhere"
    assert by_event_id(await pushes(http, sandbox_server, call_id))[110] == [
        "ipad",
        "iphone",
        "pixel",
    ]


async def test_end_event_before_the_incoming_call_means_no_ring(http, sandbox_server) -> None:
    call_id = str(uuid.uuid4())
    await three_devices(http, sandbox_server)
    status, body = await post_events(http, sandbox_server, [call_ended_event(call_id)])
    assert status == 200
    assert body["events"][0]["status"] == "no_devices"
    report = await ring(http, sandbox_server, call_id)
    assert report["status"] == "cancelled"
    assert "already stopped ringing" in report["reason"]
    assert await pushes(http, sandbox_server, call_id) == []


async def test_correlation_by_server_call_id_when_correlation_id_is_absent(
    http, sandbox_server
) -> None:
    call_id = str(uuid.uuid4())
    await three_devices(http, sandbox_server)
    event = incoming_call_event(CALLEE, CALLER, correlation_id=call_id)
    assert (await post_events(http, sandbox_server, [event]))[0] == 200
    ended = call_ended_event("unused", server_call_id=event["data"]["serverCallId"])
    del ended["data"]["correlationId"]
    status, body = await post_events(http, sandbox_server, [ended])
    assert status == 200, body
    assert body["events"][0]["callId"] == call_id
    assert by_event_id(await pushes(http, sandbox_server, call_id))[110] == [
        "ipad",
        "iphone",
        "pixel",
    ]


async def test_stop_after_the_ring_window_is_recorded_not_sent(http, make_server) -> None:
    server = make_server(ring_window_seconds=5)
    call_id = str(uuid.uuid4())
    await register(http, server, CALLEE, "iphone")
    await ring(http, server, call_id, event_time=datetime.now(UTC) - timedelta(seconds=4))
    await asyncio.sleep(1.2)  # the phone stops ringing by itself
    status, body = await post_events(http, server, [call_ended_event(call_id)])
    assert status == 200, body
    (outcome,) = body["events"][0]["deliveries"]
    assert outcome["status"] == "expired"
    assert "ring window over" in outcome["reason"]
    assert 110 not in by_event_id(await pushes(http, server, call_id))


async def test_a_stop_waits_for_its_ring_in_flight(http, nh_server, fake_nh) -> None:
    call_id = str(uuid.uuid4())
    await register(http, nh_server, CALLEE, "iphone")
    fake_nh.respond(201, times=1, delay=1.0)  # the ring is still at the hub when the call ends
    ring_task = asyncio.create_task(ring(http, nh_server, call_id))
    await asyncio.sleep(0.3)
    status, body = await post_events(http, nh_server, [call_ended_event(call_id)])
    assert status == 200, body
    assert (await ring_task)["status"] == "delivered"
    assert body["events"][0]["status"] == "delivered", body
    sent = [json.loads(json.dumps(p["body"]))["data"]["eventId"] for p in fake_nh.pushes]
    assert sent == [107, 110]  # the stop went out after its ring, not before


async def test_a_stop_cancels_the_retries_of_a_ring_that_never_got_through(
    http, nh_server, fake_nh
) -> None:
    call_id = str(uuid.uuid4())
    await register(http, nh_server, CALLEE, "iphone")
    fake_nh.respond(500, times=1000)
    ring_task = asyncio.create_task(ring(http, nh_server, call_id))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    status, body = await post_events(http, nh_server, [call_ended_event(call_id)])
    assert status == 200, body
    report = await ring_task
    assert time.monotonic() - started < 5  # not the ring window nor the webhook deadline
    (outcome,) = report["deliveries"]
    assert outcome["status"] == "cancelled"
    assert report["status"] == "cancelled"
    # The phone never rang, so it gets no stop.
    assert [p for p in fake_nh.pushes if p["status"] == 201] == []
    assert all(p["body"]["data"]["eventId"] == 107 for p in fake_nh.pushes if "body" in p)


async def test_stop_ringing_through_notification_hubs(http, nh_server, fake_nh) -> None:
    call_id = str(uuid.uuid4())
    await register(http, nh_server, CALLEE, "iphone")
    await ring(http, nh_server, call_id)
    status, body = await post_events(http, nh_server, [call_ended_event(call_id)])
    assert status == 200, body
    stop = fake_nh.pushes[-1]
    assert stop["headers"]["apns-push-type"] == "voip"
    assert stop["headers"]["apns-collapse-id"] == call_id
    assert stop["body"]["data"]["eventId"] == 110
    assert stop["body"]["data"]["callId"] == call_id


async def test_stop_ringing_through_apns_and_fcm_direct(
    http,
    make_server,
    direct_settings,  # noqa: F811
    fake_apns,  # noqa: F811
    fake_fcm,  # noqa: F811
) -> None:
    server = make_server(**direct_settings())
    call_id = str(uuid.uuid4())
    await register(http, server, CALLEE, "iphone", app_id="com.contoso.calling")
    await register(http, server, CALLEE, "pixel", platform="fcm", token=fcm_token(3))
    assert (await ring(http, server, call_id))["status"] == "delivered"
    status, body = await post_events(http, server, [call_ended_event(call_id)])
    assert status == 200, body
    assert body["events"][0]["status"] == "delivered", body

    apns_stop = next(p for p in fake_apns.pushes if p["body"]["data"]["eventId"] == 110)
    assert apns_stop["push_type"] == "voip"
    assert apns_stop["topic"] == "com.contoso.calling.voip"
    assert apns_stop["headers"]["apns-priority"] == "10"
    assert apns_stop["headers"]["apns-collapse-id"] == call_id
    assert apns_stop["body"]["data"]["callId"] == call_id
    fcm_stop = next(p for p in fake_fcm.pushes if p["message"]["data"]["eventId"] == "110")
    android = fcm_stop["message"]["android"]
    assert android["priority"] == "HIGH"
    assert android["collapse_key"] == call_id
    assert int(android["ttl"].rstrip("s")) <= 45


@pytest.mark.parametrize(
    ("callee", "kind"),
    [
        ("8:orgid:7c3e2a51-6d5c-4d3f-9f7e-0b1c2d3e4f50", "microsoftTeamsUser"),
        ("28:orgid:2b9f1c3e-8a7d-4e6f-b5c4-d3e2f1a0b9c8", "unknown"),
    ],
)
async def test_teams_users_and_resource_accounts_ring(http, sandbox_server, callee, kind) -> None:
    call_id = str(uuid.uuid4())
    assert (await register(http, sandbox_server, callee, "desk-phone")).status == 201
    event = incoming_call_event(callee, CALLER, correlation_id=call_id)
    event["data"]["to"] = {"kind": kind, "rawId": callee}  # as the Teams quickstart shows
    status, body = await post_events(http, sandbox_server, [event])
    assert status == 200, body
    assert body["events"][0]["status"] == "delivered"
    assert by_event_id(await pushes(http, sandbox_server, call_id)) == {107: ["desk-phone"]}


async def test_stop_api_validates_and_names_the_field(http, sandbox_server) -> None:
    status, body = await stop_api(http, sandbox_server, "c1", identity="not-a-raw-id")
    assert status == 422
    assert body["detail"][0]["field"] == "identity"
    status, body = await stop_api(http, sandbox_server, "c1", answered_device="bad device")
    assert status == 422
    assert body["detail"][0]["field"] == "answered_device"
    status, body = await stop_api(http, sandbox_server, "c1", colour="red")
    assert status == 422
    status, body = await stop_api(http, sandbox_server, "never-rang")
    assert status == 404
    assert "no device rang" in body["detail"]


async def test_a_ring_after_the_stop_api_is_not_pushed_for_that_callee_only(
    http, sandbox_server
) -> None:
    other = acs_id("lifecycle-other")
    call_id = str(uuid.uuid4())
    await register(http, sandbox_server, CALLEE, "iphone")
    await register(http, sandbox_server, other, "iphone")
    await ring(http, sandbox_server, call_id)
    status, _ = await stop_api(http, sandbox_server, call_id, identity=CALLEE)
    assert status == 200
    assert (await ring(http, sandbox_server, call_id))["status"] == "cancelled"
    # A redirect of the same call to someone else still rings them.
    assert (await ring(http, sandbox_server, call_id, to=other))["status"] == "delivered"


async def test_stop_events_racing_on_two_postgres_instances_stop_each_device_once(
    tmp_path,
) -> None:
    from tests.test_postgres_instances import pg_instances

    async with pg_instances(tmp_path) as (urls, _, _), aiohttp.ClientSession() as http:
        for i, device in enumerate(("phone", "tablet", "desk")):
            async with http.put(
                f"{urls[i % 2]}/v1/identities/{CALLEE}/devices/{device}",
                json={"platform": "apns", "token": f"{i + 1:02x}" * 32},
            ) as resp:
                assert resp.status == 201

        async def post(url: str, events: list[Any]) -> tuple[int, Any]:
            async with http.post(f"{url}/api/events", json=events) as resp:
                return resp.status, await resp.json()

        for _ in range(10):
            call_id = str(uuid.uuid4())
            status, body = await post(
                urls[0], [incoming_call_event(CALLEE, CALLER, correlation_id=call_id)]
            )
            assert status == 200, body
            ended = call_ended_event(call_id)
            answered = participant_added_event(call_id, CALLEE)
            answers = await asyncio.gather(
                post(urls[0], [ended]),
                post(urls[1], [copy.deepcopy(ended)]),
                post(urls[1], [answered]),
            )
            for status, body in answers:
                if status == 503:  # the other instance held the claim: Event Grid retries
                    status, body = await post(urls[0], [ended])
                assert status == 200, body
            stops: list[str] = []
            for url in urls:
                async with http.get(
                    f"{url}/v1/sandbox/pushes", params={"call_id": call_id, "limit": "100"}
                ) as resp:
                    stops += [
                        p["device_id"]
                        for p in (await resp.json())["pushes"]
                        if p["body"]["data"]["eventId"] == 110
                    ]
            assert sorted(stops) == ["desk", "phone", "tablet"]


def test_simulate_answered_and_call_ended_show_the_stops(tmp_path) -> None:
    """The README's lifecycle walk-through, as a user runs it."""
    import subprocess
    import urllib.request

    from tests.test_cli import RINGRELAY, clean_env, free_port, serve, wait_healthy

    port = free_port()
    proc = serve(port, tmp_path, clean_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        for device, body in (
            ("iphone-1", b'{"platform": "apns", "token": "' + b"ab" * 32 + b'"}'),
            ("pixel-1", b'{"platform": "fcm", "token": "fcm-registration-token-from-the-app"}'),
        ):
            req = urllib.request.Request(
                f"{url}/v1/identities/{CALLEE}/devices/{device}",
                data=body,
                method="PUT",
                headers={"Content-Type": "application/json"},
            )
            assert urllib.request.urlopen(req, timeout=10).status == 201

        def simulate(*args: str) -> str:
            out = subprocess.run(
                [*RINGRELAY, "simulate", *args, "--server", url],
                capture_output=True,
                text=True,
                env=clean_env(),
                timeout=60,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout

        simulate("incoming-call", "--to", CALLEE, "--call-id", "demo-call-1")
        answered = simulate("answered", "--call-id", "demo-call-1", "--device", "iphone-1")
        assert "devices stopped: 1" in answered
        assert "pixel-1 [fcm] accepted via sandbox" in answered
        assert "iphone-1 [apns] cancelled" in answered
        ended = simulate("call-ended", "--call-id", "demo-call-1")
        assert "event status: delivered" in ended
        assert "call ended" in ended
        with urllib.request.urlopen(f"{url}/v1/sandbox/pushes?call_id=demo-call-1") as resp:
            found = json.loads(resp.read())["pushes"]
        assert sorted((p["device_id"], p["kind"]) for p in found) == [
            ("iphone-1", "call"),
            ("pixel-1", "call"),
            ("pixel-1", "stop"),
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_stop_survives_a_restart_of_the_sqlite_server(http, make_server, tmp_path) -> None:
    """SQLite keeps recent stops in memory for the IncomingCall path: a restarted server must
    still know that a call stopped before it restarted."""
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    first = make_server(database_url=url)
    call_id = str(uuid.uuid4())
    await register(http, first, CALLEE, "iphone")
    status, _ = await post_events(http, first, [call_ended_event(call_id)])
    assert status == 200
    first.stop()
    second = make_server(database_url=url)
    assert (await ring(http, second, call_id))["status"] == "cancelled"
