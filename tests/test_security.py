"""Security rules over the wire: identity-bound registration, webhook secrets and Entra tokens,
secure-by-default binding."""

from __future__ import annotations

import json
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


def hs256_with_public_key() -> str:
    """The classic confusion attack: HMAC-sign with the server's public key as the secret."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": ISS, "aud": AUD, "acs_id": ALICE, "exp": int(time.time()) + 300}
    signing_input = (
        f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
        f"{b64(json.dumps(claims).encode())}"
    )
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def public_key_file(directory: Any) -> Any:
    """The identity provider's public key as a PEM file."""
    pem = directory / "idp.pem"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
def secured(make_server, tmp_path):
    pem = public_key_file(tmp_path)
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
        auth(hs256_with_public_key()),
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
        "hs256-public-key",
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
        auth_issuer="https://idp.example",
        auth_audience="ringrelay",
        auth_jwks_url=jwks.url,
        auth_jwks_min_refresh_seconds=0,
    )
    now = int(time.time())
    good = jwt.encode(
        {"iss": "https://idp.example", "aud": "ringrelay", "sub": ALICE, "exp": now + 60},
        jwks.rsa,
        "RS256",
        {"kid": "rsa-1"},
    )
    assert await put(http, server, ALICE, "phone", auth(good)) == 201
    # The identity provider rotates its key: the new kid is fetched, the old one is refused.
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.keys = {"rsa-2": rotated}
    claims = {"iss": "https://idp.example", "aud": "ringrelay", "sub": ALICE, "exp": now + 60}
    new_token = jwt.encode(claims, rotated, "RS256", {"kid": "rsa-2"})
    assert await put(http, server, ALICE, "tablet", auth(new_token), "cd" * 32) == 201
    old_token = jwt.encode(claims, jwks.rsa, "RS256", {"kid": "rsa-1"})
    assert await put(http, server, ALICE, "phone", auth(old_token)) in (401,)
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


# --- API keys for trusted backends -------------------------------------------------------------


def keys_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RINGRELAY, "keys", *args],
        env=clean_env() | {"RINGRELAY_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_api_keys_created_scoped_and_revoked(http, make_server, tmp_path) -> None:
    db_url = f"sqlite:///{tmp_path / 'keys.db'}"
    server = make_server(database_url=db_url, auth_required=True)
    # Required, and nothing can authenticate yet: refused, not open.
    assert await put(http, server, ALICE, "phone", {}) == 503

    out = keys_cli(db_url, "create", "--name", "signup-service", "--scope", "register")
    assert out.returncode == 0, out.stderr
    full_key = out.stdout.strip().splitlines()[-1]
    assert full_key.startswith("rr_")
    reader = keys_cli(db_url, "create", "--name", "dashboard", "--scope", "read").stdout
    read_key = reader.strip().splitlines()[-1]

    listing = keys_cli(db_url, "list").stdout
    assert "signup-service" in listing and "dashboard" in listing
    assert full_key.split("_", 2)[2] not in listing  # the secret is never shown again

    assert await put(http, server, ALICE, "phone", {}) == 401  # a key exists: use it
    key_hdr = {"X-API-Key": full_key}
    assert await put(http, server, BOB, "phone", key_hdr, "cd" * 32) == 201  # any identity
    assert (
        await put(http, server, BOB, "tab", {"Authorization": f"Bearer {full_key}"}, "ef" * 32)
        == 201
    )
    async with http.get(f"{server.url}/v1/identities/{BOB}/devices", headers=key_hdr) as resp:
        assert resp.status == 403  # no read scope
    async with http.get(
        f"{server.url}/v1/identities/{BOB}/devices", headers={"X-API-Key": read_key}
    ) as resp:
        assert resp.status == 200 and len((await resp.json())["devices"]) == 2
    assert await put(http, server, BOB, "x", {"X-API-Key": read_key}) == 403
    assert await put(http, server, BOB, "x", {"X-API-Key": full_key + "x"}) == 401
    assert await put(http, server, BOB, "x", {"X-API-Key": "rr_nope_nope"}) == 401

    key_id = full_key.split("_")[1]
    assert keys_cli(db_url, "revoke", key_id).returncode == 0
    assert await put(http, server, BOB, "phone", key_hdr, "cd" * 32) == 401
    assert keys_cli(db_url, "revoke", key_id).returncode == 1
    assert "revoked" in keys_cli(db_url, "list").stdout


def test_keys_cli_refuses_unknown_scopes(tmp_path) -> None:
    out = keys_cli(f"sqlite:///{tmp_path / 'k.db'}", "create", "--name", "x", "--scope", "root")
    assert out.returncode == 2


async def test_request_size_limit_on_the_registry(http, sandbox_server) -> None:
    url = f"{sandbox_server.url}/v1/identities/{ALICE}/devices/phone"
    body = b'{"platform": "apns", "token": "' + b"ab" * 40_000 + b'"}'
    async with http.put(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413

    async def chunks():  # no Content-Length
        yield b'{"platform": "apns", "token": "'
        for _ in range(10):
            yield b"ab" * 8192
        yield b'"}'

    async with http.put(url, data=chunks(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
    async with http.post(f"{sandbox_server.url}/api/add_device_token", data=body) as resp:
        assert resp.status == 413


async def test_rate_limits_answer_429_with_retry_after(http, make_server) -> None:
    server = make_server(rate_limit_per_identity=5, rate_limit_per_client=1000)
    statuses = [await put(http, server, ALICE, f"d{i}", {}, f"{i:02x}" * 32) for i in range(7)]
    assert statuses[:5] == [201] * 5 and statuses[5:] == [429, 429]
    async with http.get(f"{server.url}/v1/identities/{ALICE}/devices") as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
    assert await put(http, server, BOB, "d", {}) == 201  # another identity is unaffected
    client_limited = make_server(rate_limit_per_identity=0, rate_limit_per_client=3)
    statuses = [await put(http, client_limited, acs_id(f"u{i}"), "d", {}) for i in range(4)]
    assert statuses == [201, 201, 201, 429]


async def test_sample_listing_shows_full_tokens_to_the_owner_only(http, make_server, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'owner.db'}"
    pem = public_key_file(tmp_path)
    server = make_server(
        database_url=db_url,
        auth_issuer=ISS,
        auth_audience=AUD,
        auth_public_key_file=pem,
        auth_identity_claim="acs_id",
    )
    assert await put(http, server, ALICE, "phone", auth(token(ALICE)), "ab" * 32) == 201
    reader = keys_cli(db_url, "create", "--name", "ops", "--scope", "read").stdout
    read_key = reader.strip().splitlines()[-1]
    url = f"{server.url}/api/get_device_registrations"
    async with http.get(url, params={"acsMri": ALICE}, headers=auth(token(ALICE))) as resp:
        assert (await resp.json(content_type=None))["deviceInfos"][0]["deviceToken"] == "ab" * 32
    async with http.get(url, params={"acsMri": ALICE}, headers={"X-API-Key": read_key}) as resp:
        shown = (await resp.json(content_type=None))["deviceInfos"][0]["deviceToken"]
    assert shown.startswith("sha256:")


async def test_strangers_cannot_use_up_an_identitys_rate(http, make_server, tmp_path) -> None:
    pem = public_key_file(tmp_path)
    server = make_server(
        auth_issuer=ISS,
        auth_audience=AUD,
        auth_public_key_file=pem,
        auth_identity_claim="acs_id",
        rate_limit_per_identity=3,
    )
    for _ in range(5):  # unauthenticated attempts against Alice
        assert await put(http, server, ALICE, "phone", {}) == 401
    assert await put(http, server, ALICE, "phone", auth(token(ALICE))) == 201


async def test_refused_requests_do_not_count_against_the_target_identity(
    http, make_server, tmp_path
) -> None:
    """Issue 17, item 6: Alice's requests on Bob's identity are refused and do not spend Bob's
    allowance; only Bob's own (allowed) requests do."""
    pem = public_key_file(tmp_path)
    server = make_server(
        auth_issuer=ISS,
        auth_audience=AUD,
        auth_public_key_file=pem,
        auth_identity_claim="acs_id",
        rate_limit_per_identity=3,
        rate_limit_per_client=1000,
    )
    for _ in range(6):
        assert await put(http, server, BOB, "phone", auth(token(ALICE))) == 403
    url = f"{server.url}/v1/identities/{BOB}/devices"
    for _ in range(6):
        async with http.get(url, headers=auth(token(ALICE))) as resp:
            assert resp.status == 403
    assert await put(http, server, BOB, "phone", auth(token(BOB))) == 201
    statuses = [await put(http, server, BOB, "phone", auth(token(BOB))) for _ in range(3)]
    assert statuses == [200, 200, 429]  # Bob's own allowance: 3 a minute
    # Alice's allowance is her own: her requests on her identity still pass.
    assert await put(http, server, ALICE, "phone", auth(token(ALICE)), "cd" * 32) == 201


# --- leaks (issue 17, item 7) ------------------------------------------------------------------


def test_access_log_redacts_a_percent_encoded_code_parameter(tmp_path) -> None:
    """`?c%6Fde=` is `?code=` to the webhook: it authenticates, so it must not be logged."""
    import urllib.request

    from tests.test_cli import serve, wait_healthy

    port = free_port()
    secret = "hunter2-percent-secret"
    proc = serve(port, tmp_path, clean_env() | {"RINGRELAY_WEBHOOK_SECRET": secret}, "--access-log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        for query in (
            f"c%6Fde={secret}",
            f"%63%6F%64%65={secret}&x=1",
            f"x=1&CO%64e=no&code={secret}",
        ):
            req = urllib.request.Request(
                f"{url}/api/events?{query}",
                data=b"[]",
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            assert urllib.request.urlopen(req).status == 200  # the secret was accepted
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "/api/events?c%6Fde=<redacted>" in out
    assert "/api/events?%63%6F%64%65=<redacted>&x=1" in out
    assert secret not in out


@pytest.mark.parametrize(
    "connection_string",
    [
        "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;Zm9vYmFyS2V5U2VjcmV0",
        "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;"
        "SharedAccessKey:Zm9vYmFyS2V5U2VjcmV0",
        "Zm9vYmFyS2V5U2VjcmV0",
    ],
    ids=["bare-key", "colon-for-equals", "only-the-key"],
)
def test_a_malformed_connection_string_is_never_echoed(tmp_path, connection_string) -> None:
    out = subprocess.run(
        [*RINGRELAY, "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env() | {"ANHHubConnectionString": connection_string, "ANHHubName": "hub"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "ANHHubConnectionString" in out.stderr and "has no '='" in out.stderr
    assert "Zm9vYmFyS2V5U2VjcmV0" not in out.stderr + out.stdout


async def test_sample_listing_shows_fingerprints_to_anonymous_callers(http, sandbox_server):
    """With registrar authentication off, anyone may call: the sample-compatible listing shows
    fingerprints, as the native one does, not the tokens themselves."""
    body = {
        "acsMri": ALICE,
        "deviceInfos": [
            {"deviceUUID": "iphone", "deviceToken": "ab" * 32, "platform": "apple"},
            {"deviceUUID": "pixel", "deviceToken": "fcm:secret-token", "platform": "android"},
        ],
    }
    async with http.post(f"{sandbox_server.url}/api/add_device_token", json=body) as resp:
        assert resp.status == 201
    async with http.get(
        f"{sandbox_server.url}/api/get_device_registrations", params={"acsMri": ALICE}
    ) as resp:
        assert resp.status == 200
        text = await resp.text()
    doc = json.loads(text)
    assert all(d["deviceToken"].startswith("sha256:") for d in doc["deviceInfos"])
    assert "ab" * 32 not in text and "secret-token" not in text


# --- whether authentication is required is decided at start-up (issue 17, items 1 and 17) --------


async def test_revoking_the_last_key_does_not_open_the_registry(http, make_server, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'revoke.db'}"
    only_key = keys_cli(db_url, "create", "--name", "signup").stdout.strip().splitlines()[-1]
    server = make_server(database_url=db_url, auth_required=True)
    revoked = keys_cli(db_url, "revoke", only_key.split("_")[1])
    assert revoked.returncode == 0

    async with http.put(
        f"{server.url}/v1/identities/{ALICE}/devices/phone",
        json={"platform": "apns", "token": "ab" * 32},
    ) as resp:
        assert resp.status == 503
        detail = (await resp.json())["detail"]
    assert "RINGRELAY_AUTH_REQUIRED" in detail and "ringrelay keys create" in detail
    assert "does not open" in revoked.stdout  # the CLI says so too
    assert await put(http, server, ALICE, "phone", {"X-API-Key": only_key}) == 401
    async with http.get(
        f"{server.url}/api/get_device_registrations", params={"acsMri": ALICE}
    ) as resp:
        assert resp.status == 503
    assert await stored_with_key(http, server, db_url, ALICE) == []

    new_key = keys_cli(db_url, "create", "--name", "signup-2").stdout.strip().splitlines()[-1]
    assert await put(http, server, ALICE, "phone", {"X-API-Key": new_key}) == 201
    assert await put(http, server, BOB, "phone", {}, "cd" * 32) == 401


async def stored_with_key(http, server, db_url, identity) -> list:
    reader = keys_cli(db_url, "create", "--name", "check", "--scope", "read").stdout
    key = reader.strip().splitlines()[-1]
    async with http.get(
        f"{server.url}/v1/identities/{identity}/devices", headers={"X-API-Key": key}
    ) as resp:
        assert resp.status == 200
        devices = (await resp.json())["devices"]
    keys_cli(db_url, "revoke", key.split("_")[1])
    return devices


async def test_creating_the_first_key_leaves_a_quickstart_server_open(
    http, make_server, tmp_path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'quick.db'}"
    server = make_server(database_url=db_url)
    out = keys_cli(db_url, "create", "--name", "backend")
    assert out.returncode == 0
    note = out.stdout.splitlines()[1]
    assert "on loopback does not" in note and "RINGRELAY_AUTH_REQUIRED=true" in note
    assert out.stdout.strip().splitlines()[-1].startswith("rr_")  # the key stays the last line
    assert await put(http, server, ALICE, "phone", {}) == 201  # still the quickstart

    required = subprocess.run(
        [*RINGRELAY, "keys", "create", "--name", "other"],
        env=clean_env() | {"RINGRELAY_DATABASE_URL": db_url, "RINGRELAY_AUTH_REQUIRED": "true"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "requires registrar authentication" in required.stdout


def _banner(tmp_path, env: dict[str, str], *extra: str) -> str:
    """The start-up banner of `ringrelay serve` (stopped once it is printed)."""
    from tests.test_cli import serve, wait_healthy

    port = free_port()
    proc = serve(port, tmp_path, clean_env() | env, *extra)
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    proc.terminate()
    return proc.communicate(timeout=10)[0]


def test_the_banner_says_whether_registrar_auth_is_required(tmp_path) -> None:
    assert "auth:     off" in _banner(tmp_path, {})
    assert "auth:     required (API keys)" in _banner(tmp_path, {"RINGRELAY_AUTH_REQUIRED": "1"})
    # Beyond loopback it is required unless --insecure; a key created first lets it start.
    db_url = f"sqlite:///{tmp_path / 'public.db'}"
    assert keys_cli(db_url, "create", "--name", "backend").returncode == 0
    public = _banner(tmp_path, {"RINGRELAY_DATABASE_URL": db_url}, "--host", "0.0.0.0")
    assert "auth:     required (API keys)" in public
    # The same store on loopback: off, and the log says the active key is not required.
    loopback = _banner(tmp_path, {"RINGRELAY_DATABASE_URL": db_url})
    assert "auth:     off" in loopback and "API keys are active: they are not required" in loopback


def test_serve_refuses_a_public_address_with_auth_turned_off(tmp_path) -> None:
    out = subprocess.run(
        [*RINGRELAY, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env() | {"RINGRELAY_AUTH_REQUIRED": "false"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0" in out.stderr
    assert "RINGRELAY_AUTH_REQUIRED=false" in out.stderr and "ringrelay keys create" in out.stderr


def test_auth_required_false_contradicts_a_jwt_issuer(tmp_path) -> None:
    from ringrelay.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="RINGRELAY_AUTH_REQUIRED"):
        load_settings(
            auth_required=False,
            auth_issuer=ISS,
            auth_audience=AUD,
            auth_public_key_file=public_key_file(tmp_path),
        )
