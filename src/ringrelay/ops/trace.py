"""A call's story in order: each Event Grid delivery of each event, the devices found, every push
attempt per device and its final state, and the time from the event to the first accepted push.

The ledger (the store) keeps each device's final state for `RINGRELAY_LEDGER_RETENTION_SECONDS`;
the deliveries received and the attempts are kept in memory by the instance that handled them
(`ops/calllog.py`), for its recent calls.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ringrelay.models import DeliveryStatus, EventRecord, EventStatus
from ringrelay.ops.calllog import INSTANCE, Attempt, CallLog

# What a final state means for the person whose phone did not ring.
EXPLAIN: dict[str, str] = {
    EventStatus.NO_DEVICES: "nobody to push to: the callee had no live VoIP registration "
    "(run `ringrelay doctor --identity <rawId>`)",
    EventStatus.EXPIRED: "not pushed in time: the ring window was over",
    EventStatus.REJECTED: "the event was malformed; nothing was pushed",
    EventStatus.IGNORED: "not an event ringrelay pushes for",
    EventStatus.PENDING: "a push failed transiently; Event Grid's redelivery will retry it",
    EventStatus.FAILED: "at least one device's push was refused; see the device",
    EventStatus.DELIVERED: "every device's provider accepted the push; if a phone still did "
    "not ring, the platform (APNs/FCM) did not deliver it",
    DeliveryStatus.ACCEPTED: "the provider accepted it; delivery to the phone is the "
    "platform's from here",
    DeliveryStatus.REJECTED: "the provider refused it for good",
    DeliveryStatus.CONFIG_ERROR: "our credentials or settings for this transport are wrong "
    "(run `ringrelay doctor`)",
    DeliveryStatus.EXPIRED: "the ring window ended before a push got through",
    DeliveryStatus.TRANSIENT: "failed for now; Event Grid's redelivery retries it",
    DeliveryStatus.IN_FLIGHT: "being pushed",
    DeliveryStatus.CANCELLED: "not pushed: the call had stopped ringing (answered or ended)",
    EventStatus.CANCELLED: "not pushed: the call had already stopped ringing when this arrived",
}


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _attempt_json(a: Attempt) -> dict[str, Any]:
    out = a.as_json()
    del out["identity"], out["device_id"]  # the delivery it is listed under says them
    out["at"] = iso(a.at)
    return out


def call_trace(call_id: str, events: list[EventRecord], log: CallLog | None) -> dict[str, Any]:
    """The JSON of `/v1/calls/{callId}` and `ringrelay trace` (the ledger's fields unchanged,
    the in-memory story added where this instance has it)."""
    out_events = []
    for ev in sorted(events, key=lambda e: e.received_at):
        receipts = log.receipts_for(ev.event_id) if log else []
        attempts = log.attempts_for(ev.event_id) if log else []
        event_time = next((r.event_time for r in receipts if r.event_time is not None), None)
        first = log.first_accepted(ev.event_id) if log else None
        first_receipt = receipts[0].received_at if receipts else ev.received_at
        deliveries = []
        for d in ev.deliveries:
            mine = [a for a in attempts if a.identity == d.identity and a.device_id == d.device_id]
            deliveries.append(
                {
                    "identity": d.identity,
                    "device_id": d.device_id,
                    "platform": d.platform,
                    "status": d.status,
                    "reason": d.reason,
                    "attempts": d.attempts,
                    "provider": d.provider,
                    "provider_ref": d.provider_ref,
                    "token": d.token_fingerprint,
                    "explanation": EXPLAIN.get(d.status, ""),
                    "attempt_log": [_attempt_json(a) for a in mine],
                }
            )
        out_events.append(
            {
                "id": ev.event_id,
                "type": ev.event_type,
                "status": ev.status,
                "reason": ev.reason,
                "explanation": EXPLAIN.get(ev.status, ""),
                "recipient": ev.recipient,
                "received_at": iso(ev.received_at),
                "event_time": iso(event_time),
                "receipts": [
                    {
                        **r.as_json(),
                        "received_at": iso(r.received_at),
                        "event_time": iso(r.event_time),
                    }
                    for r in receipts
                ],
                "devices_found": len(ev.deliveries),
                "first_push_at": iso(first),
                "first_push_after_event_seconds": (
                    round(first - event_time, 3) if first and event_time else None
                ),
                "first_push_after_receipt_seconds": (
                    round(first - first_receipt, 3) if first else None
                ),
                "deliveries": deliveries,
            }
        )
    return {
        "callId": call_id,
        "instance": INSTANCE if log else None,
        "attempts_kept_by": "the instance that pushed, in memory, for its recent calls",
        "events": out_events,
    }


def render(trace: dict[str, Any]) -> str:
    """The trace as lines for a terminal."""
    lines = [f"call {trace['callId']}"]
    for ev in trace["events"]:
        lines.append(f"  event {ev['id']} ({ev['type']}): {ev['status']}")
        if ev.get("reason"):
            lines.append(f"    reason: {ev['reason']}")
        if ev.get("explanation"):
            lines.append(f"    means: {ev['explanation']}")
        if ev.get("event_time"):
            lines.append(f"    eventTime {ev['event_time']}")
        receipts = ev.get("receipts") or []
        if receipts:
            for r in receipts:
                count = r.get("delivery_count")
                lines.append(
                    f"    received {r['received_at']} (Event Grid delivery count "
                    f"{'-' if count is None else count}, instance {r['instance']})"
                )
        else:
            lines.append(f"    received {ev['received_at']}")
        lines.append(f"    devices found: {ev.get('devices_found', len(ev['deliveries']))}")
        if ev.get("first_push_at"):
            after = ev.get("first_push_after_event_seconds")
            lines.append(
                f"    first accepted push {ev['first_push_at']}"
                + (f", {after:.3f} s after eventTime" if after is not None else "")
                + f", {ev['first_push_after_receipt_seconds']:.3f} s after receipt"
            )
        for d in ev["deliveries"]:
            line = (
                f"    - device {d['device_id']} [{d['platform']}] {d['status']} via "
                f"{d['provider'] or '-'} after {d['attempts']} attempt(s)"
            )
            if d.get("reason"):
                line += f": {d['reason']}"
            if d.get("provider_ref"):
                line += f" (ref {d['provider_ref']})"
            lines.append(line)
            if d.get("explanation"):
                lines.append(f"        means: {d['explanation']}")
            for a in d.get("attempt_log") or []:
                lines.append(
                    f"        #{a['attempt']} {a['at']} {a['provider']}"
                    + (f" {a['app']}" if a.get("app") else "")
                    + f" {a['status']} in {a['latency_ms']:.1f} ms"
                    + (f": {a['reason']}" if a.get("reason") else "")
                    + (f" (ref {a['provider_ref']})" if a.get("provider_ref") else "")
                )
    return "\n".join(lines)
