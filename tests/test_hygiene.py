"""No secret in any log record, security headers everywhere, no stack traces to clients."""

from __future__ import annotations

import logging
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, post_events

CALLEE = acs_id("hygiene")


async def test_full_cycle_logs_no_secret(http, make_server, nh_settings, fake_nh, tmp_path, caplog):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    caplog.set_level(logging.DEBUG)
    server = make_server(
        webhook_secret="webhook-secret-value-123",
        auth_issuer="https://idp",
        auth_audience="rr",
        auth_public_key_file=pem,
        nh_timeout_seconds=0.5,
        webhook_deadline_seconds=1.0,
        **nh_settings,
    )
    bearer = jwt.encode(
        {"iss": "https://idp", "aud": "rr", "sub": CALLEE, "exp": int(time.time()) + 60},
        key,
        "RS256",
    )
    apns = "0123456789abcdef" * 4
    fcm = "fcm-secret-token:APA91bH-very-private"
    for device, platform, token in (("ios", "apns", apns), ("droid", "fcm", fcm)):
        async with http.put(
            f"{server.url}/v1/identities/{CALLEE}/devices/{device}",
            json={"platform": platform, "token": token},
            headers={"Authorization": f"Bearer {bearer}"},
        ) as resp:
            assert resp.status == 201
    # Failures and refusals log too: exercise them.
    fake_nh.respond(500, times=100, handle=fcm)
    event = incoming_call_event(CALLEE, cc="H4sIAAAAAAAAA+NgYGBgYmBiYGBhYWJkZmBkYGBkAAAxMTExMTEx")
    status, body = await post_events(http, server, [event], query="?code=webhook-secret-value-123")
    assert status == 503 and body["events"][0]["deliveries"]
    await post_events(http, server, [event], query="?code=wrong")
    async with http.put(
        f"{server.url}/v1/identities/{CALLEE}/devices/x",
        json={"platform": "apns", "token": apns},
        headers={"Authorization": f"Bearer {bearer}x"},
    ) as resp:
        assert resp.status == 401

    sas_sig = fake_nh.key
    cp = "H4sIAAAAAAAAA+NgYGBgYmBiYGBhYWJkZmBkYGBkAAAxMTExMTEx"
    context = event["data"]["incomingCallContext"]
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "push" in logged  # the failure was logged ...
    for secret in (
        apns,
        fcm,
        bearer,
        "webhook-secret-value-123",
        sas_sig,
        cp,
        context,
        context.split(".")[1],
    ):
        assert secret not in logged  # ... without any secret in full


async def test_security_headers_on_every_response(http, sandbox_server) -> None:
    for path in ("/healthz", "/v1/identities/bad/devices", "/api/events", "/nope"):
        async with http.get(f"{sandbox_server.url}{path}") as resp:
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["Cache-Control"] == "no-store"
    async with http.get(f"{sandbox_server.url}/docs") as resp:
        assert resp.status == 200 and "Content-Security-Policy" not in resp.headers


async def test_internal_errors_show_no_stack_trace(http, sandbox_server) -> None:
    await sandbox_server.relay.store.close()  # every store call now raises
    try:
        async with http.get(f"{sandbox_server.url}/v1/identities/{CALLEE}/devices") as resp:
            assert resp.status == 500
            text = await resp.text()
        assert "Traceback" not in text and "sqlite" not in text.lower()
        status, body = await post_events(http, sandbox_server, [incoming_call_event(CALLEE)])
        assert status == 503  # Event Grid retries; never a 4xx for our own failure
        assert "Traceback" not in str(body)
    finally:
        await sandbox_server.relay.store.open()


async def test_webhook_answers_carry_the_security_headers(
    http, sandbox_server, monkeypatch
) -> None:
    """The webhook answers on bare ASGI, outside ResponseGuard: its answers, a delivery's, a
    handshake's and an error of ours alike, still carry the headers, and an error is a plain
    JSON 500 with nothing of the exception in it."""
    url = f"{sandbox_server.url}/api/events"
    body = [incoming_call_event(CALLEE)]

    def expect_guarded(resp) -> None:
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]

    async with http.post(url, json=body) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
        expect_guarded(resp)
    async with http.options(url, headers={"WebHook-Request-Origin": "eventgrid.azure.net"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "0"
        expect_guarded(resp)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret-looking detail")

    monkeypatch.setattr(sandbox_server.relay.dispatcher.calls, "receipt", broken)
    async with http.post(url, json=body) as resp:
        assert resp.status == 500
        assert await resp.json() == {"error": "internal error"}
        expect_guarded(resp)
