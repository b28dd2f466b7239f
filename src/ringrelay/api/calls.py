"""A call's story and its control: `GET /v1/calls/{callId}` (every event, and per device the
ring and the stop), `POST /v1/calls/{callId}/stop-ringing` (for backends that learn of an answer
or a hang-up some other way than Event Grid: Call Automation callbacks, their own signalling)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ringrelay.api.registry import field_error
from ringrelay.delivery.dispatcher import outcome_json
from ringrelay.events.ingest import INCOMING_CALL
from ringrelay.events.stop_ringing import STOP_RINGING, plan_stop
from ringrelay.models import EventRecord, EventStatus
from ringrelay.ops.trace import call_trace
from ringrelay.registry import RegistrationError, check_device_id, check_identity
from ringrelay.relay import Relay
from ringrelay.store import CALL_STOPPED

router = APIRouter(prefix="/v1")

STOP_REQUEST = "ringrelay.StopRingingRequest"  # the API call, recorded against its call
_WHY = {
    "answered_elsewhere": "answered elsewhere (API)",
    "ended": "call ended (API)",
    "declined": "declined (API)",
}


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


class StopRingingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    identity: str | None = Field(
        default=None,
        description="Whose devices stop ringing; default: a user token's own identity, or every "
        "callee of the call for an API key.",
    )
    answered_device: str | None = Field(
        default=None,
        max_length=128,
        description="The device that answered: it gets no stop.",
    )
    reason: Literal["answered_elsewhere", "ended", "declined"] | None = Field(
        default=None,
        description="Recorded as who stopped the ringing; default `answered_elsewhere` when "
        "`answered_device` is given, else `ended`.",
    )


@router.post(
    "/calls/{call_id}/stop-ringing",
    tags=["deliveries"],
    summary="Stop a call's ringing: a StopRinging (110) push to every device that rang",
    responses={
        202: {"description": "Some rings are still in flight elsewhere: call again shortly"},
        404: {"description": "Nothing rang for this call (for this identity)"},
    },
)
async def stop_ringing(call_id: str, body: StopRingingIn, request: Request) -> JSONResponse:
    relay: Relay = request.app.state.relay
    try:
        if body.identity is not None:
            check_identity(body.identity)
        if body.answered_device is not None:
            check_device_id(body.answered_device)
    except RegistrationError as exc:
        name = "answered_device" if exc.field == "device_id" else exc.field
        raise field_error(name, "body", exc.message) from None
    principal = await relay.guard.authorize(request, "register", body.identity)
    identity = body.identity if body.identity is not None else principal.identity
    reason = body.reason or ("answered_elsewhere" if body.answered_device else "ended")
    now = time.time()
    deadline = now + relay.settings.webhook_deadline_seconds
    source = EventRecord(
        f"api-stop:{uuid.uuid4()}", STOP_REQUEST, EventStatus.PENDING, "", call_id, identity, now
    )
    decision = await plan_stop(
        relay.dispatcher.context(now, deadline),
        source,
        call_id,
        identity=identity,
        why=_WHY[reason],
        answered_device=body.answered_device,
    )
    report = await relay.dispatcher.execute(decision, now, deadline)
    answer = {
        "callId": call_id,
        "status": report.status,
        "reason": report.reason,
        "devices": [outcome_json(d) for d in report.deliveries],
    }
    if report.status is EventStatus.NO_DEVICES:
        return JSONResponse({**answer, "detail": report.reason}, status_code=404)
    return JSONResponse(answer, status_code=202 if report.status is EventStatus.PENDING else 200)


@router.get(
    "/calls/{call_id}",
    tags=["deliveries"],
    summary="A call's events, and per device its ring and its stop (by correlationId)",
    responses={404: {"description": "No event recorded for this call"}},
)
async def call_deliveries(call_id: str, request: Request) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    principal = await relay.guard.authorize(request, "read")
    events = await relay.store.events_for_call(call_id)
    if principal.identity is not None:  # a user sees only what concerns them
        events = [ev for ev in events if ev.recipient in (principal.identity, None)]
        if not any(ev.recipient == principal.identity for ev in events):
            events = []
    if not events:
        raise HTTPException(status_code=404, detail="no event recorded for this callId")
    trace = call_trace(call_id, events, relay.dispatcher.calls)
    trace["stopped"] = _stopped(events)
    trace["devices"] = _devices(events)
    return trace


def _stopped(events: list[EventRecord]) -> dict[str, Any] | None:
    stops = [ev for ev in events if ev.event_type == CALL_STOPPED]
    if not stops:
        return None
    first = min(stops, key=lambda ev: ev.received_at)
    return {"by": first.reason, "identity": first.recipient, "at": _ts(first.received_at)}


def _devices(events: list[EventRecord]) -> list[dict[str, Any]]:
    """Per device: how its ring went and how (and by whom) its ringing was stopped."""
    devices: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in events:
        if ev.event_type not in (INCOMING_CALL, STOP_RINGING):
            continue
        for d in ev.deliveries:
            entry = devices.setdefault(
                (d.identity, d.device_id),
                {
                    "identity": d.identity,
                    "device_id": d.device_id,
                    "platform": d.platform,
                    "ring": None,
                    "stop": None,
                },
            )
            outcome = {
                k: v
                for k, v in outcome_json(d).items()
                if k not in ("identity", "device_id", "platform")
            }
            if ev.event_type == INCOMING_CALL:
                entry["ring"] = outcome
            else:
                entry["stop"] = outcome  # its reason says who stopped the ringing
    return list(devices.values())
