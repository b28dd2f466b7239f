"""The visible chat notification (`chat_format: "notification"`): what it says, per preview mode.

Message text in a push travels through Apple's or Google's servers, hence
`RINGRELAY_CHAT_PREVIEW`: `full` (sender and text), `sender` ("New message from Ada") or `none`
("New message"); with `none` the push carries neither the text nor who sent it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from ringrelay.chat.message import AddedToThread, ChatMessage

Preview = Literal["full", "sender", "none"]

# APNs alert pushes are capped at 4096 bytes, FCM at 4096 (ringrelay.payloads); a lock screen
# shows a few lines. 240 characters of preview (<= 960 bytes of UTF-8) leave room for the rest.
MAX_PREVIEW_CHARS = 240
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def collapse_id(thread_id: str) -> str:
    """One notification entry per thread: APNs `apns-collapse-id` (<= 64 bytes), FCM
    `collapse_key`/`tag`, APNs `thread-id`. A digest, so the thread id itself stays off the
    notification's metadata and any length fits."""
    return "chat-" + hashlib.sha256(thread_id.encode()).hexdigest()[:32]


def preview_text(msg: ChatMessage) -> str:
    """Plain text of the message, shortened. HTML messages (`RichText/Html`) lose their tags."""
    text = msg.body
    if "html" in msg.message_type.lower():
        text = _TAG.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) > MAX_PREVIEW_CHARS:
        text = text[: MAX_PREVIEW_CHARS - 1].rstrip() + "…"
    return text


@dataclass(frozen=True, slots=True)
class Notice:
    title: str | None
    body: str


def message_notice(msg: ChatMessage, preview: Preview, count: int = 1) -> Notice:
    """Title and body for one message, or for `count` messages of a thread coalesced."""
    name = msg.sender_display_name.strip() or "Someone"
    many = count > 1
    if preview == "full":
        title = f"{name} ({count} new messages)" if many else name
        return Notice(title, preview_text(msg) or "New message")
    if preview == "sender":
        return Notice(
            None, f"{count} new messages from {name}" if many else f"New message from {name}"
        )
    return Notice(None, f"{count} new messages" if many else "New message")


def added_notice(added: AddedToThread, preview: Preview) -> Notice:
    name = added.actor_name.strip() or "Someone"
    if preview == "none":
        return Notice(None, "You were added to a chat")
    topic = f": {added.topic}" if preview == "full" and added.topic else ""
    return Notice(None, f"{name} added you to a chat{topic}")
