"""Events handed over by a host's Event Grid trigger (Azure Functions' `EventGridEvent`) rather
than posted to the webhook: the host has already parsed the envelope and answered the
subscription handshake, so only the fields are checked, the way the webhook checks them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ringrelay.events.ingest import Event

MAX_ID_CHARS = 512  # the webhook's bound (events/ingest.py)


def event_from_trigger(
    event_id: object, event_type: object, event_time: object, data: Any
) -> Event:
    """An `Event` from a trigger's fields; a malformed one comes back with `error` set, so that
    the dispatcher records it as rejected (a retry cannot fix it)."""
    given_id = event_id if isinstance(event_id, str) else ""
    given_type = event_type if isinstance(event_type, str) else ""
    if not given_id or len(given_id) > MAX_ID_CHARS:
        return Event(
            given_id[:MAX_ID_CHARS] or "invalid-trigger-event",
            given_type,
            None,
            None,
            "eventgrid",
            error="id: missing, empty or longer than 512 characters",
        )
    if not given_type:
        return Event(given_id, "", None, None, "eventgrid", error="eventType: missing or empty")
    when: float | None = None
    if isinstance(event_time, datetime):
        if event_time.tzinfo is None:
            return Event(
                given_id, given_type, None, None, "eventgrid", error="eventTime: no time zone"
            )
        when = event_time.timestamp()
    elif event_time is not None:
        return Event(
            given_id, given_type, None, None, "eventgrid", error="eventTime: not a datetime"
        )
    return Event(given_id, given_type, when, data, "eventgrid")
