"""Registration rules shared by the native API and the sample-compatible routes."""

from __future__ import annotations

import re
import time

from ringrelay.models import ChatFormat, Platform, PushKind, Registration, is_raw_id
from ringrelay.store import Store

# Every pattern here is applied with fullmatch: `$` would also match before a trailing newline.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
APP_ID_RE = re.compile(r"[A-Za-z0-9._\-]{1,255}")
HEX_RE = re.compile(r"[0-9a-fA-F]+")
# FCM, ADM and Baidu tokens are opaque: bounded, printable, no whitespace.
OPAQUE_TOKEN_RE = re.compile(r"[A-Za-z0-9_:\-.=+/]{1,4096}")
# A WNS channel is an https URI (WinRT PushNotificationChannel.Uri), and a URI is printable ASCII,
# anything else percent-encoded (RFC 3986 §2): a NUL or a non-Latin-1 character is no channel, and
# could not even be sent in the Notification Hubs device-handle header.
WNS_CHANNEL_RE = re.compile(r"https://[\x21-\x7e]{1,2040}")
MAX_APNS_TOKEN_HEX = 400  # Apple: "device tokens are of variable length"; 200 bytes is generous


class RegistrationError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_identity(identity: str) -> None:
    if not is_raw_id(identity):
        raise RegistrationError(
            "identity", "not an ACS raw identifier (e.g. 8:acs:<resource>_<user>, 8:orgid:<id>)"
        )


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise RegistrationError("device_id", "1-128 characters of A-Z a-z 0-9 . _ : -")


def check_token(platform: Platform, token: str) -> None:
    if not token:
        raise RegistrationError("token", "empty")
    if platform is Platform.APNS:
        # The token is binary, sent as hex in the :path (Apple, "Sending notification requests").
        if not HEX_RE.fullmatch(token) or len(token) % 2:
            raise RegistrationError("token", "APNs tokens are an even-length hexadecimal string")
        if not 16 <= len(token) <= MAX_APNS_TOKEN_HEX:
            raise RegistrationError(
                "token", f"APNs token length must be 16-{MAX_APNS_TOKEN_HEX} hex digits"
            )
    elif platform is Platform.WNS:
        if not WNS_CHANNEL_RE.fullmatch(token):
            raise RegistrationError(
                "token",
                "WNS tokens are https:// channel URIs of <= 2048 printable ASCII characters",
            )
    elif not OPAQUE_TOKEN_RE.fullmatch(token):
        raise RegistrationError(
            "token", f"{platform.value} tokens are 1-4096 printable characters without spaces"
        )


def normalise_token(platform: Platform, token: str) -> str:
    """The one spelling a token is stored under. An APNs token is hex for binary bytes, so its
    case carries nothing: one phone registered as `AB…` and `ab…` is one device, and must be
    stored once, or a token moving to a new identity would leave the old one ringing it too."""
    return token.lower() if platform is Platform.APNS else token


def check_app_id(app_id: str | None) -> None:
    if app_id is not None and not APP_ID_RE.fullmatch(app_id):
        raise RegistrationError("app_id", "1-255 characters of A-Z a-z 0-9 . _ -")


def build_registration(
    identity: str,
    device_id: str,
    platform: Platform,
    token: str,
    push_kind: PushKind,
    app_id: str | None,
    ttl_seconds: int,
    now: float | None = None,
    chat_format: ChatFormat = ChatFormat.NOTIFICATION,
    sealed_chat_key: str | None = None,
) -> Registration:
    """Validate every field (raising RegistrationError naming the first bad one). The chat key
    arrives sealed (ringrelay.chat.keys): the API checks and seals it before this."""
    check_identity(identity)
    check_device_id(device_id)
    check_token(platform, token)
    check_app_id(app_id)
    token = normalise_token(platform, token)
    now = time.time() if now is None else now
    return Registration(
        identity=identity,
        device_id=device_id,
        platform=platform,
        token=token,
        push_kind=push_kind,
        app_id=app_id,
        created_at=now,
        updated_at=now,
        expires_at=now + ttl_seconds,
        chat_format=chat_format,
        chat_key=sealed_chat_key,
    )


async def register(store: Store, reg: Registration) -> bool:
    """Store it; True when it is new."""
    created, _ = await store.upsert_registration(reg)
    return created
