"""What one chat push says, for every transport (the pipeline's `PushContent` shape: a label,
a collapse id, the APNs body, the FCM v1 message, and the data dictionaries for the hub's other
platforms). Two formats: a visible notification, and the Chat SDK's encrypted data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from ringrelay.chat import sdk_format
from ringrelay.chat.notification import Notice


def _ttl(seconds_left: float) -> str:
    return f"{max(0, math.ceil(seconds_left))}s"


@dataclass(slots=True)
class ChatNotificationContent:
    """A visible alert: title/body from the preview mode, grouped and collapsed per thread.

    APNs: `alert`, `thread-id`, `mutable-content: 1` (a Notification Service Extension may
    fetch and decorate; Apple, "Modifying content in newly delivered notifications"), `sound`.
    FCM v1: a notification message with `tag`/`collapse_key` per thread and string data."""

    notice: Notice
    collapse_id: str
    fields: dict[str, str]  # threadId, messageId, senderId (as the preview mode allows), count
    label: str = "chat"
    call_id: str | None = None

    def data(self) -> dict[str, Any]:
        return dict(self.fields)

    def string_data(self) -> dict[str, str]:
        out = dict(self.fields)
        if self.notice.title:
            out["title"] = self.notice.title
        out["body"] = self.notice.body
        return out

    def apns_payload(self) -> dict[str, Any]:
        alert: dict[str, str] = {"body": self.notice.body}
        if self.notice.title:
            alert["title"] = self.notice.title
        return {
            "aps": {
                "alert": alert,
                "thread-id": self.collapse_id,
                "mutable-content": 1,
                "sound": "default",
            },
            **self.fields,
        }

    def fcm_message(self, seconds_left: float) -> dict[str, Any]:
        notification: dict[str, str] = {"body": self.notice.body}
        if self.notice.title:
            notification["title"] = self.notice.title
        return {
            "notification": notification,
            "data": dict(self.fields),
            "android": {
                "priority": "HIGH",
                "ttl": _ttl(seconds_left),
                "collapse_key": self.collapse_id,
                "notification": {"tag": self.collapse_id},
            },
        }


@dataclass(slots=True)
class ChatSdkContent:
    """The Chat SDK's own push: `{"eventId": n, "e": <encrypted message>}` under `data`.

    APNs: an alert push the app's Notification Service Extension decrypts with
    `PushNotificationKeyStorage.decryptPayload(notification:)`, which reads `data`; the alert
    shown if the extension does not run says only "New message" (the text is in `e`). FCM: a
    data-only message, every value a string (the Android SDK parses `eventId` with parseInt)."""

    event_id: int
    encrypted: str
    collapse_id: str
    placeholder: str = "New message"
    label: str = "chat-sdk"
    call_id: str | None = None

    def data(self) -> dict[str, Any]:
        return {"eventId": self.event_id, "e": self.encrypted}

    def string_data(self) -> dict[str, str]:
        return {"eventId": str(self.event_id), "e": self.encrypted}

    def apns_payload(self) -> dict[str, Any]:
        return {
            "aps": {
                "alert": {"body": self.placeholder},
                "thread-id": self.collapse_id,
                "mutable-content": 1,
                "sound": "default",
            },
            "data": self.data(),
        }

    def fcm_message(self, seconds_left: float) -> dict[str, Any]:
        return {
            "data": self.string_data(),
            "android": {
                "priority": "HIGH",
                "ttl": _ttl(seconds_left),
                "collapse_key": self.collapse_id,
            },
        }


def sdk_content(
    event_id: int, plaintext: dict[str, str], key: bytes, collapse: str
) -> ChatSdkContent:
    """Encrypt the message for one device's key (a fresh IV per push)."""
    return ChatSdkContent(event_id, sdk_format.encrypt(orjson.dumps(plaintext), key), collapse)
