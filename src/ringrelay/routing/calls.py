"""Where an IncomingCall goes: rules in order, then number assignment, else a push to `data.to`;
a redirect or reject is done through Call Automation once per call leg, with a loop guard.

The loop (learn.microsoft.com azure/communication-services/concepts/call-automation/
incoming-call-notification): a redirect raises a second IncomingCall for the new callee, and one
subscription receives both. ringrelay tells the two apart by its own ledger: a call leg whose
correlationId has a redirect of ours *to this callee* (claimed before the request is sent, so
the follow-up cannot overtake it) is pushed, never routed again. Beyond that, a call is never
redirected to its own callee, nor more than RINGRELAY_MAX_REDIRECTS times. Not confirmed by any
source: that the follow-up keeps the first event's correlationId. If it did not, the own-callee
guard still stops the usual loop (the follow-up's callee is the redirect's target), but not a
chain of rules redirecting A to B and B back to A.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ringrelay.models import DeliveryStatus, EventStatus
from ringrelay.routing.callautomation import ActionResult, CallAutomation, repeatability_id
from ringrelay.routing.numbers import phone_number_of
from ringrelay.routing.rules import Rule, first_match
from ringrelay.store import CallAction, Store

log = logging.getLogger("ringrelay.routing")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one IncomingCall, and why."""

    action: str  # push | redirect | reject | ignore
    target: str | None  # push: identity to ring; redirect: new callee; reject: reason
    why: str  # "rule 'x'", "number +1425…", "no rule matched", "follow-up of our redirect"


@dataclass(slots=True)
class Routed:
    """The routing's answer: a settled report (`status`), or push to `push_to`."""

    decision: Decision
    status: EventStatus | None = None
    reason: str = ""
    push_to: str | None = None
    note: str = ""  # why a push happened instead of the rule's action (loop guard)


# A redirect the service refused raised no follow-up; any other (done, in flight, or unanswered:
# a timed-out request may have been carried out) may have.
_REFUSED = (DeliveryStatus.REJECTED.value, DeliveryStatus.CONFIG_ERROR.value)


def _backoff(attempt: int) -> float:
    return float(min(2.0, 0.1 * 2 ** (attempt - 1))) * random.uniform(0.5, 1.5)


class CallRouter:
    def __init__(
        self,
        rules: Sequence[Rule],
        store: Store,
        call_automation: CallAutomation | None,
        *,
        max_redirects: int = 1,
    ) -> None:
        self.rules = list(rules)
        self.store = store
        self.call_automation = call_automation
        self.max_redirects = max_redirects

    @property
    def active(self) -> bool:
        return bool(self.rules) or self.call_automation is not None

    # --- deciding --------------------------------------------------------------------------

    async def decide(self, envelope: Any, callee: str, correlation_id: str) -> Decision:
        if self.call_automation is not None:
            for action in await self.store.call_actions(correlation_id):
                if (
                    action.kind == "redirect"
                    and action.target == callee
                    and action.callee != callee
                    and action.status not in _REFUSED
                ):
                    return Decision("push", callee, "follow-up IncomingCall of our redirect")
        match = first_match(self.rules, envelope) if isinstance(envelope, dict) else None
        if match is not None:
            rule = match.rule
            why = f"rule {rule.name!r}"
            if rule.action == "push":
                return Decision("push", rule.target or callee, why)
            if rule.action == "reject":
                return Decision("reject", rule.reason or "none", why)
            return Decision(rule.action, rule.target, why)
        number = phone_number_of(callee)
        if number is not None and self.call_automation is not None:
            assigned = await self.store.get_number(number)
            if assigned is not None:
                return Decision("redirect", assigned.target, f"number {number}")
        return Decision("push", callee, "no rule matched")

    # --- acting ----------------------------------------------------------------------------

    async def route(
        self,
        envelope: Any,
        *,
        event_id: str,
        callee: str,
        correlation_id: str,
        context: str,
        ring_ends_at: float,
        deadline: float,
    ) -> Routed:
        decision = await self.decide(envelope, callee, correlation_id)
        if decision.action == "push":
            return Routed(decision, push_to=decision.target)
        if decision.action == "ignore":
            return Routed(decision, EventStatus.IGNORED, f"{decision.why}: ignore")
        assert decision.target is not None
        if decision.action == "redirect" and decision.target == callee:
            note = f"loop guard: {decision.why} redirects the call to its own callee; pushed"
            return Routed(decision, push_to=callee, note=note)
        if self.call_automation is None:  # config validation prevents it; be explicit anyway
            return Routed(
                decision,
                EventStatus.FAILED,
                f"{decision.why}: {decision.action} needs Call Automation "
                "(RINGRELAY_ACS_CONNECTION_STRING)",
            )
        now = time.time()
        action = CallAction(
            correlation_id=correlation_id,
            callee=callee,
            event_id=event_id,
            kind=decision.action,
            target=decision.target,
            status=DeliveryStatus.IN_FLIGHT.value,
            request_id=repeatability_id(correlation_id, callee, decision.action),
            first_sent=now,
        )
        claim = await self.store.claim_call_action(
            action, now, lease_until=deadline + 5, max_redirects=self.max_redirects
        )
        if claim.limit_reached:
            note = (
                f"loop guard: the call was already redirected {self.max_redirects} time(s) "
                "(RINGRELAY_MAX_REDIRECTS); pushed"
            )
            return Routed(decision, push_to=callee, note=note)
        if not claim.claimed:
            assert claim.action is not None
            return Routed(decision, *self._earlier(decision, claim.action))
        return await self._perform(decision, action, context, ring_ends_at, deadline)

    def _earlier(self, decision: Decision, action: CallAction) -> tuple[EventStatus, str]:
        """A redelivery (or another instance) finds the action claimed: its recorded outcome."""
        status = DeliveryStatus(action.status)
        if status is DeliveryStatus.IN_FLIGHT:
            return EventStatus.PENDING, f"{decision.why}: {action.kind} in flight elsewhere"
        return self._outcome(decision, action.kind, action.target, status, action.reason)

    def _outcome(
        self, decision: Decision, kind: str, target: str, status: DeliveryStatus, reason: str
    ) -> tuple[EventStatus, str]:
        what = f"redirected to {target}" if kind == "redirect" else f"rejected ({target})"
        if status is DeliveryStatus.ACCEPTED:
            done = EventStatus.REDIRECTED if kind == "redirect" else EventStatus.CALL_REJECTED
            return done, f"{decision.why}: {what}"
        if status is DeliveryStatus.CONFIG_ERROR:
            return (
                EventStatus.FAILED,
                f"{decision.why}: {kind} failed, configuration error: {reason}",
            )
        if status is DeliveryStatus.EXPIRED:
            return (
                EventStatus.EXPIRED,
                f"{decision.why}: {kind} not done in the ring window: {reason}",
            )
        if status is DeliveryStatus.TRANSIENT:
            return EventStatus.PENDING, f"{decision.why}: {kind} failed for now: {reason}"
        return EventStatus.FAILED, f"{decision.why}: {kind} refused by Call Automation: {reason}"

    async def _perform(
        self,
        decision: Decision,
        action: CallAction,
        context: str,
        ring_ends_at: float,
        deadline: float,
    ) -> Routed:
        assert self.call_automation is not None
        stop_at = min(deadline, ring_ends_at)
        result = ActionResult(DeliveryStatus.EXPIRED, "the ring window had ended")
        attempts = 0
        while attempts < 8 and time.time() < stop_at:
            attempts += 1
            budget = stop_at - time.time()
            if action.kind == "redirect":
                result = await self.call_automation.redirect(
                    context, action.target, action.request_id, action.first_sent, budget
                )
            else:
                result = await self.call_automation.reject(
                    context, action.target, action.request_id, action.first_sent, budget
                )
            if result.status is not DeliveryStatus.TRANSIENT:
                break
            delay = _backoff(attempts)
            if time.time() + delay >= stop_at:
                break
            await asyncio.sleep(delay)
        status = result.status
        if status is DeliveryStatus.TRANSIENT and (
            ring_ends_at <= stop_at or time.time() >= ring_ends_at
        ):
            status = DeliveryStatus.EXPIRED
        action.status = status.value
        action.reason = result.reason
        action.attempts += attempts
        await self.store.settle_call_action(action, time.time())
        if status is DeliveryStatus.CONFIG_ERROR:
            log.error("call %s: %s", action.correlation_id, result.reason)
        elif status is not DeliveryStatus.ACCEPTED:
            log.warning(
                "call %s: %s to %s %s after %d attempt(s): %s",
                action.correlation_id,
                action.kind,
                action.target,
                status.value,
                attempts,
                result.reason,
            )
        report_status, reason = self._outcome(
            decision, action.kind, action.target, status, result.reason
        )
        return Routed(decision, report_status, reason)


def build_call_router(settings: Any, store: Store) -> CallRouter:
    """The router from the settings (Call Automation only when configured)."""
    call_automation = None
    if settings.call_automation_configured:
        call_automation = CallAutomation(
            connection_string=(
                settings.acs_connection_string.get_secret_value()
                if settings.acs_connection_string is not None
                else None
            ),
            endpoint=settings.acs_endpoint,
            ca_file=str(settings.acs_ca_file) if settings.acs_ca_file else None,
            timeout=settings.acs_timeout_seconds,
        )
    return CallRouter(settings.rules, store, call_automation, max_redirects=settings.max_redirects)
