"""`Microsoft.Communication.IncomingCall` -> a VoIP ring on every device of the callee.

The push is the one the Calling SDK's `PushNotificationInfo` parses (payloads.py): eventId 107,
or 111 for a phone-number caller. A ring whose call already stopped (its CallEnded, or the callee
joining, came first: Event Grid does not order deliveries) is not pushed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ringrelay.delivery.plan import Decision, PushPlan
from ringrelay.events.ingest import INCOMING_CALL, Event
from ringrelay.events.kind import Context
from ringrelay.events.stop_ringing import stop_applies
from ringrelay.models import EventRecord, EventStatus, PushKind
from ringrelay.payloads import PayloadError, call_push_from_incoming_call

if TYPE_CHECKING:
    from ringrelay.routing.calls import CallRouter

log = logging.getLogger("ringrelay.routing")

# An eventTime ahead of our clock by more than this is taken as our receive time: a sender's
# clock off by years must not make a push live for years (apns-expiration, FCM ttl). Azure's
# clocks are NTP-synced; 5 s covers ours drifting, and costs at most 5 s of extra ring.
CLOCK_SKEW_ALLOWANCE_SECONDS = 5.0


def event_time(event: Event, received_at: float) -> float:
    """When the event happened, as far as windows are concerned (never later than allowed)."""
    if event.time is None or event.time > received_at + CLOCK_SKEW_ALLOWANCE_SECONDS:
        return received_at
    return event.time


class IncomingCall:
    event_types = (INCOMING_CALL,)

    def __init__(self, call_router: CallRouter | None = None) -> None:
        # Call routing (rules, numbers, redirect/reject): consulted before any push.
        self.call_router = call_router if call_router is not None and call_router.active else None

    async def decide(self, event: Event, ctx: Context) -> Decision:
        try:
            call = call_push_from_incoming_call(event.data)
        except PayloadError as exc:
            return Decision.final(event.id, event.type, EventStatus.REJECTED, str(exc))
        started = event_time(event, ctx.received_at)
        ring_ends_at = started + ctx.ring_window
        data = event.data
        server_call_id = data.get("serverCallId")
        record = EventRecord(
            event.id,
            event.type,
            EventStatus.PENDING,
            "",
            call.call_id,
            call.recipient_id,
            ctx.received_at,
            caller=call.caller_id,
            server_call_id=server_call_id if isinstance(server_call_id, str) else None,
            expires_at=ring_ends_at,
        )
        stop = stop_applies(await ctx.store.call_stops(call.call_id), call.recipient_id)
        if stop is not None:
            record.status = EventStatus.CANCELLED
            record.reason = f"not pushed: the call had already stopped ringing ({stop.reason})"
            return Decision(record=record)

        if self.call_router is not None:
            routed = await self.call_router.route(
                event.envelope,
                event_id=event.id,
                callee=call.recipient_id,
                correlation_id=call.call_id,
                context=str(data.get("incomingCallContext", "")),
                ring_ends_at=ring_ends_at,
                deadline=ctx.deadline,
            )
            if routed.status is not None:  # redirected, rejected, ignored, or failed: no push
                record.status, record.reason = routed.status, routed.reason
                return Decision(record=record)
            if routed.note:
                log.info("call %s: %s", call.call_id, routed.note)
            if routed.push_to is not None and routed.push_to != call.recipient_id:
                # A push rule's target rings instead; the push names it as the recipient.
                call.recipient_id = record.recipient = routed.push_to

        call_id, callee, store, stopped = call.call_id, call.recipient_id, ctx.store, ctx.stopped

        async def cancelled() -> bool:
            # Before a retry: stopped here, or on another instance (the store knows).
            if stopped.is_stopped(call_id, callee):
                return True
            return stop_applies(await store.call_stops(call_id), callee) is not None

        # Formatted only for an event already too old on arrival (a float format per event was
        # measurable); one that expires while being handled says so plainly.
        age = ctx.received_at - started
        expired_reason = (
            f"event time is {age:.0f}s old, past the {ctx.ring_window:.0f}s ring window"
            if ring_ends_at <= ctx.received_at
            else "the ring window ended before it could be pushed"
        )
        return Decision(
            record=record,
            plans=[
                PushPlan(
                    record,
                    callee,
                    PushKind.VOIP,
                    call,
                    ring_ends_at,
                    started_at=started,
                    window="ring window",
                    no_targets_reason="no live VoIP registration for the callee",
                    expired_reason=expired_reason,
                    cancelled=cancelled,
                )
            ],
        )
