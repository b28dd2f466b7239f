"""Realistic IncomingCall deliveries for `ringrelay simulate` and the tests."""

from __future__ import annotations

import base64
import gzip
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def make_incoming_call_context(cc: str | None = None) -> tuple[str, str]:
    """An `incomingCallContext` shaped like ACS's: unsigned JWT whose payload holds `cc` (base64 of
    gzip, as in every public sample: it starts `H4sI`) and `shrToken`. Returns (context, cc)."""
    if cc is None:
        inner = orjson.dumps({"callId": str(uuid.uuid4()), "nonce": os.urandom(24).hex()})
        cc = base64.b64encode(gzip.compress(inner + os.urandom(300))).decode("ascii")
    header = _b64url(b'{"alg":"none","typ":"JWT"}')
    shr = ".".join(_b64url(os.urandom(n)) for n in (36, 120, 64))
    payload = _b64url(orjson.dumps({"cc": cc, "shrToken": shr}))
    return f"{header}.{payload}.", cc


def _identifier(raw_id: str) -> dict[str, Any]:
    if raw_id.startswith("4:"):
        return {"kind": "phoneNumber", "rawId": raw_id, "phoneNumber": {"value": raw_id[2:]}}
    if raw_id.startswith("8:acs:"):
        return {"kind": "communicationUser", "rawId": raw_id, "communicationUser": {"id": raw_id}}
    return {"kind": "unknown", "rawId": raw_id}


def incoming_call_event(
    to: str,
    caller: str = "8:acs:00000000-0000-0000-0000-000000000000_caller",
    display_name: str = "ringrelay simulator",
    *,
    event_id: str | None = None,
    correlation_id: str | None = None,
    event_time: datetime | None = None,
    cc: str | None = None,
) -> dict[str, Any]:
    """One IncomingCall event in the Event Grid schema."""
    context, _ = make_incoming_call_context(cc)
    when = (event_time or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    prefix = "/phoneCall" if caller.startswith("4:") else ""
    return {
        "id": event_id or str(uuid.uuid4()),
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ringrelay/"
        "providers/Microsoft.Communication/communicationServices/ringrelay-sim",
        "subject": f"{prefix}/caller/{caller}/recipient/{to}",
        "data": {
            "to": _identifier(to),
            "from": _identifier(caller),
            "serverCallId": _b64url(os.urandom(48)),
            "callerDisplayName": display_name,
            "incomingCallContext": context,
            "correlationId": correlation_id or str(uuid.uuid4()),
        },
        "eventType": "Microsoft.Communication.IncomingCall",
        "dataVersion": "1.0",
        "metadataVersion": "1",
        "eventTime": when,
    }


def _event_envelope(event_type: str, subject: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ringrelay/"
        "providers/Microsoft.Communication/communicationServices/ringrelay-sim",
        "subject": subject,
        "data": data,
        "eventType": event_type,
        "dataVersion": "1.0",
        "metadataVersion": "1",
        "eventTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z"),
    }


def _call_data(correlation_id: str, server_call_id: str | None) -> dict[str, Any]:
    # The shape of the docs' examples (../shared/fixtures/events/call*.json).
    return {
        "serverCallId": server_call_id or _b64url(os.urandom(48)),
        "group": {"id": "00000000-0000-0000-0000-000000000000"},
        "isTwoParty": True,
        "correlationId": correlation_id,
        "isRoomsCall": False,
    }


def call_ended_event(correlation_id: str, server_call_id: str | None = None) -> dict[str, Any]:
    """One Microsoft.Communication.CallEnded event in the Event Grid schema."""
    data = _call_data(correlation_id, server_call_id)
    data["durationOfCall"] = 0.0
    return _event_envelope(
        "Microsoft.Communication.CallEnded", f"call/{data['serverCallId']}", data
    )


def participant_added_event(
    correlation_id: str, participant: str, server_call_id: str | None = None
) -> dict[str, Any]:
    """One Microsoft.Communication.CallParticipantAdded event: `participant` joined the call."""
    data = _call_data(correlation_id, server_call_id)
    ident = _identifier(participant)
    data.update(
        {
            "user": {"communicationIdentifier": ident, "role": "Attendee"},
            "displayName": "",
            "participantId": str(uuid.uuid4()),
        }
    )
    return _event_envelope(
        "Microsoft.Communication.CallParticipantAdded",
        f"call/{data['serverCallId']}/participant/{participant}",
        data,
    )


# What each status means, in the words `ringrelay simulate` prints (README, "Event and delivery
# statuses", says the same).
EVENT_MEANING: dict[str, str] = {
    "delivered": "every device accepted the push or, once the call stopped, needed none",
    "failed": "settled, but not every device accepted the push; a retry would not change that",
    "pending": "a transient failure remains; answered 503 so that Event Grid retries",
    "expired": "the ring window ended before any push could go out",
    "rejected": "the event is malformed and was not pushed",
    "no_devices": "nobody to push to (a ring: no live VoIP registration; a stop: no device rang)",
    "ignored": "an event type ringrelay does not handle (acknowledged)",
    "cancelled": "the call had already stopped ringing (answered or ended): nothing pushed",
}
DELIVERY_MEANING: dict[str, str] = {
    "accepted": "the provider took the push",
    "rejected": "the provider refused it for good (e.g. a dead token)",
    "config_error": "our credentials, topic or endpoint are wrong; fix the configuration",
    "transient": "failed for now (timeout, 5xx, 429); Event Grid's retry pushes it again",
    "expired": "the ring window ended before it could be pushed",
    "in_flight": "being pushed by another delivery of the same event",
    "cancelled": "not pushed: the call stopped ringing (or this device answered it)",
}


def summarize(report: dict[str, Any]) -> list[str]:
    """The lines `ringrelay simulate` prints for one event of the webhook's answer: what
    happened overall, counted per device, then each device."""
    status = str(report.get("status", "?"))
    deliveries: list[dict[str, Any]] = list(report.get("deliveries", []))
    counts: dict[str, int] = {}
    for d in deliveries:
        counts[str(d["status"])] = counts.get(str(d["status"]), 0) + 1
    accepted = counts.pop("accepted", 0)
    if deliveries:
        result = f"{accepted} of {len(deliveries)} device(s) accepted the push"
        result += "".join(f", {n} {s}" for s, n in sorted(counts.items()))
    else:
        result = EVENT_MEANING.get(status, status)
    reason = f"; {report['reason']}" if report.get("reason") else ""
    lines = [
        f"  result: {result}{reason}",
        f"  event status: {status} ({EVENT_MEANING.get(status, 'see README')})",
        f"  devices found: {len(deliveries)}, pushes accepted: {accepted}",
    ]
    for d in deliveries:
        line = (
            f"    - {d['device_id']} [{d['platform']}] {d['status']}"
            f" via {d.get('provider') or '-'} after {d.get('attempts', 0)} attempt(s): "
            f"{DELIVERY_MEANING.get(str(d['status']), str(d['status']))}"
        )
        if d.get("reason"):
            line += f" ({d['reason']})"
        lines.append(line)
    return lines


def chat_message_event(
    to: str,
    sender: str = "8:acs:00000000-0000-0000-0000-000000000000_sender",
    text: str = "Hello from the ringrelay simulator",
    display_name: str = "ringrelay simulator",
    *,
    thread_id: str | None = None,
    message_id: str | None = None,
    event_id: str | None = None,
    event_type: str = "Microsoft.Communication.ChatMessageReceived",
    event_time: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One ChatMessageReceived (or Edited/Deleted) event for one recipient, in the Event Grid
    schema, shaped like the documented sample (../shared/fixtures/events/chatmessage*.json)."""
    now = event_time or datetime.now(UTC)
    when = now.strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    millis = int(now.timestamp() * 1000)
    message_id = message_id or str(millis)
    thread_id = thread_id or f"19:{uuid.uuid4().hex}@thread.v2"
    data: dict[str, Any] = {
        "messageBody": text,
        "messageId": message_id,
        "metadata": metadata or {},
        "senderId": sender,
        "senderCommunicationIdentifier": _identifier(sender),
        "senderDisplayName": display_name,
        "composeTime": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "type": "Text",
        "version": millis,
        "recipientId": to,
        "recipientCommunicationIdentifier": _identifier(to),
        "transactionId": _b64url(os.urandom(16)) + ".1.1.1.1.1.1.1",
        "threadId": thread_id,
    }
    if event_type.endswith("ChatMessageEdited"):
        data["editTime"] = data["composeTime"]
    elif event_type.endswith("ChatMessageDeleted"):
        data["deleteTime"] = data["composeTime"]
        del data["messageBody"], data["metadata"]
    return {
        "id": event_id or str(uuid.uuid4()),
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ringrelay/"
        "providers/Microsoft.Communication/communicationServices/ringrelay-sim",
        "subject": f"thread/{thread_id}/sender/{sender}/recipient/{to}",
        "data": data,
        "eventType": event_type,
        "dataVersion": "1.0",
        "metadataVersion": "1",
        "eventTime": when,
    }
