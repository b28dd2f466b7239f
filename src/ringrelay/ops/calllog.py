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


class CallLog:
    def __init__(self, max_events: int = 10_000, max_attempts_per_event: int = 200) -> None:
        self.max_events = max_events
        self.max_attempts = max_attempts_per_event
        self._attempts: OrderedDict[str, list[tuple[Any, ...]]] = OrderedDict()
        self._receipts: OrderedDict[str, list[Receipt]] = OrderedDict()
        # event -> first accepted push (unix time). An OrderedDict: evicting a plain dict's
        # first key scans the deleted slots before it (measured 11 us per event at 10,000).
        self._accepted: OrderedDict[str, float] = OrderedDict()

    @staticmethod
    def _bounded(table: OrderedDict[str, Any], key: str, limit: int) -> Any:
        entry = table.get(key)
        if entry is None:
            entry = table[key] = []
            while len(table) > limit:
                table.popitem(last=False)
        return entry

    def receipt(
        self,
        event_id: str,
        received_at: float,
        delivery_count: int | None,
        event_time: float | None = None,
    ) -> None:
        self._bounded(self._receipts, event_id, self.max_events).append(
            Receipt(received_at, delivery_count, event_time)
        )

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
        entries = self._attempts.get(event_id)
        if entries is None:
            entries = self._bounded(self._attempts, event_id, self.max_events)
        if len(entries) < self.max_attempts:
            entries.append((reg, number, provider, result, seconds, at))
        if result.status is DeliveryStatus.ACCEPTED and event_id not in self._accepted:
            self._accepted[event_id] = at
            if len(self._accepted) > self.max_events:
                self._accepted.popitem(last=False)

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
        return [self._attempt(e) for e in self._attempts.get(event_id, ())]

    def receipts_for(self, event_id: str) -> list[Receipt]:
        return list(self._receipts.get(event_id, ()))

    def first_accepted(self, event_id: str) -> float | None:
        return self._accepted.get(event_id)

    def first_push_latencies(self) -> list[tuple[float, float]]:
        """(accepted at, seconds from eventTime) of the recent events that have both."""
        out = []
        for event_id, accepted_at in self._accepted.items():
            receipts = self._receipts.get(event_id) or ()
            event_time = next((r.event_time for r in receipts if r.event_time is not None), None)
            if event_time is not None:
                out.append((accepted_at, max(0.0, accepted_at - event_time)))
        return out

    def recent_attempts(self, limit: int = 500) -> list[Attempt]:
        """The newest attempts of any event, newest last."""
        out: list[tuple[Any, ...]] = []
        for entries in reversed(self._attempts.values()):
            out[:0] = entries
            if len(out) >= limit:
                break
        return [self._attempt(e) for e in out[-limit:]]
