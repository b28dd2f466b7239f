"""Domain types shared by the store, the payload builders, the providers and the dispatcher."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from ringrelay.redact import fingerprint


class Platform(StrEnum):
    """The push network a device token belongs to."""

    APNS = "apns"
    FCM = "fcm"  # FCM HTTP v1
    GCM = "gcm"  # legacy FCM/GCM format, reachable only through Notification Hubs
    WNS = "wns"
    ADM = "adm"
    BAIDU = "baidu"


class PushKind(StrEnum):
    """`voip` tokens (PushKit on iOS) ring calls; `alert` tokens show notifications (chat)."""

    VOIP = "voip"
    ALERT = "alert"


class ChatFormat(StrEnum):
    """How chat messages reach an `alert` registration (ringrelay.chat)."""

    NOTIFICATION = "notification"  # a visible alert built by ringrelay
    SDK = "sdk"  # the ACS Chat SDK's encrypted data push, decrypted by the app with its key


class DeliveryStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # claimed, push under way
    ACCEPTED = "accepted"  # the provider took it
    REJECTED = "rejected"  # the provider refused it for good (bad token, bad payload)
    CONFIG_ERROR = "config_error"  # our credentials/endpoint are wrong; a retry cannot fix it
    TRANSIENT = "transient"  # may succeed later: Event Grid's retry will push again
    EXPIRED = "expired"  # the ring window ended before it could be delivered
    CANCELLED = "cancelled"  # no longer wanted: the call stopped ringing before it went out

    @property
    def settled(self) -> bool:
        return self not in (DeliveryStatus.IN_FLIGHT, DeliveryStatus.TRANSIENT)


class EventStatus(StrEnum):
    DELIVERED = "delivered"  # every device accepted
    FAILED = "failed"  # settled, but some device was refused
    PENDING = "pending"  # a transient failure remains: answered 503 for Event Grid to retry
    EXPIRED = "expired"  # older than the ring window
    REJECTED = "rejected"  # malformed event
    NO_DEVICES = "no_devices"  # nobody to push to
    IGNORED = "ignored"  # event type we do not handle (or a routing rule said ignore)
    REDIRECTED = "redirected"  # routing: Call Automation redirected the call
    CALL_REJECTED = "call_rejected"  # routing: Call Automation rejected the call
    CANCELLED = "cancelled"  # the call had already stopped ringing: nothing pushed
    MUTED = "muted"  # a chat message in a thread its recipient muted: recorded, not pushed


# ACS raw identifiers (../shared/notes/acs-payloads.md §1.7). Anything that is not one of these
# shapes is refused at registration: a typo would otherwise store a registration that never rings.
# Applied with fullmatch: `$` would also match before a trailing newline.
RAW_ID_RE = re.compile(
    r"(?:"
    r"8:(?:acs|gcch-acs|dod-acs|spool|orgid|gcch|dod|teamsvisitor):[A-Za-z0-9._\-]{1,200}"
    r"|28:(?:orgid|gcch|dod):[A-Za-z0-9._\-]{1,200}"
    r"|4:\+?[0-9]{3,20}"
    r")"
)


def is_raw_id(value: str) -> bool:
    return RAW_ID_RE.fullmatch(value) is not None


# Not frozen (frozen init costs ~5x), but never changed once built: the SQLite store shares
# one object with every push of its identity (store/sqlite.py, push_targets).
@dataclass(slots=True)
class Registration:
    identity: str  # ACS rawId of the callee
    device_id: str  # chosen by the app, stable per install
    platform: Platform
    token: str
    push_kind: PushKind
    app_id: str | None
    created_at: float
    updated_at: float
    expires_at: float
    chat_format: ChatFormat = ChatFormat.NOTIFICATION
    # The app's chat key sealed by ringrelay.chat.keys (never the key itself); `sdk` format only.
    chat_key: str | None = None
    # `redact.fingerprint(token)`, filled on first use: every push's outcome carries it, and a
    # SHA-256 per device per event was 0.5 % of a five-device IncomingCall's instructions
    # (callgrind). A cache, not a change: the object is otherwise never changed once built.
    _token_fingerprint: str = field(default="", init=False, repr=False, compare=False)

    def token_fingerprint(self) -> str:
        fp = self._token_fingerprint
        if not fp:
            fp = self._token_fingerprint = fingerprint(self.token)
        return fp


# Not frozen (frozen init costs ~5x), but never changed once built: the SQLite store shares
# one object with every push of its identity (store/sqlite.py, push_targets).
@dataclass(slots=True)
class DeliveryOutcome:
    """One device's result for one event, as recorded in the ledger."""

    identity: str
    device_id: str
    platform: Platform
    status: DeliveryStatus
    reason: str = ""
    attempts: int = 0
    provider: str = ""
    provider_ref: str | None = None  # e.g. apns-id / Notification Hubs notification id
    token_fingerprint: str = ""


@dataclass(slots=True)
class EventRecord:
    event_id: str
    event_type: str
    status: EventStatus
    reason: str = ""
    correlation_id: str | None = None
    recipient: str | None = None
    received_at: float = 0.0
    deliveries: list[DeliveryOutcome] = field(default_factory=list)
    # Calls: who called, ACS's second call key, and when the phone stops ringing; a stop push
    # needs all three, and the call context is never stored.
    caller: str | None = None
    server_call_id: str | None = None
    expires_at: float | None = None


# Ids are stored as text, and PostgreSQL's cannot hold U+0000: a record holding one would fail on
# every retry. No Event Grid id or type, ACS raw id or correlation id has a control character.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control_character(text: str) -> bool:
    """True when `text` holds an ASCII control character. Printable ASCII (every id seen) is
    settled in C without the regex: this runs several times per event on the hot path."""
    if text.isascii() and text.isprintable():
        return False
    return _CONTROL.search(text) is not None
