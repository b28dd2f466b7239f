"""Stop ringing: a StopRinging (eventId 110) push to every device that rang for a call.

Shared by the call-lifecycle event kinds and the `POST /v1/calls/{callId}/stop-ringing` API. The
stop's ledger key is the call (`stop:<callId>`, or `stop:<callId>:<identity>` when one callee
answered), so each device gets at most one stop per call, whichever end event or instance sends
it; the same record tells a late IncomingCall that its call already stopped.
"""

from __future__ import annotations

import asyncio
import time

from ringrelay.delivery.plan import Decision, PushPlan
from ringrelay.events.ingest import INCOMING_CALL
from ringrelay.events.kind import Context
from ringrelay.models import DeliveryOutcome, DeliveryStatus, EventRecord, EventStatus, PushKind
from ringrelay.payloads import stop_ringing_push
from ringrelay.store import STOP_TYPE

STOP_RINGING = STOP_TYPE  # our record type for a call's stop ledger


def stop_record_id(call_id: str, identity: str | None) -> str:
    return f"stop:{call_id}" if identity is None else f"stop:{call_id}:{identity}"


def stop_applies(stops: list[EventRecord], identity: str) -> EventRecord | None:
    """The stop that ends `identity`'s ringing for the call, if any (None recipient: everyone)."""
    for stop in stops:
        if stop.recipient is None or stop.recipient == identity:
            return stop
    return None


async def plan_stop(
    ctx: Context,
    source: EventRecord,
    call_id: str,
    *,
    identity: str | None,
    why: str,
    answered_device: str | None = None,
) -> Decision:
    """Plans stopping the devices that rang for `call_id` (only `identity`'s, when given),
    except `answered_device`."""
    store = ctx.store
    marker = EventRecord(
        stop_record_id(call_id, identity),
        STOP_RINGING,
        EventStatus.PENDING,
        why,
        call_id,
        identity,
        ctx.received_at,
    )
    # First the fact, so that a ring deciding or retrying now (here or elsewhere) gives up.
    ctx.stopped.stop(call_id, identity, ctx.received_at + ctx.ring_window)
    await store.record_event(marker, time.time())

    # A ring of this call still under way here: wait for it, so that its devices are known.
    running = ctx.pushes_in_flight(call_id)
    if running:
        wait = max(0.0, ctx.deadline - time.time() - 1.0)
        await asyncio.wait([asyncio.ensure_future(r) for r in running], timeout=wait)

    rung: dict[str, dict[str, DeliveryOutcome]] = {}  # identity -> device -> ring outcome
    waiting: dict[str, list[DeliveryOutcome]] = {}
    rings: dict[str, EventRecord] = {}
    for record in await store.events_for_call(call_id):
        if record.event_type != INCOMING_CALL or record.recipient is None:
            continue
        if identity is not None and record.recipient != identity:
            continue
        rings.setdefault(record.recipient, record)
        for outcome in record.deliveries:
            if outcome.status is DeliveryStatus.ACCEPTED:
                rung.setdefault(outcome.identity, {})[outcome.device_id] = outcome
            elif outcome.status is DeliveryStatus.IN_FLIGHT:
                waiting.setdefault(outcome.identity, []).append(outcome)

    plans: list[PushPlan] = []
    skipped = 0
    now = time.time()
    for callee, ring in rings.items():
        devices = rung.get(callee, {})
        if answered_device is not None and devices.pop(answered_device, None) is not None:
            skipped += 1
        held = [w for w in waiting.get(callee, []) if w.device_id not in devices]
        if not devices and not held:
            continue
        live = {r.device_id: r for r in await store.list_registrations(callee, now)}
        targets = [live[d] for d in devices if d in live]
        ends_at = ring.expires_at or ring.received_at + ctx.ring_window
        plans.append(
            PushPlan(
                EventRecord(
                    marker.event_id,
                    STOP_RINGING,
                    EventStatus.PENDING,
                    why,
                    call_id,
                    identity,
                    ctx.received_at,
                ),
                callee,
                PushKind.VOIP,
                stop_ringing_push(call_id, callee, ring.caller or ""),
                ends_at,
                targets=targets,
                waiting=held,
                window="ring window",
                no_targets_reason="the devices that rang are no longer registered",
                expired_reason="ring window over: the phone already stopped ringing by itself",
            )
        )
    if not plans:
        source.status = EventStatus.NO_DEVICES
        source.reason = (
            f"{why}: no other device rang for this call"
            if skipped
            else f"{why}: no device rang for this call"
        )
        marker.status, marker.reason = source.status, source.reason
        await store.record_event(marker, time.time())
    else:
        source.reason = why
    return Decision(source, plans)
