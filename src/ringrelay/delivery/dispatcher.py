"""Delivery: from a parsed event to settled pushes on every device of the callee.

Per event: find the callee's live VoIP registrations, claim each (event, device) in the ledger,
push to all devices at once, retry transient failures with short jittered backoff inside the ring
window and the webhook's deadline, and record every device's outcome.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ringrelay.delivery.router import ProviderRouter
from ringrelay.events.ingest import INCOMING_CALL, Event
from ringrelay.metrics import Metrics
from ringrelay.models import (
    DeliveryOutcome,
    DeliveryStatus,
    EventRecord,
    EventStatus,
    PushKind,
    Registration,
)
from ringrelay.payloads import CallPush, PayloadError, call_push_from_incoming_call
from ringrelay.providers import PushRequest, PushResult
from ringrelay.redact import fingerprint
from ringrelay.store import Claim, Store

if TYPE_CHECKING:
    from ringrelay.routing.calls import CallRouter

log = logging.getLogger("ringrelay.delivery")

# Backoff between attempts: 100 ms doubling to 2 s, each drawn from [50 %, 150 %] so that many
# failing pushes do not retry in lockstep. The first retry comes well under a second.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
MAX_ATTEMPTS_PER_DELIVERY = 8


def backoff(attempt: int) -> float:
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))) * random.uniform(0.5, 1.5)


@dataclass(slots=True)
class EventReport:
    """What happened to one event of a delivery (returned in the webhook's answer)."""

    event_id: str
    event_type: str
    status: EventStatus
    reason: str = ""
    correlation_id: str | None = None
    recipient: str | None = None
    deliveries: list[DeliveryOutcome] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.event_id, "type": self.event_type, "status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.correlation_id:
            out["callId"] = self.correlation_id
        if self.recipient:
            out["recipient"] = self.recipient
        if self.deliveries or self.status not in (EventStatus.IGNORED, EventStatus.REJECTED):
            out["deliveries"] = [outcome_json(d) for d in self.deliveries]
        return out


def outcome_json(o: DeliveryOutcome) -> dict[str, Any]:
    return {
        "identity": o.identity,
        "device_id": o.device_id,
        "platform": o.platform,
        "status": o.status,
        "reason": o.reason,
        "attempts": o.attempts,
        "provider": o.provider,
        "provider_ref": o.provider_ref,
        "token": o.token_fingerprint,
    }


class InFlightLimit:
    """Pushes under way per provider. Beyond the provider's limit a push fails fast (transient,
    with the reason recorded) instead of queueing: a slow or dead provider must not pile up
    memory, nor hold up the devices on other providers."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


class Dispatcher:
    def __init__(
        self,
        store: Store,
        router: ProviderRouter,
        metrics: Metrics,
        *,
        ring_window_seconds: float,
        call_router: CallRouter | None = None,
    ) -> None:
        self.store = store
        # Call routing (rules, numbers, redirect/reject): consulted before any push.
        self.call_router = call_router if call_router is not None and call_router.active else None
        self.router = router
        self.metrics = metrics
        self.ring_window = ring_window_seconds
        # Single flight: a duplicate delivery of an event being handled in this process waits
        # for the first instead of racing it.
        self._inflight: dict[str, asyncio.Future[EventReport]] = {}
        self._limits: dict[int, InFlightLimit] = {
            id(p): InFlightLimit(p.max_in_flight) for p in router.providers()
        }

    async def handle(self, event: Event, received_at: float, deadline: float) -> EventReport:
        if event.error:
            report = EventReport(event.id, event.type, EventStatus.REJECTED, event.error)
            await self._record(report, received_at)
        elif event.type == INCOMING_CALL:
            report = await self._single_flight(event, received_at, deadline)
        else:
            report = EventReport(
                event.id, event.type, EventStatus.IGNORED, "event type not handled"
            )
        self.metrics.event(_type_label(event.type), report.status.value)
        return report

    async def _single_flight(
        self, event: Event, received_at: float, deadline: float
    ) -> EventReport:
        running = self._inflight.get(event.id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[EventReport] = asyncio.get_running_loop().create_future()
        self._inflight[event.id] = future
        try:
            report = await self._incoming_call(event, received_at, deadline)
            future.set_result(report)
            return report
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise, nobody else needs to
            raise
        finally:
            del self._inflight[event.id]

    async def _record(self, report: EventReport, now: float) -> None:
        await self.store.record_event(
            EventRecord(
                report.event_id,
                report.event_type,
                report.status,
                report.reason,
                report.correlation_id,
                report.recipient,
                received_at=now,
            ),
            now,
        )

    async def _incoming_call(
        self, event: Event, received_at: float, deadline: float
    ) -> EventReport:
        try:
            call = call_push_from_incoming_call(event.data)
        except PayloadError as exc:
            report = EventReport(event.id, event.type, EventStatus.REJECTED, str(exc))
            await self._record(report, received_at)
            log.info("event %s rejected: %s", event.id, exc)
            return report

        report = EventReport(
            event.id,
            event.type,
            EventStatus.PENDING,
            correlation_id=call.call_id,
            recipient=call.recipient_id,
        )
        ring_ends_at = (event.time if event.time is not None else received_at) + self.ring_window
        if self.call_router is not None:
            routed = await self._route_call(event, call, ring_ends_at, deadline)
            if routed is not None:
                return routed
        now = time.time()
        record = EventRecord(
            event.id, event.type, EventStatus.PENDING, "", call.call_id, call.recipient_id, now
        )
        # The lease outlives this request's deadline a little, so a crashed process's claims are
        # taken over by the next delivery attempt, and a live one's are not.
        targets, claim = await self.store.claim_callee(
            record, call.recipient_id, PushKind.VOIP, now, lease_until=deadline + 5
        )
        if not targets:
            report.status = EventStatus.NO_DEVICES
            report.reason = "no live VoIP registration for the callee"
            await self._record(report, now)
            return report

        if now >= ring_ends_at:
            outcomes = [
                self._outcome(reg, DeliveryStatus.EXPIRED, "ring window ended", claim)
                for reg in claim.to_send
            ]
            # A redelivery of a call that was pushed in time keeps its earlier outcomes.
            report.status = _event_status([*outcomes, *claim.settled], bool(claim.busy))
            if outcomes:
                report.reason = (
                    f"event time is {now - ring_ends_at + self.ring_window:.0f}s old, "
                    f"past the {self.ring_window:.0f}s ring window"
                )
        else:
            stop_at = min(deadline, ring_ends_at)
            pushes = [
                self._push_with_retries(reg, call, event.id, ring_ends_at, stop_at, claim)
                for reg in claim.to_send
            ]
            # Every device at once; a lone device needs no task of its own.
            outcomes = (
                [await pushes[0]] if len(pushes) == 1 else list(await asyncio.gather(*pushes))
            )
            report.status = _event_status([*outcomes, *claim.settled], bool(claim.busy))
            if claim.busy:
                report.reason = f"{len(claim.busy)} device(s) in flight under another claim"

        report.deliveries = [*outcomes, *claim.settled, *claim.busy]
        record.status = report.status
        record.reason = report.reason
        await self._settle(record, outcomes, deadline)
        return report

    async def _route_call(
        self, event: Event, call: CallPush, ring_ends_at: float, deadline: float
    ) -> EventReport | None:
        """Routing's hook: a settled report (redirected, rejected, ignored, failed), or None to
        push, possibly to another identity (a push rule's target)."""
        assert self.call_router is not None
        context = event.data.get("incomingCallContext", "") if isinstance(event.data, dict) else ""
        routed = await self.call_router.route(
            event.envelope,
            event_id=event.id,
            callee=call.recipient_id,
            correlation_id=call.call_id,
            context=str(context),
            ring_ends_at=ring_ends_at,
            deadline=deadline,
        )
        if routed.status is None:
            if routed.note:
                log.info("call %s: %s", call.call_id, routed.note)
            if routed.push_to is not None:
                call.recipient_id = routed.push_to
            return None
        report = EventReport(
            event.id,
            event.type,
            routed.status,
            routed.reason,
            correlation_id=call.call_id,
            recipient=call.recipient_id,
        )
        await self._record(report, time.time())
        return report

    async def _settle(
        self, record: EventRecord, outcomes: list[DeliveryOutcome], deadline: float
    ) -> None:
        """Record the outcomes; the pushes are already out, so a write that fails (a database
        connection dropped) is tried again: an unrecorded push would be pushed again by Event
        Grid's redelivery once its claim's lease ends."""
        for pause in (0.05, 0.25, None):
            try:
                await self.store.settle_deliveries(record, outcomes, time.time())
                return
            except Exception:
                if pause is None or time.time() + pause >= deadline + 2:
                    raise
                log.warning("recording outcomes of event %s failed; retrying", record.event_id)
                await asyncio.sleep(pause)

    def _outcome(
        self,
        reg: Registration,
        status: DeliveryStatus,
        reason: str,
        claim: Claim,
        attempts: int = 0,
        provider: str = "",
        provider_ref: str | None = None,
    ) -> DeliveryOutcome:
        earlier = claim.attempts.get((reg.identity, reg.device_id), 0)
        return DeliveryOutcome(
            identity=reg.identity,
            device_id=reg.device_id,
            platform=reg.platform,
            status=status,
            reason=reason,
            attempts=earlier + attempts,
            provider=provider,
            provider_ref=provider_ref,
            token_fingerprint=fingerprint(reg.token),
        )

    async def _push_with_retries(
        self,
        reg: Registration,
        call: CallPush,
        event_id: str,
        ring_ends_at: float,
        stop_at: float,
        claim: Claim,
    ) -> DeliveryOutcome:
        provider = self.router.for_registration(reg)
        if provider is None:
            app = f" app {reg.app_id}" if reg.app_id else ""
            return self._outcome(
                reg,
                DeliveryStatus.CONFIG_ERROR,
                f"no transport configured for {reg.platform.value}{app}",
                claim,
            )
        limit = self._limits[id(provider)]
        push_id = str(uuid.uuid4())
        attempts = 0
        result = PushResult(DeliveryStatus.TRANSIENT, "not attempted")
        while attempts < MAX_ATTEMPTS_PER_DELIVERY:
            remaining = stop_at - time.time()
            if remaining <= 0:
                break
            attempts += 1
            started = time.perf_counter()
            if limit.count >= limit.limit:
                result = PushResult(
                    DeliveryStatus.TRANSIENT,
                    f"{provider.name} overloaded: {limit.count} pushes in flight (limit)",
                )
            else:
                limit.count += 1
                try:
                    result = await provider.send(
                        PushRequest(push_id, reg, call, ring_ends_at, remaining, event_id)
                    )
                finally:
                    limit.count -= 1
            self.metrics.push_attempt(
                provider.name,
                reg.platform.value,
                result.status.value,
                time.perf_counter() - started,
            )
            if result.status is not DeliveryStatus.TRANSIENT:
                break
            delay = backoff(attempts)
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            if time.time() + delay >= stop_at:
                break
            await asyncio.sleep(delay)

        if result.remove_token:
            await self._prune(reg, provider.name, result)
        status, reason = result.status, result.reason
        # When the ring ends before our deadline, a later retry (Event Grid's included) would
        # come too late: the push is expired, not pending.
        if status is DeliveryStatus.TRANSIENT and (
            ring_ends_at <= stop_at or time.time() >= ring_ends_at
        ):
            status, reason = DeliveryStatus.EXPIRED, f"ring window ended; last error: {reason}"
        if status is not DeliveryStatus.ACCEPTED:
            log.warning(
                "push %s to %s device %s (%s, token %s) %s after %d attempt(s): %s",
                push_id,
                reg.identity,
                reg.device_id,
                provider.name,
                fingerprint(reg.token),
                status.value,
                attempts,
                reason,
            )
        return self._outcome(
            reg, status, reason, claim, attempts, provider.name, result.provider_ref
        )

    async def _prune(self, reg: Registration, provider: str, result: PushResult) -> None:
        """The provider says the token is dead: remove the registration, keep an audit record."""
        try:
            removed = await self.store.prune_registration(
                reg, f"{provider}: {result.reason}", time.time(), result.removed_after
            )
        except Exception:
            # The outcome is recorded either way; the next push will learn it again.
            log.exception("could not prune registration %s/%s", reg.identity, reg.device_id)
            return
        if removed:
            self.metrics.registrations.labels("pruned").inc()
            log.info(
                "registration %s/%s (%s, token %s) removed: %s",
                reg.identity,
                reg.device_id,
                provider,
                fingerprint(reg.token),
                result.reason,
            )


def _event_status(outcomes: list[DeliveryOutcome], busy: bool) -> EventStatus:
    if busy or any(not o.status.settled for o in outcomes):
        return EventStatus.PENDING
    if all(o.status is DeliveryStatus.ACCEPTED for o in outcomes):
        return EventStatus.DELIVERED
    if all(o.status is DeliveryStatus.EXPIRED for o in outcomes):
        return EventStatus.EXPIRED
    return EventStatus.FAILED


_KNOWN_PREFIX = "Microsoft."


def _type_label(event_type: str) -> str:
    # Bound the metric's label set: arbitrary strings from the wire must not create series.
    if event_type.startswith(_KNOWN_PREFIX) and len(event_type) <= 80:
        return event_type
    return "other"
