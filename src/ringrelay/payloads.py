"""IncomingCall event data -> the VoIP push the ACS Calling SDK accepts. Pure functions only.

Push keys are the ones `PushNotificationInfo.fromDictionary` (iOS) / `fromMap` (Android) read, as
sent by Microsoft's Event Grid sample (Utilities.cs `ConvertToPNInfo`) and listed in the Android UI
library's `CallCompositePushNotification` javadoc (../shared/notes/acs-payloads.md §3).
"""

from __future__ import annotations

import binascii
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson

from ringrelay.delivery.plan import PushContent
from ringrelay.models import has_control_character

# ACSPushNotificationEventType (learn.microsoft.com objectivec/communication-services/calling).
EVENT_ID_INCOMING_CALL = 107
EVENT_ID_STOP_RINGING = 110
EVENT_ID_INCOMING_PSTN_CALL = 111

# Payload ceilings: APNs VoIP 5120 B, APNs alert 4096 B (Apple, "Sending notification requests to
# APNs"); FCM 4096 B (firebase.google.com/docs/cloud-messaging/customize-messages/set-message-type);
# Notification Hubs caps every APNs payload at 4 KB, VoIP included (learn.microsoft.com
# azure/notification-hubs/voip-apns).
APNS_VOIP_MAX_BYTES = 5120
APNS_ALERT_MAX_BYTES = 4096
FCM_MAX_BYTES = 4096
NOTIFICATION_HUBS_APNS_MAX_BYTES = 4096


def apns_collapse_id(value: str) -> str:
    """Apple: `apns-collapse-id` at most 64 bytes; a longer id is sent as its SHA-256 (hex)."""
    if len(value.encode()) <= 64:
        return value
    return hashlib.sha256(value.encode()).hexdigest()


def apns_size_error(body: bytes, voip: bool) -> str | None:
    """Apple refuses larger bodies (413 PayloadTooLarge): found before sending."""
    limit = APNS_VOIP_MAX_BYTES if voip else APNS_ALERT_MAX_BYTES
    return f"payload {len(body)} bytes exceeds APNs' {limit}" if len(body) > limit else None


def fcm_size_error(message: dict[str, Any]) -> str | None:
    """FCM's limit is on the data's keys and values (and a notification's text)."""
    data = message.get("data") or {}
    size = sum(len(k.encode()) + len(str(v).encode()) for k, v in data.items())
    note = message.get("notification") or {}
    size += sum(len(str(v).encode()) for v in note.values())
    return f"data {size} bytes exceeds FCM's {FCM_MAX_BYTES}" if size > FCM_MAX_BYTES else None


class PayloadError(ValueError):
    """The event cannot become a push; the message names the offending field."""


@dataclass(slots=True)  # not frozen: built per push, and frozen init costs ~5x
class CallPush:
    """Platform-independent content of an incoming-call push."""

    event_id: int
    cp: str
    call_id: str
    recipient_id: str
    caller_id: str
    display_name: str
    video_call: bool

    def data(self) -> dict[str, Any]:
        """The SDK dictionary with native JSON types, as APNs carries it."""
        return {
            "eventId": self.event_id,
            "cp": self.cp,
            "callId": self.call_id,
            "recipientId": self.recipient_id,
            "callerId": self.caller_id,
            "displayName": self.display_name,
            # Microsoft's sample sends the string "false"; the event carries no video flag.
            "videoCall": "true" if self.video_call else "false",
        }

    def string_data(self) -> dict[str, str]:
        """The same dictionary with every value a string: FCM `data` is a map<string,string>."""
        return {k: str(v) for k, v in self.data().items()}

    # PushContent (delivery/plan.py)
    @property
    def label(self) -> str:
        return "stop" if self.event_id == EVENT_ID_STOP_RINGING else "call"

    @property
    def collapse_id(self) -> str | None:
        # A stop replaces a ring of the same call still held by APNs/FCM for an offline phone.
        return self.call_id if self.event_id == EVENT_ID_STOP_RINGING else None

    def apns_payload(self) -> dict[str, Any]:
        """`{"aps": {}, "data": {...}}` as Microsoft's sample sends it; NH needs `aps`."""
        return {"aps": {}, "data": self.data()}

    def fcm_message(self, seconds_left: float) -> dict[str, Any]:
        """A high-priority data-only message living no longer than the ring."""
        android: dict[str, Any] = {"priority": "HIGH", "ttl": fcm_ttl(seconds_left)}
        if self.event_id == EVENT_ID_STOP_RINGING:
            android["collapse_key"] = self.call_id
        return {"data": self.string_data(), "android": android}


def stop_ringing_push(record_call_id: str, recipient_id: str, caller_id: str) -> CallPush:
    """The StopRinging (110) push: the ring's keys with `eventId` 110. The call context is never
    stored, so `cp` is empty: the app ends the call by `callId` (README, "Ring lifecycle")."""
    return CallPush(
        event_id=EVENT_ID_STOP_RINGING,
        cp="",
        call_id=record_call_id,
        recipient_id=recipient_id,
        caller_id=caller_id,
        display_name="",
        video_call=False,
    )


def _b64url_decode(segment: str, field: str) -> bytes:
    # Accept base64url as sent and the standard alphabet that some producers use; restore padding.
    # binascii's strict mode checks the alphabet and the padding in C, in the pass that decodes:
    # base64.b64decode(validate=True) ran a regex over the segment and translated its bytes first
    # (~4 % of an IncomingCall's instructions with the context's two segments).
    cleaned = segment.strip().rstrip("=").replace("-", "+").replace("_", "/")
    if not cleaned:
        raise PayloadError(f"{field}: empty segment")
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        return binascii.a2b_base64(padded, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"{field}: not base64url ({exc})") from None


def extract_cc(incoming_call_context: object) -> str:
    """The `cc` claim inside `incomingCallContext` (an unsigned JWT-like string)."""
    field = "data.incomingCallContext"
    if not isinstance(incoming_call_context, str) or not incoming_call_context:
        raise PayloadError(f"{field}: missing or not a string")
    parts = incoming_call_context.split(".")
    if len(parts) < 2:
        raise PayloadError(f"{field}: expected header.payload[.signature], found no '.'")
    raw = _b64url_decode(parts[1], field)
    try:
        claims = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise PayloadError(f"{field}: payload segment is not JSON") from None
    if not isinstance(claims, dict):
        raise PayloadError(f"{field}: payload segment is not a JSON object")
    cc = claims.get("cc")
    if not isinstance(cc, str) or not cc:
        raise PayloadError(f"{field}: no 'cc' claim")
    try:
        # The SDK base64-decodes cc; refuse a value it would choke on (as the sample does).
        binascii.a2b_base64(cc, strict_mode=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"{field}: 'cc' claim is not base64") from None
    return cc


def _raw_id(data: dict[str, Any], key: str) -> tuple[str, str]:
    ident = data.get(key)
    if not isinstance(ident, dict):
        raise PayloadError(f"data.{key}: missing or not an object")
    raw_id = ident.get("rawId")
    if not isinstance(raw_id, str) or not raw_id:
        raise PayloadError(f"data.{key}.rawId: missing or empty")
    if not (raw_id.isascii() and raw_id.isprintable()) and has_control_character(raw_id):
        raise PayloadError(f"data.{key}.rawId: contains a control character")
    kind = ident.get("kind")
    return raw_id, kind if isinstance(kind, str) else ""


def call_push_from_incoming_call(data: object) -> CallPush:
    """Build the push content from `Microsoft.Communication.IncomingCall` event data."""
    if not isinstance(data, dict):
        raise PayloadError("data: missing or not an object")
    recipient_id, _ = _raw_id(data, "to")
    caller_id, caller_kind = _raw_id(data, "from")
    correlation_id = data.get("correlationId")
    if not isinstance(correlation_id, str) or not correlation_id:
        raise PayloadError("data.correlationId: missing or empty")
    if not (correlation_id.isascii() and correlation_id.isprintable()) and has_control_character(
        correlation_id
    ):
        raise PayloadError("data.correlationId: contains a control character")
    display_name = data.get("callerDisplayName")
    if display_name is not None and not isinstance(display_name, str):
        raise PayloadError("data.callerDisplayName: not a string")
    cp = extract_cc(data.get("incomingCallContext"))
    is_pstn = caller_kind.lower() == "phonenumber" or caller_id.startswith("4:")
    return CallPush(
        event_id=EVENT_ID_INCOMING_PSTN_CALL if is_pstn else EVENT_ID_INCOMING_CALL,
        cp=cp,
        call_id=correlation_id,
        recipient_id=recipient_id,
        caller_id=caller_id,
        display_name=display_name or "",
        # IncomingCall has no video indicator (../shared/notes/acs-payloads.md §6).
        video_call=False,
    )


# --- platform bodies -------------------------------------------------------------------------


def apns_voip_body(content: PushContent) -> dict[str, Any]:
    return content.apns_payload()


def fcm_ttl(seconds_left: float) -> str:
    """FCM v1 `android.ttl` Duration string, never negative."""
    return f"{max(0, math.ceil(seconds_left))}s"


def fcm_v1_message(
    content: PushContent, seconds_left: float, token: str | None = None
) -> dict[str, Any]:
    """FCM HTTP v1 send body: `{"message": {..., "token": …}}`."""
    message = content.fcm_message(seconds_left)
    if token is not None:
        message["token"] = token
    return {"message": message}


def gcm_legacy_body(call: PushContent, seconds_left: float) -> dict[str, Any]:
    return {
        "data": call.string_data(),
        "priority": "high",
        "time_to_live": max(0, math.ceil(seconds_left)),
    }


def adm_body(call: PushContent, seconds_left: float) -> dict[str, Any]:
    # Amazon Device Messaging: data map of strings, expiresAfter in seconds.
    return {"data": call.string_data(), "expiresAfter": max(1, math.ceil(seconds_left))}


def baidu_body(call: PushContent) -> dict[str, Any]:
    return {"custom_content": call.string_data()}


def wns_raw_body(call: PushContent) -> dict[str, Any]:
    # The Windows SDK's PushNotificationDetails.Parse format is not public; a raw notification
    # carrying the same dictionary is what the app hands to it.
    return call.data()


def encode(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)
