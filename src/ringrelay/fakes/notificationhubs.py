"""A fake Azure Notification Hubs that checks what the real one checks on a direct send.

It verifies the SAS token (HMAC-SHA256 of the URL-encoded resource URI + "\\n" + expiry, keyed
with the UTF-8 key: learn.microsoft.com/rest/api/notificationhubs/common-concepts) and its scope
against the hub's own URI (not the address the request came by: a proxy in front changes that),
the direct-send query and headers, and the body for the platform format; then answers 201 with a
Location, or whatever the test scripted (401, 403, 404, 429, 500, delays). The check is written
independently of the provider's signing code on purpose: a shared bug would pass unseen.

Control API (JSON): `POST /_fake/script` {"status": 500, "times": 2, "retry_after": 1, "delay": 0,
"handle": optional device handle}; `GET /_fake/pushes`; `DELETE /_fake/pushes`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ringrelay.fakes.receipts import Receipts
from ringrelay.fakes.tls import make_test_certificates

FORMATS = {"apple", "fcmv1", "gcm", "windows", "adm", "baidu"}
MAX_BODY = 64 * 1024  # direct-send reference: 413 over 64 KB
APNS_MAX = 4096  # Notification Hubs caps APNs payloads at 4 KB (voip-apns doc)


@dataclass
class ScriptedAnswer:
    status: int
    times: int
    retry_after: float | None = None
    delay: float = 0.0
    handle: str | None = None


@dataclass
class FakeNotificationHubs:
    hub: str = "ringrelay"
    key_name: str = "DefaultFullSharedAccessSignature"
    key: str = "ringrelay-fake-key"
    record_bodies: bool = True
    capacity: int = 100_000
    pushes: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    script: list[ScriptedAnswer] = field(default_factory=list)
    counts: collections.Counter[int] = field(default_factory=collections.Counter)
    # Bench mode: (callId, monotonic receipt time) of each accepted push.
    receipts: Receipts = field(default_factory=Receipts)
    # Formats the hub has platform credentials for (None: all). A direct send in another is
    # refused with 400; the wording is the fake's own (no public source quotes the hub's).
    platforms: set[str] | None = None
    # Seconds added to the Date header of every answer: a server whose clock is off.
    clock_offset: float = 0.0

    def __post_init__(self) -> None:
        self.pushes = collections.deque(maxlen=self.capacity)
        self._runner: web.AppRunner | None = None

    # --- wiring ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY * 4)
        app.router.add_post(f"/{self.hub}/messages/", self._send)
        app.router.add_post("/_fake/script", self._post_script)
        app.router.add_get("/_fake/pushes", self._get_pushes)
        app.router.add_delete("/_fake/pushes", self._reset)
        app.on_response_prepare.append(self._date_header)
        return app

    async def _date_header(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.clock_offset:
            from email.utils import formatdate

            response.headers["Date"] = formatdate(time.time() + self.clock_offset, usegmt=True)

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls_dir: str | None = None
    ) -> str:
        ssl_ctx = None
        if tls_dir is not None:
            ssl_ctx = make_test_certificates(tls_dir).server_context(["http/1.1"])
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_ctx, backlog=1024)
        await site.start()
        server: Any = site._server
        bound = server.sockets[0].getsockname()[1]
        scheme = "https" if ssl_ctx else "http"
        self.base_url = f"{scheme}://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def connection_string(self) -> str:
        host = self.base_url.split("://", 1)[1]
        scheme = "sb" if self.base_url.startswith("https") else "http"
        return (
            f"Endpoint={scheme}://{host}/;SharedAccessKeyName={self.key_name};"
            f"SharedAccessKey={self.key}"
        )

    def respond(self, status: int, times: int = 1, **kwargs: Any) -> None:
        self.script.append(ScriptedAnswer(status, times, **kwargs))

    def reset(self) -> None:
        self.pushes.clear()
        self.script.clear()
        self.counts.clear()
        self.receipts.clear()
        self.platforms = None
        self.clock_offset = 0.0

    # --- checks ----------------------------------------------------------------------------

    def _check_sas(self, header: str, entity_uri: str) -> str | None:
        prefix = "SharedAccessSignature "
        if not header.startswith(prefix):
            return "Authorization is not a SharedAccessSignature"
        fields: dict[str, str] = {}
        for part in header[len(prefix) :].split("&"):
            name, sep, value = part.partition("=")
            if not sep:
                return f"malformed SAS field {name!r}"
            fields[name] = value
        missing = {"sr", "sig", "se", "skn"} - fields.keys()
        if missing:
            return f"SAS token lacks {sorted(missing)}"
        if unquote(fields["skn"]) != self.key_name:
            return "unknown key name"
        try:
            expiry = int(fields["se"])
        except ValueError:
            return "se is not an integer"
        if expiry < time.time():
            return "SAS token expired"
        # The hub checks the scope against its own name for the entity, whatever address the
        # request came in by (a proxy, a private endpoint): `sr` must be a prefix of the hub's
        # URI, <namespace endpoint>/<hub>. The scheme is left out of the comparison: the docs
        # show http:// scopes, the SDKs https:// ones, and no source says the hub minds.
        resource = unquote(fields["sr"]).lower().split("://", 1)[-1]
        if not entity_uri.lower().split("://", 1)[-1].startswith(resource):
            return f"token scope {resource} does not cover {entity_uri}"
        expected = base64.b64encode(
            hmac.new(
                self.key.encode("utf-8"), f"{fields['sr']}\n{expiry}".encode(), hashlib.sha256
            ).digest()
        ).decode()
        if not hmac.compare_digest(unquote(fields["sig"]), expected):
            return "signature mismatch"
        return None

    def _check_body(self, fmt: str, headers: Any, body: bytes) -> str | None:
        if fmt == "windows":
            if headers.get("X-WNS-Type") != "wns/raw":
                return "windows raw notification needs X-WNS-Type: wns/raw"
            return None
        if not headers.get("Content-Type", "").lower().startswith("application/json"):
            return "Content-Type must be application/json"
        try:
            doc = json.loads(body)
        except ValueError:
            return "body is not JSON"
        if not isinstance(doc, dict):
            return "body is not a JSON object"
        if fmt == "apple":
            if "aps" not in doc:
                return "APNs payload without 'aps'"
            if len(body) > APNS_MAX:
                return f"APNs payload over {APNS_MAX} bytes"
            if (
                headers.get("apns-push-type") == "voip"
                or headers.get("ServiceBusNotification-Apns-Push-Type") == "voip"
            ):
                if headers.get("apns-priority") not in (None, "10", "5"):
                    return "bad apns-priority"
        if fmt == "fcmv1":
            message = doc.get("message")
            if not isinstance(message, dict):
                return "fcmv1 body must be {'message': {...}}"
            data = message.get("data", {})
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()
            ):
                return "fcmv1 message.data must map strings to strings"
        return None

    # --- handlers --------------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        received = time.monotonic()
        body = await request.read()
        if len(body) > MAX_BODY:
            return self._answer(413, "entity too large")
        if "direct" not in request.query or "api-version" not in request.query:
            return self._answer(400, "direct send needs ?direct&api-version=")
        url = f"{request.scheme}://{request.host}{request.path}"
        # The entity as the hub names it: its namespace endpoint, not the Host header.
        problem = self._check_sas(
            request.headers.get("Authorization", ""), f"{self.base_url}{request.path}"
        )
        if problem:
            return self._answer(401, problem)
        fmt = request.headers.get("ServiceBusNotification-Format", "")
        if fmt not in FORMATS:
            return self._answer(400, f"unknown ServiceBusNotification-Format {fmt!r}")
        if self.platforms is not None and fmt not in self.platforms:
            return self._answer(400, f"the hub has no credentials configured for platform {fmt!r}")
        handle = request.headers.get("ServiceBusNotification-DeviceHandle", "")
        if not handle:
            return self._answer(400, "missing ServiceBusNotification-DeviceHandle")
        problem = self._check_body(fmt, request.headers, body)
        if problem:
            return self._answer(400, problem)

        scripted = self._next_scripted(handle)
        if scripted is not None and scripted.delay:
            await asyncio.sleep(scripted.delay)
        status = scripted.status if scripted is not None else 201
        record: dict[str, Any] = {"status": status, "format": fmt, "handle": handle}
        if self.record_bodies:
            record["headers"] = {k: v for k, v in request.headers.items() if k != "Authorization"}
            record["body"] = json.loads(body) if fmt != "windows" else body.decode()
            record["received_at"] = time.time()
            self.pushes.append(record)
        if status == 201:
            self.receipts.append(_call_id(body), received)
        self.counts[status] += 1
        if status != 201:
            headers = {}
            if scripted is not None and scripted.retry_after is not None:
                headers["Retry-After"] = str(scripted.retry_after)
            return web.Response(status=status, text=f"scripted {status}", headers=headers)
        notification_id = uuid.uuid4().hex
        return web.Response(
            status=201,
            headers={
                "Location": f"{url}{notification_id}?api-version={request.query['api-version']}",
                "TrackingId": str(uuid.uuid4()),
            },
        )

    def _answer(self, status: int, reason: str) -> web.Response:
        self.counts[status] += 1
        if self.record_bodies:
            self.pushes.append({"status": status, "error": reason})
        return web.Response(status=status, text=reason)

    def _next_scripted(self, handle: str) -> ScriptedAnswer | None:
        for entry in self.script:
            if entry.handle is not None and entry.handle != handle:
                continue
            entry.times -= 1
            if entry.times <= 0:
                self.script.remove(entry)
            return entry
        return None

    async def _post_script(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.respond(
            int(doc["status"]),
            int(doc.get("times", 1)),
            retry_after=doc.get("retry_after"),
            delay=float(doc.get("delay", 0)),
            handle=doc.get("handle"),
        )
        return web.json_response({"scripted": len(self.script)})

    async def _get_pushes(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pushes": list(self.pushes),
                "counts": dict(self.counts),
                "receipts": self.receipts.as_json(),
            }
        )

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})


def _call_id(body: bytes) -> str:
    try:
        doc = json.loads(body)
        data = doc.get("data") or doc.get("message", {}).get("data") or doc
        return str(data.get("callId", ""))
    except (ValueError, AttributeError):
        return ""


async def run_forever(host: str, port: int, tls_dir: str, hub: str, key: str) -> None:
    fake = FakeNotificationHubs(hub=hub, key=key, capacity=1000)
    url = await fake.start(host, port, tls_dir)
    certs = make_test_certificates(tls_dir)
    print(
        f"fake Notification Hubs on {url} (hub {hub!r})\n"
        f"point ringrelay at it with:\n"
        f"  export RINGRELAY_NH_CONNECTION_STRING='{fake.connection_string()}'\n"
        f"  export RINGRELAY_NH_HUB_NAME={hub}\n"
        f"  export RINGRELAY_NH_CA_FILE={certs.ca_file.resolve()}\n"
        f"received pushes: GET {url}/_fake/pushes",
        flush=True,
    )
    await asyncio.Event().wait()
