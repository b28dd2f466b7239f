"""A fake FCM HTTP v1 endpoint with a fake Google OAuth2 token endpoint, over TLS.

The token endpoint checks what Google's does for a service-account JWT bearer grant (RFC 7523 as
used by google-auth: RS256 assertion signed with the account's key, `iss` = client_email, `aud` =
token_uri, a scope that can send, lifetime <= 1 h). The send endpoint checks the bearer token, the
project and the message shape (firebase.google.com/docs/reference/fcm/rest/v1/projects.messages:
one target, `data` a map of strings without reserved keys, `android.priority`, a Duration `ttl`,
payload <= 4096 bytes) and answers in Google's RPC error format (../shared/notes/protocols.md §4).

Control API: `GET /_fake/pushes`, `DELETE /_fake/pushes`, `POST /_fake/script` {"status",
"error_code", "times", "token", "retry_after", "delay", "field_violation"}.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ringrelay.fakes.receipts import Receipts
from ringrelay.fakes.tls import make_test_certificates

SEND_SCOPES = {
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
}
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth addresses its assertion to Google's endpoint whatever the file's token_uri says
# (google/oauth2/service_account.py `_GOOGLE_OAUTH2_TOKEN_ENDPOINT`); Google accepts either.
GOOGLE_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
MAX_DATA_BYTES = 4096
DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
RESERVED_KEYS = {"from", "gcm", "message_type", "notification"}
# errorCode -> (HTTP status, google.rpc status), FCM ErrorCode reference.
ERRORS = {
    "UNREGISTERED": (404, "NOT_FOUND"),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED"),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED"),
    "UNAVAILABLE": (503, "UNAVAILABLE"),
    "INTERNAL": (500, "INTERNAL"),
}


def write_service_account(
    path: str | Path, project_id: str, token_uri: str, client_email: str | None = None
) -> dict[str, Any]:
    """A service-account key file as the Firebase console hands it out, with a fresh RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "client_email": client_email or f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
        "client_id": str(secrets.randbelow(10**20)),
        "token_uri": token_uri,
    }
    Path(path).write_text(json.dumps(info, indent=2))
    return info


@dataclass
class _Scripted:
    status: int
    error_code: str
    times: int
    token: str | None
    retry_after: float | None
    delay: float
    field_violation: str | None


@dataclass
class FakeFCM:
    token_lifetime: int = 3600
    record_bodies: bool = True
    capacity: int = 100_000
    pushes: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    counts: collections.Counter[int] = field(default_factory=collections.Counter)
    receipts: Receipts = field(default_factory=Receipts)
    token_requests: int = 0

    def __post_init__(self) -> None:
        self.pushes = collections.deque(maxlen=self.capacity)
        self._accounts: dict[str, tuple[str, Any]] = {}  # client_email -> (project, public key)
        self._access_tokens: dict[str, tuple[str, float]] = {}  # token -> (project, expiry)
        self._script: list[_Scripted] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def trust_service_account(self, path: str | Path) -> None:
        info = json.loads(Path(path).read_text())
        private = serialization.load_pem_private_key(info["private_key"].encode(), None)
        self._accounts[info["client_email"]] = (info["project_id"], private.public_key())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        app.router.add_get("/_fake/pushes", self._get_pushes)
        app.router.add_delete("/_fake/pushes", self._delete_pushes)
        app.router.add_post("/_fake/script", self._post_script)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls_dir: str | None = None
    ) -> str:
        ctx = make_test_certificates(tls_dir).server_context(["http/1.1"]) if tls_dir else None
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ctx, backlog=1024)
        await site.start()
        server: Any = site._server
        bound = server.sockets[0].getsockname()[1]
        self.base_url = f"{'https' if ctx else 'http'}://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def respond(
        self,
        status: int,
        error_code: str,
        times: int = 1,
        *,
        token: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
        field_violation: str | None = None,
    ) -> None:
        self._script.append(
            _Scripted(status, error_code, times, token, retry_after, delay, field_violation)
        )

    def expire_access_tokens(self) -> None:
        self._access_tokens.clear()

    def reset(self) -> None:
        self.pushes.clear()
        self.counts.clear()
        self.receipts.clear()
        self._script.clear()

    # --- OAuth ---------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()

        def refuse(why: str) -> web.Response:
            return web.json_response(
                {"error": "invalid_grant", "error_description": why}, status=400
            )

        if form.get("grant_type") != JWT_BEARER:
            return refuse("unsupported grant_type")
        assertion = str(form.get("assertion", ""))
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            account = self._accounts.get(str(unverified.get("iss", "")))
            if account is None:
                return refuse("Invalid JWT: unknown service account")
            claims = jwt.decode(
                assertion,
                account[1],
                algorithms=["RS256"],
                audience=[self.token_uri, GOOGLE_TOKEN_ENDPOINT],
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.PyJWTError as exc:
            return refuse(f"Invalid JWT: {exc}")
        if claims["exp"] - claims["iat"] > 3600:
            return refuse("Invalid JWT: lifetime over one hour")
        if not SEND_SCOPES & set(str(claims.get("scope", "")).split()):
            return refuse("Invalid JWT: no scope that can send messages")
        access = "ya29.fake-" + secrets.token_urlsafe(32)
        self._access_tokens[access] = (account[0], time.time() + self.token_lifetime)
        return web.json_response(
            {"access_token": access, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    # --- send ----------------------------------------------------------------------------------

    @staticmethod
    def _error(
        status: int,
        rpc_status: str,
        message: str,
        error_code: str | None = None,
        violation: str | None = None,
        retry_after: float | None = None,
    ) -> web.Response:
        details: list[dict[str, Any]] = []
        if error_code:
            details.append(
                {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": error_code,
                }
            )
        if violation:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": violation, "description": message}],
                }
            )
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        return web.json_response(
            {
                "error": {
                    "code": status,
                    "message": message,
                    "status": rpc_status,
                    "details": details,
                }
            },
            status=status,
            headers=headers,
        )

    def _shape_error(self, message: Any) -> web.Response | None:
        if not isinstance(message, dict):
            return self._error(400, "INVALID_ARGUMENT", "message is required")
        targets = [k for k in ("token", "fid", "topic", "condition") if message.get(k)]
        if len(targets) != 1:
            return self._error(
                400, "INVALID_ARGUMENT", "exactly one target is required", "INVALID_ARGUMENT"
            )
        data = message.get("data", {})
        if not isinstance(data, dict):
            return self._error(400, "INVALID_ARGUMENT", "data must be a map", None, "message.data")
        size = 0
        for key, value in data.items():
            if not isinstance(value, str):
                return self._error(
                    400,
                    "INVALID_ARGUMENT",
                    f"Invalid value at 'message.data[{key}].value' (TYPE_STRING)",
                    None,
                    f"message.data[{key}].value",
                )
            if key in RESERVED_KEYS or key.startswith("google"):
                return self._error(
                    400, "INVALID_ARGUMENT", f"Invalid data key: {key}", "INVALID_ARGUMENT"
                )
            size += len(key.encode()) + len(value.encode())
        if size > MAX_DATA_BYTES:
            return self._error(400, "INVALID_ARGUMENT", "Message is too big", "INVALID_ARGUMENT")
        android = message.get("android", {})
        if not isinstance(android, dict):
            return self._error(400, "INVALID_ARGUMENT", "android must be an object")
        if android.get("priority", "NORMAL") not in ("HIGH", "NORMAL", "high", "normal"):
            return self._error(
                400,
                "INVALID_ARGUMENT",
                "Invalid android.priority",
                None,
                "message.android.priority",
            )
        ttl = android.get("ttl")
        if ttl is not None and not (isinstance(ttl, str) and DURATION.match(ttl)):
            return self._error(
                400, "INVALID_ARGUMENT", "Invalid android.ttl", None, "message.android.ttl"
            )
        return None

    async def _send(self, request: web.Request) -> web.Response:
        project = request.match_info["project"]
        bearer = request.headers.get("Authorization", "")
        granted = self._access_tokens.get(bearer.removeprefix("Bearer "))
        if not bearer.startswith("Bearer ") or granted is None or granted[1] < time.time():
            self.counts[401] += 1
            return self._error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        if granted[0] != project:
            # Google answers a token of another project with PERMISSION_DENIED.
            self.counts[403] += 1
            return self._error(403, "PERMISSION_DENIED", "Permission denied on this project.")
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        message = body.get("message") if isinstance(body, dict) else None
        problem = self._shape_error(message)
        if problem is not None:
            self.counts[problem.status] += 1
            return problem
        assert isinstance(message, dict)
        target = str(message.get("token") or message.get("fid"))
        for scripted in self._script:
            if scripted.token is None or scripted.token == target:
                scripted.times -= 1
                if scripted.times <= 0:
                    self._script.remove(scripted)
                if scripted.delay:
                    await asyncio.sleep(scripted.delay)
                if scripted.status != 200:
                    self.counts[scripted.status] += 1
                    rpc = ERRORS.get(scripted.error_code, (0, "UNKNOWN"))[1]
                    return self._error(
                        scripted.status,
                        rpc,
                        f"scripted {scripted.error_code}",
                        scripted.error_code if scripted.error_code in ERRORS else None,
                        scripted.field_violation,
                        scripted.retry_after,
                    )
                break
        self.counts[200] += 1
        data = message.get("data") or {}
        self.receipts.append(str(data.get("callId", "")), time.monotonic())
        name = f"projects/{project}/messages/{secrets.token_hex(8)}"
        if self.record_bodies:
            self.pushes.appendleft(
                {
                    "project": project,
                    "token": target,
                    "message": message,
                    "headers": dict(request.headers),
                    "received_at": time.time(),
                    "name": name,
                }
            )
        return web.json_response({"name": name})

    # --- control -------------------------------------------------------------------------------

    async def _get_pushes(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pushes": [{**p, "headers": {}} for p in self.pushes],
                "receipts": self.receipts.as_json(),
            }
        )

    async def _delete_pushes(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    async def _post_script(self, request: web.Request) -> web.Response:
        spec = await request.json()
        self.respond(
            int(spec["status"]),
            str(spec.get("error_code", "")),
            int(spec.get("times", 1)),
            token=spec.get("token"),
            retry_after=spec.get("retry_after"),
            delay=float(spec.get("delay", 0)),
            field_violation=spec.get("field_violation"),
        )
        return web.Response(status=204)


async def run_forever(host: str, port: int, tls_dir: str, project_id: str) -> None:
    """`ringrelay fake fcm`: a fake FCM + token endpoint, a service account it trusts, and the
    config that uses them."""
    folder = Path(tls_dir)
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
    fake = FakeFCM(capacity=1000)
    url = await fake.start(host, port, tls_dir)
    account = (folder / f"{project_id}-service-account.json").resolve()
    write_service_account(account, project_id, fake.token_uri)
    fake.trust_service_account(account)
    ca_file = make_test_certificates(tls_dir).ca_file.resolve()
    config = (
        f'[[fcm]]\nservice_account_file = "{account}"\nendpoint = "{url}"\nca_file = "{ca_file}"\n'
    )
    (folder / "fcm.toml").write_text(config)
    print(
        f"fake FCM HTTP v1 on {url} (project {project_id}, OAuth at {fake.token_uri})\n"
        f"add this to ringrelay's TOML config (also written to {folder / 'fcm.toml'}):\n\n"
        f"{config}\n"
        f"received pushes: curl --cacert {ca_file} {url}/_fake/pushes",
        flush=True,
    )
    await asyncio.Event().wait()
