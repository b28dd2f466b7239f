"""Security rules over the wire: identity-bound registration, webhook secrets and Entra tokens,
secure-by-default binding."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, post_events, register
from tests.test_auth import Jwks, jwks  # noqa: F401  (fixture: a JWKS server on loopback)
from tests.test_cli import RINGRELAY, clean_env, free_port

ISS, AUD = "https://idp.contoso.example", "ringrelay-registrar"
ALICE, BOB = acs_id("alice"), acs_id("bob")
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(identity: str | None = ALICE, key: Any = KEY, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "user-1", "iat": now, "exp": now + 300, **claims}
    if identity is not None:
        body["acs_id"] = identity
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, alg)


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
def secured(make_server, tmp_path):
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return make_server(
        auth_issuer=ISS,
        auth_audience=AUD,
        auth_public_key_file=pem,
        auth_identity_claim="acs_id",
    )


async def put(http, server, identity, device, headers, token_hex="ab" * 32):
    async with http.put(
        f"{server.url}/v1/identities/{identity}/devices/{device}",
        json={"platform": "apns", "token": token_hex},
        headers=headers,
    ) as resp:
        return resp.status


async def stored(http, server, identity) -> list:
    async with http.get(
        f"{server.url}/v1/identities/{identity}/devices", headers=auth(token(identity))
    ) as resp:
        assert resp.status == 200
        return (await resp.json())["devices"]


async def test_a_caller_manages_only_its_own_identity(http, secured) -> None:
    assert await put(http, secured, ALICE, "phone", auth(token(ALICE))) == 201
    assert await put(http, secured, BOB, "phone", auth(token(ALICE)), "cd" * 32) == 403
    assert await stored(http, secured, BOB) == []
    async with http.get(
        f"{secured.url}/v1/identities/{ALICE}/devices", headers=auth(token(BOB))
    ) as resp:
        assert resp.status == 403
    async with http.delete(
        f"{secured.url}/v1/identities/{ALICE}/devices/phone", headers=auth(token(BOB))
    ) as resp:
        assert resp.status == 403
    async with http.delete(
        f"{secured.url}/v1/identities/{ALICE}/devices", headers=auth(token(BOB))
    ) as resp:
        assert resp.status == 403
    assert len(await stored(http, secured, ALICE)) == 1
    # The sample-compatible routes obey the same rule.
    body = {
        "acsMri": BOB,
        "deviceInfos": [{"deviceUUID": "u", "deviceToken": "fcm:x", "platform": "android"}],
    }
    async with http.post(
        f"{secured.url}/api/add_device_token", json=body, headers=auth(token(ALICE))
    ) as resp:
        assert resp.status == 403
    async with http.get(
        f"{secured.url}/api/get_device_registrations",
        params={"acsMri": ALICE},
        headers=auth(token(BOB)),
    ) as resp:
        assert resp.status == 403
    assert await stored(http, secured, BOB) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        auth(token(exp=int(time.time()) - 120)),
        auth(token(nbf=int(time.time()) + 600)),
        auth(token(iss="https://evil.example")),
        auth(token(aud="another-api")),
        auth(token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))),
        auth(
            jwt.encode(
                {"iss": ISS, "aud": AUD, "acs_id": ALICE, "exp": time.time() + 60}, None, "none"
            )
        ),
    ],
    ids=[
        "none",
        "basic",
        "expired",
        "not-yet-valid",
        "issuer",
        "audience",
        "signature",
        "alg-none",
    ],
)
async def test_bad_credentials_are_401_and_store_nothing(http, secured, headers) -> None:
    assert await put(http, secured, ALICE, "phone", headers) == 401
    assert await stored(http, secured, ALICE) == []


async def test_token_without_the_identity_claim_is_403(http, secured) -> None:
    assert await put(http, secured, ALICE, "phone", auth(token(identity=None))) == 403


async def test_call_records_are_visible_to_the_callee_only(http, secured) -> None:
    assert await put(http, secured, ALICE, "phone", auth(token(ALICE))) == 201
    event = incoming_call_event(ALICE)
    status, _ = await post_events(http, secured, [event])
    assert status == 200
    url = f"{secured.url}/v1/calls/{event['data']['correlationId']}"
    async with http.get(url, headers=auth(token(ALICE))) as resp:
        assert resp.status == 200
    async with http.get(url, headers=auth(token(BOB))) as resp:
        assert resp.status == 404
    async with http.get(url) as resp:
        assert resp.status == 401


async def test_jwks_backed_registrar_auth(http, make_server, jwks) -> None:  # noqa: F811
    server = make_server(
        auth_issuer="https://idp.example", auth_audience="ringrelay", auth_jwks_url=jwks.url
    )
    now = int(time.time())
    good = jwt.encode(
        {"iss": "https://idp.example", "aud": "ringrelay", "sub": ALICE, "exp": now + 60},
        jwks.rsa,
        "RS256",
        {"kid": "rsa-1"},
    )
    assert await put(http, server, ALICE, "phone", auth(good)) == 201
    unknown = jwt.encode(
        {"iss": "https://idp.example", "aud": "ringrelay", "sub": ALICE, "exp": now + 60},
        jwks.rsa,
        "RS256",
        {"kid": "nope"},
    )
    assert await put(http, server, ALICE, "phone", auth(unknown)) == 401


# --- webhook --------------------------------------------------------------------------------


async def test_two_webhook_secrets_during_rotation(http, make_server) -> None:
    server = make_server(webhook_secret="old-secret", webhook_secret_next="new-secret")
    for code, expected in [("old-secret", 200), ("new-secret", 200), ("other", 401), ("", 401)]:
        status, _ = await post_events(http, server, [], query=f"?code={code}")
        assert status == expected, code


async def test_entra_protected_webhook(http, make_server, jwks) -> None:  # noqa: F811
    tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    server = make_server(
        eventgrid_tenant_id=tenant,
        eventgrid_audience="api://ringrelay",
        eventgrid_jwks_url=jwks.url,
    )
    await register(http, server, ALICE, "phone")
    now = int(time.time())
    claims = {
        "iss": f"https://sts.windows.net/{tenant}/",
        "aud": "api://ringrelay",
        "tid": tenant,
        "appid": "4962773b-9cdb-44cf-a8bf-237846a00ab7",
        "roles": ["AzureEventGridSecureWebhookSubscriber"],
        "iat": now,
        "exp": now + 3600,
    }
    good = jwt.encode(claims, jwks.rsa, "RS256", {"kid": "rsa-1"})
    forged = jwt.encode(
        {**claims, "appid": "11111111-1111-1111-1111-111111111111"},
        jwks.rsa,
        "RS256",
        {"kid": "rsa-1"},
    )
    event = incoming_call_event(ALICE)
    for headers in ({}, auth(forged), auth(good + "x")):
        async with http.post(f"{server.url}/api/events", json=[event], headers=headers) as resp:
            assert resp.status == 401
    async with http.get(f"{server.url}/v1/sandbox/pushes") as resp:
        assert (await resp.json())["pushes"] == []
    async with http.post(f"{server.url}/api/events", json=[event], headers=auth(good)) as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/v1/sandbox/pushes") as resp:
        assert len((await resp.json())["pushes"]) == 1


# --- secure by default ------------------------------------------------------------------------


def test_serve_refuses_a_public_address_without_auth(tmp_path) -> None:
    out = subprocess.run(
        [*RINGRELAY, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0" in out.stderr


def test_serve_insecure_starts_and_warns(tmp_path) -> None:
    proc = subprocess.Popen(
        [*RINGRELAY, "serve", "--host", "0.0.0.0", "--port", str(free_port()), "--insecure"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 15
    seen = ""
    assert proc.stdout is not None
    while time.monotonic() < deadline and "INSECURE" not in seen:
        seen += proc.stdout.readline()
    proc.terminate()
    proc.wait(timeout=10)
    assert "INSECURE: listening on 0.0.0.0" in seen
