"""A fake Azure Communication Services Call Automation (Redirect and Reject) that checks what the
service checks, and plays the part of ACS for the calls it places.

- HMAC-SHA256 request signature (learn.microsoft.com/azure/communication-services/tutorials/
  hmac-header-tutorial): string to sign `VERB\\n<path>?<query>\\n<x-ms-date>;<host>;<x-ms-content-
  sha256>`, keyed with the base64-decoded access key; `x-ms-content-sha256` must be the body's
  SHA-256. A bad signature is answered 401. Written apart from the SDK's signing on purpose.
- Bodies against the REST spec (Azure/azure-rest-api-specs `specification/communication/
  data-plane/CallAutomation/stable/2024-09-15/communicationservicescallautomation.json`):
  RedirectCallRequest {incomingCallContext (required), target (required, an identifier)},
  RejectCallRequest {incomingCallContext (required), callRejectReason: none|busy|forbidden};
  answered 204; Repeatability-Request-ID (a UUID) needs Repeatability-First-Sent.
- A repeated Repeatability-Request-ID gets the first answer again without acting twice; a
  context already used (redirected, rejected) or of a call that ended gets 400 / 404.
- Calls: `place_call` makes an IncomingCall for a callee and remembers its context; after a
  redirect the fake raises the follow-up IncomingCall for the target (same correlationId, new
  context), posted to `webhook_url` when set (as ACS posts to Event Grid) and kept in `followups`.

Control API: `POST /_fake/calls` {"to", "from"} places a call (and posts it to the webhook);
`POST /_fake/script` {"status", "times"}; `POST /_fake/end` {"correlationId"} ends a call;
`GET /_fake/actions`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from ringrelay.fakes.tls import make_test_certificates
from ringrelay.redact import fingerprint

log = logging.getLogger("ringrelay.fake.callautomation")

REJECT_REASONS = {"none", "busy", "forbidden"}
IDENTIFIER_KINDS = {
    "communicationUser",
    "phoneNumber",
    "microsoftTeamsUser",
    "microsoftTeamsApp",
    "teamsExtensionUser",
}
MAX_CLOCK_SKEW = 15 * 60  # seconds; not confirmed for ACS, a common HMAC-scheme window


@dataclass
class FakeCall:
    correlation_id: str
    to: str
    caller: str
    display_name: str
    state: str = "ringing"  # ringing | redirected | rejected | ended


@dataclass
class FakeCallAutomation:
    access_key: str = base64.b64encode(b"ringrelay-fake-callautomation-key").decode()
    webhook_url: str | None = None
    ca_file: str | None = None  # to reach an https webhook signed by the test CA
    actions: list[dict[str, Any]] = field(default_factory=list)
    followups: list[dict[str, Any]] = field(default_factory=list)
    script: collections.deque[tuple[int, float]] = field(default_factory=collections.deque)
    counts: collections.Counter[int] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.calls: dict[str, FakeCall] = {}  # incomingCallContext -> call
        self._answers: dict[str, tuple[int, dict[str, Any] | None]] = {}  # by request id
        self._tasks: set[asyncio.Task[None]] = set()
        self.base_url = ""

    # --- wiring ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_post("/calling/callConnections:redirect", self._redirect)
        app.router.add_post("/calling/callConnections:reject", self._reject)
        app.router.add_post("/_fake/calls", self._post_call)
        app.router.add_post("/_fake/script", self._post_script)
        app.router.add_post("/_fake/end", self._post_end)
        app.router.add_get("/_fake/actions", self._get_actions)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, tls_dir: str = ".") -> str:
        ssl_ctx = make_test_certificates(tls_dir).server_context(["http/1.1"])
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_ctx)
        await site.start()
        server: Any = site._server
        self.base_url = f"https://{host}:{server.sockets[0].getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def connection_string(self, access_key: str | None = None) -> str:
        return f"endpoint={self.base_url}/;accesskey={access_key or self.access_key}"

    def reset(self) -> None:
        self.actions.clear()
        self.followups.clear()
        self.script.clear()
        self.counts.clear()
        self.calls.clear()
        self._answers.clear()

    def respond(self, status: int, times: int = 1, delay: float = 0.0) -> None:
        """The next `times` well-formed, well-signed requests get `status` after `delay`; a 204
        is a slow success: the request is then carried out as usual."""
        for _ in range(times):
            self.script.append((status, delay))

    # --- calls -----------------------------------------------------------------------------

    def place_call(
        self,
        to: str,
        caller: str,
        display_name: str = "PSTN caller",
        correlation_id: str | None = None,
    ) -> dict[str, Any]:
        """An IncomingCall event for `to`, as ACS would raise it; its context is known here."""
        from ringrelay.simulate import incoming_call_event

        event = incoming_call_event(to, caller, display_name, correlation_id=correlation_id)
        data = event["data"]
        self.calls[data["incomingCallContext"]] = FakeCall(
            data["correlationId"], to, caller, display_name
        )
        return event

    def end_call(self, correlation_id: str) -> None:
        for call in self.calls.values():
            if call.correlation_id == correlation_id:
                call.state = "ended"

    async def post_event(self, event: dict[str, Any]) -> tuple[int, Any] | None:
        """Deliver `event` to the webhook as Event Grid would; (status, answer) or None."""
        if not self.webhook_url:
            return None
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        try:
            async with (
                ClientSession(timeout=ClientTimeout(total=30)) as session,
                session.post(
                    self.webhook_url,
                    data=json.dumps([event]).encode(),
                    headers={"Content-Type": "application/json", "aeg-event-type": "Notification"},
                    ssl=ctx if ctx is not None else True,
                ) as resp,
            ):
                raw = await resp.read()
                try:
                    return resp.status, json.loads(raw)
                except ValueError:
                    return resp.status, raw.decode(errors="replace")
        except OSError as exc:
            log.warning("posting the follow-up IncomingCall failed: %s", exc)
            return None

    def _raise_followup(self, call: FakeCall, target: str) -> None:
        event = self.place_call(target, call.caller, call.display_name, call.correlation_id)
        self.followups.append(event)
        if self.webhook_url:
            task = asyncio.get_running_loop().create_task(self._post_soon(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post_soon(self, event: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)  # after our 204 reached the caller, as ACS does
        await self.post_event(event)

    # --- checks ----------------------------------------------------------------------------

    def _check_signature(self, request: web.Request, body: bytes) -> str | None:
        date = request.headers.get("x-ms-date", "")
        content_hash = request.headers.get("x-ms-content-sha256", "")
        authorization = request.headers.get("Authorization", "")
        if not date or not content_hash:
            return "x-ms-date and x-ms-content-sha256 are required"
        try:
            skew = abs(time.time() - parsedate_to_datetime(date).timestamp())
        except (TypeError, ValueError):
            return "x-ms-date is not an RFC 1123 date"
        if skew > MAX_CLOCK_SKEW:
            return "x-ms-date is too far from the current time"
        if content_hash != base64.b64encode(hashlib.sha256(body).digest()).decode():
            return "x-ms-content-sha256 does not match the body"
        prefix = "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature="
        if not authorization.startswith(prefix):
            return "Authorization is not HMAC-SHA256 with SignedHeaders=x-ms-date;host;…"
        path_and_query = request.rel_url.raw_path + (
            f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
        )
        to_sign = f"{request.method}\n{path_and_query}\n{date};{request.host};{content_hash}"
        expected = base64.b64encode(
            hmac.new(base64.b64decode(self.access_key), to_sign.encode(), hashlib.sha256).digest()
        ).decode()
        if not hmac.compare_digest(authorization[len(prefix) :], expected):
            return "signature mismatch"
        return None

    @staticmethod
    def _check_identifier(target: Any) -> str | None:
        if not isinstance(target, dict):
            return "target: required, an identifier object"
        raw = target.get("rawId")
        kinds = [k for k in IDENTIFIER_KINDS if k in target]
        if raw is not None and not isinstance(raw, str):
            return "target.rawId: must be a string"
        if not raw and not kinds:
            return "target: needs rawId or one of " + ", ".join(sorted(IDENTIFIER_KINDS))
        if len(kinds) > 1:
            return "target: more than one identifier kind"
        if "phoneNumber" in target and not isinstance(target["phoneNumber"].get("value"), str):
            return "target.phoneNumber.value: required"
        if "communicationUser" in target and not isinstance(
            target["communicationUser"].get("id"), str
        ):
            return "target.communicationUser.id: required"
        return None

    def _check_request(self, request: web.Request, body: bytes) -> tuple[int, str] | None:
        if not request.query.get("api-version"):
            return 400, "api-version: required"
        problem = self._check_signature(request, body)
        if problem is not None:
            return 401, problem
        request_id = request.headers.get("Repeatability-Request-ID")
        if request_id is not None:
            try:
                uuid.UUID(request_id)
            except ValueError:
                return 400, "Repeatability-Request-ID: must be a UUID"
            if not request.headers.get("Repeatability-First-Sent"):
                return 400, "Repeatability-First-Sent: required with Repeatability-Request-ID"
        return None

    # --- handlers --------------------------------------------------------------------------

    async def _handle(self, request: web.Request, kind: str) -> web.Response:
        body = await request.read()
        problem = self._check_request(request, body)
        if problem is not None:
            return self._error(problem[0], problem[1], kind)
        try:
            doc = json.loads(body)
        except ValueError:
            return self._error(400, "body is not JSON", kind)
        if not isinstance(doc, dict):
            return self._error(400, "body is not a JSON object", kind)
        context = doc.get("incomingCallContext")
        if not isinstance(context, str) or not context:
            return self._error(400, "incomingCallContext: required", kind)
        if kind == "redirect":
            bad = self._check_identifier(doc.get("target"))
        else:
            reason = doc.get("callRejectReason")
            bad = (
                None
                if reason is None or reason in REJECT_REASONS
                else "callRejectReason: one of none, busy, forbidden"
            )
        if bad is not None:
            return self._error(400, bad, kind)

        request_id = request.headers.get("Repeatability-Request-ID")
        if request_id is not None and request_id in self._answers:
            status, error = self._answers[request_id]
            self._record(kind, status, doc, request, replayed=True)
            return self._answer(status, error)

        if self.script:
            status, delay = self.script.popleft()
            if delay:
                await asyncio.sleep(delay)  # a slow service: the caller may time out meanwhile
            if status != 204:
                self._record(kind, status, doc, request, scripted=True)
                return self._answer(status, _error_body(status, f"scripted {status}"))
            if request_id is not None and request_id in self._answers:  # done while we slept
                status, error = self._answers[request_id]
                self._record(kind, status, doc, request, replayed=True)
                return self._answer(status, error)

        call = self.calls.get(context)
        status, error = 204, None
        if call is None:
            status, error = 404, _error_body(404, "Call not found for this incomingCallContext")
        elif call.state == "ended":
            status, error = 404, _error_body(404, "The call has ended")
        elif call.state != "ringing":
            status, error = 400, _error_body(400, f"The call was already {call.state}")
        else:
            call.state = "redirected" if kind == "redirect" else "rejected"
        if request_id is not None:
            self._answers[request_id] = (status, error)
        self._record(kind, status, doc, request)
        if status == 204 and kind == "redirect" and call is not None:
            target = doc["target"]
            self._raise_followup(call, target.get("rawId") or _raw_id(target))
        return self._answer(status, error)

    async def _redirect(self, request: web.Request) -> web.Response:
        return await self._handle(request, "redirect")

    async def _reject(self, request: web.Request) -> web.Response:
        return await self._handle(request, "reject")

    def _record(
        self,
        kind: str,
        status: int,
        doc: dict[str, Any],
        request: web.Request,
        **flags: bool,
    ) -> None:
        self.counts[status] += 1
        call = self.calls.get(str(doc.get("incomingCallContext")))
        entry: dict[str, Any] = {
            "kind": kind,
            "status": status,
            "context": fingerprint(str(doc.get("incomingCallContext"))),
            "correlationId": call.correlation_id if call else None,
            "request_id": request.headers.get("Repeatability-Request-ID"),
            "first_sent": request.headers.get("Repeatability-First-Sent"),
            "at": time.time(),
            **flags,
        }
        if kind == "redirect":
            entry["target"] = doc.get("target")
        else:
            entry["reason"] = doc.get("callRejectReason")
        self.actions.append(entry)

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        self.counts[status] += 1
        self.actions.append({"kind": kind, "status": status, "error": message, "at": time.time()})
        return self._answer(status, _error_body(status, message))

    @staticmethod
    def _answer(status: int, error: dict[str, Any] | None) -> web.Response:
        if status == 204:
            return web.Response(status=204)
        return web.json_response(error or _error_body(status, ""), status=status)

    async def _post_call(self, request: web.Request) -> web.Response:
        doc = await request.json()
        event = self.place_call(str(doc["to"]), str(doc["from"]), doc.get("displayName", "Caller"))
        posted = await self.post_event(event)
        return web.json_response(
            {
                "event": event,
                "webhook_status": posted[0] if posted else None,
                "webhook_answer": posted[1] if posted else None,
            }
        )

    async def _post_script(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.respond(int(doc["status"]), int(doc.get("times", 1)), float(doc.get("delay", 0)))
        return web.json_response({"scripted": len(self.script)})

    async def _post_end(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.end_call(str(doc["correlationId"]))
        return web.json_response({"ended": doc["correlationId"]})

    async def _get_actions(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"actions": self.actions, "followups": len(self.followups), "counts": self.counts}
        )


def _raw_id(target: dict[str, Any]) -> str:
    if "phoneNumber" in target:
        return "4:" + str(target["phoneNumber"]["value"])
    if "communicationUser" in target:
        return str(target["communicationUser"]["id"])
    if "microsoftTeamsUser" in target:
        return "8:orgid:" + str(target["microsoftTeamsUser"]["userId"])
    return "unknown"


def _error_body(status: int, message: str) -> dict[str, Any]:
    # CommunicationErrorResponse {error: CommunicationError {code, message}} (the REST spec).
    return {"error": {"code": str(status), "message": message}}


def decode_key(key: str) -> bytes:
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the access key must be base64") from None


async def run_forever(
    host: str, port: int, tls_dir: str, webhook_url: str | None, access_key: str | None
) -> None:
    fake = FakeCallAutomation(webhook_url=webhook_url)
    if access_key:
        decode_key(access_key)
        fake.access_key = access_key
    url = await fake.start(host, port, tls_dir)
    certs = make_test_certificates(tls_dir)
    print(
        f"fake Call Automation on {url}\n"
        f"point ringrelay at it with:\n"
        f"  export RINGRELAY_ACS_CONNECTION_STRING='{fake.connection_string()}'\n"
        f"  export RINGRELAY_ACS_CA_FILE={certs.ca_file.resolve()}\n"
        f"follow-up IncomingCalls go to: {webhook_url or '(no --webhook given: kept only)'}\n"
        f'place a call: POST {url}/_fake/calls {{"to": "4:+14255551212", "from": '
        f'"4:+14255550123"}}; actions: GET {url}/_fake/actions',
        flush=True,
    )
    await asyncio.Event().wait()
