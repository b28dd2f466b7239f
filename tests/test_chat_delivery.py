# ruff: noqa: F811  (the direct-delivery fixtures are imported, then named as parameters)
"""Chat pushes over the wire: the webhook receives chat events, the fakes (APNs, FCM,
Notification Hubs) receive the pushes. SDK format decrypted by the independent decryptor."""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ringrelay.fakes.apns import FakeAPNs
from ringrelay.fakes.fcm import FakeFCM
from ringrelay.simulate import chat_message_event
from tests.chat_sdk_decryptor import decrypt_e, decrypt_payload
from tests.conftest import acs_id, apns_token, post_events, register
from tests.test_direct_delivery import (  # noqa: F401  (fixtures)
    BUNDLE_A,
    _apns_session,
    _fcm_session,
    direct_settings,
    fake_apns,
    fake_fcm,
    fcm_token,
    keys,
)

ADA = acs_id("ada-chat")
BOB = acs_id("bob-chat")
MASTER = base64.b64encode(os.urandom(32)).decode()
THREAD = "19:6e5d6ca1d75044a49a36a7965ec4a906@thread.v2"


def _key() -> tuple[bytes, str]:
    raw = os.urandom(64)
    return raw, base64.b64encode(raw).decode()


async def _alert(http: Any, server: Any, identity: str, device: str, **body: Any) -> None:
    resp = await register(http, server, identity, device, push_kind="alert", **body)
    assert resp.status == 201


async def _message(http: Any, server: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    kw.setdefault("thread_id", THREAD)
    event = chat_message_event(kw.pop("to", ADA), kw.pop("sender", BOB), **kw)
    status, body = await post_events(http, server, [event])
    assert status == 200, body
    return event, body["events"][0]


async def _outcomes(http: Any, server: Any, message_id: str) -> list[dict[str, Any]]:
    async with http.get(f"{server.url}/v1/messages/{message_id}") as resp:
        assert resp.status == 200, await resp.text()
        return list((await resp.json())["events"])


def _alerts(fake: FakeAPNs) -> list[dict[str, Any]]:
    return [p for p in fake.pushes if p["push_type"] == "alert"]


async def test_notification_reaches_alert_devices_only_on_apns_and_fcm(
    http, make_server, direct_settings, fake_apns: FakeAPNs, fake_fcm: FakeFCM
) -> None:
    server = make_server(**direct_settings())
    await _alert(http, server, ADA, "iphone", token=apns_token(1))
    await _alert(http, server, ADA, "pixel", platform="fcm", token=fcm_token(1))
    # Ada's PushKit token: never a chat push.
    assert (await register(http, server, ADA, "iphone-voip", token=apns_token(2))).status == 201

    before = time.time()
    event, report = await _message(http, server, text="Lunch at noon?", display_name="Bob")
    assert report["status"] == "delivered"
    assert sorted(d["device_id"] for d in report["deliveries"]) == ["iphone", "pixel"]

    [push] = list(fake_apns.pushes)  # nothing to the VoIP token
    assert push["device_token"] == apns_token(1)
    headers = push["headers"]
    assert headers["apns-topic"] == BUNDLE_A  # the plain bundle id, not .voip
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    expiry = int(headers["apns-expiration"])
    assert before + 3600 - 5 <= expiry <= time.time() + 3600 + 1
    aps = push["body"]["aps"]
    assert aps["alert"] == {"title": "Bob", "body": "Lunch at noon?"}
    assert aps["mutable-content"] == 1
    assert headers["apns-collapse-id"] == aps["thread-id"]
    assert push["body"]["threadId"] == THREAD
    assert push["body"]["messageId"] == event["data"]["messageId"]

    [fcm] = list(fake_fcm.pushes)
    message = fcm["message"]
    assert message["token"] == fcm_token(1)
    assert message["notification"] == {"title": "Bob", "body": "Lunch at noon?"}
    assert message["data"]["threadId"] == THREAD and message["data"]["senderId"] == BOB
    assert message["android"]["notification"]["tag"] == aps["thread-id"]
    assert 3590 <= int(message["android"]["ttl"].rstrip("s")) <= 3600

    [recorded] = await _outcomes(http, server, event["data"]["messageId"])
    assert recorded["status"] == "delivered" and recorded["recipient"] == ADA
    assert {d["device_id"]: d["status"] for d in recorded["deliveries"]} == {
        "iphone": "accepted",
        "pixel": "accepted",
    }

    # Event Grid redelivers the same event: nobody is pushed twice.
    status, _ = await post_events(http, server, [event])
    assert status == 200
    assert len(fake_apns.pushes) == 1 and len(fake_fcm.pushes) == 1


@pytest.mark.parametrize(
    ("preview", "alert", "sender_id_sent"),
    [
        ("full", {"title": "Bob", "body": "the secret plan"}, True),
        ("sender", {"body": "New message from Bob"}, True),
        ("none", {"body": "New message"}, False),
    ],
)
async def test_each_preview_mode(
    http,
    make_server,
    direct_settings,
    fake_apns: FakeAPNs,
    fake_fcm: FakeFCM,
    preview: str,
    alert: dict[str, str],
    sender_id_sent: bool,
) -> None:
    server = make_server(**direct_settings(), chat_preview=preview)
    await _alert(http, server, ADA, "iphone", token=apns_token(1))
    await _alert(http, server, ADA, "pixel", platform="fcm", token=fcm_token(1))
    await _message(http, server, text="the secret plan", display_name="Bob")
    [push] = list(fake_apns.pushes)
    [fcm] = list(fake_fcm.pushes)
    assert push["body"]["aps"]["alert"] == alert
    assert fcm["message"]["notification"] == alert
    assert ("senderId" in push["body"]) is sender_id_sent
    assert ("senderId" in fcm["message"]["data"]) is sender_id_sent
    if preview != "full":
        assert "secret plan" not in str(push["body"]) + str(fcm["message"])


async def test_sdk_format_decrypts_with_the_sdks_algorithm_on_apns_and_fcm(
    http, make_server, direct_settings, fake_apns: FakeAPNs, fake_fcm: FakeFCM
) -> None:
    server = make_server(**direct_settings(), chat_key_encryption_key=MASTER)
    _, ios_key = _key()
    _, android_key = _key()
    await _alert(
        http, server, ADA, "iphone", token=apns_token(1), chat_format="sdk", chat_key=ios_key
    )
    await _alert(
        http,
        server,
        ADA,
        "pixel",
        platform="fcm",
        token=fcm_token(1),
        chat_format="sdk",
        chat_key=android_key,
    )
    event, report = await _message(http, server, text="encrypted hello", display_name="Bob")
    assert report["status"] == "delivered"
    [push] = list(fake_apns.pushes)
    assert push["push_type"] == "alert" and push["headers"]["apns-topic"] == BUNDLE_A
    assert "encrypted hello" not in str(push["body"])
    doc = decrypt_payload(push["body"], [ios_key])
    data = event["data"]
    for mine, theirs in (
        ("senderId", "senderId"),
        ("recipientId", "recipientId"),
        ("groupId", "threadId"),
        ("messageId", "messageId"),
        ("messageBody", "messageBody"),
        ("senderDisplayName", "senderDisplayName"),
        ("transactionId", "transactionId"),
        ("originalArrivalTime", "composeTime"),
    ):
        assert doc[mine] == data[theirs], mine
    assert doc["version"] == str(data["version"])
    [fcm] = list(fake_fcm.pushes)
    message = fcm["message"]
    assert "notification" not in message and message["data"]["eventId"] == "200"
    assert "encrypted hello" in decrypt_e(message["data"]["e"], [android_key])
    # Each device's push opens only with its own key.
    with pytest.raises(Exception, match="decrypt"):
        decrypt_e(message["data"]["e"], [ios_key])
    assert ios_key not in str(await _outcomes(http, server, data["messageId"]))


async def test_sender_is_never_pushed_and_thread_copy_is_acknowledged(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False))
    await _alert(http, server, BOB, "iphone", token=apns_token(3))
    # A 1-member thread: the only event an older resource sends is the sender's own copy.
    event, report = await _message(http, server, to=BOB, sender=BOB, text="note to self")
    assert report["status"] == "ignored"
    assert "sender" in report["reason"]
    thread_copy = dict(
        event, id="thread-copy", eventType="Microsoft.Communication.ChatMessageReceivedInThread"
    )
    status, body = await post_events(http, server, [thread_copy])
    assert status == 200 and body["events"][0]["status"] == "ignored"
    assert list(fake_apns.pushes) == []


async def test_muted_thread_is_recorded_not_pushed(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False))
    await _alert(http, server, ADA, "iphone", token=apns_token(1))
    base = f"{server.url}/v1/identities/{ADA}/muted-threads/{THREAD}"
    async with http.put(base) as resp:
        assert resp.status == 200
    event, report = await _message(http, server, text="muted?")
    assert report["status"] == "muted"
    assert list(fake_apns.pushes) == []
    [recorded] = await _outcomes(http, server, event["data"]["messageId"])
    assert recorded["status"] == "muted"
    # Another thread is not muted; unmuting brings the pushes back.
    await _message(http, server, text="other thread", thread_id="19:other@thread.v2")
    async with http.delete(base) as resp:
        assert resp.status == 204
    await _message(http, server, text="unmuted")
    assert [p["body"]["aps"]["alert"]["body"] for p in fake_apns.pushes] == [
        "unmuted",
        "other thread",
    ]


async def test_coalescing_counts_a_burst_under_one_collapse_id(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False), chat_coalesce_seconds=60)
    await _alert(http, server, ADA, "iphone", token=apns_token(1))
    for text in ("one", "two", "three"):
        await _message(http, server, text=text, display_name="Bob")
    await _message(http, server, text="elsewhere", display_name="Bob", thread_id="19:b@thread.v2")
    pushes = list(reversed(fake_apns.pushes))
    alerts = [p["body"]["aps"]["alert"] for p in pushes]
    assert alerts[0] == {"title": "Bob", "body": "one"}
    assert alerts[1] == {"title": "Bob (2 new messages)", "body": "two"}
    assert alerts[2] == {"title": "Bob (3 new messages)", "body": "three"}
    assert alerts[3] == {"title": "Bob", "body": "elsewhere"}
    ids = [p["headers"]["apns-collapse-id"] for p in pushes]
    assert ids[0] == ids[1] == ids[2] != ids[3]


async def test_edits_and_deletes_go_only_to_android_sdk_registrations(
    http, make_server, direct_settings, fake_apns: FakeAPNs, fake_fcm: FakeFCM
) -> None:
    server = make_server(**direct_settings(), chat_key_encryption_key=MASTER)
    _, ios_key = _key()
    _, android_key = _key()
    await _alert(
        http, server, ADA, "iphone", token=apns_token(1), chat_format="sdk", chat_key=ios_key
    )
    await _alert(
        http,
        server,
        ADA,
        "pixel",
        platform="fcm",
        token=fcm_token(1),
        chat_format="sdk",
        chat_key=android_key,
    )
    await _alert(http, server, ADA, "tablet", platform="fcm", token=fcm_token(2))  # notification
    _, edited = await _message(
        http, server, text="fixed typo", event_type="Microsoft.Communication.ChatMessageEdited"
    )
    _, deleted = await _message(
        http, server, event_type="Microsoft.Communication.ChatMessageDeleted"
    )
    assert [d["device_id"] for d in edited["deliveries"]] == ["pixel"]
    assert [d["device_id"] for d in deleted["deliveries"]] == ["pixel"]
    assert list(fake_apns.pushes) == []  # iOS: nothing for an edit
    ids = sorted(p["message"]["data"]["eventId"] for p in fake_fcm.pushes)
    assert ids == ["247", "248"]
    assert all(p["message"]["token"] == fcm_token(1) for p in fake_fcm.pushes)
    texts = [decrypt_e(p["message"]["data"]["e"], [android_key]) for p in fake_fcm.pushes]
    assert any("fixed typo" in t for t in texts)


async def test_ios_edit_sends_nothing(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False), chat_key_encryption_key=MASTER)
    await _alert(
        http, server, ADA, "iphone", token=apns_token(1), chat_format="sdk", chat_key=_key()[1]
    )
    _, report = await _message(
        http, server, text="fixed", event_type="Microsoft.Communication.ChatMessageEdited"
    )
    assert report["status"] in ("ignored", "no_devices")
    assert list(fake_apns.pushes) == []


async def test_dead_token_on_a_chat_push_is_pruned(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False))
    await _alert(http, server, ADA, "old-iphone", token=apns_token(9))
    # Apple saw the token die after it was registered (an earlier death means re-registered).
    fake_apns.unregistered_at(apns_token(9), int((time.time() + 1) * 1000))
    _, report = await _message(http, server, text="anyone there?")
    assert report["status"] == "failed"
    async with http.get(f"{server.url}/v1/identities/{ADA}/removed-devices") as resp:
        removed = (await resp.json())["removed"]
    assert [r["device_id"] for r in removed] == ["old-iphone"]
    async with http.get(f"{server.url}/v1/identities/{ADA}/devices") as resp:
        assert (await resp.json())["devices"] == []


async def test_message_older_than_the_chat_ttl_expires(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    server = make_server(**direct_settings(fcm=False), chat_ttl_seconds=60)
    await _alert(http, server, ADA, "iphone", token=apns_token(1))
    old = datetime.now(UTC) - timedelta(minutes=5)
    _, report = await _message(http, server, text="late", event_time=old)
    assert report["status"] == "expired"
    assert list(fake_apns.pushes) == []


async def test_chat_through_notification_hubs(http, make_server, nh_settings, fake_nh) -> None:
    server = make_server(**nh_settings)
    await _alert(http, server, ADA, "iphone", token=apns_token(1))
    await _alert(http, server, ADA, "pixel", platform="fcm", token="fcm:android-token_1")
    _, report = await _message(http, server, text="via the hub", display_name="Bob")
    assert report["status"] == "delivered"
    pushes = {p["format"]: p for p in fake_nh.pushes if p.get("status") == 201}
    apple = pushes["apple"]
    assert apple["headers"]["apns-push-type"] == "alert"
    assert apple["headers"]["ServiceBusNotification-Apns-Push-Type"] == "alert"
    assert apple["body"]["aps"]["alert"] == {"title": "Bob", "body": "via the hub"}
    message = pushes["fcmv1"]["body"]["message"]
    assert message["notification"]["body"] == "via the hub"
    assert message["data"]["threadId"] == THREAD


async def test_added_to_a_chat_is_off_by_default_and_on_when_asked(
    http, make_server, direct_settings, fake_apns: FakeAPNs
) -> None:
    from tests.conftest import load_fixture

    added = load_fixture("chatparticipantaddedtothreadwithuser.eventgrid.azure-docs.json")[0]
    added["eventTime"] = datetime.now(UTC).isoformat()  # the sample's 2021 is past the chat TTL
    recipient = added["data"]["recipientCommunicationIdentifier"]["rawId"]
    server = make_server(**direct_settings(fcm=False))
    await _alert(http, server, recipient, "iphone", token=apns_token(1))
    status, body = await post_events(http, server, [added])
    assert status == 200 and body["events"][0]["status"] == "ignored"
    assert list(fake_apns.pushes) == []

    server = make_server(**direct_settings(fcm=False), chat_notify_added=True)
    await _alert(http, server, recipient, "iphone", token=apns_token(1))
    status, body = await post_events(http, server, [added])
    assert status == 200 and body["events"][0]["status"] == "delivered"
    [push] = list(fake_apns.pushes)
    assert push["body"]["aps"]["alert"]["body"] == "Someone added you to a chat"


async def test_a_key_sealed_under_another_encryption_key_skips_its_device(
    http, make_server, direct_settings, fake_apns: FakeAPNs, tmp_path
) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    first = make_server(
        **direct_settings(fcm=False), chat_key_encryption_key=MASTER, database_url=db
    )
    await _alert(
        http, first, ADA, "iphone", token=apns_token(1), chat_format="sdk", chat_key=_key()[1]
    )
    await _alert(http, first, ADA, "ipad", token=apns_token(2))
    first.stop()
    other = base64.b64encode(os.urandom(32)).decode()
    server = make_server(
        **direct_settings(fcm=False), chat_key_encryption_key=other, database_url=db
    )
    _, report = await _message(http, server, text="hello")
    assert [d["device_id"] for d in report["deliveries"]] == ["ipad"]
    assert "chat key unusable: iphone" in report["reason"]
    assert [p["device_token"] for p in fake_apns.pushes] == [apns_token(2)]
