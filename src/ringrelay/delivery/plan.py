"""What an event kind hands the dispatcher: push plans, or a final answer that needs no push.

An event-kind module (`ringrelay.events.*`) turns one parsed event into a `Decision`; the
dispatcher executes it (ledger claims, concurrent pushes, retries, outcomes, pruning) without
knowing which kind of event it came from.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ringrelay.models import DeliveryOutcome, EventRecord, EventStatus, PushKind, Registration


class PushContent(Protocol):
    """What one push says, whatever carries it. Providers build their request from this; the
    registration's `push_kind` chooses APNs's topic and push type (voip: `<bundle>.voip`)."""

    @property
    def label(self) -> str:
        """ "call", "stop", "chat": for the sandbox listing and logs."""
        ...

    @property
    def call_id(self) -> str | None:
        """The call (correlationId) the push is about, if any."""
        ...

    @property
    def collapse_id(self) -> str | None:
        """apns-collapse-id / FCM collapse_key; None for none."""
        ...

    def apns_payload(self) -> dict[str, Any]:
        """The APNs JSON body."""
        ...

    def fcm_message(self, seconds_left: float) -> dict[str, Any]:
        """The FCM HTTP v1 `message` object, without `token`."""
        ...

    def data(self) -> dict[str, Any]:
        """The app's dictionary with native JSON types (WNS raw notifications)."""
        ...

    def string_data(self) -> dict[str, str]:
        """The same with every value a string (GCM, ADM, Baidu through Notification Hubs)."""
        ...


@dataclass(slots=True)
class PushPlan:
    """Push `content` to the live `kind` registrations of `identity` (or to `targets`), once
    per device per `record.event_id` (the ledger key), no later than `expires_at`."""

    record: EventRecord
    identity: str
    kind: PushKind
    content: PushContent
    expires_at: float
    # Explicit devices (a stop goes only to the devices that rang); None: the identity's live
    # registrations of `kind`.
    targets: list[Registration] | None = None
    # Per-device content (a chat push encrypted under each device's key); None: `content`.
    content_for: Callable[[Registration], PushContent] | None = None
    no_targets_reason: str = "no live registration for the recipient"
    started_at: float | None = None  # when what is pushed happened (eventTime): for metrics
    window: str = "delivery window"  # what `expires_at` ends, in reasons: "ring window"
    expired_reason: str = "its delivery window ended before it could be pushed"
    # Checked before each retry: True when the push is no longer wanted (the call stopped).
    cancelled: Callable[[], Awaitable[bool]] | None = None
    # Devices that must settle elsewhere first (a ring in flight on another instance): shown,
    # and they keep the event pending so that Event Grid's retry finishes the job.
    waiting: list[DeliveryOutcome] = field(default_factory=list)
    # Devices claimed and settled as cancelled, with the reason, instead of pushed (the device
    # that answered gets no stop, now or from a later end event).
    skip: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Decision:
    """An event kind's answer: push `plans`, or record `record` as it is (nothing to push)."""

    # The event's own record: final as it is when there are no plans; with plans, its status
    # becomes theirs. A plan may share it (a ring's ledger key is the event) or have its own (a
    # stop's key is the call, so that redeliveries and other end events stop each device once).
    record: EventRecord
    plans: list[PushPlan] = field(default_factory=list)

    @staticmethod
    def final(
        event_id: str,
        event_type: str,
        status: EventStatus,
        reason: str,
        correlation_id: str | None = None,
        recipient: str | None = None,
    ) -> Decision:
        return Decision(
            EventRecord(event_id, event_type, status, reason, correlation_id, recipient)
        )
