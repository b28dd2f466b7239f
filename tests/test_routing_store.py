"""Number assignment and call-action claims, on SQLite and PostgreSQL (the store contract), and
the SQLite upgrade from schema version 1."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

from ringrelay.models import DeliveryStatus
from ringrelay.routing.numbers import NumberAssignment
from ringrelay.store import CallAction, Store
from ringrelay.store import sqlite as sqlite_store
from ringrelay.store.sqlite import SQLiteStore
from tests.test_store_contract import NOW, store  # noqa: F401  (the fixture)

USER = "8:acs:res_user"


async def test_numbers_crud(store: Store) -> None:  # noqa: F811
    assert await store.get_number("+14255551212") is None
    a = NumberAssignment("+14255551212", USER, "front desk", NOW, NOW)
    assert await store.put_number(a) is True
    assert await store.put_number(replace(a, target="8:acs:res_b", updated_at=NOW + 1)) is False
    got = await store.get_number("+14255551212")
    assert got is not None and got.target == "8:acs:res_b" and got.created_at == NOW
    await store.put_number(NumberAssignment("+12065550100", USER, "", NOW, NOW))
    assert [n.e164 for n in await store.list_numbers()] == ["+12065550100", "+14255551212"]
    assert await store.delete_number("+14255551212") is True
    assert await store.delete_number("+14255551212") is False
    assert [n.e164 for n in await store.list_numbers()] == ["+12065550100"]


def _action(callee: str = "4:+14255551212", kind: str = "redirect") -> CallAction:
    return CallAction(
        correlation_id="corr-1",
        callee=callee,
        event_id="ev-1",
        kind=kind,
        target=USER,
        status="in_flight",
        request_id="11111111-1111-4111-8111-111111111111",
        first_sent=NOW,
    )


async def test_call_action_is_claimed_once(store: Store) -> None:  # noqa: F811
    first = await store.claim_call_action(_action(), NOW, NOW + 30, max_redirects=1)
    assert first.claimed and first.action is not None
    # Another delivery (or instance) while the lease lives: not claimed, told what is going on.
    busy = await store.claim_call_action(_action(), NOW + 1, NOW + 31, max_redirects=1)
    assert not busy.claimed and busy.action is not None and busy.action.status == "in_flight"
    # A transient failure releases it: the next delivery claims it again, same request id.
    action = first.action
    action.status, action.reason, action.attempts = "transient", "HTTP 503", 2
    await store.settle_call_action(action, NOW + 2)
    again = _action()
    again.request_id, again.first_sent = "22222222-2222-4222-8222-222222222222", NOW + 3
    retry = await store.claim_call_action(again, NOW + 3, NOW + 33, max_redirects=1)
    assert retry.claimed and retry.action is not None
    assert retry.action.request_id == "11111111-1111-4111-8111-111111111111"
    assert retry.action.first_sent == NOW and retry.action.attempts == 2
    retry.action.status = DeliveryStatus.ACCEPTED.value
    await store.settle_call_action(retry.action, NOW + 4)
    done = await store.claim_call_action(_action(), NOW + 5, NOW + 35, max_redirects=1)
    assert not done.claimed and done.action is not None and done.action.status == "accepted"
    # An expired lease is taken over (a crashed instance).
    other = _action(callee="4:+12065550100", kind="reject")
    assert (await store.claim_call_action(other, NOW, NOW + 1, 1)).claimed
    assert (
        await store.claim_call_action(_action("4:+12065550100", "reject"), NOW + 2, NOW + 9, 1)
    ).claimed
    listed = await store.call_actions("corr-1")
    assert {(a.callee, a.status) for a in listed} == {
        ("4:+14255551212", "accepted"),
        ("4:+12065550100", "in_flight"),
    }


async def test_redirects_per_call_are_limited(store: Store) -> None:  # noqa: F811
    assert (await store.claim_call_action(_action("4:+1"), NOW, NOW + 30, 1)).claimed
    second = await store.claim_call_action(_action("8:acs:res_x"), NOW, NOW + 30, 1)
    assert not second.claimed and second.limit_reached
    assert (await store.claim_call_action(_action("8:acs:res_x"), NOW, NOW + 30, 2)).claimed
    # A reject is not a redirect: never limited.
    assert (
        await store.claim_call_action(_action("8:acs:res_y", "reject"), NOW, NOW + 30, 1)
    ).claimed


async def test_sqlite_upgrades_an_older_database(tmp_path: Any) -> None:
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE registrations (identity TEXT NOT NULL, device_id TEXT NOT NULL, platform "
        "TEXT NOT NULL, token TEXT NOT NULL, push_kind TEXT NOT NULL, app_id TEXT, created_at "
        "REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL NOT NULL, "
        "PRIMARY KEY (identity, device_id)) WITHOUT ROWID;"
        "CREATE TABLE events (event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, status TEXT "
        "NOT NULL, reason TEXT NOT NULL DEFAULT '', correlation_id TEXT, recipient TEXT, "
        "received_at REAL NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_hash TEXT "
        "NOT NULL, scopes TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL);"
        "INSERT INTO api_keys VALUES ('k1', 'old', 'h', 'admin', 1.0, NULL);"
        "PRAGMA user_version=1;"
    )
    db.close()
    s = SQLiteStore(str(path))
    await s.open()
    try:
        assert [k.key_id for k in await s.list_api_keys()] == ["k1"]  # kept
        await s.put_number(NumberAssignment("+14255551212", USER, "", NOW, NOW))
        assert (await s.get_number("+14255551212")) is not None
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    finally:
        await s.close()


async def test_refused_redirects_do_not_count_unanswered_ones_do(store: Store) -> None:  # noqa: F811
    refused = (await store.claim_call_action(_action("4:+1"), NOW, NOW + 30, 1)).action
    assert refused is not None
    refused.status = DeliveryStatus.REJECTED.value  # HTTP 404: the call was gone
    await store.settle_call_action(refused, NOW + 1)
    unanswered = (await store.claim_call_action(_action("4:+2"), NOW, NOW + 30, 1)).action
    assert unanswered is not None  # the refused one did not count
    unanswered.status = DeliveryStatus.TRANSIENT.value  # timed out: may have been carried out
    await store.settle_call_action(unanswered, NOW + 2)
    third = await store.claim_call_action(_action("4:+3"), NOW + 3, NOW + 30, 1)
    assert not third.claimed and third.limit_reached
