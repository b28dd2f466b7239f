"""Webhook ingest: Event Grid and CloudEvents 1.0 deliveries -> normalized events."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
INCOMING_CALL = "Microsoft.Communication.IncomingCall"

CLOUDEVENTS_SINGLE = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"


class IngestError(Exception):
    """The whole delivery is unusable: answered with `status` and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)  # not frozen: built per push, and frozen init costs ~5x
class Event:
    id: str
    type: str
    time: float | None  # unix seconds; None when the event carries no time
    data: Any
    schema: str  # "eventgrid" | "cloudevents"
    error: str = ""  # set when the envelope itself is malformed
    envelope: Any = None  # the event as received: routing rules read `subject`, `topic`, ...


def parse_time(value: object) -> float | None:
    """ISO 8601 as Event Grid writes it (`2022-08-25T19:27:24.2415391Z`: 7 fractional digits)."""
    if not isinstance(value, str) or not value:
        raise ValueError("missing")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python's parser takes at most 6 fractional digits: trim .NET's 7th.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("no time zone")
    return parsed.timestamp()


def _invalid(index: int, raw: object, reason: str) -> Event:
    given = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(given, str) and given:
        event_id = given
    else:
        digest = hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        event_id = f"invalid-{digest}"
    etype = ""
    if isinstance(raw, dict):
        t = raw.get("eventType", raw.get("type"))
        etype = t if isinstance(t, str) else ""
    return Event(event_id, etype, None, None, "unknown", error=f"event[{index}]: {reason}")


def _normalize(index: int, raw: object) -> Event:
    if not isinstance(raw, dict):
        return _invalid(index, raw, "not a JSON object")
    cloud = "specversion" in raw or "specVersion" in raw
    type_key, time_key = ("type", "time") if cloud else ("eventType", "eventTime")
    event_id = raw.get("id")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 512:
        return _invalid(index, raw, "id: missing, empty or longer than 512 characters")
    etype = raw.get(type_key)
    if not isinstance(etype, str) or not etype:
        return _invalid(index, raw, f"{type_key}: missing or empty")
    when: float | None = None
    if raw.get(time_key) is not None:
        try:
            when = parse_time(raw.get(time_key))
        except ValueError as exc:
            return _invalid(index, raw, f"{time_key}: not an ISO 8601 time ({exc})")
    elif not cloud:
        return _invalid(index, raw, f"{time_key}: missing")
    data = raw.get("data")
    if cloud and data is None and isinstance(raw.get("data_base64"), str):
        try:
            import base64

            data = orjson.loads(base64.b64decode(raw["data_base64"]))
        except (ValueError, orjson.JSONDecodeError):
            return _invalid(index, raw, "data_base64: not base64-encoded JSON")
    return Event(event_id, etype, when, data, "cloudevents" if cloud else "eventgrid", "", raw)


def parse_delivery(body: bytes, content_type: str) -> list[Event]:
    """Split a delivery into events; malformed events come back with `error` set."""
    if not body.strip():
        raise IngestError(400, "empty body: expected a JSON array of events")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, f"body is not JSON: {exc}") from None
    media = content_type.split(";", 1)[0].strip().lower()
    if isinstance(doc, dict):
        # One CloudEvent in structured mode; Event Grid's own schema always sends an array.
        if media == CLOUDEVENTS_SINGLE or "specversion" in doc or "specVersion" in doc:
            doc = [doc]
        else:
            raise IngestError(
                400, "expected a JSON array of events (Event Grid schema), got an object"
            )
    if not isinstance(doc, list):
        raise IngestError(400, f"expected a JSON array of events, got {type(doc).__name__}")
    return [_normalize(i, raw) for i, raw in enumerate(doc)]


def validation_code(events: list[Event]) -> str | None:
    """The code to echo for Event Grid's subscription validation handshake, if this is one."""
    for ev in events:
        if ev.type == VALIDATION_EVENT and isinstance(ev.data, dict):
            code = ev.data.get("validationCode")
            if isinstance(code, str):
                return code
    return None
