"""The one table that maps event types to their kind modules: a new kind is one file + one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ringrelay.events.call_lifecycle import Acknowledged, CallEnded, CallParticipantAdded
from ringrelay.events.incoming_call import IncomingCall
from ringrelay.events.kind import EventKind

if TYPE_CHECKING:
    from ringrelay.routing.calls import CallRouter


def event_kinds(call_router: CallRouter | None = None) -> dict[str, EventKind]:
    kinds: list[EventKind] = [
        IncomingCall(call_router),
        CallEnded(),
        CallParticipantAdded(),
        Acknowledged(),
    ]
    return {event_type: kind for kind in kinds for event_type in kind.event_types}
