"""Chat push formats: the SDK's encrypted push (against an independent decryptor that first
decrypts the SDK's own test vector), the notification texts per preview mode, sealed keys."""

from __future__ import annotations

import base64
import os

import pytest

from ringrelay.chat import sdk_format
from ringrelay.chat.content import ChatNotificationContent, sdk_content
from ringrelay.chat.keys import ChatKeyVault, ChatKeyVaultError, parse_master_key
from ringrelay.chat.message import (
    CHAT_MESSAGE_RECEIVED,
    chat_message_from_event,
    sdk_plaintext,
)
from ringrelay.chat.notification import collapse_id, message_notice
from ringrelay.payloads import PayloadError
from tests.chat_sdk_decryptor import DecryptError, decrypt_e, decrypt_payload
from tests.conftest import load_fixture

# The Chat SDK's own test vector: the iOS Chat SDK's `CrytoUtilUnitTests` (sic) XCTest class
# (validEncryptedNotificationPayload, aesKey, authKey, validDecryptedNotificationPayload), found
# through the code index, which did not name the file's repository path.
SDK_VECTOR_E = (
    "cBVKSMQMmcCXmKpNlWFDaRtVBWHa7zmhKFs1qoF0qbVi/CBPOwr7ngSMdlNJY5rOgwcWwYFGMG2b138Rerb/rB6YBCTlm"
    "v59RAfbjiceXyHQwGL7CWGkKJVUlgohjL4VLvSqpYhYzXjpRwRFzbPBCZrEWxB6+j0ZK51robqYpKULXq82BiGrs4WVKg"
    "s2AfO41W4tGplLNs2cWHugzXMaGgTSmHkehEHriuVUkVdEkOSLJH+GN/kw/BWLcRyCuJUMBSy30l+N+9+o/ufTX/CTKR5"
    "j22Jf5167Ffwr7AGtZGXFxrJ9zHMNbtM5ARqaozYEVaa4apDqHi82euBpe1ofETRCyiYMRThaKQbKlcA9sXPeZxOkjdlf"
    "021xaIVipE2cKAbOwaiRkL+rfEdWQHOtxsbyal6uLgf9e5ab2xXni+/9Q8wCkTY2JDrRONHFfAOKPALQPrCoI+KWFcPVe"
    "nEGV6MzQ0mXpu/osYcZUbmmyhSe5tobaePbfBCDwcTgQ5pAyH7dibxqyi0pSZ1nyOvzY3QrddbqD+6oPCh725E63m3ejC"
    "+D+IrliSbrRO0yM7ZMhkG6QcaVYfHI+UYj1G+TKdM44sTQ16A3M5LNpoBTwO35l+VWle4KIu5SadBqao93xVZWmfwwdG2"
    "atqx2Vz5ODk0Y7JzRyD6YyXINUyF35APyuBIRk+1yxMKyVh8cW+KiWUo2iljIFZNM4zCcQMkI1xu9MHWJ4AuGE8kGpMlj"
    "Wr+sdocTeFULIHybFeNq7VQGpLyRSprO5YaUz9kOusn9fJMoxocCMu6ggqDNpY4roTSgoawQE81YlcPfDJvdxTWDMjCiy"
    "sunu4pmYvYu/mG+DFtTFYlBaR2Z4JFuZLvHyWEg/w5Rniv+3b4Va7ypwhDePhRTRdncTDJDuXWAewmj7ss1ujoStsVLer"
    "B9wzCnnAwCB0m4hiDaVUvAq0Fk0qOI9BbFKjibH+KwjCoSuKomO7bbLe4ijd3qtlPHJfWv7H8Wm5ho1iViF/h3IgMcT0G"
    "dnslNmnuYyFAdB3dM1lisesQr5jvZLYufUeU1OlxY/Rno"
)
SDK_VECTOR_AES = "W+OOsDib0dgVq4BUxj9n3bi32wmpM8TFGZbULwaBi1U="
SDK_VECTOR_AUTH = "u6cf4JQX1HArhvrdie0Gh1ltAOWRwVuZQShmrXs02uM="


def _sdk_key(aes_b64: str, auth_b64: str) -> str:
    return base64.b64encode(base64.b64decode(aes_b64) + base64.b64decode(auth_b64)).decode()


def _received() -> dict:
    return load_fixture("chatmessagereceived.eventgrid.azure-docs.json")[0]


def test_independent_decryptor_opens_the_sdks_own_vector() -> None:
    text = decrypt_e(SDK_VECTOR_E, [_sdk_key(SDK_VECTOR_AES, SDK_VECTOR_AUTH)])
    assert text.startswith('{"senderId": "8:acs:a1e25fcc')
    assert '"messageBody": "this is gloria"' in text
    # The halves swapped: the HMAC check fails, as in the SDK.
    with pytest.raises(DecryptError):
        decrypt_e(SDK_VECTOR_E, [_sdk_key(SDK_VECTOR_AUTH, SDK_VECTOR_AES)])


def test_sdk_format_round_trip_fields_equal_the_events() -> None:
    event = _received()
    msg = chat_message_from_event(CHAT_MESSAGE_RECEIVED, event["data"])
    key = os.urandom(64)
    content = sdk_content(200, sdk_plaintext(msg), key, collapse_id(msg.thread_id))
    body = content.apns_payload()
    assert body["aps"]["mutable-content"] == 1
    assert body["data"]["eventId"] == 200
    raw = base64.b64decode(body["data"]["e"])
    assert raw[0] == 0x70  # the SDK's cipher mode byte
    assert (len(raw) - 1 - 16 - 32) % 16 == 0
    doc = decrypt_payload(
        body, [base64.b64encode(os.urandom(64)).decode(), base64.b64encode(key).decode()]
    )
    data = event["data"]
    assert doc["senderId"] == data["senderId"]
    assert doc["recipientId"] == data["recipientId"]
    assert doc["groupId"] == data["threadId"]
    assert doc["messageId"] == data["messageId"]
    assert doc["messageBody"] == data["messageBody"]
    assert doc["messageType"] == data["type"]
    assert doc["senderDisplayName"] == data["senderDisplayName"]
    assert doc["transactionId"] == data["transactionId"]
    assert doc["originalArrivalTime"] == data["composeTime"]
    assert doc["version"] == str(data["version"])
    import json

    assert json.loads(doc["acsChatMessageMetadata"]) == data["metadata"]
    # FCM carries the same, every value a string.
    fcm = content.fcm_message(60)
    assert fcm["data"]["eventId"] == "200"
    assert "notification" not in fcm
    assert decrypt_e(fcm["data"]["e"], [base64.b64encode(key).decode()])


def test_sdk_format_fresh_iv_per_push_and_tamper_detected() -> None:
    key = os.urandom(64)
    a = sdk_format.encrypt(b'{"x":"1"}', key)
    b = sdk_format.encrypt(b'{"x":"1"}', key)
    assert a != b
    raw = bytearray(base64.b64decode(a))
    raw[20] ^= 1
    with pytest.raises(DecryptError):
        decrypt_e(base64.b64encode(bytes(raw)).decode(), [base64.b64encode(key).decode()])


def test_chat_key_must_be_64_bytes_of_base64() -> None:
    assert len(sdk_format.decode_chat_key(base64.b64encode(os.urandom(64)).decode())) == 64
    with pytest.raises(sdk_format.ChatKeyError, match="64 bytes"):
        sdk_format.decode_chat_key(base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(sdk_format.ChatKeyError, match="base64"):
        sdk_format.decode_chat_key("not base64!")


def test_message_needs_its_ids() -> None:
    data = dict(_received()["data"])
    del data["threadId"]
    with pytest.raises(PayloadError, match=r"data\.threadId"):
        chat_message_from_event(CHAT_MESSAGE_RECEIVED, data)
    data = dict(_received()["data"])
    del data["recipientId"]
    del data["recipientCommunicationIdentifier"]
    with pytest.raises(PayloadError, match=r"data\.recipientId"):
        chat_message_from_event(CHAT_MESSAGE_RECEIVED, data)


@pytest.mark.parametrize(
    ("preview", "title", "body"),
    [
        ("full", "Bob(Admin)", "Welcome to Azure Communication Services"),
        ("sender", None, "New message from Bob(Admin)"),
        ("none", None, "New message"),
    ],
)
def test_notification_text_per_preview_mode(preview: str, title: str | None, body: str) -> None:
    msg = chat_message_from_event(CHAT_MESSAGE_RECEIVED, _received()["data"])
    notice = message_notice(msg, preview)  # type: ignore[arg-type]
    assert (notice.title, notice.body) == (title, body)
    content = ChatNotificationContent(
        notice, collapse_id(msg.thread_id), {"threadId": msg.thread_id}
    )
    apns = content.apns_payload()
    assert apns["aps"]["alert"]["body"] == body
    assert apns["aps"]["thread-id"] == content.collapse_id
    assert len(content.collapse_id.encode()) <= 64
    if preview != "full":
        assert msg.body not in str(apns) and msg.body not in str(content.fcm_message(10))


def test_coalesced_notice_counts_and_keeps_newest_text() -> None:
    msg = chat_message_from_event(CHAT_MESSAGE_RECEIVED, _received()["data"])
    assert message_notice(msg, "full", 3).title == "Bob(Admin) (3 new messages)"
    assert message_notice(msg, "full", 3).body == msg.body
    assert message_notice(msg, "none", 3).body == "3 new messages"


def test_html_message_preview_loses_tags() -> None:
    data = dict(_received()["data"], type="RichText/Html", messageBody="<p>Hi <b>there</b></p>")
    msg = chat_message_from_event(CHAT_MESSAGE_RECEIVED, data)
    assert message_notice(msg, "full").body == "Hi there"


def test_sealed_chat_key_opens_only_with_its_master_key_and_row() -> None:
    master = parse_master_key(base64.b64encode(os.urandom(32)).decode())
    vault = ChatKeyVault(master)
    key = os.urandom(64)
    sealed = vault.seal(key, "8:acs:a_1", "phone")
    assert base64.b64encode(key).decode() not in sealed
    assert ChatKeyVault(master).open(sealed, "8:acs:a_1", "phone") == key
    with pytest.raises(ChatKeyVaultError):
        ChatKeyVault(master).open(sealed, "8:acs:a_2", "phone")
    with pytest.raises(ChatKeyVaultError):
        ChatKeyVault(os.urandom(32)).open(sealed, "8:acs:a_1", "phone")
    with pytest.raises(ChatKeyVaultError, match="32 bytes"):
        parse_master_key(base64.b64encode(os.urandom(16)).decode())
