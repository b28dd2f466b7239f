"""The interface every event-kind module implements, and what it may use while deciding."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ringrelay.delivery.plan import Decision
from ringrelay.events.ingest import Event
from ringrelay.store import Store


class EventKind(Protocol):
    """Turns one parsed event of `event_types` into a `Decision`: push plans, or a final record.
    It decides; the dispatcher claims, pushes, retries and records."""

    @property
    def event_types(self) -> tuple[str, ...]: ...

    async def decide(self, event: Event, ctx: Context) -> Decision: ...


class StoppedCalls:
    """Calls that stopped ringing in this process, so that a ring still retrying here gives up at
    once (the store has the same fact for other instances, read before a retry)."""

    def __init__(self) -> None:
        self._until: dict[tuple[str, str | None], float] = {}

    def stop(self, call_id: str, identity: str | None, until: float) -> None:
        now = time.time()
        if len(self._until) > 10_000:  # bounded: entries are only useful during a ring
            self._until = {k: v for k, v in self._until.items() if v > now}
        self._until[(call_id, identity)] = max(until, now + 60)

    def is_stopped(self, call_id: str, identity: str) -> bool:
        now = time.time()
        return any(
            self._until.get(key, 0.0) > now for key in ((call_id, None), (call_id, identity))
        )


@dataclass(slots=True)
class Context:
    """What a kind may use: the store, this delivery's clock, and the process's call state."""

    store: Store
    ring_window: float
    received_at: float
    deadline: float
    stopped: StoppedCalls
    # Pushes of this call under way in this process right now (a stop waits for its ring).
    pushes_in_flight: Callable[[str], list[Awaitable[object]]]
