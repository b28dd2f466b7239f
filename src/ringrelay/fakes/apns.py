"""A fake APNs: HTTP/2 over TLS (ALPN h2) that checks what Apple checks on a token-based push.

Checks and answers follow Apple's "Sending notification requests to APNs", "Establishing a
token-based connection to APNs" and "Handling notification responses from APNs"
(../shared/notes/protocols.md §3): the method and `/3/device/<hex token>` path, the ES256 provider
token (signature against the key's public half, `kid`, `iss`, `iat` no older than an hour,
renewal no more often than every 20 minutes), the topic against the key's bundle ids and the push
type, priority, expiration, `apns-id` and the payload size (5120 bytes VoIP, 4096 otherwise).
Scripted answers (410 with a timestamp, 5xx, delays), GOAWAY and dropped connections on demand.

Built on HTTP/2 server connections directly (h2server.py: h2's server side in the tests, lean
framing in the benchmark), not an ASGI server: it must answer thousands of pushes a second on a
core it shares with the load generator, and the tests need frame-level control (GOAWAY, aborts).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ringrelay.fakes.h2lean import LeanConnection
from ringrelay.fakes.h2server import H2ServerConnection
from ringrelay.fakes.receipts import Receipts
from ringrelay.fakes.tls import make_test_certificates
from ringrelay.redact import fingerprint

PUSH_TYPES = {
    "alert",
    "background",
    "location",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "pushtotalk",
}
# Topic suffixes Apple defines per push type (the bundle id alone for alert/background).
TOPIC_SUFFIX = {
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
}
VOIP_MAX = 5120
OTHER_MAX = 4096
TOKEN_MAX_AGE = 3600  # older provider tokens: 403 ExpiredProviderToken
HEX = re.compile(rb"^[0-9a-fA-F]+$")
NEVER_ISSUED = re.compile(rb"^0+$")  # all zeros: a token APNs never hands out
UUID = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def write_signing_key(path: str | Path) -> bytes:
    """A fresh APNs auth key as Apple hands it out (PKCS#8 PEM `.p8`); returns its public PEM,
    which is what the fake needs to verify provider tokens."""
    key = ec.generate_private_key(ec.SECP256R1())
    Path(path).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class _Key:
    team_id: str
    key_id: str
    public_key: Any
    bundle_ids: set[str]


@dataclass
class _Scripted:
    status: int
    reason: str
    times: int
    device_token: str | None
    timestamp_ms: int | None
    delay: float


@dataclass
class FakeAPNs:
    max_concurrent_streams: int = 1000
    record_bodies: bool = True
    # h2's generic checks of received header fields (RFC 9113 §8.2: lowercase names, pseudo-
    # header fields first and once, no connection-specific fields). The tests run with them;
    # the benchmark turns them off, as it turns off keeping bodies, to spend less of the load
    # core (they were ~10 % of the fake's CPU). Apple's own checks (`handle`) always run.
    validate_headers: bool = True
    # "h2": h2's server side, independent of the relay's client (the tests). "lean": a lean
    # server side for the benchmark's load core (fakes/h2lean.py says why and what it gives up).
    framing: str = "h2"
    capacity: int = 100_000
    # Apple: refresh no more than once every 20 minutes; tests may relax it.
    min_token_renewal_seconds: float = 1200.0
    check_token_renewal: bool = True
    pushes: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    counts: collections.Counter[int] = field(default_factory=collections.Counter)
    receipts: Receipts = field(default_factory=Receipts)
    connections_opened: int = 0
    pings_received: int = 0  # HTTP/2 PINGs from clients (their keep-alive)
    provider_tokens: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.pushes = collections.deque(maxlen=self.capacity)
        self._keys: dict[str, _Key] = {}
        self._verified: dict[str, tuple[_Key, int]] = {}  # JWT -> (key, iat)
        self._script: list[_Scripted] = []
        self._unregistered: dict[str, int] = {}
        self._connections: set[H2ServerConnection | LeanConnection] = set()
        self._server: asyncio.Server | None = None
        self.base_url = ""

    # --- set-up ----------------------------------------------------------------------------

    def add_key(
        self, team_id: str, key_id: str, public_key_pem: bytes, bundle_ids: set[str]
    ) -> None:
        self._keys[key_id] = _Key(
            team_id, key_id, load_pem_public_key(public_key_pem), set(bundle_ids)
        )

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls_dir: str | None = None
    ) -> str:
        if tls_dir is None:
            raise ValueError("APNs is only spoken over TLS: give tls_dir")
        ctx = make_test_certificates(tls_dir).server_context(["h2"])
        if self.framing not in ("h2", "lean"):
            raise ValueError(f"framing must be 'h2' or 'lean', not {self.framing!r}")
        lean = self.framing == "lean"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: (LeanConnection if lean else H2ServerConnection)(self, answer_request),
            host,
            port,
            ssl=ctx,
            backlog=1024,
        )
        bound = self._server.sockets[0].getsockname()[1]
        self.base_url = f"https://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        await self.drop_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def respond(
        self,
        status: int,
        reason: str,
        times: int = 1,
        *,
        device_token: str | None = None,
        timestamp_ms: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self._script.append(_Scripted(status, reason, times, device_token, timestamp_ms, delay))

    def unregistered_at(self, device_token: str, timestamp_ms: int) -> None:
        self._unregistered[device_token.lower()] = timestamp_ms

    async def goaway(self, reason: str = "Shutdown") -> None:
        for conn in list(self._connections):
            conn.goaway(reason)

    async def drop_connections(self) -> None:
        for conn in list(self._connections):
            conn.abort()

    def reset(self) -> None:
        self.pushes.clear()
        self.counts.clear()
        self.receipts.clear()
        self.provider_tokens.clear()
        self._script.clear()
        self._unregistered.clear()
        self._verified.clear()

    # --- checks ----------------------------------------------------------------------------

    def _provider_token_error(
        self, authorization: bytes | None, conn: H2ServerConnection | LeanConnection | None
    ) -> tuple[int, str] | None:
        if not authorization:
            return 403, "MissingProviderToken"
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 403, "MissingProviderToken"
        now = time.time()
        known = self._verified.get(token)
        if known is None:
            try:
                header = jwt.get_unverified_header(token)
                key = self._keys.get(str(header.get("kid", "")))
                if header.get("alg") != "ES256" or key is None:
                    return 403, "InvalidProviderToken"
                claims = jwt.decode(
                    token,
                    key.public_key,
                    algorithms=["ES256"],
                    options={"verify_aud": False, "verify_exp": False, "require": ["iss", "iat"]},
                    leeway=3600 * 24,  # iat age is judged below, with Apple's own words
                )
            except jwt.PyJWTError:
                return 403, "InvalidProviderToken"
            if claims.get("iss") != key.team_id or not isinstance(claims.get("iat"), int):
                return 403, "InvalidProviderToken"
            known = (key, int(claims["iat"]))
            self._verified[token] = known
            self.provider_tokens.add(token)
        key, iat = known
        if conn is not None and conn.token != token:
            # A connection whose token changes again within 20 minutes "will be unusable until
            # enough time has passed" (Apple Developer Forums 675879): judged per connection, so
            # a restart or a second instance with its own fresh token is fine.
            if (
                self.check_token_renewal
                and conn.token
                and now - conn.token_at < self.min_token_renewal_seconds
            ):
                return 429, "TooManyProviderTokenUpdates"
            conn.token, conn.token_at = token, now
        if iat > now + 60:
            return 403, "InvalidProviderToken"
        if now - iat > TOKEN_MAX_AGE:
            return 403, "ExpiredProviderToken"
        return None

    def handle(
        self,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        conn: H2ServerConnection | LeanConnection | None = None,
    ) -> tuple[int, dict[str, Any] | None, str, float]:
        """Judge one request: (status, error body or None, apns-id, delay)."""
        values: dict[bytes, bytes] = {}
        duplicate = False
        for name, value in headers:
            if name in values:
                duplicate = True
            values[name] = value
        apns_id = values.get(b"apns-id", b"").decode("latin-1") or str(uuid.uuid4())

        def error(status: int, reason: str) -> tuple[int, dict[str, Any] | None, str, float]:
            return status, {"reason": reason}, apns_id, 0.0

        if duplicate:
            return error(400, "DuplicateHeaders")
        if values.get(b":method") != b"POST":
            return error(405, "MethodNotAllowed")
        path = values.get(b":path", b"")
        if not path.startswith(b"/3/device/"):
            return error(404, "BadPath")
        device = path[len(b"/3/device/") :]
        if not device:
            return error(400, "MissingDeviceToken")
        if not HEX.match(device) or len(device) % 2:
            return error(400, "BadDeviceToken")
        if b"apns-id" in values and not UUID.match(values[b"apns-id"]):
            return error(400, "BadMessageId")
        problem = self._provider_token_error(values.get(b"authorization"), conn)
        if problem is not None:
            return error(*problem)
        key, _ = self._verified[values[b"authorization"].decode("latin-1").partition(" ")[2]]
        topic = values.get(b"apns-topic", b"").decode("latin-1")
        if not topic:
            return error(400, "MissingTopic")
        push_type = values.get(b"apns-push-type", b"alert").decode("latin-1")
        if push_type not in PUSH_TYPES:
            return error(400, "InvalidPushType")
        suffix = TOPIC_SUFFIX.get(push_type, "")
        base = topic.removesuffix(suffix) if suffix else topic
        if base not in key.bundle_ids:
            return error(400, "TopicDisallowed")
        if not topic.endswith(suffix) or (not suffix and topic.endswith(".voip")):
            # Apple's docs give no reason for a type/topic mismatch; InvalidPushType is closest.
            return error(400, "InvalidPushType")
        priority = values.get(b"apns-priority", b"10")
        if priority not in (b"1", b"5", b"10"):
            return error(400, "BadPriority")
        expiration = values.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return error(400, "BadExpirationDate")
        if not body:
            return error(400, "PayloadEmpty")
        limit = VOIP_MAX if push_type == "voip" else OTHER_MAX
        if len(body) > limit:
            return error(413, "PayloadTooLarge")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error(400, "BadPayload")  # not an Apple reason; Apple would not accept it
        if not isinstance(payload, dict):
            return error(400, "BadPayload")

        token = device.decode().lower()
        status, reason, timestamp, delay = 200, "", None, 0.0
        for scripted in self._script:
            if scripted.device_token is None or scripted.device_token.lower() == token:
                status, reason, timestamp, delay = (
                    scripted.status,
                    scripted.reason,
                    scripted.timestamp_ms,
                    scripted.delay,
                )
                scripted.times -= 1
                if scripted.times <= 0:
                    self._script.remove(scripted)
                break
        else:
            if NEVER_ISSUED.match(device):
                # A well-formed token no device was given (what `ringrelay doctor` probes
                # with): Apple answers BadDeviceToken once the provider token and topic passed.
                status, reason = 400, "BadDeviceToken"
        if token in self._unregistered and status == 200:
            status, reason, timestamp = 410, "Unregistered", self._unregistered[token]

        data = payload.get("data")
        call_id = str(data.get("callId", "")) if isinstance(data, dict) else ""
        if status == 200:
            self.receipts.append(call_id, time.monotonic())
        if self.record_bodies:
            self.pushes.appendleft(
                {
                    "device_token": token,
                    "headers": {
                        n.decode(): v.decode("latin-1")
                        for n, v in values.items()
                        if not n.startswith(b":")
                    },
                    "body": payload,
                    "apns_id": apns_id,
                    "topic": topic,
                    "push_type": push_type,
                    "connection": conn.id if conn is not None else 0,
                    "received_at": time.time(),
                    "status": status,
                    "expired": bool(
                        expiration and expiration != b"0" and int(expiration) < time.time()
                    ),
                }
            )
        self.counts[status] += 1
        if status == 200:
            return 200, None, apns_id, delay
        answer: dict[str, Any] = {"reason": reason}
        if status == 410:
            answer["timestamp"] = timestamp if timestamp is not None else int(time.time() * 1000)
        return status, answer, apns_id, delay

    def listing(self) -> list[dict[str, Any]]:
        """What `/_fake/pushes` shows: a token's first characters, and the provider token as a
        fingerprint (a developer may point a real .p8 at the fake; its JWT is a credential for
        an hour). `pushes` itself keeps everything, for the tests."""
        return [
            {
                **p,
                "device_token": p["device_token"][:8] + "…",
                "headers": {
                    name: fingerprint(value) if name == "authorization" else value
                    for name, value in p["headers"].items()
                },
            }
            for p in self.pushes
        ]


def answer_request(
    conn: H2ServerConnection | LeanConnection,
    stream_id: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """Judge one request and answer it on its connection. Called while a read is processed; the
    connection sends every answer of that read at once."""
    fake: FakeAPNs = conn.fake  # type: ignore[assignment]
    if dict(headers).get(b":path", b"").startswith(b"/_fake/pushes"):
        conn._send(stream_id, 200, {"pushes": fake.listing()}, flush=False)
        return
    status, answer, apns_id, delay = fake.handle(headers, body, conn)
    extra = [(b"apns-id", apns_id.encode())] if apns_id else []
    if delay > 0:
        asyncio.get_running_loop().call_later(delay, conn._send, stream_id, status, answer, extra)
    else:
        conn._send(stream_id, status, answer, extra, flush=False)


async def start_for_cli(
    host: str, port: int, tls_dir: str, bundle_id: str, team_id: str
) -> tuple[FakeAPNs, str, str]:
    """A fake APNs with a fresh signing key: (the fake, the TOML config that uses it, what to
    print). Shared by `ringrelay fake apns` and `ringrelay fake all`."""
    key_id = "FAKEKEY001"
    folder = Path(tls_dir)
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
    key_file = (folder / f"AuthKey_{key_id}.p8").resolve()
    fake = FakeAPNs(capacity=1000)
    fake.add_key(team_id, key_id, write_signing_key(key_file), {bundle_id})
    url = await fake.start(host, port, tls_dir)
    ca_file = make_test_certificates(tls_dir).ca_file.resolve()
    config = (
        f'[[apns]]\nbundle_id = "{bundle_id}"\nteam_id = "{team_id}"\nkey_id = "{key_id}"\n'
        f'key_file = "{key_file}"\nenvironment = "sandbox"\nendpoint = "{url}"\n'
        f'ca_file = "{ca_file}"\n'
    )
    info = (
        f"fake APNs (HTTP/2 over TLS) on {url}, topic {bundle_id}.voip\n"
        f"  received pushes: curl --http2 --cacert {ca_file} {url}/_fake/pushes"
    )
    return fake, config, info


async def run_forever(host: str, port: int, tls_dir: str, bundle_id: str, team_id: str) -> None:
    """`ringrelay fake apns`: a fake APNs with a fresh signing key, and the config that uses it."""
    _, config, info = await start_for_cli(host, port, tls_dir, bundle_id, team_id)
    written = Path(tls_dir) / "apns.toml"
    written.write_text(config)
    print(
        f"{info}\nadd this to ringrelay's TOML config (also written to {written}):\n\n{config}",
        flush=True,
    )
    await asyncio.Event().wait()
