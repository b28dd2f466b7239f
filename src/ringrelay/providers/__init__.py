"""Delivery providers: one file per transport, each implementing `PushProvider`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ringrelay.delivery.plan import PushContent
from ringrelay.models import DeliveryStatus, Platform, Registration


@dataclass(slots=True)  # not frozen: built per push, and frozen init costs ~5x
class PushRequest:
    push_id: str  # our UUID for this attempt series; sent as apns-id where the transport allows
    registration: Registration
    content: PushContent
    expires_at: float  # unix time at which the phone stops ringing: never deliver after it
    timeout: float  # seconds this attempt may take
    event_id: str = ""


@dataclass(slots=True)  # not frozen: built per push, and frozen init costs ~5x
class PushResult:
    status: DeliveryStatus  # ACCEPTED, REJECTED, CONFIG_ERROR or TRANSIENT
    reason: str = ""
    http_status: int | None = None
    retry_after: float | None = None  # seconds, from the provider's Retry-After
    provider_ref: str | None = None
    remove_token: bool = False  # the provider says the token is dead: prune the registration
    removed_after: float | None = None  # ...unless re-registered after this (APNs 410 timestamp)


class PushProvider(Protocol):
    name: str  # metric label: the transport
    description: str  # for start-up and /readyz: which endpoint, which app
    max_in_flight: int  # pushes under way at once; beyond it a push fails fast (transient)

    def supports(self, platform: Platform) -> bool: ...

    async def send(self, request: PushRequest) -> PushResult:
        """One attempt. Never raises for network or provider errors: classifies them instead."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; HTTP dates are rare here)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            import time

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds)
