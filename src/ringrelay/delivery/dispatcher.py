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
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from ringrelay.delivery.plan import Decision, PushPlan
from ringrelay.delivery.router import ProviderRouter
from ringrelay.events.ingest import Event
from ringrelay.events.kind import Context, EventKind, StoppedCalls
from ringrelay.logs import bind
from ringrelay.metrics import Metrics, reason_label
from ringrelay.models import (
    DeliveryOutcome,
    DeliveryStatus,
    EventRecord,
    EventStatus,
    Registration,
)
from ringrelay.ops.calllog import CallLog
from ringrelay.providers import PushRequest, PushResult
from ringrelay.redact import fingerprint
from ringrelay.store import Claim, Store

log = logging.getLogger("ringrelay.delivery")

# Backoff between attempts: 100 ms doubling to 2 s, each drawn from [50 %, 150 %] so that many
# failing pushes do not retry in lockstep. The first retry comes well under a second.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
MAX_ATTEMPTS_PER_DELIVERY = 8


def new_push_id() -> str:
    """A random (version 4) UUID in its canonical text form: the `apns-id` every push carries
    (Apple: "a canonical UUID that's 32 lowercase hexadecimal digits, displayed in five groups").
    From the process's Mersenne Twister rather than `str(uuid.uuid4())`: an id needs to be
    unique, not secret, and uuid4's object and syscall cost ~1 % of an IncomingCall."""
    h = f"{random.getrandbits(128):032x}"
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


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
            # Chat events are recorded under their message id where a call keeps its callId.
            chat = self.event_type.startswith("Microsoft.Communication.Chat")
            out["messageId" if chat else "callId"] = self.correlation_id
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


class _InFlight:
    """Plans of one call being pushed in this process; `done` is set when the last ends."""

    __slots__ = ("count", "done")

    def __init__(self) -> None:
        self.count = 0
        self.done: asyncio.Future[None] | None = None


class Dispatcher:
    """Executes what the event kinds decide: claims in the ledger, every device at once, retries
    inside the plan's window and the webhook's deadline, outcomes recorded, dead tokens pruned."""

    def __init__(
        self,
        store: Store,
        router: ProviderRouter,
        metrics: Metrics,
        *,
        ring_window_seconds: float,
        kinds: dict[str, EventKind] | None = None,
        call_log: CallLog | None = None,
    ) -> None:
        self.store = store
        self.calls = call_log or CallLog()  # recent attempts, for traces
        self.router = router
        self.metrics = metrics
        self.ring_window = ring_window_seconds
        self.kinds = kinds if kinds is not None else {}
        self.stopped = StoppedCalls()
        # Single flight: a duplicate delivery of an event being handled in this process waits
        # for the first instead of racing it.
        self._inflight: dict[str, asyncio.Future[EventReport]] = {}
        # Plans being pushed now, by call: a stop of the call waits for them.
        self._pushing: dict[str, _InFlight] = {}
        self._limits: dict[int, InFlightLimit] = {
            id(p): InFlightLimit(p.max_in_flight) for p in router.providers()
        }

    def context(self, received_at: float, deadline: float) -> Context:
        return Context(
            self.store, self.ring_window, received_at, deadline, self.stopped, self._pushes_of
        )

    def _pushes_of(self, call_id: str) -> list[Awaitable[object]]:
        flight = self._pushing.get(call_id)
        if flight is None:
            return []
        if flight.done is None:  # made only when a stop waits: a ring alone needs none
            flight.done = asyncio.get_running_loop().create_future()
        return [flight.done]

    async def handle(self, event: Event, received_at: float, deadline: float) -> EventReport:
        kind = None if event.error else self.kinds.get(event.type)
        if event.error:
            report = EventReport(event.id, event.type, EventStatus.REJECTED, event.error)
            await self._record(report, received_at)
        elif kind is None:
            report = EventReport(
                event.id, event.type, EventStatus.IGNORED, "event type not handled"
            )
        elif (running := self._inflight.get(event.id)) is not None:
            report = await asyncio.shield(running)
        else:
            # Single flight: the first handles the event, duplicates wait for its report.
            future: asyncio.Future[EventReport] = asyncio.get_running_loop().create_future()
            self._inflight[event.id] = future
            try:
                decision = await kind.decide(event, self.context(received_at, deadline))
                report = await self.execute(decision, received_at, deadline)
                future.set_result(report)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters re-raise, nobody else needs to
                raise
            finally:
                del self._inflight[event.id]
        self.metrics.event(_type_label(event.type), report.status)
        return report

    async def execute(self, decision: Decision, received_at: float, deadline: float) -> EventReport:
        """Push every plan of `decision` (at once) and record the event with their outcome."""
        record = decision.record
        report = EventReport(
            record.event_id,
            record.event_type,
            record.status,
            record.reason,
            correlation_id=record.correlation_id,
            recipient=record.recipient,
        )
        plans = decision.plans
        if not plans:
            await self._record_event(record, received_at)
            if record.status is not EventStatus.IGNORED:
                log.info("event %s %s: %s", record.event_id, record.status.value, record.reason)
            return report
        # Plans of a call under way: a stop of the call waits for them (`_pushes_of`).
        calls = [p.record.correlation_id for p in plans if p.record.correlation_id is not None]
        for call_id in calls:
            self._pushing.setdefault(call_id, _InFlight()).count += 1
        try:
            if len(plans) == 1:  # the common case: no task of its own
                results = [await self._execute_plan(plans[0], deadline)]
            else:
                results = list(
                    await asyncio.gather(*(self._execute_plan(p, deadline) for p in plans))
                )
        finally:
            for call_id in calls:
                flight = self._pushing[call_id]
                flight.count -= 1
                if not flight.count:
                    del self._pushing[call_id]
                    if flight.done is not None:
                        flight.done.set_result(None)
        pending = False
        for outcomes, busy in results:
            report.deliveries += outcomes
            pending = pending or busy
        if len(plans) == 1 and plans[0].record is record:
            report.status, report.reason = record.status, record.reason
            return report
        report.status = _event_status(report.deliveries, pending)
        if pending:
            report.reason = "some devices are still in flight; retry"
        record.status, record.reason = report.status, report.reason or record.reason
        await self._record_event(record, time.time())
        return report

    async def _record(self, report: EventReport, now: float) -> None:
        await self._record_event(
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

    async def _record_event(self, record: EventRecord, now: float) -> None:
        if not record.received_at:
            record.received_at = now
        await self.store.record_event(record, now)

    async def _execute_plan(
        self, plan: PushPlan, deadline: float
    ) -> tuple[list[DeliveryOutcome], bool]:
        """One plan: returns every device's outcome and whether any is still unsettled."""
        record = plan.record
        bind(eventId=record.event_id, callId=record.correlation_id)  # on every line logged
        now = time.time()
        # The lease outlives this request's deadline a little, so a crashed process's claims are
        # taken over by the next delivery attempt, and a live one's are not.
        if plan.targets is None:
            targets, claim = await self.store.claim_callee(
                record, plan.identity, plan.kind, now, lease_until=deadline + 5
            )
        else:
            targets = plan.targets
            claim = (
                await self.store.claim_deliveries(record, targets, now, lease_until=deadline + 5)
                if targets
                else Claim()
            )
        if not targets and not plan.waiting:
            record.status = EventStatus.NO_DEVICES
            record.reason = plan.no_targets_reason
            await self._record_event(record, now)
            return [], False

        if now >= plan.expires_at:
            outcomes = [
                self._outcome(reg, DeliveryStatus.EXPIRED, plan.expired_reason, claim)
                for reg in claim.to_send
            ]
            # A redelivery of a call that was pushed in time keeps its earlier outcomes.
            busy = bool(claim.busy or plan.waiting)
            record.status = _event_status([*outcomes, *claim.settled], busy)
            if outcomes:
                record.reason = plan.expired_reason
        else:
            stop_at = min(deadline, plan.expires_at)
            to_push = claim.to_send
            skipped: list[DeliveryOutcome] = []
            if plan.skip:
                to_push = [r for r in claim.to_send if r.device_id not in plan.skip]
                skipped = [
                    self._outcome(r, DeliveryStatus.CANCELLED, plan.skip[r.device_id], claim)
                    for r in claim.to_send
                    if r.device_id in plan.skip
                ]
            pushes = [self._push_with_retries(reg, plan, stop_at, claim) for reg in to_push]
            # Every device at once; a lone device needs no task of its own.
            outcomes = (
                [await pushes[0]] if len(pushes) == 1 else list(await asyncio.gather(*pushes))
            )
            outcomes += skipped
            busy = bool(claim.busy or plan.waiting)
            record.status = _event_status([*outcomes, *claim.settled], busy)
            if claim.busy or plan.waiting:
                held = len(claim.busy) + len(plan.waiting)
                record.reason = f"{held} device(s) in flight under another claim"
            accepted_at = self.calls.first_accepted(record.event_id)
            if accepted_at is not None and plan.started_at is not None:
                self.metrics.first_push(plan.started_at, record.received_at, accepted_at)
        for outcome in outcomes:
            self.metrics.push_outcome(outcome.provider, outcome.platform, outcome.status)

        await self._settle(record, outcomes, deadline)
        return [*outcomes, *claim.settled, *claim.busy, *plan.waiting], busy

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
            token_fingerprint=reg.token_fingerprint(),
        )

    async def _push_with_retries(
        self, reg: Registration, plan: PushPlan, stop_at: float, claim: Claim
    ) -> DeliveryOutcome:
        bind(deviceId=reg.device_id)
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
        content = plan.content if plan.content_for is None else plan.content_for(reg)
        ends_at = plan.expires_at
        push_id = new_push_id()
        attempts = 0
        result = PushResult(DeliveryStatus.TRANSIENT, "not attempted")
        while attempts < MAX_ATTEMPTS_PER_DELIVERY:
            remaining = stop_at - time.time()
            if remaining <= 0:
                break
            if attempts and plan.cancelled is not None and await plan.cancelled():
                result = PushResult(DeliveryStatus.CANCELLED, "the call stopped ringing")
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
                        PushRequest(push_id, reg, content, ends_at, remaining, plan.record.event_id)
                    )
                finally:
                    limit.count -= 1
            elapsed = time.perf_counter() - started
            self.metrics.push_attempt(
                provider.name,
                reg.platform,
                result.status,
                elapsed,
                reason_label(result.reason, result.http_status),
                attempts > 1,
            )
            self.calls.attempt(
                plan.record.event_id, reg, attempts, provider, result, elapsed, time.time()
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
        if status is DeliveryStatus.TRANSIENT and (ends_at <= stop_at or time.time() >= ends_at):
            status = DeliveryStatus.EXPIRED
            reason = f"{plan.window} ended; last error: {reason}"
        if status not in (DeliveryStatus.ACCEPTED, DeliveryStatus.CANCELLED):
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
        if status is DeliveryStatus.ACCEPTED and not reason:
            reason = plan.record.reason  # a stop's accepted push says who stopped the ringing
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
            self.metrics.pruned.labels(
                provider, reason_label(result.reason, result.http_status)
            ).inc()
            log.info(
                "registration %s/%s (%s, token %s) removed: %s",
                reg.identity,
                reg.device_id,
                provider,
                fingerprint(reg.token),
                result.reason,
            )


_ONE_OUTCOME = {
    DeliveryStatus.ACCEPTED: EventStatus.DELIVERED,
    DeliveryStatus.CANCELLED: EventStatus.CANCELLED,
    DeliveryStatus.EXPIRED: EventStatus.EXPIRED,
}


def _event_status(outcomes: list[DeliveryOutcome], busy: bool) -> EventStatus:
    if len(outcomes) == 1 and not busy:  # one device: what the loops below would say
        status = outcomes[0].status
        if not status.settled:
            return EventStatus.PENDING
        return _ONE_OUTCOME.get(status, EventStatus.FAILED)
    if busy or any(not o.status.settled for o in outcomes):
        return EventStatus.PENDING
    if all(o.status in (DeliveryStatus.ACCEPTED, DeliveryStatus.CANCELLED) for o in outcomes):
        # Cancelled: not wanted any more (the call stopped), which is no failure.
        if all(o.status is DeliveryStatus.CANCELLED for o in outcomes):
            return EventStatus.CANCELLED
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
