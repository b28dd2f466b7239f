"""Stop ringing: a StopRinging (eventId 110) push to every device that rang for a call.

Shared by the call-lifecycle event kinds and the `POST /v1/calls/{callId}/stop-ringing` API.
Two records per call:
- the stop ledger (`stop:<callId>`, type `ringrelay.StopRinging`): its claims make each device
  get at most one stop per call, whichever end event, redelivery, API call or instance sends it;
  the device that answered is settled there as cancelled, so no later stop reaches it either;
- the fact that the call stopped (`stopped:<callId>` for everyone when it ended,
  `stopped:<callId>:<identity>` when that callee answered; type `ringrelay.CallStopped`), which
  a late IncomingCall reads so that it is not pushed, and a ring's retries read to give up.
"""

from __future__ import annotations

import asyncio
import time

from ringrelay.delivery.plan import Decision, PushPlan
from ringrelay.events.ingest import INCOMING_CALL
from ringrelay.events.kind import Context
from ringrelay.models import DeliveryOutcome, DeliveryStatus, EventRecord, EventStatus, PushKind
from ringrelay.payloads import stop_ringing_push
from ringrelay.store import CALL_STOPPED

STOP_RINGING = "ringrelay.StopRinging"  # the stop ledger's record type


def stopped_record_id(call_id: str, identity: str | None) -> str:
    return f"stopped:{call_id}" if identity is None else f"stopped:{call_id}:{identity}"


def stop_applies(stops: list[EventRecord], identity: str) -> EventRecord | None:
    """The record that ends `identity`'s ringing for the call, if any (no recipient: everyone)."""
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
    fact = EventRecord(
        stopped_record_id(call_id, identity),
        CALL_STOPPED,
        EventStatus.IGNORED,
        why,
        call_id,
        identity,
        ctx.received_at,
    )
    # The fact first, so that a ring deciding or retrying now (here or elsewhere) gives up.
    ctx.stopped.stop(call_id, identity, ctx.received_at + ctx.ring_window)
    if not any(s.event_id == fact.event_id for s in await store.call_stops(call_id)):
        await store.record_event(fact, time.time())  # the first stop says who stopped it

    # A ring of this call still under way here: wait for it, so that its devices are known.
    running = ctx.pushes_in_flight(call_id)
    if running:
        wait = max(0.0, ctx.deadline - time.time() - 1.0)
        await asyncio.wait([asyncio.ensure_future(r) for r in running], timeout=wait)

    rung: dict[str, set[str]] = {}  # identity -> devices whose ring was accepted
    waiting: dict[str, list[DeliveryOutcome]] = {}  # rings in flight under another claim
    rings: dict[str, EventRecord] = {}
    for record in await store.events_for_call(call_id):
        if record.event_type != INCOMING_CALL or record.recipient is None:
            continue
        if identity is not None and record.recipient != identity:
            continue
        rings.setdefault(record.recipient, record)
        for outcome in record.deliveries:
            if outcome.status is DeliveryStatus.ACCEPTED:
                rung.setdefault(outcome.identity, set()).add(outcome.device_id)
            elif outcome.status is DeliveryStatus.IN_FLIGHT:
                waiting.setdefault(outcome.identity, []).append(outcome)

    plans: list[PushPlan] = []
    now = time.time()
    for callee, ring in rings.items():
        devices = rung.get(callee, set())
        held = [w for w in waiting.get(callee, []) if w.device_id not in devices]
        if not devices and not held:
            continue
        live = {r.device_id: r for r in await store.list_registrations(callee, now)}
        targets = [live[d] for d in sorted(devices) if d in live]
        skip = {}
        if answered_device is not None and answered_device in devices:
            skip[answered_device] = "answered on this device: no stop"
        ends_at = ring.expires_at or ring.received_at + ctx.ring_window
        plans.append(
            PushPlan(
                EventRecord(
                    f"stop:{call_id}",
                    STOP_RINGING,
                    EventStatus.PENDING,
                    why,
                    call_id,
                    None,
                    ctx.received_at,
                ),
                callee,
                PushKind.VOIP,
                stop_ringing_push(call_id, callee, ring.caller or ""),
                ends_at,
                targets=targets,
                waiting=held,
                skip=skip,
                window="ring window",
                no_targets_reason="the devices that rang are no longer registered",
                expired_reason="ring window over: the phone already stopped ringing by itself",
            )
        )
    if not plans:
        source.status = EventStatus.NO_DEVICES
        source.reason = f"{why}: no device rang for this call"
    else:
        source.reason = why
    return Decision(source, plans)
