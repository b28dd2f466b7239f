"""The device registry over the wire: native /v1 API, sample-compatible routes, TTL expiry."""

from __future__ import annotations

import sqlite3
import time

import pytest

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, apns_token, post_events, register

ALICE = acs_id("alice")


async def devices(http, server, identity=ALICE) -> list[dict]:
    async with http.get(f"{server.url}/v1/identities/{identity}/devices") as resp:
        assert resp.status == 200
        return (await resp.json())["devices"]


async def test_register_refresh_list_delete(http, sandbox_server) -> None:
    token = apns_token(1)
    resp = await register(http, sandbox_server, ALICE, "iphone-1", token=token, ttl_seconds=600)
    assert resp.status == 201
    (first,) = await devices(http, sandbox_server)
    assert first["platform"] == "apns" and first["push_kind"] == "voip"
    assert first["token"].startswith("sha256:") and token not in str(first)

    resp = await register(http, sandbox_server, ALICE, "iphone-1", token=token, ttl_seconds=3600)
    assert resp.status == 200
    (refreshed,) = await devices(http, sandbox_server)
    assert refreshed["created_at"] == first["created_at"]
    assert refreshed["expires_at"] > first["expires_at"]

    await register(http, sandbox_server, ALICE, "pixel", platform="fcm", token="fcm:abc")
    assert [d["device_id"] for d in await devices(http, sandbox_server)] == ["iphone-1", "pixel"]

    url = f"{sandbox_server.url}/v1/identities/{ALICE}/devices"
    async with http.delete(f"{url}/pixel") as resp:
        assert resp.status == 204
    async with http.delete(f"{url}/pixel") as resp:
        assert resp.status == 404
    await register(http, sandbox_server, ALICE, "ipad", token=apns_token(2))
    async with http.delete(url) as resp:
        assert resp.status == 200
        assert (await resp.json())["deleted"] == 2
    assert await devices(http, sandbox_server) == []


async def test_default_ttl_comes_from_settings(http, make_server) -> None:
    server = make_server(default_ttl_seconds=900)
    before = time.time()
    await register(http, server, ALICE, "d1")
    (dev,) = await devices(http, server)
    from datetime import datetime

    expires = datetime.fromisoformat(dev["expires_at"]).timestamp()
    assert before + 899 <= expires <= time.time() + 901


@pytest.mark.parametrize(
    ("path_identity", "device_id", "body", "field"),
    [
        (ALICE, "d", {"platform": "symbian", "token": "ab"}, "platform"),
        (ALICE, "d", {"platform": "apns", "token": ""}, "token"),
        (ALICE, "d", {"platform": "apns", "token": "abc"}, "token"),  # odd length
        (ALICE, "d", {"platform": "apns", "token": "zz" * 32}, "token"),  # not hex
        (ALICE, "d", {"platform": "apns", "token": "ab" * 4}, "token"),  # too short
        (ALICE, "d", {"platform": "fcm", "token": "has space"}, "token"),
        (ALICE, "d", {"platform": "fcm", "token": "x" * 4097}, "token"),
        (ALICE, "d", {"platform": "wns", "token": "http://not-https"}, "token"),
        (ALICE, "d", {"platform": "apns", "token": "ab" * 32, "ttl_seconds": 299}, "ttl_seconds"),
        (
            ALICE,
            "d",
            {"platform": "apns", "token": "ab" * 32, "ttl_seconds": 15_552_001},
            "ttl_seconds",
        ),
        (ALICE, "d", {"platform": "apns", "token": "ab" * 32, "push_kind": "sms"}, "push_kind"),
        (ALICE, "d", {"platform": "apns", "token": "ab" * 32, "app_id": "bad id"}, "app_id"),
        (ALICE, "d", {"platform": "apns", "token": "ab" * 32, "color": "red"}, "color"),
        (ALICE, "d", {"token": "ab" * 32}, "platform"),
        ("alice@example.com", "d", {"platform": "apns", "token": "ab" * 32}, "identity"),
        ("4:not-a-number", "d", {"platform": "apns", "token": "ab" * 32}, "identity"),
        (ALICE, "bad device id!", {"platform": "apns", "token": "ab" * 32}, "device_id"),
    ],
)
async def test_bad_registration_is_422_naming_the_field_and_stores_nothing(
    http, sandbox_server, path_identity, device_id, body, field
) -> None:
    url = f"{sandbox_server.url}/v1/identities/{path_identity}/devices/{device_id}"
    async with http.put(url, json=body) as resp:
        assert resp.status == 422
        detail = (await resp.json())["detail"]
    assert field in [d["field"] for d in detail], detail
    assert body.get("token", "") not in str(detail) or not body.get("token")
    assert await devices(http, sandbox_server) == []


async def test_not_json_body_is_422(http, sandbox_server) -> None:
    async with http.put(
        f"{sandbox_server.url}/v1/identities/{ALICE}/devices/d",
        data=b"{nope",
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 422


async def test_a_token_moves_to_its_newest_identity(http, sandbox_server) -> None:
    token = apns_token(7)
    await register(http, sandbox_server, ALICE, "shared-phone", token=token)
    bob = acs_id("bob")
    await register(http, sandbox_server, bob, "shared-phone", token=token)
    assert await devices(http, sandbox_server) == []
    assert len(await devices(http, sandbox_server, bob)) == 1


async def test_expired_registrations_are_never_pushed_and_are_purged(http, make_server) -> None:
    server = make_server(purge_interval_seconds=0.2)
    await register(http, server, ALICE, "live")
    # Age one registration past its expiry directly in the database file.
    db_path = server.settings.sqlite_path
    now = time.time()
    with sqlite3.connect(db_path) as db:
        db.execute(
            "INSERT INTO registrations (identity, device_id, platform, token, push_kind, "
            "app_id, created_at, updated_at, expires_at) "
            "VALUES (?, 'old', 'apns', ?, 'voip', NULL, ?, ?, ?)",
            (ALICE, apns_token(99), now - 1000, now - 1000, now - 1),
        )
    assert [d["device_id"] for d in await devices(http, server)] == ["live"]
    status, body = await post_events(http, server, [incoming_call_event(ALICE)])
    assert status == 200
    assert [d["device_id"] for d in body["events"][0]["deliveries"]] == ["live"]

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            left = db.execute("SELECT device_id FROM registrations").fetchall()
        if left == [("live",)]:
            break
        time.sleep(0.05)
    assert left == [("live",)]


async def test_registrations_survive_a_restart(http, make_server, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'persist.db'}"
    first = make_server(database_url=url)
    await register(http, first, ALICE, "iphone")
    await post_events(http, first, [incoming_call_event(ALICE, correlation_id="c-1")])
    first.stop()
    second = make_server(database_url=url)
    assert [d["device_id"] for d in await devices(http, second)] == ["iphone"]
    async with http.get(f"{second.url}/v1/calls/c-1") as resp:
        assert (await resp.json())["events"][0]["status"] == "delivered"


# --- Microsoft sample-compatible routes -------------------------------------------------------


async def test_sample_routes_round_trip(http, sandbox_server) -> None:
    base = f"{sandbox_server.url}/api"
    body = {
        "acsMri": ALICE,
        "deviceInfos": [
            {
                "deviceUUID": "6f1b1f4e-1111-2222-3333-444455556666",
                "deviceToken": apns_token(3),
                "platform": "apple",
            }
        ],
    }
    async with http.post(f"{base}/add_device_token", json=body) as resp:
        assert resp.status == 201
    body["deviceInfos"] = [
        {"deviceUUID": "droid-1", "deviceToken": "fcm:token-1", "platform": "android"}
    ]
    async with http.post(f"{base}/add_device_token", json=body) as resp:
        assert resp.status == 201
    async with http.get(f"{base}/get_device_registrations", params={"acsMri": ALICE}) as resp:
        assert resp.status == 200
        doc = await resp.json(content_type=None)
    assert doc["acsMri"] == ALICE
    infos = {d["deviceUUID"]: d for d in doc["deviceInfos"]}
    assert infos["6f1b1f4e-1111-2222-3333-444455556666"]["platform"] == "apple"
    assert infos["droid-1"]["platform"] == "fcmv1"  # android means FCM v1
    assert infos["droid-1"]["deviceToken"].startswith("sha256:")  # anonymous: a fingerprint

    # The native API sees the same registrations.
    assert {d["platform"] for d in await devices(http, sandbox_server)} == {"apns", "fcm"}

    params = {"acsMri": ALICE, "deviceUUID": "droid-1"}
    async with http.delete(f"{base}/delete_device_registration", params=params) as resp:
        assert resp.status == 200
    async with http.delete(f"{base}/delete_device_registration", params=params) as resp:
        assert resp.status == 404
    async with http.get(
        f"{base}/get_device_registrations", params={"acsMri": acs_id("nobody")}
    ) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"acsMri": "8:acs:x_y"}',
        b'{"acsMri": "8:acs:x_y", "deviceInfos": []}',
        b'{"acsMri": "bob", "deviceInfos": [{"deviceUUID": "u", "deviceToken": "fcm:a", '
        b'"platform": "android"}]}',
        b'{"acsMri": "8:acs:x_y", "deviceInfos": [{"deviceUUID": "u", "deviceToken": "abc", '
        b'"platform": "apple"}]}',
        b'{"acsMri": "8:acs:x_y", "deviceInfos": [{"deviceUUID": "u", "deviceToken": "fcm:a", '
        b'"platform": "none"}]}',
        # One good entry and one bad: nothing is stored.
        b'{"acsMri": "8:acs:x_y", "deviceInfos": [{"deviceUUID": "u1", "deviceToken": "fcm:a", '
        b'"platform": "android"}, {"deviceUUID": "u2", "deviceToken": "fcm:b"}]}',
    ],
)
async def test_sample_add_rejects_bad_input_with_400(http, sandbox_server, body) -> None:
    async with http.post(
        f"{sandbox_server.url}/api/add_device_token",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    assert await devices(http, sandbox_server, "8:acs:x_y") == []


async def test_sample_routes_need_their_parameters(http, sandbox_server) -> None:
    async with http.get(f"{sandbox_server.url}/api/get_device_registrations") as resp:
        assert resp.status == 400
    async with http.delete(
        f"{sandbox_server.url}/api/delete_device_registration", params={"acsMri": ALICE}
    ) as resp:
        assert resp.status == 400


# --- operations ------------------------------------------------------------------------------


async def test_health_readiness_and_openapi(http, sandbox_server) -> None:
    async with http.get(f"{sandbox_server.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{sandbox_server.url}/readyz") as resp:
        assert resp.status == 200
        checks = (await resp.json())["checks"]
        assert checks["store"] == "ok" and "sandbox" in checks["delivery"]
    async with http.get(f"{sandbox_server.url}/openapi.json") as resp:
        paths = (await resp.json())["paths"]
    for path in (
        "/api/events",
        "/v1/identities/{identity}/devices/{device_id}",
        "/v1/identities/{identity}/devices",
        "/v1/calls/{call_id}",
        "/v1/sandbox/pushes",
        "/api/add_device_token",
    ):
        assert path in paths


async def test_readyz_fails_when_the_store_is_gone(http, sandbox_server) -> None:
    await sandbox_server.relay.store.close()  # the database connection drops
    async with http.get(f"{sandbox_server.url}/readyz") as resp:
        assert resp.status == 503
        assert "unreachable" in (await resp.json())["checks"]["store"]
    await sandbox_server.relay.store.open()


async def test_sandbox_listing_is_404_outside_sandbox_mode(http, nh_server) -> None:
    async with http.get(f"{nh_server.url}/v1/sandbox/pushes") as resp:
        assert resp.status == 404


# --- validation: whole values only, one spelling per token (issue 17, item 8) -----------------


@pytest.mark.parametrize(
    ("path_identity", "device_id", "body", "field"),
    [
        (ALICE + "%0A", "d", {"platform": "apns", "token": "ab" * 32}, "identity"),
        (ALICE, "d%0A", {"platform": "apns", "token": "ab" * 32}, "device_id"),
        (ALICE, "d", {"platform": "apns", "token": "ab" * 31 + "a\n"}, "token"),  # even length
        (ALICE, "d", {"platform": "fcm", "token": "fcm:abc\n"}, "token"),
        (ALICE, "d", {"platform": "apns", "token": "ab" * 32, "app_id": "com.x.y\n"}, "app_id"),
        (ALICE, "d", {"platform": "wns", "token": "https://wns.example/?t=a\x00b"}, "token"),
        (ALICE, "d", {"platform": "wns", "token": "https://wns.example/?t=\u20ac"}, "token"),
        (ALICE, "d", {"platform": "wns", "token": "https://wns.example/?t=\u00e9"}, "token"),
        (ALICE, "d", {"platform": "wns", "token": "https://wns.example/?t=a\n"}, "token"),
    ],
    ids=[
        "identity-newline",
        "device-newline",
        "apns-newline",
        "fcm-newline",
        "app-id-newline",
        "wns-nul",
        "wns-non-latin-1",
        "wns-latin-1",
        "wns-newline",
    ],
)
async def test_a_trailing_newline_or_a_control_character_is_422(
    http, sandbox_server, path_identity, device_id, body, field
) -> None:
    from yarl import URL

    url = URL(
        f"{sandbox_server.url}/v1/identities/{path_identity}/devices/{device_id}", encoded=True
    )
    async with http.put(url, json=body) as resp:
        assert resp.status == 422, await resp.text()
        detail = (await resp.json())["detail"]
    assert field in [d["field"] for d in detail], detail
    assert await devices(http, sandbox_server) == []


async def test_sample_route_refuses_a_trailing_newline(http, sandbox_server) -> None:
    for mri, uuid_ in ((ALICE + "\n", "u"), (ALICE, "u\n")):
        body = {
            "acsMri": mri,
            "deviceInfos": [
                {"deviceUUID": uuid_, "deviceToken": apns_token(1), "platform": "apple"}
            ],
        }
        async with http.post(f"{sandbox_server.url}/api/add_device_token", json=body) as resp:
            assert resp.status == 400, await resp.text()
    assert await devices(http, sandbox_server) == []


async def test_one_phone_in_two_cases_is_one_device(http, sandbox_server) -> None:
    """APNs tokens are hex: `AB…` and `ab…` are the same phone, so registering it for a second
    identity moves it there (native and sample routes alike), and a call rings it once."""
    from ringrelay.redact import fingerprint

    bob, carol = acs_id("bob"), acs_id("carol")
    token = apns_token(0xABCDEF12)
    assert token != token.upper()
    assert (await register(http, sandbox_server, ALICE, "phone", token=token.upper())).status == 201
    assert (await register(http, sandbox_server, bob, "phone", token=token)).status == 201
    assert await devices(http, sandbox_server) == []
    (listed,) = await devices(http, sandbox_server, bob)
    assert listed["token"] == fingerprint(token)  # stored in lower case

    body = {
        "acsMri": carol,
        "deviceInfos": [{"deviceUUID": "phone", "deviceToken": token.upper(), "platform": "apple"}],
    }
    async with http.post(f"{sandbox_server.url}/api/add_device_token", json=body) as resp:
        assert resp.status == 201
    assert await devices(http, sandbox_server, bob) == []
    (listed,) = await devices(http, sandbox_server, carol)
    assert listed["token"] == fingerprint(token)

    for callee, rung in ((ALICE, 0), (bob, 0), (carol, 1)):
        status, answer = await post_events(http, sandbox_server, [incoming_call_event(callee)])
        assert status == 200
        assert len(answer["events"][0]["deliveries"]) == rung, callee


def _old_sqlite_file(path, rows) -> None:
    """A store file as ringrelay wrote it before APNs tokens were lower-cased (schema 1)."""
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE registrations (identity TEXT NOT NULL, device_id TEXT NOT NULL, "
        "platform TEXT NOT NULL, token TEXT NOT NULL, push_kind TEXT NOT NULL, app_id TEXT, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL NOT NULL, "
        "PRIMARY KEY (identity, device_id)) WITHOUT ROWID; "
        # schema 1's events table: the ring lifecycle's upgrade adds columns to it
        "CREATE TABLE events (event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, "
        "status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', correlation_id TEXT, "
        "recipient TEXT, received_at REAL NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID; "
        "PRAGMA user_version=1;"
    )
    db.executemany("INSERT INTO registrations VALUES (?, ?, ?, ?, 'voip', NULL, ?, ?, ?)", rows)
    db.commit()
    db.close()


async def test_existing_rows_in_two_cases_become_one_device(http, make_server, tmp_path) -> None:
    from ringrelay.redact import fingerprint

    bob, carol = acs_id("bob"), acs_id("carol")
    token = apns_token(0xABCDEF12)
    now = time.time()
    path = tmp_path / "old.db"
    _old_sqlite_file(
        path,
        [
            (ALICE, "phone", "apns", token.upper(), now - 60, now - 60, now + 3600),
            (bob, "phone", "apns", token, now - 10, now - 10, now + 3600),  # the newest
            (carol, "ipad", "apns", apns_token(0xDEADBEEF).upper(), now, now, now + 3600),
        ],
    )
    server = make_server(database_url=f"sqlite:///{path}")
    assert await devices(http, server) == []
    assert [d["token"] for d in await devices(http, server, bob)] == [fingerprint(token)]
    assert [d["token"] for d in await devices(http, server, carol)] == [
        fingerprint(apns_token(0xDEADBEEF))
    ]
    status, answer = await post_events(http, server, [incoming_call_event(ALICE)])
    assert status == 200 and answer["events"][0]["deliveries"] == []


async def test_postgres_migration_keeps_one_spelling_per_apns_token() -> None:
    import asyncpg

    from ringrelay.store.postgres import MIGRATIONS
    from tests.test_store_contract import PG_URL, _drop_schema, _postgres_store

    schema = f"t_case_{int(time.time() * 1000)}"
    store = await _postgres_store(schema)
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        await conn.execute(MIGRATIONS[0])
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now()); "
            "INSERT INTO schema_migrations (version) VALUES (1)"
        )
        token, now = apns_token(0xABCDEF12), time.time()
        await conn.executemany(
            "INSERT INTO registrations VALUES ($1, $2, 'apns', $3, 'voip', NULL, $4, $4, $5)",
            [
                (ALICE, "phone", token.upper(), now - 60, now + 3600),
                (acs_id("bob"), "phone", token, now - 10, now + 3600),
            ],
        )
        await store.open()
        assert await store.list_registrations(ALICE, now) == []
        (kept,) = await store.list_registrations(acs_id("bob"), now)
        assert kept.token == token
        await store.close()
    finally:
        await conn.close()
        await _drop_schema(schema)
