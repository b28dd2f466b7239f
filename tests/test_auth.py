"""Token verification against a JWKS served over HTTP on loopback (keys made per test run)."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ringrelay.auth.tokens import (
    AuthError,
    JwksKeys,
    PemKey,
    TokenVerifier,
    bearer_token,
    check_algorithms,
    check_event_grid_claims,
    entra_issuers,
)

ISS, AUD = "https://idp.example", "ringrelay"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


class Jwks:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.keys: dict[str, Any] = {"rsa-1": self.rsa, "ec-1": self.ec}
        self.hits = 0

    def document(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = json.loads(algo.to_jwk(key.public_key()))
            jwk.update(kid=kid, use="sig")
            out.append(jwk)
        return {"keys": out}

    async def handler(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response(self.document())


@pytest.fixture
async def jwks():
    server = Jwks()
    app = web.Application()
    app.router.add_get("/keys", server.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/keys"
    yield server
    await runner.cleanup()


def mint(key: Any, kid: str, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "8:acs:r_u", "iat": now, "exp": now + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, alg, {"kid": kid})


def verifier(jwks: Jwks, **kw: Any) -> TokenVerifier:
    return TokenVerifier(
        JwksKeys(jwks.url, min_refresh_interval=kw.pop("min_refresh", 0.0)),
        ["RS256", "ES256"],
        [ISS],
        [AUD],
        leeway=0,
        **kw,
    )


async def test_valid_rs256_and_es256_tokens(jwks) -> None:
    v = verifier(jwks)
    assert (await v.verify(mint(jwks.rsa, "rsa-1")))["sub"] == "8:acs:r_u"
    assert (await v.verify(mint(jwks.ec, "ec-1", "ES256")))["sub"] == "8:acs:r_u"
    assert jwks.hits == 1  # keys cached


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 60}, "expired"),
        ({"nbf": int(time.time()) + 600}, "not yet valid"),
        ({"iss": "https://evil.example"}, "wrong issuer"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"exp": None}, "invalid token"),
    ],
)
async def test_bad_claims_are_refused(jwks, claims, message) -> None:
    with pytest.raises(AuthError, match=message):
        await verifier(jwks).verify(mint(jwks.rsa, "rsa-1", **claims))


async def test_alg_none_and_hs256_with_the_public_key_are_refused(jwks) -> None:
    v = verifier(jwks)
    unsigned = jwt.encode({"iss": ISS, "aud": AUD, "exp": time.time() + 60}, None, "none")
    with pytest.raises(AuthError, match="'none' is not accepted"):
        await v.verify(unsigned)
    pem = jwks.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payload = {"iss": ISS, "aud": AUD, "exp": int(time.time()) + 60}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(AuthError, match="'HS256' is not accepted"):
        await v.verify(f"{signing_input}.{b64(sig)}")


async def test_wrong_signature_is_refused(jwks) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError, match="invalid token"):
        await verifier(jwks).verify(mint(other, "rsa-1"))


async def test_key_rotation_at_the_jwks(jwks) -> None:
    v = verifier(jwks, min_refresh=0.0)
    await v.verify(mint(jwks.rsa, "rsa-1"))
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.keys = {"rsa-2": rotated}
    assert (await v.verify(mint(rotated, "rsa-2")))["iss"] == ISS  # unknown kid -> refetch
    with pytest.raises(AuthError, match="unknown signing key"):
        await v.verify(mint(jwks.rsa, "rsa-1"))  # retired key
    assert jwks.hits == 3


async def test_unknown_kid_refetch_is_rate_limited(jwks) -> None:
    v = verifier(jwks, min_refresh=60.0)
    await v.verify(mint(jwks.rsa, "rsa-1"))
    for _ in range(5):
        with pytest.raises(AuthError, match="unknown signing key"):
            await v.verify(mint(jwks.rsa, "forged-kid"))
    assert jwks.hits == 1


async def test_pem_public_key(tmp_path, jwks) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        jwks.ec.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    v = TokenVerifier(PemKey(pem), ["ES256"], [ISS], [AUD])
    assert (await v.verify(mint(jwks.ec, "any", "ES256")))["aud"] == AUD


def test_symmetric_or_none_algorithms_cannot_be_configured() -> None:
    for bad in (["HS256"], ["none"], ["RS256", "HS512"], []):
        with pytest.raises(ValueError):
            check_algorithms(bad)


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    for bad in (None, "", "Basic xyz", "Bearer "):
        with pytest.raises(AuthError):
            bearer_token(bad)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_event_grid_entra_tokens(jwks, version) -> None:
    iss = entra_issuers(TENANT)[0 if version == "v1" else 1]
    v = TokenVerifier(JwksKeys(jwks.url), ["RS256"], entra_issuers(TENANT), ["api://ringrelay"])
    caller = (
        {"appid": "4962773b-9cdb-44cf-a8bf-237846a00ab7"}
        if version == "v1"
        else {"azp": "4962773b-9cdb-44cf-a8bf-237846a00ab7"}
    )
    token = mint(
        jwks.rsa,
        "rsa-1",
        iss=iss,
        aud="api://ringrelay",
        tid=TENANT,
        roles=["AzureEventGridSecureWebhookSubscriber"],
        **caller,
    )
    check_event_grid_claims(await v.verify(token), TENANT)

    for bad, message in [
        ({"appid": "00000000-0000-0000-0000-000000000000"}, "not issued to Event Grid"),
        ({**caller, "roles": ["Reader"]}, "lacks the AzureEventGridSecureWebhookSubscriber"),
        ({**caller, "tid": "other-tenant"}, "another tenant"),
    ]:
        claims = {"tid": TENANT, **bad}
        token = mint(jwks.rsa, "rsa-1", iss=iss, aud="api://ringrelay", **claims)
        with pytest.raises(AuthError, match=message):
            check_event_grid_claims(await v.verify(token), TENANT)
