"""Chat event data -> the message a push is about. Pure functions only.

Fields of `Microsoft.Communication.ChatMessageReceived` / `…Edited` / `…Deleted` as the Event Grid
schema documents them (MicrosoftDocs/azure-docs `articles/event-grid/communication-services-chat-
events.md`; ../shared/fixtures/events/chatmessage*.json): one event per recipient, `recipientId`
and `senderId` raw ids, `threadId`, `messageId`, `messageBody`, `type`, `composeTime`, `version`,
`metadata`, `senderDisplayName`, `transactionId`; Edited adds `editTime`, Deleted `deleteTime`
(and carries no body).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ringrelay.payloads import PayloadError

CHAT_EVENT_PREFIX = "Microsoft.Communication.Chat"
CHAT_MESSAGE_RECEIVED = "Microsoft.Communication.ChatMessageReceived"
CHAT_MESSAGE_RECEIVED_IN_THREAD = "Microsoft.Communication.ChatMessageReceivedInThread"
CHAT_MESSAGE_EDITED = "Microsoft.Communication.ChatMessageEdited"
CHAT_MESSAGE_DELETED = "Microsoft.Communication.ChatMessageDeleted"
CHAT_THREAD_CREATED_WITH_USER = "Microsoft.Communication.ChatThreadCreatedWithUser"
CHAT_PARTICIPANT_ADDED_WITH_USER = "Microsoft.Communication.ChatParticipantAddedToThreadWithUser"

MAX_BODY_CHARS = 28_000  # ACS caps a message at 28 KB; anything longer is not an ACS event


@dataclass(slots=True)
class ChatMessage:
    """One message as its recipient is told about it."""

    event_type: str
    message_id: str
    thread_id: str
    sender_id: str
    recipient_id: str
    sender_display_name: str = ""
    body: str = ""
    message_type: str = "Text"
    compose_time: str = ""
    version: str = ""
    transaction_id: str = ""
    metadata: dict[str, Any] | None = None
    edit_time: str = ""
    delete_time: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def from_self(self) -> bool:
        """Addressed to its own sender (older resources emitted that copy): never pushed."""
        return self.sender_id == self.recipient_id


def _raw_id(data: dict[str, Any], plain: str, ident: str) -> str:
    """`senderId` / `recipientId`, else the identifier object's `rawId`."""
    value = data.get(plain)
    if isinstance(value, str) and value:
        return value
    obj = data.get(ident)
    if isinstance(obj, dict):
        raw = obj.get("rawId")
        if isinstance(raw, str) and raw:
            return raw
    raise PayloadError(f"data.{plain}: missing (nor data.{ident}.rawId)")


def _text(data: dict[str, Any], key: str, *, required: bool = False, limit: int = 1024) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise PayloadError(f"data.{key}: missing")
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # `version` is a number in the Event Grid samples
    if not isinstance(value, str):
        raise PayloadError(f"data.{key}: not a string")
    if required and not value:
        raise PayloadError(f"data.{key}: empty")
    if len(value) > limit:
        raise PayloadError(f"data.{key}: longer than {limit} characters")
    return value


def chat_message_from_event(event_type: str, data: object) -> ChatMessage:
    """Build the message from a ChatMessageReceived/Edited/Deleted event's data."""
    if not isinstance(data, dict):
        raise PayloadError("data: missing or not an object")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise PayloadError("data.metadata: not an object")
    return ChatMessage(
        event_type=event_type,
        message_id=_text(data, "messageId", required=True, limit=128),
        thread_id=_text(data, "threadId", required=True, limit=256),
        sender_id=_raw_id(data, "senderId", "senderCommunicationIdentifier"),
        recipient_id=_raw_id(data, "recipientId", "recipientCommunicationIdentifier"),
        sender_display_name=_text(data, "senderDisplayName", limit=256),
        body=_text(data, "messageBody", limit=MAX_BODY_CHARS),
        message_type=_text(data, "type", limit=64) or "Text",
        compose_time=_text(data, "composeTime", limit=64),
        version=_text(data, "version", limit=64),
        transaction_id=_text(data, "transactionId", limit=256),
        metadata=metadata,
        edit_time=_text(data, "editTime", limit=64),
        delete_time=_text(data, "deleteTime", limit=64),
    )


def sdk_plaintext(msg: ChatMessage) -> dict[str, str]:
    """The JSON the Chat SDK decodes after decryption (iOS `PushNotificationPayload.swift`
    `PushNotificationMessageReceivedPayload`: every key required, every value a string; an
    Android SDK example: ../shared/fixtures/events/chatpush.decrypted.android-sdk-test.json).
    `clientMessageId` and `priority` are not in the event: sent empty, as in both SDKs' samples.
    `acsChatMessageMetadata` is the metadata as a JSON string, `"null"` without metadata.
    """
    out = {
        "senderId": msg.sender_id,
        "recipientId": msg.recipient_id,
        "transactionId": msg.transaction_id,
        "groupId": msg.thread_id,
        "messageId": msg.message_id,
        "messageType": msg.message_type,
        "messageBody": msg.body,
        "senderDisplayName": msg.sender_display_name,
        "clientMessageId": "",
        "originalArrivalTime": msg.compose_time,
        "priority": "",
        "version": msg.version,
        "acsChatMessageMetadata": orjson.dumps(msg.metadata).decode()
        if msg.metadata is not None
        else "null",
    }
    # Edited/Deleted (Android's 247/248): no public sample of their plaintext; the times are
    # added under the event's own names. Not confirmed against a live ACS push.
    if msg.edit_time:
        out["editTime"] = msg.edit_time
    if msg.delete_time:
        out["deleteTime"] = msg.delete_time
    return out


@dataclass(slots=True)
class AddedToThread:
    """ChatThreadCreatedWithUser / ChatParticipantAddedToThreadWithUser, for "X added you"."""

    event_type: str
    thread_id: str
    recipient_id: str
    actor_id: str
    actor_name: str
    topic: str


def added_to_thread_from_event(event_type: str, data: object) -> AddedToThread:
    if not isinstance(data, dict):
        raise PayloadError("data: missing or not an object")
    if event_type == CHAT_THREAD_CREATED_WITH_USER:
        actor_id = _raw_id(data, "createdBy", "createdByCommunicationIdentifier")
        props = data.get("properties")
        topic = props.get("topic") if isinstance(props, dict) else None
    else:
        actor_id = _raw_id(data, "addedBy", "addedByCommunicationIdentifier")
        topic = None
    actor_name = ""
    participants = data.get("participants") or data.get("members") or []
    if isinstance(participants, list):
        for p in participants:
            if not isinstance(p, dict):
                continue
            pid = p.get("memberId")
            ident = p.get("participantCommunicationIdentifier")
            if isinstance(ident, dict):
                pid = ident.get("rawId", pid)
            if pid == actor_id and isinstance(p.get("displayName"), str):
                actor_name = p["displayName"]
    return AddedToThread(
        event_type=event_type,
        thread_id=_text(data, "threadId", required=True, limit=256),
        recipient_id=_raw_id(data, "recipientId", "recipientCommunicationIdentifier"),
        actor_id=actor_id,
        actor_name=actor_name,
        topic=topic if isinstance(topic, str) else "",
    )
