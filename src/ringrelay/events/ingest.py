"""Webhook ingest: Event Grid and CloudEvents 1.0 deliveries -> normalized events."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ringrelay.models import has_control_character

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


MAX_ID_CHARS = 512
MAX_TYPE_CHARS = 256


def _text(value: object, limit: int) -> str | None:
    """`value` if it is a usable id or type: a non-empty string, at most `limit` characters,
    without control characters."""
    if isinstance(value, str) and 0 < len(value) <= limit:
        if (value.isascii() and value.isprintable()) or not has_control_character(value):
            return value  # printable ASCII settled inline: twice per event
    return None


def _invalid(index: int, raw: object, reason: str, body: bytes) -> Event:
    given = _text(raw.get("id"), MAX_ID_CHARS) if isinstance(raw, dict) else None
    if given is not None:
        event_id = given
    else:
        # The same malformed event gets the same id on redelivery. orjson writes at most 254
        # levels but reads 1,024: a deeper event is named by the delivery and its place in it.
        try:
            canonical = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError: "Recursion limit reached"
            canonical = b"%d:%s" % (index, hashlib.sha256(body).digest())
        event_id = f"invalid-{hashlib.sha256(canonical).hexdigest()[:16]}"
    etype = ""
    if isinstance(raw, dict):
        etype = _text(raw.get("eventType", raw.get("type")), MAX_TYPE_CHARS) or ""
    return Event(event_id, etype, None, None, "unknown", error=f"event[{index}]: {reason}")


def _normalize(index: int, raw: object, body: bytes) -> Event:
    if not isinstance(raw, dict):
        return _invalid(index, raw, "not a JSON object", body)
    cloud = "specversion" in raw or "specVersion" in raw
    type_key, time_key = ("type", "time") if cloud else ("eventType", "eventTime")
    event_id = _text(raw.get("id"), MAX_ID_CHARS)
    if event_id is None:
        return _invalid(
            index,
            raw,
            f"id: missing, empty, longer than {MAX_ID_CHARS} characters or with a control "
            "character",
            body,
        )
    etype = _text(raw.get(type_key), MAX_TYPE_CHARS)
    if etype is None:
        return _invalid(
            index,
            raw,
            f"{type_key}: missing, empty, longer than {MAX_TYPE_CHARS} characters or with a "
            "control character",
            body,
        )
    when: float | None = None
    if raw.get(time_key) is not None:
        try:
            when = parse_time(raw.get(time_key))
        except ValueError as exc:
            return _invalid(index, raw, f"{time_key}: not an ISO 8601 time ({exc})", body)
    elif not cloud:
        return _invalid(index, raw, f"{time_key}: missing", body)
    data = raw.get("data")
    if cloud and data is None and isinstance(raw.get("data_base64"), str):
        try:
            import base64

            data = orjson.loads(base64.b64decode(raw["data_base64"]))
        except (ValueError, orjson.JSONDecodeError):
            return _invalid(index, raw, "data_base64: not base64-encoded JSON", body)
    return Event(event_id, etype, when, data, "cloudevents" if cloud else "eventgrid", "", raw)


def parse_delivery(body: bytes, content_type: str, max_events: int = 5000) -> list[Event]:
    """Split a delivery into events; malformed events come back with `error` set. More than
    `max_events` is refused (413) before any event is looked at."""
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
    if len(doc) > max_events:
        raise IngestError(
            413,
            f"{len(doc)} events in one delivery; at most {max_events} are taken "
            "(RINGRELAY_MAX_EVENTS_PER_DELIVERY; Event Grid sends at most 5,000 per batch)",
        )
    return [_normalize(i, raw, body) for i, raw in enumerate(doc)]


def validation_code(event: Event) -> str | None:
    """The code to echo if this event is Event Grid's subscription validation handshake."""
    if event.type == VALIDATION_EVENT and not event.error and isinstance(event.data, dict):
        code = event.data.get("validationCode")
        if isinstance(code, str):
            return code
    return None
