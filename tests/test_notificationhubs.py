"""Delivery through Notification Hubs Direct Send, against the project's fake hub over TLS: what
goes on the wire, SAS signing and caching, outcome classes, retries without double pushes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from ringrelay.providers.notificationhubs import make_sas_token
from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, apns_token, post_events, register
from tests.test_cli import free_port

CALLEE = acs_id("nh-callee")


def accepted(fake, handle: str | None = None) -> list[dict]:
    return [
        p
        for p in fake.pushes
        if p.get("status") == 201 and (handle is None or p["handle"] == handle)
    ]


async def test_direct_send_wire_format(http, nh_server, fake_nh) -> None:
    ios, android = apns_token(11), "fcm:android-token_1"
    await register(http, nh_server, CALLEE, "iphone", platform="apns", token=ios)
    await register(http, nh_server, CALLEE, "pixel", platform="fcm", token=android)
    await register(
        http, nh_server, CALLEE, "kindle", platform="adm", token="amzn1.adm-registration"
    )
    await register(
        http, nh_server, CALLEE, "surface", platform="wns", token="https://wns.example/chan?x=1"
    )
    event = incoming_call_event(CALLEE, display_name="Alice")
    status, body = await post_events(http, nh_server, [event])
    assert status == 200, body
    report = body["events"][0]
    assert report["status"] == "delivered"
    assert {d["provider"] for d in report["deliveries"]} == {"notificationhubs"}
    assert all(d["provider_ref"] for d in report["deliveries"])  # notification ids from Location

    pushes = {p["format"]: p for p in accepted(fake_nh)}  # the fake verified each SAS
    assert set(pushes) == {"apple", "fcmv1", "adm", "windows"}
    apple = pushes["apple"]
    assert apple["handle"] == ios
    headers = apple["headers"]
    assert headers["ServiceBusNotification-Apns-Push-Type"] == "voip"
    assert headers["apns-push-type"] == "voip"
    assert headers["apns-priority"] == "10"
    ring_end = time.time() + 45
    assert int(headers["apns-expiration"]) <= ring_end
    expiry = datetime.strptime(headers["ServiceBusNotification-Apns-Expiry"], "%Y-%m-%dT%H:%M:%SZ")
    assert expiry.replace(tzinfo=UTC).timestamp() <= ring_end
    assert apple["body"]["aps"] == {}
    assert apple["body"]["data"]["displayName"] == "Alice"
    assert apple["body"]["data"]["callId"] == event["data"]["correlationId"]

    fcm = pushes["fcmv1"]
    assert fcm["handle"] == android
    message = fcm["body"]["message"]
    assert message["data"]["eventId"] == "107"
    assert message["android"]["priority"] == "HIGH"
    assert 40 <= int(message["android"]["ttl"].rstrip("s")) <= 45
    assert pushes["windows"]["headers"]["X-WNS-Type"] == "wns/raw"


async def test_sas_token_is_cached_across_pushes(http, nh_server, fake_nh) -> None:
    for i in range(3):
        await register(http, nh_server, CALLEE, f"d{i}", token=apns_token(100 + i))
    for _ in range(4):
        status, _ = await post_events(http, nh_server, [incoming_call_event(CALLEE)])
        assert status == 200
    assert len(accepted(fake_nh)) == 12
    provider = nh_server.relay.router.providers()[0]
    assert provider.sas.minted == 1


def test_sas_token_signature_matches_the_documented_algorithm() -> None:
    # Worked example computed independently with the algorithm in Microsoft's docs/samples:
    # HMAC-SHA256(key as UTF-8, urlencode(lower(uri)) + "\n" + expiry), base64, urlencoded.
    import base64
    import hashlib
    import hmac
    from urllib.parse import quote_plus, unquote

    token = make_sas_token("https://NS.servicebus.windows.net/Hub", "rule", "k3y+/=", 1700000000)
    fields = dict(
        part.split("=", 1) for part in token.removeprefix("SharedAccessSignature ").split("&")
    )
    assert fields["sr"] == quote_plus("https://ns.servicebus.windows.net/hub").lower()
    assert fields["se"] == "1700000000" and fields["skn"] == "rule"
    expected = base64.b64encode(
        hmac.new(b"k3y+/=", f"{fields['sr']}\n1700000000".encode(), hashlib.sha256).digest()
    ).decode()
    assert unquote(fields["sig"]) == expected


@pytest.mark.parametrize(
    ("status", "words"),
    [(401, "authorization"), (403, "forbidden"), (404, "hub not found")],
)
async def test_configuration_errors_are_settled_and_reported(
    http, nh_server, fake_nh, status, words
) -> None:
    await register(http, nh_server, CALLEE, "phone")
    fake_nh.respond(status, times=10)
    http_status, body = await post_events(http, nh_server, [incoming_call_event(CALLEE)])
    assert http_status == 200  # a retry cannot fix it: Event Grid must not retry
    (delivery,) = body["events"][0]["deliveries"]
    assert delivery["status"] == "config_error"
    assert words in delivery["reason"]
    assert delivery["attempts"] == 1
    assert body["events"][0]["status"] == "failed"


async def test_wrong_key_is_caught_by_the_hub(http, make_server, nh_settings, fake_nh) -> None:
    settings = dict(nh_settings)
    settings["nh_connection_string"] = settings["nh_connection_string"].replace(
        fake_nh.key, "wrong-key"
    )
    server = make_server(**settings)
    await register(http, server, CALLEE, "phone")
    status, body = await post_events(http, server, [incoming_call_event(CALLEE)])
    assert status == 200
    assert body["events"][0]["deliveries"][0]["status"] == "config_error"
    assert fake_nh.pushes[-1]["error"] == "signature mismatch"


async def test_transient_failures_are_retried_then_delivered_once(http, nh_server, fake_nh) -> None:
    token = apns_token(21)
    await register(http, nh_server, CALLEE, "phone", token=token)
    fake_nh.respond(500, times=2)
    status, body = await post_events(http, nh_server, [incoming_call_event(CALLEE)])
    assert status == 200
    (delivery,) = body["events"][0]["deliveries"]
    assert delivery["status"] == "accepted" and delivery["attempts"] == 3
    assert [p["status"] for p in fake_nh.pushes] == [500, 500, 201]


async def test_retry_after_is_honoured(http, nh_server, fake_nh) -> None:
    await register(http, nh_server, CALLEE, "phone")
    fake_nh.respond(429, times=1, retry_after=0.6)
    started = time.monotonic()
    status, body = await post_events(http, nh_server, [incoming_call_event(CALLEE)])
    assert status == 200
    assert body["events"][0]["deliveries"][0]["attempts"] == 2
    assert time.monotonic() - started >= 0.6  # waited as told (not a timing target)


async def test_timeouts_are_transient_and_retried(http, make_server, nh_settings, fake_nh) -> None:
    server = make_server(nh_timeout_seconds=0.3, **nh_settings)
    await register(http, server, CALLEE, "phone")
    fake_nh.respond(201, times=1, delay=1.0)  # the first attempt hangs past the timeout
    status, body = await post_events(http, server, [incoming_call_event(CALLEE)])
    assert status == 200
    (delivery,) = body["events"][0]["deliveries"]
    assert delivery["status"] == "accepted" and delivery["attempts"] == 2


async def test_unsettled_delivery_is_503_and_the_retry_pushes_only_what_is_missing(
    http, make_server, nh_settings, fake_nh
) -> None:
    server = make_server(webhook_deadline_seconds=1.0, **nh_settings)
    ok_token, bad_token = apns_token(31), apns_token(32)
    await register(http, server, CALLEE, "ok", token=ok_token)
    await register(http, server, CALLEE, "flaky", token=bad_token)
    fake_nh.respond(503, times=1000, handle=bad_token)
    event = incoming_call_event(CALLEE)
    status, body = await post_events(http, server, [event])
    assert status == 503  # Event Grid will retry
    outcomes = {d["device_id"]: d for d in body["events"][0]["deliveries"]}
    assert outcomes["ok"]["status"] == "accepted"
    assert outcomes["flaky"]["status"] == "transient"
    assert outcomes["flaky"]["attempts"] >= 2
    assert len(accepted(fake_nh, ok_token)) == 1

    fake_nh.script.clear()  # the hub recovers; Event Grid redelivers the same event
    status, body = await post_events(http, server, [event])
    assert status == 200
    outcomes = {d["device_id"]: d for d in body["events"][0]["deliveries"]}
    assert outcomes["flaky"]["status"] == "accepted"
    assert outcomes["ok"]["status"] == "accepted"
    assert len(accepted(fake_nh, ok_token)) == 1  # not pushed again
    assert len(accepted(fake_nh, bad_token)) == 1
    async with http.get(f"{server.url}/v1/calls/{event['data']['correlationId']}") as resp:
        record = (await resp.json())["events"][0]
    assert record["status"] == "delivered"
    assert {d["device_id"]: d["attempts"] for d in record["deliveries"]}["flaky"] >= 3


async def test_failures_past_the_ring_window_are_expired(http, make_server, nh_settings, fake_nh):
    server = make_server(ring_window_seconds=5, **nh_settings)
    await register(http, server, CALLEE, "phone")
    fake_nh.respond(500, times=1000)
    event = incoming_call_event(CALLEE, event_time=datetime.now(UTC) - timedelta(seconds=4))
    status, body = await post_events(http, server, [event])
    assert status == 200  # nothing left that a retry could fix in time
    (delivery,) = body["events"][0]["deliveries"]
    assert delivery["status"] == "expired"
    assert "ring window" in delivery["reason"]
    assert body["events"][0]["status"] == "expired"


async def test_payload_over_the_hubs_apns_limit_is_rejected_unsent(http, nh_server, fake_nh):
    await register(http, nh_server, CALLEE, "phone")
    event = incoming_call_event(CALLEE, display_name="x" * 5000)
    status, body = await post_events(http, nh_server, [event])
    assert status == 200
    (delivery,) = body["events"][0]["deliveries"]
    assert delivery["status"] == "rejected" and "4096" in delivery["reason"]
    assert list(fake_nh.pushes) == []


async def test_hub_unreachable_is_transient(http, make_server, nh_settings) -> None:
    settings = dict(nh_settings)
    # A closed port: nothing listens (a fixed one, 9, may be taken on a shared machine).
    settings["nh_hub_url"] = f"https://127.0.0.1:{free_port()}/ringrelay-test/messages/"
    server = make_server(webhook_deadline_seconds=0.5, **settings)
    await register(http, server, CALLEE, "phone")
    status, body = await post_events(http, server, [incoming_call_event(CALLEE)])
    assert status == 503
    delivery = body["events"][0]["deliveries"][0]
    assert delivery["status"] == "transient" and "connection" in delivery["reason"]


async def test_past_the_concurrency_limit_deliveries_are_503_at_once(
    http, make_server, nh_settings, fake_nh
) -> None:
    """Two deliveries hang at the hub; a third, past webhook_max_concurrent=2, is answered 503
    without waiting (Event Grid retries it), and nothing of it is pushed or recorded; once the
    first two are answered, the same delivery goes through."""
    import asyncio

    server = make_server(webhook_max_concurrent=2, **nh_settings)
    await register(http, server, CALLEE, "phone")
    fake_nh.respond(201, times=2, delay=1.5)
    slow = [
        asyncio.create_task(post_events(http, server, [incoming_call_event(CALLEE)]))
        for _ in range(2)
    ]
    while sum(entry.times for entry in fake_nh.script) > 0:  # both reached the hub
        await asyncio.sleep(0.02)
    shed = incoming_call_event(CALLEE)
    status, body = await post_events(http, server, [shed])
    assert status == 503 and "overloaded" in body["error"]
    assert [s for s, _ in await asyncio.gather(*slow)] == [200, 200]
    async with http.get(f"{server.url}/v1/calls/{shed['data']['correlationId']}") as resp:
        assert resp.status == 404  # nothing recorded for the shed delivery
    status, _ = await post_events(http, server, [shed])  # Event Grid's retry
    assert status == 200
    async with http.get(f"{server.url}/metrics") as resp:
        assert "ringrelay_webhook_shed_total 1.0" in await resp.text()


@contextlib.asynccontextmanager
async def tcp_forwarder(target_port: int) -> AsyncIterator[int]:
    """A TCP proxy on loopback in front of `target_port` (a private endpoint's address, say):
    bytes pass unchanged, TLS included; yields the proxy's port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_sas_scope_is_the_hub_not_the_proxy_address(
    http, make_server, nh_settings, fake_nh
) -> None:
    """ANHHubUrl through a proxy: the token is scoped to the connection string's endpoint + hub
    (what the hub checks), not to the proxy's address the request goes to."""
    hub_port = int(fake_nh.base_url.rsplit(":", 1)[1])
    async with tcp_forwarder(hub_port) as proxy_port:
        server = make_server(
            **nh_settings, nh_hub_url=f"https://127.0.0.1:{proxy_port}/{fake_nh.hub}/messages/"
        )
        await register(http, server, CALLEE, "iphone", platform="apns", token=apns_token(14))
        status, body = await post_events(http, server, [incoming_call_event(CALLEE)])
    assert status == 200, body
    assert body["events"][0]["status"] == "delivered", body
    assert len(accepted(fake_nh)) == 1  # it came in through the proxy, and the hub took it


async def test_untrusted_hub_certificate_is_a_configuration_error_at_once(
    http, make_server, nh_settings
) -> None:
    """The hub's certificate does not verify (its CA not trusted): settled on the first attempt
    as config_error naming RINGRELAY_NH_CA_FILE, answered 200 at once; no retries for 12 s."""
    server = make_server(**{**nh_settings, "nh_ca_file": None})
    await register(http, server, CALLEE, "iphone", platform="apns", token=apns_token(15))
    status, body = await post_events(http, server, [incoming_call_event(CALLEE)])
    assert status == 200, body  # settled: Event Grid's retry could not fix it
    (outcome,) = body["events"][0]["deliveries"]
    assert outcome["status"] == "config_error", outcome
    assert outcome["attempts"] == 1
    assert "certificate" in outcome["reason"] and "RINGRELAY_NH_CA_FILE" in outcome["reason"]


@pytest.mark.parametrize(
    ("hub_name", "hub_url"),
    [
        ("calls", "https://proxy.internal:8443/nh/calls/messages/"),
        (None, "https://proxy.internal:8443/nh/calls/messages/"),  # the name from the URL
        (None, "https://10.1.2.3/calls/messages"),
    ],
)
def test_sas_scope_is_endpoint_and_hub_whatever_the_hub_url(hub_name, hub_url) -> None:
    from ringrelay.config import load_settings

    settings = load_settings(
        nh_connection_string="Endpoint=sb://contoso.servicebus.windows.net/;"
        "SharedAccessKeyName=DefaultFullSharedAccessSignature;SharedAccessKey=k",
        nh_hub_name=hub_name,
        nh_hub_url=hub_url,
    )
    assert settings.nh_messages_url().startswith(hub_url.rstrip("/"))
    assert settings.nh_resource_uri() == "https://contoso.servicebus.windows.net/calls"
