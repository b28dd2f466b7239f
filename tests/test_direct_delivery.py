"""Direct delivery over the wire: APNs over HTTP/2 + TLS and FCM HTTP v1, against the project's
fake servers, with several apps, every outcome class, token renewal, reconnects and isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from ringrelay.fakes import tls
from ringrelay.fakes.apns import FakeAPNs, write_signing_key
from ringrelay.fakes.fcm import FakeFCM, write_service_account
from ringrelay.providers.fcm import AccessToken, read_service_account
from ringrelay.providers.http2 import Http2Pool
from ringrelay.simulate import incoming_call_event
from tests.conftest import (
    BackgroundLoop,
    RunningServer,
    acs_id,
    apns_token,
    post_events,
    register,
)

TEAM = "TEAM123456"
KEY_A, KEY_B = "KEYAAAAAAA", "KEYBBBBBBB"
BUNDLE_A, BUNDLE_B = "com.contoso.calling", "com.contoso.meet"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    folder = tmp_path_factory.mktemp("apns-keys")
    return {
        kid: (folder / f"AuthKey_{kid}.p8", write_signing_key(folder / f"AuthKey_{kid}.p8"))
        for kid in (KEY_A, KEY_B)
    }


@pytest.fixture(scope="module")
def _apns_session(
    background_loop: BackgroundLoop,
    certs: tls.TestCertificates,
    keys: dict[str, tuple[Path, bytes]],
) -> Iterator[FakeAPNs]:
    fake = FakeAPNs()
    fake.add_key(TEAM, KEY_A, keys[KEY_A][1], {BUNDLE_A})
    fake.add_key(TEAM, KEY_B, keys[KEY_B][1], {BUNDLE_B})
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    yield fake
    background_loop.run(fake.stop())


@pytest.fixture
def fake_apns(_apns_session: FakeAPNs) -> FakeAPNs:
    _apns_session.reset()
    return _apns_session


@pytest.fixture(scope="module")
def _fcm_session(
    background_loop: BackgroundLoop,
    certs: tls.TestCertificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeFCM, Path]]:
    fake = FakeFCM()
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    account = tmp_path_factory.mktemp("fcm") / "service-account.json"
    write_service_account(account, "contoso-calling", fake.token_uri)
    fake.trust_service_account(account)
    yield fake, account
    background_loop.run(fake.stop())


@pytest.fixture
def fake_fcm(_fcm_session: tuple[FakeFCM, Path]) -> FakeFCM:
    _fcm_session[0].reset()
    return _fcm_session[0]


@pytest.fixture
def direct_settings(
    fake_apns: FakeAPNs,
    fake_fcm: FakeFCM,
    _fcm_session: tuple[FakeFCM, Path],
    certs: tls.TestCertificates,
    keys: dict[str, tuple[Path, bytes]],
) -> Callable[..., dict[str, Any]]:
    def build(
        *, two_apps: bool = False, apns: dict[str, Any] | None = None, fcm: bool = True, **more: Any
    ) -> dict[str, Any]:
        common = {"endpoint": fake_apns.base_url, "ca_file": certs.ca_file, "timeout_seconds": 2.0}
        apps = [
            {
                "bundle_id": BUNDLE_A,
                "team_id": TEAM,
                "key_id": KEY_A,
                "key_file": keys[KEY_A][0],
                **common,
                **(apns or {}),
            }
        ]
        if two_apps:
            apps.append(
                {
                    "bundle_id": BUNDLE_B,
                    "team_id": TEAM,
                    "key_id": KEY_B,
                    "key_file": keys[KEY_B][0],
                    **common,
                }
            )
        settings: dict[str, Any] = {"apns": apps, **more}
        if fcm:
            settings["fcm"] = [
                {
                    "service_account_file": _fcm_session[1],
                    "endpoint": fake_fcm.base_url,
                    "ca_file": certs.ca_file,
                    "timeout_seconds": 2.0,
                }
            ]
        return settings

    return build


def fcm_token(n: int) -> str:
    return f"fcm-{n:04d}:APA91b" + "x" * 120


async def call(
    http: aiohttp.ClientSession, server: RunningServer, callee: str, **kw: Any
) -> tuple[int, Any, dict[str, Any]]:
    event = incoming_call_event(callee, **kw)
    status, body = await post_events(http, server, [event])
    return status, body, event


def outcomes(body: Any) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in body["events"][0]["deliveries"]}


async def devices(http: aiohttp.ClientSession, server: RunningServer, identity: str) -> list[str]:
    async with http.get(f"{server.url}/v1/identities/{identity}/devices") as resp:
        return [d["device_id"] for d in (await resp.json())["devices"]]


async def removed(
    http: aiohttp.ClientSession, server: RunningServer, identity: str
) -> list[dict[str, Any]]:
    async with http.get(f"{server.url}/v1/identities/{identity}/removed-devices") as resp:
        assert resp.status == 200
        return list((await resp.json())["removed"])


# --- the whole path ------------------------------------------------------------------------


async def test_call_reaches_every_device_on_both_platforms_and_two_apps(
    http, make_server, direct_settings, fake_apns: FakeAPNs, fake_fcm: FakeFCM
) -> None:
    server = make_server(**direct_settings(two_apps=True))
    alice = acs_id("alice-direct")
    tokens = {"iphone": apns_token(11), "ipad": apns_token(12)}
    assert (
        await register(http, server, alice, "iphone", token=tokens["iphone"], app_id=BUNDLE_A)
    ).status == 201
    assert (
        await register(http, server, alice, "ipad", token=tokens["ipad"], app_id=BUNDLE_B)
    ).status == 201
    assert (
        await register(http, server, alice, "pixel", platform="fcm", token=fcm_token(1))
    ).status == 201

    before = time.time()
    fcm_connections = fake_fcm.connections_opened
    status, body, event = await call(http, server, alice, display_name="Bob")
    assert status == 200, body
    assert body["events"][0]["status"] == "delivered"
    result = outcomes(body)
    assert {d: o["status"] for d, o in result.items()} == {
        "iphone": "accepted",
        "ipad": "accepted",
        "pixel": "accepted",
    }

    ring_end = before + server.settings.ring_window_seconds
    by_token = {p["device_token"]: p for p in fake_apns.pushes}
    assert set(by_token) == set(tokens.values())
    for device, bundle in (("iphone", BUNDLE_A), ("ipad", BUNDLE_B)):
        push = by_token[tokens[device]]
        headers = push["headers"]
        assert headers["apns-topic"] == f"{bundle}.voip"
        assert headers["apns-push-type"] == "voip"
        assert headers["apns-priority"] == "10"
        # Apple never delivers after the ring ends.
        assert abs(int(headers["apns-expiration"]) - ring_end) <= 2
        # Our own apns-id, recorded in the ledger.
        assert result[device]["provider_ref"] == headers["apns-id"]
        data = push["body"]["data"]
        assert data["callId"] == event["data"]["correlationId"]
        assert data["eventId"] == 107 and data["displayName"] == "Bob"
        assert push["body"]["aps"] == {}
        # Each app's JWT is signed with its own key.
        claims = jwt.get_unverified_header(headers["authorization"].removeprefix("bearer "))
        assert claims["kid"] == (KEY_A if bundle == BUNDLE_A else KEY_B)

    [fcm_push] = list(fake_fcm.pushes)
    # Over HTTP/2: the fake counts only HTTP/2 connections.
    assert fcm_push["headers"][":method"] == "POST"
    assert fcm_push["headers"]["authorization"].startswith("Bearer ya29.fake-")
    assert fake_fcm.connections_opened == fcm_connections + 1
    message = fcm_push["message"]
    assert message["token"] == fcm_token(1)
    assert message["android"]["priority"] == "HIGH"
    ttl = float(message["android"]["ttl"].removesuffix("s"))
    assert 0 < ttl <= server.settings.ring_window_seconds
    assert all(isinstance(v, str) for v in message["data"].values())
    assert message["data"]["callId"] == event["data"]["correlationId"]
    assert result["pixel"]["provider_ref"].startswith("projects/contoso-calling/messages/")

    # The outcome per device is retrievable per call.
    async with http.get(f"{server.url}/v1/calls/{event['data']['correlationId']}") as resp:
        recorded = (await resp.json())["events"][0]["deliveries"]
    assert {d["device_id"]: d["provider"] for d in recorded} == {
        "iphone": "apns",
        "ipad": "apns",
        "pixel": "fcm",
    }


async def test_registrations_without_a_transport_or_app_are_refused_and_not_stored(
    http, make_server, direct_settings
) -> None:
    server = make_server(**direct_settings(two_apps=True, fcm=False))
    bob = acs_id("bob-direct")

    async def refused(device: str, **body: Any) -> str:
        body = {"platform": "apns", "token": apns_token(7), **body}
        url = f"{server.url}/v1/identities/{bob}/devices/{device}"
        async with http.put(url, json=body) as resp:
            assert resp.status == 422
            return str((await resp.json())["detail"][0]["field"])

    assert await refused("pixel", platform="fcm", token=fcm_token(2)) == "platform"
    assert await refused("iphone") == "app_id"  # two APNs apps: which one?
    assert await refused("iphone", app_id="com.unknown.app") == "app_id"
    assert await devices(http, server, bob) == []
    assert (await register(http, server, bob, "iphone", app_id=BUNDLE_B)).status == 201


# --- outcome classes ----------------------------------------------------------------------------

APNS_OUTCOMES = [
    # (status, reason, delivery status, token removed)
    (410, "Unregistered", "rejected", True),
    (410, "ExpiredToken", "rejected", True),
    (400, "BadDeviceToken", "rejected", True),
    (400, "DeviceTokenNotForTopic", "config_error", False),
    (400, "TopicDisallowed", "config_error", False),
    (403, "InvalidProviderToken", "config_error", False),
    (413, "PayloadTooLarge", "rejected", False),
]


@pytest.mark.parametrize(("status", "reason", "verdict", "removed_token"), APNS_OUTCOMES)
async def test_apns_outcomes(
    http, make_server, direct_settings, fake_apns: FakeAPNs, status, reason, verdict, removed_token
) -> None:
    server = make_server(**direct_settings(fcm=False))
    carol = acs_id(f"carol-{status}-{reason}")
    await register(http, server, carol, "iphone")
    fake_apns.respond(
        status, reason, timestamp_ms=int(time.time() * 1000) + 1000 if status == 410 else None
    )

    code, body, _ = await call(http, server, carol)
    assert code == 200  # settled either way: Event Grid must not retry
    outcome = outcomes(body)["iphone"]
    assert outcome["status"] == verdict
    assert reason in outcome["reason"]
    assert outcome["attempts"] == 1
    left = await devices(http, server, carol)
    audit = await removed(http, server, carol)
    if removed_token:
        assert left == []
        assert [r["device_id"] for r in audit] == ["iphone"]
        assert reason in audit[0]["reason"]
    else:
        assert left == ["iphone"] and audit == []


async def test_apns_410_older_than_the_registration_keeps_it(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    """APNs' timestamp says when the token stopped being valid; a re-registration after that
    moment (the app got a fresh token... or the same one back) must survive."""
    server = make_server(**direct_settings(fcm=False))
    dave = acs_id("dave-410")
    await register(http, server, dave, "iphone")
    fake_apns.respond(410, "Unregistered", timestamp_ms=int((time.time() - 3600) * 1000))
    code, body, _ = await call(http, server, dave)
    assert code == 200, body
    assert outcomes(body)["iphone"]["status"] == "rejected"
    assert await devices(http, server, dave) == ["iphone"]
    assert await removed(http, server, dave) == []


@pytest.mark.parametrize(
    ("status", "reason"),
    [(500, "InternalServerError"), (503, "ServiceUnavailable"), (429, "TooManyRequests")],
)
async def test_apns_transient_failures_are_retried_then_delivered_once(
    http, make_server, direct_settings, fake_apns: FakeAPNs, status, reason
) -> None:
    server = make_server(**direct_settings(fcm=False))
    erin = acs_id(f"erin-{status}")
    await register(http, server, erin, "iphone")
    fake_apns.respond(status, reason, times=2)
    code, body, _ = await call(http, server, erin)
    assert code == 200, body
    outcome = outcomes(body)["iphone"]
    assert outcome["status"] == "accepted" and outcome["attempts"] == 3
    assert fake_apns.counts[200] == 1 and fake_apns.counts[status] == 2


async def test_apns_hang_is_retried_within_the_window_then_expired(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(
        **direct_settings(fcm=False, apns={"timeout_seconds": 1.0}), ring_window_seconds=5
    )
    frank = acs_id("frank-hang")
    await register(http, server, frank, "iphone")
    fake_apns.respond(200, "", times=100, delay=30)
    started = time.monotonic()
    code, body, _ = await call(http, server, frank)
    elapsed = time.monotonic() - started
    outcome = outcomes(body)["iphone"]
    assert outcome["status"] == "expired" and "timeout" in outcome["reason"]
    assert outcome["attempts"] >= 2  # retried inside the window
    assert code == 200 and elapsed < 8  # settled as expired, well inside Event Grid's 30 s


FCM_OUTCOMES = [
    # (error code, field violation, delivery status, token removed)
    ("UNREGISTERED", None, "rejected", True),
    ("INVALID_ARGUMENT", "message.token", "rejected", True),
    ("INVALID_ARGUMENT", "message.data", "rejected", False),
    ("SENDER_ID_MISMATCH", None, "rejected", True),
    ("THIRD_PARTY_AUTH_ERROR", None, "config_error", False),
]


@pytest.mark.parametrize(("error_code", "field", "verdict", "removed_token"), FCM_OUTCOMES)
async def test_fcm_outcomes(
    http, make_server, direct_settings, fake_fcm: FakeFCM, error_code, field, verdict, removed_token
) -> None:
    server = make_server(**direct_settings())
    gina = acs_id(f"gina-{error_code}-{field}")
    await register(http, server, gina, "pixel", platform="fcm", token=fcm_token(3))
    status = {
        "UNREGISTERED": 404,
        "INVALID_ARGUMENT": 400,
        "SENDER_ID_MISMATCH": 403,
        "THIRD_PARTY_AUTH_ERROR": 401,
    }[error_code]
    fake_fcm.respond(status, error_code, field_violation=field)
    code, body, _ = await call(http, server, gina)
    assert code == 200
    outcome = outcomes(body)["pixel"]
    assert outcome["status"] == verdict and error_code in outcome["reason"]
    assert outcome["attempts"] == 1
    if removed_token:
        assert await devices(http, server, gina) == []
        assert error_code in (await removed(http, server, gina))[0]["reason"]
    else:
        assert await devices(http, server, gina) == ["pixel"]


@pytest.mark.parametrize(
    ("status", "error_code"), [(429, "QUOTA_EXCEEDED"), (503, "UNAVAILABLE"), (500, "INTERNAL")]
)
async def test_fcm_transient_failures_honour_retry_after(
    http, make_server, direct_settings, fake_fcm: FakeFCM, status, error_code
) -> None:
    server = make_server(**direct_settings())
    hank = acs_id(f"hank-{status}")
    await register(http, server, hank, "pixel", platform="fcm", token=fcm_token(4))
    fake_fcm.respond(status, error_code, retry_after=1)
    started = time.monotonic()
    code, body, _ = await call(http, server, hank)
    assert code == 200
    outcome = outcomes(body)["pixel"]
    assert outcome["status"] == "accepted" and outcome["attempts"] == 2
    assert time.monotonic() - started >= 1.0  # waited as told
    assert fake_fcm.counts[200] == 1


# --- tokens and connections ---------------------------------------------------------------------


async def test_apns_provider_token_is_shared_and_renewed_on_schedule(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False))
    ivan = acs_id("ivan-token")
    for n in range(5):
        await register(http, server, ivan, f"phone{n}", token=apns_token(100 + n))
    for _ in range(3):
        code, body, _ = await call(http, server, ivan)
        assert code == 200 and body["events"][0]["status"] == "delivered"
    # 15 pushes over concurrent streams, one JWT: never minted per push or per connection.
    assert len(fake_apns.pushes) == 15
    assert len(fake_apns.provider_tokens) == 1

    # 40 minutes later (the token's clock moved back, not the test's), the next push renews it.
    [provider] = [p for p in server.relay.router.providers() if p.name == "apns"]
    provider.token._issued_at -= 41 * 60  # type: ignore[attr-defined]
    fake_apns.min_token_renewal_seconds = 0  # the fake sees both tokens within seconds
    code, body, _ = await call(http, server, ivan)
    assert code == 200 and body["events"][0]["status"] == "delivered"
    assert len(fake_apns.provider_tokens) == 2


async def test_apns_expired_provider_token_is_renewed_once_unless_too_young(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False))
    judy = acs_id("judy-expired-jwt")
    await register(http, server, judy, "iphone")
    # A fresh token called expired: our clock must be off; renewing would earn a 429.
    fake_apns.respond(403, "ExpiredProviderToken")
    code, body, _ = await call(http, server, judy)
    outcome = outcomes(body)["iphone"]
    assert outcome["status"] == "config_error" and "clock" in outcome["reason"]
    assert len(fake_apns.provider_tokens) == 1

    [provider] = [p for p in server.relay.router.providers() if p.name == "apns"]
    provider.token._issued_at -= 30 * 60  # type: ignore[attr-defined]
    fake_apns.min_token_renewal_seconds = 0
    fake_apns.respond(403, "ExpiredProviderToken")
    code, body, _ = await call(http, server, judy)
    assert code == 200, body
    assert outcomes(body)["iphone"]["status"] == "accepted"
    assert len(fake_apns.provider_tokens) == 2


async def test_fcm_access_token_is_cached_and_refreshed_when_refused(
    http, make_server, direct_settings, fake_fcm: FakeFCM
) -> None:
    server = make_server(**direct_settings())
    kim = acs_id("kim-oauth")
    for n in range(4):
        await register(http, server, kim, f"pixel{n}", platform="fcm", token=fcm_token(10 + n))
    requests_before = fake_fcm.token_requests
    for _ in range(3):
        code, body, _ = await call(http, server, kim)
        assert body["events"][0]["status"] == "delivered"
    assert fake_fcm.token_requests - requests_before <= 1  # 12 pushes, at most one exchange

    fake_fcm.expire_access_tokens()
    code, body, _ = await call(http, server, kim)
    assert code == 200 and body["events"][0]["status"] == "delivered"
    assert fake_fcm.token_requests - requests_before == 2


async def test_fcm_a_late_refusal_of_an_old_token_keeps_its_replacement(
    _fcm_session: tuple[FakeFCM, Path], fake_fcm: FakeFCM, certs: tls.TestCertificates
) -> None:
    """Concurrent pushes refused with the same expired token: the first refusal renews it; one
    that arrives after the renewal must not throw the new token away (seen in CI: 3 token
    exchanges for one expiry)."""
    token = AccessToken(read_service_account(_fcm_session[1]), str(certs.ca_file))
    old = await token.header()
    token.invalidate(old)
    new = await token.header()
    assert new != old and token.refreshes == 2
    token.invalidate(old)  # the late 401, carrying the old token
    assert await token.header() == new
    assert token.refreshes == 2


@pytest.mark.parametrize("how", ["goaway", "drop"])
async def test_apns_reconnects_without_losing_a_push(
    http,
    make_server,
    direct_settings,
    fake_apns: FakeAPNs,
    background_loop: BackgroundLoop,
    how: str,
) -> None:
    server = make_server(**direct_settings(fcm=False))
    leo = acs_id(f"leo-{how}")
    await register(http, server, leo, "iphone")
    code, body, _ = await call(http, server, leo)
    assert body["events"][0]["status"] == "delivered"
    opened = fake_apns.connections_opened

    # The connection goes away between calls: the next push opens a new one.
    background_loop.run(fake_apns.goaway() if how == "goaway" else fake_apns.drop_connections())
    code, body, _ = await call(http, server, leo)
    assert code == 200 and body["events"][0]["status"] == "delivered"
    assert fake_apns.connections_opened == opened + 1

    # ... and while a push is in flight: it is sent again, not lost.
    fake_apns.respond(200, "", delay=0.5)
    pending = asyncio.ensure_future(call(http, server, leo))
    await asyncio.sleep(0.2)
    background_loop.run(fake_apns.goaway() if how == "goaway" else fake_apns.drop_connections())
    code, body, _ = await pending
    assert code == 200 and body["events"][0]["status"] == "delivered"
    assert outcomes(body)["iphone"]["attempts"] >= 1


async def test_one_provider_down_does_not_delay_the_other(
    http, make_server, direct_settings, fake_apns: FakeAPNs, fake_fcm: FakeFCM
) -> None:
    server = make_server(**direct_settings(apns={"timeout_seconds": 1.0}), ring_window_seconds=5)
    mia = acs_id("mia-isolation")
    await register(http, server, mia, "iphone")
    await register(http, server, mia, "pixel", platform="fcm", token=fcm_token(20))
    fake_apns.respond(200, "", times=100, delay=30)  # Apple hangs
    started = time.monotonic()
    code, body, event = await call(http, server, mia)
    assert code == 200, body
    [(call_id, received)] = fake_fcm.receipts
    assert call_id == event["data"]["correlationId"]
    assert received - started < 0.5  # the Android phone rang at once
    result = outcomes(body)
    assert result["pixel"]["status"] == "accepted"
    assert result["iphone"]["status"] == "expired"


async def test_in_flight_limit_fails_excess_pushes_fast(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(
        **direct_settings(fcm=False, apns={"max_in_flight": 1, "timeout_seconds": 3.0}),
        ring_window_seconds=5,
    )
    ned = acs_id("ned-limit")
    for n in range(3):
        await register(http, server, ned, f"phone{n}", token=apns_token(300 + n))
    fake_apns.respond(200, "", times=100, delay=30)
    code, body, _ = await call(http, server, ned)
    assert code == 200, body
    result = outcomes(body).values()
    assert all(o["status"] == "expired" for o in result)
    assert any("overloaded" in o["reason"] for o in result), result
    # One push at a time reached Apple: one per 3 s timeout inside the 5 s ring.
    assert 1 <= len(fake_apns.pushes) <= 2


async def test_apns_unusable_connection_is_replaced(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    """503 ServiceUnavailable (and TooManyProviderTokenUpdates): Apple says to continue on a new
    connection; the old one takes no new pushes."""
    server = make_server(**direct_settings(fcm=False))
    olga = acs_id("olga-503")
    await register(http, server, olga, "iphone")
    code, body, _ = await call(http, server, olga)
    opened = fake_apns.connections_opened
    fake_apns.respond(503, "ServiceUnavailable")
    code, body, _ = await call(http, server, olga)
    assert code == 200 and outcomes(body)["iphone"]["attempts"] == 2
    assert fake_apns.connections_opened == opened + 1
    [first, second] = list(fake_apns.pushes)[:2][::-1]
    assert first["connection"] != second["connection"]


def h2_pool_to(base_url: str, certs: tls.TestCertificates) -> Http2Pool:
    """An HTTP/2 client for a fake's control API (curl offers HTTP/2)."""
    return Http2Pool(base_url, certs.ca_file)


async def test_fake_fcm_serves_its_control_api_over_both_protocols(
    fake_fcm: FakeFCM, certs: tls.TestCertificates
) -> None:
    """One port, chosen by ALPN: curl offers HTTP/2, google-auth does not offer ALPN at all."""
    fake_fcm.receipts.append("call-x", 1.0)
    fake_fcm.pushes.appendleft({"token": fcm_token(7), "message": {}, "headers": {"a": "b"}})
    ctx = certs.client_context()
    async with aiohttp.ClientSession() as client:  # HTTP/1.1, no ALPN
        async with client.get(f"{fake_fcm.base_url}/_fake/pushes", ssl=ctx) as resp:
            assert resp.status == 200
            listing = await resp.json()
    assert listing["receipts"] == [["call-x", 1.0]]
    # Listed without the full token and without headers (the bearer is one).
    assert listing["pushes"] == [{"token": fcm_token(7)[:8] + "…", "message": {}, "headers": {}}]
    pool = h2_pool_to(fake_fcm.base_url, certs)
    try:
        answer = await pool.request("GET", "/_fake/pushes", (), b"", 5.0)
        assert answer.status == 200
        assert orjson.loads(answer.body)["receipts"] == [["call-x", 1.0]]
        assert (await pool.request("DELETE", "/_fake/pushes", (), b"", 5.0)).status == 204
        assert len(fake_fcm.receipts) == 0
    finally:
        await pool.close()


async def test_fake_apns_lists_pushes_without_full_tokens_or_provider_tokens(
    http, make_server, direct_settings, fake_apns: FakeAPNs, certs: tls.TestCertificates
) -> None:
    """`ringrelay fake apns` prints a curl for /_fake/pushes: what it shows must not hand out the
    device token or the provider JWT (a developer may have pointed a real .p8 at the fake)."""
    server = make_server(**direct_settings())
    alice = acs_id("alice-listing")
    assert (await register(http, server, alice, "iphone", token=apns_token(31))).status == 201
    status, body, _ = await call(http, server, alice)
    assert status == 200 and outcomes(body)["iphone"]["status"] == "accepted"
    [recorded] = list(fake_apns.pushes)
    jwt_sent = recorded["headers"]["authorization"].removeprefix("bearer ")

    pool = h2_pool_to(fake_apns.base_url, certs)
    try:
        answer = await pool.request("GET", "/_fake/pushes", (), b"", 5.0)
    finally:
        await pool.close()
    assert answer.status == 200
    text = answer.body.decode()
    assert apns_token(31) not in text and jwt_sent.split(".")[2] not in text
    [listed] = orjson.loads(answer.body)["pushes"]
    assert listed["device_token"] == apns_token(31)[:8] + "…"
    assert listed["headers"]["authorization"].startswith("sha256:")
    assert listed["headers"]["apns-topic"] == recorded["headers"]["apns-topic"]


# --- TLS: an endpoint whose certificate does not verify ----------------------------------------


async def test_untrusted_certificates_are_configuration_errors_naming_ca_file(
    http, make_server, direct_settings
) -> None:
    """APNs and FCM fakes whose CA is not trusted (no ca_file): each push settles on its first
    attempt as config_error, the reason naming the app's ca_file; no retries, answered 200."""
    settings = direct_settings(apns={"ca_file": None})
    settings["fcm"] = [{**settings["fcm"][0], "ca_file": None}]
    server = make_server(**settings)
    callee = acs_id("untrusted")
    await register(http, server, callee, "iphone", platform="apns", token=apns_token(77))
    await register(http, server, callee, "pixel", platform="fcm", token=fcm_token(77))
    code, body, _ = await call(http, server, callee)
    assert code == 200, body
    for device, table in (("iphone", "[[apns]]"), ("pixel", "[[fcm]]")):
        outcome = outcomes(body)[device]
        assert outcome["status"] == "config_error", outcome
        assert outcome["attempts"] == 1
        assert "certificate" in outcome["reason"] and f"ca_file in the {table}" in outcome["reason"]


async def test_apns_untrusted_certificate_is_a_configuration_error_naming_ca_file(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    """The fake APNs's CA not trusted (no ca_file): rustls refuses the certificate, and the push
    settles on its first attempt as config_error naming the app's ca_file, nothing sent."""
    server = make_server(**direct_settings(apns={"ca_file": None}, fcm=False))
    callee = acs_id("untrusted-apns")
    await register(http, server, callee, "iphone", token=apns_token(78))
    code, body, _ = await call(http, server, callee)
    assert code == 200, body
    outcome = outcomes(body)["iphone"]
    assert outcome["status"] == "config_error", outcome
    assert outcome["attempts"] == 1
    assert "certificate" in outcome["reason"] and "ca_file in the [[apns]]" in outcome["reason"]
    assert len(fake_apns.pushes) == 0
