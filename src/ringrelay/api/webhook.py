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

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from ringrelay.events.ingest import IngestError, parse_delivery, validation_code
from ringrelay.models import EventStatus
from ringrelay.relay import Relay

log = logging.getLogger("ringrelay.webhook")


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise IngestError(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise IngestError(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _problem(status: int, reason: str) -> Response:
    return _JSON({"error": reason}, status_code=status)


async def events_endpoint(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    guard = relay.guard
    if guard.needs_secret and not guard.webhook_secret_ok(request.query_params.get("code")):
        relay.metrics.deliveries.labels("401").inc()
        log.warning("webhook delivery refused: missing or wrong 'code' secret")
        return _problem(401, "missing or wrong 'code' query parameter")
    if guard.eventgrid is not None:
        problem = await guard.webhook_token_error(request.headers.get("authorization"))
        if problem is not None:
            relay.metrics.deliveries.labels("401").inc()
            log.warning("webhook delivery refused: %s", problem)
            return _problem(401, "unauthenticated")

    if request.method == "OPTIONS":
        # CloudEvents 1.0 abuse protection (cloudevents/spec http-webhook.md §4): allow the
        # requesting origin, and grant the requested rate (or any rate).
        origin = request.headers.get("webhook-request-origin", "")
        headers = {"Allow": "POST, OPTIONS"}
        if origin:
            headers["WebHook-Allowed-Origin"] = origin
            headers["WebHook-Allowed-Rate"] = request.headers.get("webhook-request-rate") or "*"
        return Response(status_code=200, headers=headers)

    if relay.webhook_in_progress >= relay.settings.webhook_max_concurrent:
        relay.metrics.deliveries.labels("503").inc()
        relay.metrics.shed.inc()
        return _problem(
            503,
            f"overloaded: {relay.webhook_in_progress} deliveries in progress on this instance; "
            "retry",
        )
    relay.webhook_in_progress += 1
    try:
        return await _handle_delivery(request, relay)
    finally:
        relay.webhook_in_progress -= 1


async def _handle_delivery(request: Request, relay: Relay) -> Response:
    received_at = time.time()
    try:
        body = await read_body(request, relay.settings.max_body_bytes)
        events = parse_delivery(body, request.headers.get("content-type", ""))
    except IngestError as exc:
        relay.metrics.deliveries.labels(str(exc.status)).inc()
        return _problem(exc.status, exc.reason)

    code = validation_code(events)
    if code is not None:
        relay.metrics.deliveries.labels("200").inc()
        log.info("Event Grid subscription validation answered")
        return _JSON({"validationResponse": code})

    deadline = received_at + relay.settings.webhook_deadline_seconds
    # For call traces: Event Grid numbers its attempts (0 on the first delivery).
    count = request.headers.get("aeg-delivery-count")
    delivery_count = int(count) if count is not None and count.isdigit() else None
    for ev in events:
        relay.dispatcher.calls.receipt(ev.id, received_at, delivery_count, ev.time)
    try:
        handle = relay.dispatcher.handle
        if len(events) == 1:  # Event Grid's default: no batching; skip the task machinery
            reports = [await handle(events[0], received_at, deadline)]
        else:
            reports = await asyncio.gather(*(handle(ev, received_at, deadline) for ev in events))
    except Exception:
        # The store or something of ours failed: Event Grid must retry, so never 4xx here.
        log.exception("delivery could not be handled; answering 503 for Event Grid to retry")
        relay.metrics.deliveries.labels("503").inc()
        return _problem(503, "temporarily unable to handle the delivery; retry")

    pending = any(r.status is EventStatus.PENDING for r in reports)
    status = 503 if pending else 200
    relay.metrics.deliveries.labels(str(status)).inc()
    retry = {"Retry-After": "1"} if pending else None
    return _JSON({"events": [r.as_json() for r in reports]}, status_code=status, headers=retry)


async def asgi_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """The webhook as a bare ASGI app (see app.RelayApp)."""
    if scope["method"] not in ("POST", "OPTIONS"):
        response: Response = _problem(405, "use POST (or OPTIONS for the handshake)")
        response.headers["Allow"] = "POST, OPTIONS"
    else:
        response = await events_endpoint(Request(scope, receive))
    await response(scope, receive, send)


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
            "that is not an event array, 413 over the size limit."
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
