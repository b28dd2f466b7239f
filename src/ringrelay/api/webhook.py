"""POST /api/events: the Event Grid webhook (Event Grid schema and CloudEvents 1.0).

Answers 200 only when every push of the delivery is settled; 503 while a transient failure remains,
so that Event Grid retries (it never retries 400/401/403/413: learn.microsoft.com
azure/event-grid/delivery-and-retry). The ledger makes a retried delivery push only the devices
that have not been settled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ringrelay.api.middleware import API_HEADERS, log_disconnected
from ringrelay.delivery.dispatcher import EventReport
from ringrelay.events.ingest import (
    VALIDATION_EVENT,
    Event,
    IngestError,
    parse_delivery,
    validation_code,
)
from ringrelay.httpserver import BODY_RECEIVED
from ringrelay.models import EventStatus
from ringrelay.relay import Relay

log = logging.getLogger("ringrelay.webhook")


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


# The webhook answers on bare ASGI (no Request or Response objects): it is the hot path, and the
# objects, their header parsing and a wrapped `send` were ~5 % of an IncomingCall's CPU.
RawHeaders = list[tuple[bytes, bytes]]
Answer = tuple[int, bytes, RawHeaders]
_CLOSE: RawHeaders = [(b"connection", b"close")]
_RETRY: RawHeaders = [(b"retry-after", b"1")]
_JSON_TYPE = (b"content-type", b"application/json")
_READ_HEADERS = frozenset(
    (
        b"content-length",
        b"content-type",
        b"authorization",
        b"aeg-delivery-count",
        b"webhook-request-origin",
        b"webhook-request-rate",
    )
)


def _json(status: int, content: object, headers: RawHeaders | None = None) -> Answer:
    return status, orjson.dumps(content), headers or []


def _problem(status: int, reason: str, *, close: bool = False) -> Answer:
    # close: the client may still be sending a body nobody will read
    return _json(status, {"error": reason}, _CLOSE if close else None)


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise IngestError(413, f"body of {declared.decode()} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: nobody to answer
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise IngestError(413, f"body exceeds the {limit}-byte limit")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual request: one message, no copy
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def answer_delivery(scope: Scope, receive: Receive) -> Answer:
    """The webhook's answer to one request: status, JSON body and extra headers."""
    relay: Relay = scope["app"].state.relay
    # One pass over the headers for the few the webhook reads (names are lower-case in ASGI);
    # the first of a repeated header counts, as with Starlette's `headers.get`.
    given: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _READ_HEADERS and name not in given:
            given[name] = value
    content_length = given.get(b"content-length")
    content_type = given.get(b"content-type")
    authorization = given.get(b"authorization")
    delivery_count = given.get(b"aeg-delivery-count")
    guard = relay.guard
    if guard.needs_secret and not guard.webhook_secret_ok(
        QueryParams(scope["query_string"]).get("code")
    ):
        relay.metrics.delivery(401)
        log.warning("webhook delivery refused: missing or wrong 'code' secret")
        return _problem(401, "missing or wrong 'code' query parameter")
    if guard.eventgrid is not None:
        problem = await guard.webhook_token_error(
            None if authorization is None else authorization.decode("latin-1")
        )
        if problem is not None:
            relay.metrics.delivery(401)
            log.warning("webhook delivery refused: %s", problem)
            return _problem(401, "unauthenticated")

    if scope["method"] == "OPTIONS":
        # CloudEvents 1.0 abuse protection (cloudevents/spec http-webhook.md §4): allow the
        # requesting origin, and grant the requested rate (or any rate).
        headers: RawHeaders = [(b"allow", b"POST, OPTIONS")]
        origin = given.get(b"webhook-request-origin")
        if origin:
            headers.append((b"webhook-allowed-origin", origin))
            headers.append((b"webhook-allowed-rate", given.get(b"webhook-request-rate") or b"*"))
        return 200, b"", headers

    # The body first, under its own timeout, and only then a delivery slot: slow bodies must
    # not hold the slots that deliveries need (a slot is for handling, not for waiting).
    received_at = time.time()
    settings = relay.settings
    try:
        if scope.get(BODY_RECEIVED):  # all here already: nothing to time
            body = await read_body(receive, content_length, settings.max_body_bytes)
        else:
            async with asyncio.timeout(settings.body_timeout_seconds):
                body = await read_body(receive, content_length, settings.max_body_bytes)
        events = parse_delivery(
            body,
            "" if content_type is None else content_type.decode("latin-1"),
            settings.max_events_per_delivery,
        )
    except TimeoutError:
        relay.metrics.delivery(408)
        log.info("webhook body not received within RINGRELAY_BODY_TIMEOUT_SECONDS")
        return _problem(
            408,
            f"request body not received within {settings.body_timeout_seconds:g} s "
            "(RINGRELAY_BODY_TIMEOUT_SECONDS)",
            close=True,
        )
    except IngestError as exc:
        relay.metrics.delivery(exc.status)
        return _problem(exc.status, exc.reason, close=exc.status == 413)

    # Event Grid's validation handshake is a delivery of its own; should a validation event come
    # with other events, they are handled all the same and the code is echoed beside them.
    code: str | None = None
    validations: dict[int, EventReport] = {}
    for index, event in enumerate(events):
        if event.type != VALIDATION_EVENT:  # the common case, without a call
            continue
        event_code = validation_code(event)
        if event_code is not None:
            code = code or event_code
            validations[index] = EventReport(
                event.id, event.type, EventStatus.IGNORED, "subscription validation answered"
            )
    if code is not None:
        log.info("Event Grid subscription validation answered")
        if len(validations) == len(events):
            relay.metrics.delivery(200)
            return _json(200, {"validationResponse": code})

    # For call traces: Event Grid numbers its attempts (0 on the first delivery).
    count = int(delivery_count) if delivery_count is not None and delivery_count.isdigit() else None
    for ev in events:
        relay.dispatcher.calls.receipt(ev.id, received_at, count, ev.time)

    if relay.webhook_in_progress >= settings.webhook_max_concurrent:
        relay.metrics.delivery(503)
        relay.metrics.shed.inc()
        return _problem(
            503,
            f"overloaded: {relay.webhook_in_progress} deliveries in progress on this instance; "
            "retry",
        )
    relay.webhook_in_progress += 1
    try:
        if not validations:
            reports = await _handle_each(relay, events, received_at)
        else:
            others = [ev for i, ev in enumerate(events) if i not in validations]
            handled = iter(await _handle_each(relay, others, received_at))
            reports = [validations.get(i) or next(handled) for i in range(len(events))]
    finally:
        relay.webhook_in_progress -= 1

    pending = any(r.status is EventStatus.PENDING for r in reports)
    status = 503 if pending else 200
    relay.metrics.delivery(status)
    answer: dict[str, object] = {"events": [r.as_json() for r in reports]}
    if code is not None:
        answer = {"validationResponse": code, **answer}
    return _json(status, answer, _RETRY if pending else None)


# Events of one delivery handled at once. A batch is worked through by this many tasks, each
# taking the next event, so a 5,000-event batch neither creates 5,000 tasks in one step of the
# event loop nor keeps the loop from other requests between events.
BATCH_CONCURRENCY = 64


async def _handle_each(relay: Relay, events: list[Event], received_at: float) -> list[EventReport]:
    """Each event on its own: a failure of ours on one is that event's 503 (pending, Event Grid
    retries), never its neighbours' loss."""
    deadline = received_at + relay.settings.webhook_deadline_seconds
    handle = relay.dispatcher.handle
    if len(events) == 1:  # Event Grid's default: no batching; no task, no closure
        try:
            return [await handle(events[0], received_at, deadline)]
        except Exception as exc:
            _log_failures([(events[0].id, exc)], 1)
            return [_pending(events[0])]

    failures: list[tuple[str, Exception]] = []

    async def one(event: Event) -> EventReport:
        try:
            return await handle(event, received_at, deadline)
        except Exception as exc:
            failures.append((event.id, exc))
            return _pending(event)

    try:
        return await _work_through(events, one)
    finally:
        if failures:
            _log_failures(failures, len(events))


def _log_failures(failures: list[tuple[str, Exception]], events: int) -> None:
    # One traceback per delivery, not per event (a store outage is one cause).
    first_id, first = failures[0]
    log.error(
        "%d of %d event(s) could not be handled, answering 503 for a retry; the first, %s:",
        len(failures),
        events,
        first_id,
        exc_info=first,
    )


def _pending(event: Event) -> EventReport:
    # The store or something of ours failed: Event Grid must retry, so never 4xx here.
    return EventReport(
        event.id, event.type, EventStatus.PENDING, "temporarily unable to handle; retry"
    )


async def _work_through(
    events: list[Event], one: Callable[[Event], Awaitable[EventReport]]
) -> list[EventReport]:
    reports: list[EventReport | None] = [None] * len(events)
    queue = iter(enumerate(events))

    async def worker() -> None:
        for index, event in queue:
            reports[index] = await one(event)
            await asyncio.sleep(0)  # an event settled without I/O must still let others run

    await asyncio.gather(*(worker() for _ in range(min(BATCH_CONCURRENCY, len(events)))))
    return [r for r in reports if r is not None]


async def asgi_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """The webhook as a bare ASGI app (see app.RelayApp), with what `ResponseGuard` gives every
    other route: the security headers, and a plain 500 for an error of ours."""
    try:
        if scope["method"] in ("POST", "OPTIONS"):
            status, body, headers = await answer_delivery(scope, receive)
        else:
            status, body, headers = _problem(405, "use POST (or OPTIONS for the handshake)")
            headers = [(b"allow", b"POST, OPTIONS")]
    except ClientDisconnect:
        log_disconnected(scope)
        return
    except Exception:
        log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
        status, body, headers = 500, b'{"error":"internal error"}', []
    head = [*headers, (b"content-length", b"%d" % len(body))]
    if body:
        head.append(_JSON_TYPE)
    head += API_HEADERS
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def events_endpoint(request: Request) -> Response:
    """The same answer, for the route declared in the OpenAPI schema (RelayApp answers first)."""
    status, body, headers = await answer_delivery(request.scope, request.receive)
    return Response(
        body,
        status_code=status,
        headers={name.decode(): value.decode("latin-1") for name, value in headers},
        media_type="application/json" if body else None,
    )


def install(app: FastAPI) -> None:
    app.add_api_route(
        "/api/events",
        events_endpoint,
        methods=["POST"],
        operation_id="receive_events",
        tags=["webhook"],
        summary="Event Grid webhook (Event Grid schema or CloudEvents 1.0)",
        description=(
            "Takes Event Grid deliveries: a JSON array (Event Grid schema), one CloudEvent "
            "(`application/cloudevents+json`) or a batch (`application/cloudevents-batch+json`). "
            "Answers the Event Grid validation handshake. With `RINGRELAY_WEBHOOK_SECRET` set, "
            "the query parameter `code` must carry it (else 401). 200 when every push is "
            "settled, 503 while a transient failure remains (Event Grid retries), 400 for a body "
            "that is not an event array, 408 for a body not received within "
            "`RINGRELAY_BODY_TIMEOUT_SECONDS`, 413 over the size limit or over "
            "`RINGRELAY_MAX_EVENTS_PER_DELIVERY` events."
        ),
        response_class=_JSON,
    )
    app.add_api_route(
        "/api/events",
        events_endpoint,
        methods=["OPTIONS"],
        operation_id="cloudevents_handshake",
        tags=["webhook"],
        summary="CloudEvents 1.0 abuse-protection handshake",
        description="Answers `WebHook-Request-Origin` with `WebHook-Allowed-Origin` and rate.",
    )
