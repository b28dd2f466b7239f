"""Call lifecycle events -> stop ringing: CallEnded stops every device that rang for the call;
CallParticipantAdded naming a callee stops that callee's devices (answered elsewhere).

Event Grid's participant event names the identity that joined, not the device: every device
of that callee that rang gets the stop, the answering one included (README, "Ring lifecycle":
the app ignores a 110 for the call it is in). The explicit API can name the answering device.
Correlation: by `correlationId` (the pushes' `callId`), else by `serverCallId` (docs/
call-lifecycle.md says what the sources do and do not settle).
"""

from __future__ import annotations

from typing import Any

from ringrelay.delivery.plan import Decision
from ringrelay.events.ingest import Event
from ringrelay.events.kind import Context
from ringrelay.events.stop_ringing import plan_stop
from ringrelay.models import EventRecord, EventStatus

CALL_ENDED = "Microsoft.Communication.CallEnded"
CALL_PARTICIPANT_ADDED = "Microsoft.Communication.CallParticipantAdded"
# Acknowledged, not acted on: CallStarted names who started the call (the caller), and a
# participant leaving says nothing CallEnded does not.
CALL_STARTED = "Microsoft.Communication.CallStarted"
CALL_PARTICIPANT_REMOVED = "Microsoft.Communication.CallParticipantRemoved"


async def call_id_of(data: dict[str, Any], ctx: Context) -> str | None:
    correlation_id = data.get("correlationId")
    server_call_id = data.get("serverCallId")
    if isinstance(correlation_id, str) and correlation_id:
        return correlation_id
    if isinstance(server_call_id, str) and server_call_id:
        return await ctx.store.correlation_for_server_call(server_call_id)
    return None


def _participant(data: dict[str, Any]) -> str | None:
    user = data.get("user")
    if not isinstance(user, dict):
        return None
    ident = user.get("communicationIdentifier", user)
    raw_id = ident.get("rawId") if isinstance(ident, dict) else None
    return raw_id if isinstance(raw_id, str) and raw_id else None


def _rejected(event: Event, reason: str) -> Decision:
    return Decision.final(event.id, event.type, EventStatus.REJECTED, reason)


async def _stop(event: Event, ctx: Context, *, by_participant: bool) -> Decision:
    data = event.data
    if not isinstance(data, dict):
        return _rejected(event, "data: missing or not an object")
    participant = _participant(data) if by_participant else None
    if by_participant and participant is None:
        return _rejected(event, "data.user.communicationIdentifier.rawId: missing")
    call_id = await call_id_of(data, ctx)
    if call_id is None:
        return _rejected(event, "data.correlationId: missing, and no known serverCallId")
    source = EventRecord(
        event.id, event.type, EventStatus.PENDING, "", call_id, participant, ctx.received_at
    )
    why = "answered elsewhere" if by_participant else "call ended"
    return await plan_stop(ctx, source, call_id, identity=participant, why=why)


class CallEnded:
    event_types = (CALL_ENDED,)

    async def decide(self, event: Event, ctx: Context) -> Decision:
        return await _stop(event, ctx, by_participant=False)


class CallParticipantAdded:
    """The participant joined: if it is a callee that rang, its ringing stops."""

    event_types = (CALL_PARTICIPANT_ADDED,)

    async def decide(self, event: Event, ctx: Context) -> Decision:
        return await _stop(event, ctx, by_participant=True)


class Acknowledged:
    """Lifecycle events that need nothing from us: recorded against their call, not pushed."""

    event_types = (CALL_STARTED, CALL_PARTICIPANT_REMOVED)

    async def decide(self, event: Event, ctx: Context) -> Decision:
        data = event.data if isinstance(event.data, dict) else {}
        call_id = data.get("correlationId")
        return Decision.final(
            event.id,
            event.type,
            EventStatus.IGNORED,
            "acknowledged: nothing to push for this lifecycle event",
            call_id if isinstance(call_id, str) else None,
        )
