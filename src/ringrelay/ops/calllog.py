"""What the ledger does not keep, kept in memory for the recent calls of this instance: each
Event Grid delivery of an event (when, its `aeg-delivery-count`, which instance) and each push
attempt (transport, status, reason, latency, provider reference). Bounded by events; the oldest
are forgotten first. `/v1/calls/{callId}` and the trace join it to the ledger's final states."""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from ringrelay.models import DeliveryStatus, Registration
from ringrelay.providers import PushResult

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class Attempt:
    identity: str
    device_id: str
    attempt: int
    provider: str
    app: str
    status: str
    reason: str
    http_status: int | None
    latency_ms: float
    provider_ref: str | None
    at: float
    instance: str = INSTANCE

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Receipt:
    received_at: float
    delivery_count: int | None  # Event Grid's aeg-delivery-count: 0 on the first delivery
    event_time: float | None = None  # the event's eventTime (unix time), when it has one
    instance: str = INSTANCE

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class _EventLog:
    """What this instance saw of one event."""

    __slots__ = ("accepted_at", "attempts", "receipts")

    def __init__(self) -> None:
        self.receipts: list[tuple[float, int | None, float | None]] = []
        self.attempts: list[tuple[Any, ...]] = []
        self.accepted_at: float | None = None  # first accepted push (unix time)


class CallLog:
    def __init__(self, max_events: int = 10_000, max_attempts_per_event: int = 200) -> None:
        self.max_events = max_events
        self.max_attempts = max_attempts_per_event
        # One table for receipts, attempts and the first acceptance: one look-up and one
        # eviction per event on the hot path (three tables had cost ~3 % of an IncomingCall's
        # instructions). An OrderedDict: evicting a plain dict's first key scans the deleted
        # slots before it (measured 11 us per event at 10,000).
        self._events: OrderedDict[str, _EventLog] = OrderedDict()

    def _entry(self, event_id: str) -> _EventLog:
        table = self._events
        entry = table.get(event_id)
        if entry is None:
            entry = table[event_id] = _EventLog()
            if len(table) > self.max_events:
                table.popitem(last=False)
        return entry

    def receipt(
        self,
        event_id: str,
        received_at: float,
        delivery_count: int | None,
        event_time: float | None = None,
    ) -> None:
        entry = self._events.get(event_id) or self._entry(event_id)  # no call when known
        entry.receipts.append((received_at, delivery_count, event_time))

    def attempt(
        self,
        event_id: str,
        reg: Registration,
        number: int,
        provider: Any,
        result: PushResult,
        seconds: float,
        at: float,
    ) -> None:
        """On the push path: keeps references (each result is built per attempt and never
        changed after), turned into `Attempt`s only when a trace is read."""
        entry = self._events.get(event_id) or self._entry(event_id)
        if len(entry.attempts) < self.max_attempts:
            entry.attempts.append((reg, number, provider, result, seconds, at))
        if result.status is DeliveryStatus.ACCEPTED and entry.accepted_at is None:
            entry.accepted_at = at

    @staticmethod
    def _attempt(entry: tuple[Any, ...]) -> Attempt:
        reg, number, provider, result, seconds, at = entry
        return Attempt(
            reg.identity,
            reg.device_id,
            number,
            provider.name,
            str(getattr(provider, "app_id", "") or ""),
            result.status.value,
            result.reason,
            result.http_status,
            round(seconds * 1000, 3),
            result.provider_ref,
            at,
        )

    def attempts_for(self, event_id: str) -> list[Attempt]:
        entry = self._events.get(event_id)
        return [self._attempt(e) for e in entry.attempts] if entry is not None else []

    def receipts_for(self, event_id: str) -> list[Receipt]:
        entry = self._events.get(event_id)
        return [Receipt(*r) for r in entry.receipts] if entry is not None else []

    def first_accepted(self, event_id: str) -> float | None:
        entry = self._events.get(event_id)
        return entry.accepted_at if entry is not None else None

    def first_push_latencies(self) -> list[tuple[float, float]]:
        """(accepted at, seconds from eventTime) of the recent events that have both."""
        out = []
        for entry in self._events.values():
            if entry.accepted_at is None:
                continue
            event_time = next((t for _, _, t in entry.receipts if t is not None), None)
            if event_time is not None:
                out.append((entry.accepted_at, max(0.0, entry.accepted_at - event_time)))
        return out

    def recent_attempts(self, limit: int = 500) -> list[Attempt]:
        """The newest attempts of any event, newest last."""
        out: list[tuple[Any, ...]] = []
        for entry in reversed(self._events.values()):
            out[:0] = entry.attempts
            if len(out) >= limit:
                break
        return [self._attempt(e) for e in out[-limit:]]
