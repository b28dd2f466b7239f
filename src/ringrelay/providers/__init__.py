"""Delivery providers: one file per transport, each implementing `PushProvider`."""

from __future__ import annotations

import ssl
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


def certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind `exc`, if that is what it is: looked for in
    its causes, contexts, arguments and `reason` (urllib3's MaxRetryError), since client
    libraries wrap it (google-auth -> urllib3 -> ssl)."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        if isinstance(item, ssl.SSLCertVerificationError):
            return item
        seen.add(id(item))
        pending += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return None


def certificate_result(where: str, error: ssl.SSLCertVerificationError, fix: str) -> PushResult:
    """A certificate that does not verify is our configuration (the CA to trust, the endpoint's
    name), never a passing failure: settled at once, saying which setting fixes it."""
    detail = error.verify_message or str(error)
    return PushResult(
        DeliveryStatus.CONFIG_ERROR,
        f"TLS certificate of {where} not trusted ({detail}): check the endpoint, or trust the "
        f"CA that signed it with {fix}",
    )
