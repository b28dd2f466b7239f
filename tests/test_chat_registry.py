"""Chat parts of the registry: `push_kind`/`chat_format`/`chat_key` on the native API (the key
sealed at rest, never listed), muted threads, both stores, and the SQLite upgrade from
schema version 1."""

from __future__ import annotations

import base64
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ringrelay.models import ChatFormat, Platform, PushKind, Registration
from ringrelay.store import Store
from ringrelay.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.conftest import acs_id, apns_token
from tests.test_store_contract import _drop_schema, _postgres_store

NOW = 1_800_000_000.0
MASTER = base64.b64encode(b"k" * 32).decode()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(str(tmp_path / "chat.db"))
        await s.open()
        yield s
        await s.close()
        return
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    s = await _postgres_store(schema)
    await s.open()
    yield s
    await s.close()
    await _drop_schema(schema)


def _reg(device: str, **kw: Any) -> Registration:
    base: dict[str, Any] = dict(
        identity=acs_id("ada"),
        device_id=device,
        platform=Platform.APNS,
        token=apns_token(len(device)),
        push_kind=PushKind.ALERT,
        app_id=None,
        created_at=NOW,
        updated_at=NOW,
        expires_at=NOW + 3600,
    )
    base.update(kw)
    return Registration(**base)


async def test_store_keeps_chat_format_and_sealed_key(store: Store) -> None:
    await store.upsert_registration(_reg("p1", chat_format=ChatFormat.SDK, chat_key="v1.sealed"))
    await store.upsert_registration(_reg("p2", token=apns_token(99)))
    got = {r.device_id: r for r in await store.push_targets(acs_id("ada"), PushKind.ALERT, NOW)}
    assert got["p1"].chat_format is ChatFormat.SDK and got["p1"].chat_key == "v1.sealed"
    assert got["p2"].chat_format is ChatFormat.NOTIFICATION and got["p2"].chat_key is None
    # A refresh replaces the chat fields.
    await store.upsert_registration(_reg("p1", updated_at=NOW + 1))
    (p1,) = [r for r in await store.list_registrations(acs_id("ada"), NOW) if r.device_id == "p1"]
    assert p1.chat_format is ChatFormat.NOTIFICATION and p1.chat_key is None
    await store.bulk_insert_registrations([_reg("p3", token=apns_token(3), chat_key="v1.x")])
    (p3,) = [r for r in await store.list_registrations(acs_id("ada"), NOW) if r.device_id == "p3"]
    assert p3.chat_key == "v1.x"


async def test_store_muted_threads(store: Store) -> None:
    ada = acs_id("ada")
    assert not await store.is_thread_muted(ada, "19:t1@thread.v2", NOW)
    await store.mute_thread(ada, "19:t1@thread.v2", None, NOW)
    await store.mute_thread(ada, "19:t2@thread.v2", NOW + 60, NOW)
    assert await store.is_thread_muted(ada, "19:t1@thread.v2", NOW + 10**6)
    assert await store.is_thread_muted(ada, "19:t2@thread.v2", NOW + 59)
    assert not await store.is_thread_muted(ada, "19:t2@thread.v2", NOW + 60)
    assert not await store.is_thread_muted(acs_id("bob"), "19:t1@thread.v2", NOW)
    assert await store.muted_threads(ada, NOW) == [
        ("19:t1@thread.v2", None),
        ("19:t2@thread.v2", NOW + 60),
    ]
    await store.purge(NOW + 61, 86400)
    assert await store.muted_threads(ada, NOW) == [("19:t1@thread.v2", None)]
    assert await store.unmute_thread(ada, "19:t1@thread.v2")
    assert not await store.unmute_thread(ada, "19:t1@thread.v2")
    assert not await store.is_thread_muted(ada, "19:t1@thread.v2", NOW)


# The version-1 tables that later versions alter (as the first release created them).
_V1_REGISTRATIONS = """
CREATE TABLE registrations (
    identity TEXT NOT NULL, device_id TEXT NOT NULL, platform TEXT NOT NULL,
    token TEXT NOT NULL, push_kind TEXT NOT NULL, app_id TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (identity, device_id)
) WITHOUT ROWID;
CREATE TABLE events (
    event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', correlation_id TEXT, recipient TEXT,
    received_at REAL NOT NULL, updated_at REAL NOT NULL
) WITHOUT ROWID;
"""


async def test_sqlite_upgrades_a_version_1_file(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_REGISTRATIONS)
    db.execute(
        "INSERT INTO registrations VALUES (?, 'old', 'apns', ?, 'voip', NULL, ?, ?, ?)",
        (acs_id("ada"), apns_token(1), NOW, NOW, NOW + 3600),
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        (old,) = await store.list_registrations(acs_id("ada"), NOW)
        assert old.chat_format is ChatFormat.NOTIFICATION and old.chat_key is None
        await store.upsert_registration(_reg("new", chat_format=ChatFormat.SDK, chat_key="v1.k"))
        await store.mute_thread(acs_id("ada"), "19:t@thread.v2", None, NOW)
        assert await store.is_thread_muted(acs_id("ada"), "19:t@thread.v2", NOW)
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# --- the API over the wire ---------------------------------------------------------------------


def _key() -> str:
    return base64.b64encode(os.urandom(64)).decode()


async def _put(
    http: aiohttp.ClientSession, url: str, device: str, body: dict[str, Any]
) -> tuple[int, Any]:
    async with http.put(f"{url}/v1/identities/{acs_id('ada')}/devices/{device}", json=body) as r:
        return r.status, await r.json()


async def test_api_takes_chat_format_and_seals_the_key(make_server: Any, http: Any) -> None:
    server = make_server(chat_key_encryption_key=MASTER)
    key = _key()
    body = {"platform": "apns", "token": apns_token(1), "push_kind": "alert"}
    status, out = await _put(
        http, server.url, "p1", {**body, "chat_format": "sdk", "chat_key": key}
    )
    assert status == 201, out
    assert out["chat_format"] == "sdk" and out["chat_key_set"] is True
    assert key not in str(out)
    status, out = await _put(http, server.url, "p2", {**body, "token": apns_token(2)})
    assert status == 201 and out["chat_format"] == "notification" and not out["chat_key_set"]
    async with http.get(f"{server.url}/v1/identities/{acs_id('ada')}/devices") as r:
        listing = await r.text()
    assert key not in listing and '"chat_key_set":true' in listing
    # At rest: sealed, not the key.
    db_path = server.settings.database_url.removeprefix("sqlite:///")
    (stored,) = (
        sqlite3.connect(db_path)
        .execute("SELECT chat_key FROM registrations WHERE device_id = 'p1'")
        .fetchone()
    )
    assert stored.startswith("v1.") and key not in stored
    raw = base64.b64decode(key)
    assert raw not in base64.b64decode(stored[3:])
    assert server.relay.chat_keys.open(stored, acs_id("ada"), "p1") == raw


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ({"push_kind": "voip", "chat_format": "sdk"}, "chat_format", "only for push_kind alert"),
        ({"push_kind": "voip", "chat_key": "eA=="}, "chat_key", "only for push_kind alert"),
        ({"chat_format": "sdk"}, "chat_key", "required with chat_format sdk"),
        ({"chat_key": "K" * 88}, "chat_key", "only with chat_format sdk"),
        (
            {"chat_format": "sdk", "chat_key": base64.b64encode(b"x" * 32).decode()},
            "chat_key",
            "64 bytes",
        ),
        ({"chat_format": "sdk", "chat_key": "not base64!"}, "chat_key", "not base64"),
        ({"chat_format": "telegram"}, "chat_format", ""),
    ],
)
async def test_api_refuses_bad_chat_fields(
    make_server: Any, http: Any, extra: dict[str, Any], field: str, message: str
) -> None:
    server = make_server(chat_key_encryption_key=MASTER)
    body = {"platform": "apns", "token": apns_token(1), "push_kind": "alert", **extra}
    status, out = await _put(http, server.url, "p1", body)
    assert status == 422
    assert out["detail"][0]["field"] == field and message in out["detail"][0]["msg"]
    assert "K" * 88 not in str(out)
    async with http.get(f"{server.url}/v1/identities/{acs_id('ada')}/devices") as r:
        assert (await r.json())["devices"] == []


async def test_api_refuses_sdk_format_without_an_encryption_key(
    make_server: Any, http: Any
) -> None:
    server = make_server()
    body = {"platform": "apns", "token": apns_token(1), "push_kind": "alert"}
    status, out = await _put(
        http, server.url, "p1", {**body, "chat_format": "sdk", "chat_key": _key()}
    )
    assert status == 422 and "RINGRELAY_CHAT_KEY_ENCRYPTION_KEY" in out["detail"][0]["msg"]


async def test_api_mutes_and_unmutes_threads(make_server: Any, http: Any) -> None:
    server = make_server()
    base = f"{server.url}/v1/identities/{acs_id('ada')}/muted-threads"
    thread = "19:6e5d6ca1d75044a49a36a7965ec4a906@thread.v2"
    async with http.put(f"{base}/{thread}") as r:
        assert r.status == 200 and (await r.json())["until"] is None
    async with http.put(f"{base}/19:other@thread.v2", json={"until": "2999-01-01T00:00:00Z"}) as r:
        assert r.status == 200 and (await r.json())["until"].startswith("2999-01-01")
    async with http.put(f"{base}/19:x@thread.v2", json={"until": "2000-01-01T00:00:00Z"}) as r:
        assert r.status == 422 and (await r.json())["detail"][0]["field"] == "until"
    async with http.put(f"{base}/bad%20thread") as r:
        assert r.status == 422 and (await r.json())["detail"][0]["field"] == "thread_id"
    async with http.get(base) as r:
        muted = (await r.json())["muted"]
    assert [m["thread_id"] for m in muted] == [
        "19:6e5d6ca1d75044a49a36a7965ec4a906@thread.v2",
        "19:other@thread.v2",
    ]
    async with http.delete(f"{base}/{thread}") as r:
        assert r.status == 204
    async with http.delete(f"{base}/{thread}") as r:
        assert r.status == 404


async def test_chat_key_and_text_never_reach_the_logs(
    make_server: Any, http: Any, caplog: Any
) -> None:
    import logging

    from ringrelay.simulate import chat_message_event
    from tests.conftest import post_events

    caplog.set_level(logging.DEBUG)
    server = make_server(chat_key_encryption_key=MASTER, log_level="DEBUG")
    key = _key()
    body = {"platform": "apns", "token": apns_token(1), "push_kind": "alert"}
    status, _ = await _put(http, server.url, "p1", {**body, "chat_format": "sdk", "chat_key": key})
    assert status == 201
    status, _ = await _put(
        http, server.url, "p2", {**body, "chat_format": "sdk", "chat_key": "A" * 30}
    )
    assert status == 422
    event = chat_message_event(acs_id("ada"), acs_id("bob"), "very private words")
    status, answer = await post_events(http, server, [event])
    assert status == 200 and answer["events"][0]["status"] == "delivered"
    logged = caplog.text + str(answer)
    assert caplog.records  # the server did log (the test would pass vacuously otherwise)
    assert key not in logged and "A" * 30 not in logged
    assert base64.b64decode(key).hex() not in logged
    assert "very private words" not in logged


async def test_sample_routes_stay_voip_only_and_messages_404(make_server: Any, http: Any) -> None:
    from ringrelay.simulate import chat_message_event
    from tests.conftest import post_events

    server = make_server()
    ada = acs_id("ada")
    sample = {
        "acsMri": ada,
        "deviceInfos": [
            {"deviceUUID": "sample-phone", "deviceToken": apns_token(5), "platform": "apple"}
        ],
    }
    async with http.post(f"{server.url}/api/add_device_token", json=sample) as resp:
        assert resp.status == 201
    event = chat_message_event(ada, acs_id("bob"), "hi")
    status, answer = await post_events(http, server, [event])
    report = answer["events"][0]
    assert status == 200 and report["status"] == "no_devices"  # the sample's token is VoIP
    assert report["messageId"] == event["data"]["messageId"] and "callId" not in report
    async with http.get(f"{server.url}/v1/messages/{event['data']['messageId']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["events"][0]["status"] == "no_devices"
    async with http.get(f"{server.url}/v1/messages/1234") as resp:
        assert resp.status == 404
