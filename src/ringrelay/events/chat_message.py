"""Chat events -> alert pushes (README "Chat pushes").

- ChatMessageReceived: one plan for the recipient's live `alert` devices, each in its format
  (`notification`, or the Chat SDK's encrypted push with that device's key); never when the
  recipient is the sender; recorded as `muted` when the recipient muted the thread.
- ChatMessageReceivedInThread: the thread-level copy of the per-recipient events; acknowledged.
- ChatMessageEdited / ChatMessageDeleted: only `sdk` registrations on Android (FCM/GCM) get them,
  as event ids 247/248 (the Android Chat SDK's NotificationUtils knows them; the iOS SDK knows
  only 200, and a delivered notification cannot be edited); else acknowledged.
- ChatThreadCreatedWithUser / ChatParticipantAddedToThreadWithUser: "X added you to a chat" to
  `notification` devices when RINGRELAY_CHAT_NOTIFY_ADDED is on; else acknowledged.
The ledger key is the event id: Event Grid emits one event per recipient, so "once per device
per event" is "once per device per message".
"""

from __future__ import annotations

import logging
import time

from ringrelay.chat import sdk_format
from ringrelay.chat.bursts import ThreadBursts
from ringrelay.chat.content import ChatNotificationContent, ChatSdkContent, sdk_content
from ringrelay.chat.keys import ChatKeyVault, ChatKeyVaultError
from ringrelay.chat.message import (
    CHAT_MESSAGE_DELETED,
    CHAT_MESSAGE_EDITED,
    CHAT_MESSAGE_RECEIVED,
    CHAT_MESSAGE_RECEIVED_IN_THREAD,
    CHAT_PARTICIPANT_ADDED_WITH_USER,
    CHAT_THREAD_CREATED_WITH_USER,
    ChatMessage,
    added_to_thread_from_event,
    chat_message_from_event,
    sdk_plaintext,
)
from ringrelay.chat.notification import Preview, added_notice, collapse_id, message_notice
from ringrelay.config import Settings
from ringrelay.delivery.plan import Decision, PushPlan
from ringrelay.events.incoming_call import event_time
from ringrelay.events.ingest import Event
from ringrelay.events.kind import Context
from ringrelay.models import ChatFormat, EventRecord, EventStatus, Platform, PushKind, Registration
from ringrelay.payloads import PayloadError
from ringrelay.redact import fingerprint

log = logging.getLogger("ringrelay.chat")

CHAT_EVENT_TYPES = (
    CHAT_MESSAGE_RECEIVED,
    CHAT_MESSAGE_RECEIVED_IN_THREAD,
    CHAT_MESSAGE_EDITED,
    CHAT_MESSAGE_DELETED,
    CHAT_THREAD_CREATED_WITH_USER,
    CHAT_PARTICIPANT_ADDED_WITH_USER,
)
ANDROID = (Platform.FCM, Platform.GCM)
ChatContent = ChatNotificationContent | ChatSdkContent


class ChatEvents:
    """Decides what a chat event becomes; the dispatcher executes the pushes."""

    event_types = CHAT_EVENT_TYPES

    def __init__(self, settings: Settings, keys: ChatKeyVault | None) -> None:
        self.keys = keys
        self.preview: Preview = settings.chat_preview
        self.ttl = float(settings.chat_ttl_seconds)
        self.notify_added = settings.chat_notify_added
        self.bursts = ThreadBursts(settings.chat_coalesce_seconds)

    async def decide(self, event: Event, ctx: Context) -> Decision:
        try:
            if event.type in (CHAT_MESSAGE_RECEIVED, CHAT_MESSAGE_EDITED, CHAT_MESSAGE_DELETED):
                return await self._message(event, ctx)
            if event.type == CHAT_MESSAGE_RECEIVED_IN_THREAD:
                return Decision.final(
                    event.id,
                    event.type,
                    EventStatus.IGNORED,
                    "thread-level copy; each recipient is pushed from ChatMessageReceived",
                )
            return await self._added(event, ctx)
        except PayloadError as exc:
            return Decision.final(event.id, event.type, EventStatus.REJECTED, str(exc))

    def _expires_at(self, event: Event, ctx: Context) -> float:
        return event_time(event, ctx.received_at) + self.ttl

    async def _message(self, event: Event, ctx: Context) -> Decision:
        msg = chat_message_from_event(event.type, event.data)
        record = EventRecord(
            event.id,
            event.type,
            EventStatus.IGNORED,
            "",
            # Recorded under the message id, where a call keeps its callId: /v1/messages/{id}.
            correlation_id=msg.message_id,
            recipient=msg.recipient_id,
            received_at=ctx.received_at,
        )
        final = Decision(record)
        if msg.from_self:
            record.reason = "the recipient is the message's sender: never pushed"
            return final
        now = time.time()
        if await ctx.store.is_thread_muted(msg.recipient_id, msg.thread_id, now):
            record.status, record.reason = EventStatus.MUTED, "the recipient muted this thread"
            return final
        targets = await ctx.store.push_targets(msg.recipient_id, PushKind.ALERT, now)
        if event.type != CHAT_MESSAGE_RECEIVED:
            targets = [
                r for r in targets if r.chat_format is ChatFormat.SDK and r.platform in ANDROID
            ]
            if not targets:
                record.reason = (
                    "edits and deletes go only to Android devices in the Chat SDK format; "
                    "the recipient has none"
                )
                return final
        if not targets:
            record.status, record.reason = EventStatus.NO_DEVICES, "no live alert registration"
            return final
        count = 1
        if event.type == CHAT_MESSAGE_RECEIVED:
            count = self.bursts.count(msg.recipient_id, msg.thread_id, msg.message_id, now)
        collapse = collapse_id(msg.thread_id)
        notification = self._notification(msg, collapse, count)
        sdk_event_id = {
            CHAT_MESSAGE_RECEIVED: sdk_format.EVENT_ID_MESSAGE_RECEIVED,
            CHAT_MESSAGE_EDITED: sdk_format.EVENT_ID_MESSAGE_EDITED,
            CHAT_MESSAGE_DELETED: sdk_format.EVENT_ID_MESSAGE_DELETED,
        }[event.type]
        plaintext = sdk_plaintext(msg)
        # Keys are opened here, before anything is claimed: a key that does not open (the
        # encryption key was changed) leaves its device out, said in the event's reason and log.
        keys: dict[tuple[str, str], bytes] = {}
        usable: list[Registration] = []
        skipped: list[str] = []
        for reg in targets:
            if reg.chat_format is ChatFormat.SDK:
                try:
                    keys[(reg.identity, reg.device_id)] = self._open_key(reg)
                except ChatKeyVaultError as exc:
                    log.warning(
                        "chat push to %s device %s (token %s) skipped: chat key: %s",
                        reg.identity,
                        reg.device_id,
                        fingerprint(reg.token),
                        exc,
                    )
                    skipped.append(reg.device_id)
                    continue
            usable.append(reg)

        def content_for(reg: Registration) -> ChatContent:
            key = keys.get((reg.identity, reg.device_id))
            if key is None:
                return notification
            return sdk_content(sdk_event_id, plaintext, key, collapse)

        record.status = EventStatus.PENDING
        if skipped:
            record.reason = f"skipped, chat key unusable: {', '.join(sorted(skipped))}"
        plan = PushPlan(
            record,
            msg.recipient_id,
            PushKind.ALERT,
            notification,
            self._expires_at(event, ctx),
            targets=usable,
            content_for=content_for,
            no_targets_reason=record.reason or "no live alert registration",
            window="chat TTL",
            expired_reason="older than RINGRELAY_CHAT_TTL_SECONDS: not pushed",
        )
        return Decision(record, [plan])

    def _open_key(self, reg: Registration) -> bytes:
        if self.keys is None:
            raise ChatKeyVaultError("RINGRELAY_CHAT_KEY_ENCRYPTION_KEY is not set")
        if reg.chat_key is None:
            raise ChatKeyVaultError("none stored")
        return self.keys.open(reg.chat_key, reg.identity, reg.device_id)

    def _notification(self, msg: ChatMessage, collapse: str, count: int) -> ChatNotificationContent:
        fields = {"threadId": msg.thread_id, "messageId": msg.message_id}
        if self.preview != "none":
            fields["senderId"] = msg.sender_id
        if count > 1:
            fields["count"] = str(count)
        return ChatNotificationContent(message_notice(msg, self.preview, count), collapse, fields)

    async def _added(self, event: Event, ctx: Context) -> Decision:
        if not self.notify_added:
            return Decision.final(
                event.id, event.type, EventStatus.IGNORED, "off (RINGRELAY_CHAT_NOTIFY_ADDED)"
            )
        added = added_to_thread_from_event(event.type, event.data)
        record = EventRecord(
            event.id,
            event.type,
            EventStatus.IGNORED,
            "",
            recipient=added.recipient_id,
            received_at=ctx.received_at,
        )
        final = Decision(record)
        if added.actor_id == added.recipient_id:
            record.reason = "the recipient did it: never pushed"
            return final
        now = time.time()
        if await ctx.store.is_thread_muted(added.recipient_id, added.thread_id, now):
            record.status, record.reason = EventStatus.MUTED, "the recipient muted this thread"
            return final
        targets = [
            r
            for r in await ctx.store.push_targets(added.recipient_id, PushKind.ALERT, now)
            if r.chat_format is ChatFormat.NOTIFICATION
        ]
        if not targets:
            record.status = EventStatus.NO_DEVICES
            record.reason = "no live alert registration in the notification format"
            return final
        collapse = collapse_id(added.thread_id)
        content = ChatNotificationContent(
            added_notice(added, self.preview), collapse, {"threadId": added.thread_id}
        )
        record.status = EventStatus.PENDING
        plan = PushPlan(
            record,
            added.recipient_id,
            PushKind.ALERT,
            content,
            self._expires_at(event, ctx),
            targets=targets,
            window="chat TTL",
            expired_reason="older than RINGRELAY_CHAT_TTL_SECONDS: not pushed",
        )
        return Decision(record, [plan])
