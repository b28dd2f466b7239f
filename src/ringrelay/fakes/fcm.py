"""A fake FCM HTTP v1 endpoint with a fake Google OAuth2 token endpoint, over TLS.

The token endpoint checks what Google's does for a service-account JWT bearer grant (RFC 7523 as
used by google-auth: RS256 assertion signed with the account's key, `iss` = client_email, `aud` =
token_uri, a scope that can send, lifetime <= 1 h). The send endpoint checks the bearer token, the
project and the message shape (firebase.google.com/docs/reference/fcm/rest/v1/projects.messages:
one target, `data` a map of strings without reserved keys, `android.priority`, a Duration `ttl`,
payload <= 4096 bytes) and answers in Google's RPC error format (../shared/notes/protocols.md §4).

One TLS port, the protocol chosen per connection by ALPN: the send endpoint over HTTP/2 (h2's
server side in the tests, `framing="lean"` in the benchmark; see h2server.py), the token
endpoint over HTTP/1.1 (google-auth offers no ALPN), the control API over either.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ringrelay.fakes.h2lean import LeanConnection
from ringrelay.fakes.h2server import H2ServerConnection
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
SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
NEVER_ISSUED = re.compile(r"^0+$")  # all zeros: a token no app instance was given
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


_Answer = tuple[int, dict[str, Any], float | None]  # status, JSON body, Retry-After seconds


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
    # The HTTP/2 side: "h2" (h2's server, independent of the relay's client: the tests) or
    # "lean" (the benchmark's load core; fakes/h2lean.py). Google's front ends advertise 100
    # concurrent streams per connection.
    framing: str = "h2"
    validate_headers: bool = True
    max_concurrent_streams: int = 100
    connections_opened: int = 0
    pings_received: int = 0  # HTTP/2 PINGs from clients (their keep-alive)

    def __post_init__(self) -> None:
        self.pushes = collections.deque(maxlen=self.capacity)
        self._accounts: dict[str, tuple[str, Any]] = {}  # client_email -> (project, public key)
        self._access_tokens: dict[str, tuple[str, float]] = {}  # token -> (project, expiry)
        self._script: list[_Scripted] = []
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[Any] = set()  # HTTP/2 connections
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
        app.router.add_get("/_fake/pushes", self._control)
        app.router.add_delete("/_fake/pushes", self._control)
        app.router.add_post("/_fake/script", self._control)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls_dir: str | None = None
    ) -> str:
        """Serve on one port: HTTP/2 to a client that offers it in ALPN (the send endpoint, as
        ringrelay and curl do), HTTP/1.1 otherwise (the token endpoint, which google-auth calls
        without ALPN); the control API on both. Without `tls_dir`: no send endpoint."""
        ctx = (
            make_test_certificates(tls_dir).server_context(["h2", "http/1.1"]) if tls_dir else None
        )
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        http1 = self._runner.server
        assert http1 is not None
        lean = self.framing == "lean"
        if self.framing not in ("h2", "lean"):
            raise ValueError(f"framing must be 'h2' or 'lean', not {self.framing!r}")

        def h2_connection() -> asyncio.Protocol:
            return (LeanConnection if lean else H2ServerConnection)(self, self._on_h2_request)

        self._server = await asyncio.get_running_loop().create_server(
            lambda: _ByAlpn(http1, h2_connection), host, port, ssl=ctx, backlog=1024
        )
        bound = self._server.sockets[0].getsockname()[1]
        self.base_url = f"{'https' if ctx else 'http'}://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        for conn in list(self._connections):
            conn.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
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
    ) -> _Answer:
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
        doc = {"error": {"code": status, "message": message, "status": rpc_status}}
        doc["error"]["details"] = details
        return status, doc, retry_after

    def _shape_error(self, message: Any) -> _Answer | None:
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

    def judge(
        self, project: str, authorization: str, body: bytes, headers: dict[str, str]
    ) -> tuple[_Answer, float]:
        """One send request, whatever carries it: (status, JSON answer, Retry-After), delay."""
        granted = self._access_tokens.get(authorization.removeprefix("Bearer "))
        if not authorization.startswith("Bearer ") or granted is None or granted[1] < time.time():
            self.counts[401] += 1
            return self._error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            ), 0.0
        if granted[0] != project:
            # Google answers a token of another project with PERMISSION_DENIED.
            self.counts[403] += 1
            return self._error(403, "PERMISSION_DENIED", "Permission denied on this project."), 0.0
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."), 0.0
        message = doc.get("message") if isinstance(doc, dict) else None
        problem = self._shape_error(message)
        if problem is not None:
            self.counts[problem[0]] += 1
            return problem, 0.0
        assert isinstance(message, dict)
        target = str(message.get("token") or message.get("fid"))
        if NEVER_ISSUED.match(target):
            # A token FCM never issued (what `ringrelay doctor` probes with): FCM answers
            # INVALID_ARGUMENT naming the token, after the credentials and project passed.
            self.counts[400] += 1
            return self._error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
                "message.token",
            ), 0.0
        if doc.get("validate_only") is True:
            # projects.messages.send: validate_only checks the request without sending it and
            # answers with a placeholder name.
            return (200, {"name": f"projects/{project}/messages/fake_message_id"}, None), 0.0
        for scripted in self._script:
            if scripted.token is None or scripted.token == target:
                scripted.times -= 1
                if scripted.times <= 0:
                    self._script.remove(scripted)
                if scripted.status != 200:
                    self.counts[scripted.status] += 1
                    rpc = ERRORS.get(scripted.error_code, (0, "UNKNOWN"))[1]
                    answer = self._error(
                        scripted.status,
                        rpc,
                        f"scripted {scripted.error_code}",
                        scripted.error_code if scripted.error_code in ERRORS else None,
                        scripted.field_violation,
                        scripted.retry_after,
                    )
                    return answer, scripted.delay
                delay = scripted.delay
                break
        else:
            delay = 0.0
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
                    "headers": headers,
                    "received_at": time.time(),
                    "name": name,
                }
            )
        return (200, {"name": name}, None), delay

    def _on_h2_request(
        self, conn: Any, stream_id: int, fields: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """The send endpoint (and the control API), over HTTP/2."""
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in fields}
        path, method = headers.get(":path", ""), headers.get(":method", "")
        route = SEND_PATH.match(path)
        if method != "POST" or route is None:
            status, control_doc = self.control(method, path.partition("?")[0], body)
            conn._send(stream_id, status, control_doc, flush=False)
            return
        answer, delay = self.judge(route.group(1), headers.get("authorization", ""), body, headers)
        status, doc, retry_after = answer
        extra = [(b"retry-after", b"%g" % retry_after)] if retry_after is not None else []
        if delay:
            asyncio.get_running_loop().call_later(delay, conn._send, stream_id, status, doc, extra)
        else:
            conn._send(stream_id, status, doc, extra, flush=False)

    # --- control -------------------------------------------------------------------------------

    def control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """The control API, whichever protocol carries it (curl offers HTTP/2)."""
        if path == "/_fake/pushes" and method == "GET":
            # As the fake APNs lists them, a token's first characters only; no headers, for the
            # bearer token is one (the fake APNs shows its provider token as a fingerprint).
            pushes = [{**p, "token": p["token"][:8] + "…", "headers": {}} for p in self.pushes]
            return 200, {"pushes": pushes, "receipts": self.receipts.as_json()}
        if path == "/_fake/pushes" and method == "DELETE":
            self.reset()
            return 204, None
        if path == "/_fake/script" and method == "POST":
            spec = orjson.loads(body)
            self.respond(
                int(spec["status"]),
                str(spec.get("error_code", "")),
                int(spec.get("times", 1)),
                token=spec.get("token"),
                retry_after=spec.get("retry_after"),
                delay=float(spec.get("delay", 0)),
                field_violation=spec.get("field_violation"),
            )
            return 204, None
        return 404, {"error": {"code": 404, "status": "NOT_FOUND"}}

    async def _control(self, request: web.Request) -> web.Response:
        status, doc = self.control(request.method, request.path, await request.read())
        if doc is None:
            return web.Response(status=status)
        return web.json_response(doc, status=status)


class _ByAlpn(asyncio.Protocol):
    """Hands a TLS connection to the protocol its ALPN chose. asyncio calls connection_made
    after the handshake, so the choice is known by then."""

    def __init__(
        self, http1: Callable[[], asyncio.Protocol], h2: Callable[[], asyncio.Protocol]
    ) -> None:
        self._factories = (http1, h2)
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        alpn = tls.selected_alpn_protocol() if tls is not None else None
        self._inner = self._factories[alpn == "h2"]()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self._inner is not None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


async def start_for_cli(
    host: str, port: int, tls_dir: str, project_id: str
) -> tuple[FakeFCM, str, str]:
    """A fake FCM + token endpoint and a service account it trusts: (the fake, the TOML config
    that uses them, what to print). Shared by `ringrelay fake fcm` and `ringrelay fake all`."""
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
    info = (
        f"fake FCM HTTP v1 on {url} (project {project_id}, OAuth at {fake.token_uri})\n"
        f"  received pushes: curl --cacert {ca_file} {url}/_fake/pushes"
    )
    return fake, config, info


async def run_forever(host: str, port: int, tls_dir: str, project_id: str) -> None:
    """`ringrelay fake fcm`: a fake FCM + token endpoint, a service account it trusts, and the
    config that uses them."""
    _, config, info = await start_for_cli(host, port, tls_dir, project_id)
    written = Path(tls_dir) / "fcm.toml"
    written.write_text(config)
    print(
        f"{info}\nadd this to ringrelay's TOML config (also written to {written}):\n\n{config}",
        flush=True,
    )
    await asyncio.Event().wait()
