"""The one table that maps event types to their kind modules: a new kind is one file + one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ringrelay.chat.keys import ChatKeyVault
from ringrelay.config import Settings
from ringrelay.events.call_lifecycle import Acknowledged, CallEnded, CallParticipantAdded
from ringrelay.events.chat_message import ChatEvents
from ringrelay.events.incoming_call import IncomingCall
from ringrelay.events.kind import EventKind

if TYPE_CHECKING:
    from ringrelay.routing.calls import CallRouter


def event_kinds(
    settings: Settings,
    call_router: CallRouter | None = None,
    chat_keys: ChatKeyVault | None = None,
) -> dict[str, EventKind]:
    kinds: list[EventKind] = [
        IncomingCall(call_router),
        CallEnded(),
        CallParticipantAdded(),
        Acknowledged(),
        ChatEvents(settings, chat_keys),
    ]
    return {event_type: kind for kind in kinds for event_type in kind.event_types}
