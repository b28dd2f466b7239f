"""Number assignment over HTTP: CRUD, the admin scope, and 422s that name the field."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from ringrelay.auth.apikeys import new_api_key
from tests.conftest import RunningServer, acs_id

USER = acs_id("numbers-user")


async def test_numbers_crud_with_admin_key_only(
    make_server: Callable[..., RunningServer], http: aiohttp.ClientSession
) -> None:
    server = make_server(auth_required=True)
    admin, admin_record = new_api_key("ops", ["admin"])
    reader, reader_record = new_api_key("app", ["register", "read"])
    await server.relay.store.create_api_key(admin_record)
    await server.relay.store.create_api_key(reader_record)
    url = f"{server.url}/v1/numbers"
    as_admin = {"X-API-Key": admin}

    async with http.put(f"{url}/+14255551212", json={"target": USER}) as resp:
        assert resp.status == 401
    async with http.put(
        f"{url}/+14255551212", json={"target": USER}, headers={"X-API-Key": reader}
    ) as resp:
        assert resp.status == 403 and "admin" in (await resp.json())["detail"]
    async with http.get(url, headers={"X-API-Key": reader}) as resp:
        assert resp.status == 403

    body = {"target": USER, "label": "front desk"}
    async with http.put(f"{url}/+14255551212", json=body, headers=as_admin) as resp:
        assert resp.status == 201
        created = await resp.json()
    assert created["e164"] == "+14255551212" and created["target"] == USER
    # %2B is the same number; a second PUT reassigns (200) and keeps created_at.
    body = {"target": "+12065550100"}
    async with http.put(f"{url}/%2B14255551212", json=body, headers=as_admin) as resp:
        assert resp.status == 200
        again = await resp.json()
    assert again["target"] == "4:+12065550100" and again["created_at"] == created["created_at"]
    async with http.get(f"{url}/+14255551212", headers=as_admin) as resp:
        assert resp.status == 200 and (await resp.json())["label"] == ""
    async with http.get(url, headers=as_admin) as resp:
        assert [n["e164"] for n in (await resp.json())["numbers"]] == ["+14255551212"]
    async with http.delete(f"{url}/+14255551212", headers=as_admin) as resp:
        assert resp.status == 204
    async with http.delete(f"{url}/+14255551212", headers=as_admin) as resp:
        assert resp.status == 404
    async with http.get(f"{url}/+14255551212", headers=as_admin) as resp:
        assert resp.status == 404


async def test_bad_number_or_target_is_a_422_naming_the_field(
    make_server: Callable[..., RunningServer], http: aiohttp.ClientSession
) -> None:
    server = make_server()
    url = f"{server.url}/v1/numbers"
    cases = [
        ("14255551212", {"target": USER}, "e164"),  # no '+'
        ("+0425555", {"target": USER}, "e164"),  # country code 0
        ("+1425555121299999", {"target": USER}, "e164"),  # 16 digits
        ("+14255551212", {"target": "alice"}, "target"),
        (
            "+14255551212",
            {"target": "28:orgid:app"},
            "target",
        ),  # a Teams app: not a redirect target
        ("+14255551212", {"target": "+14255551212"}, "target"),  # itself: a loop
        ("+14255551212", {"target": USER, "colour": "red"}, "colour"),
        ("+14255551212", {}, "target"),
    ]
    for number, body, field in cases:
        async with http.put(f"{url}/{number}", json=body) as resp:
            assert resp.status == 422, (number, body)
            detail = (await resp.json())["detail"]
            assert detail[0]["field"] == field, (number, body, detail)
    async with http.get(url) as resp:
        assert (await resp.json())["numbers"] == []  # nothing stored


async def test_numbers_that_redirect_to_each_other_are_refused(
    make_server: Callable[..., RunningServer], http: aiohttp.ClientSession
) -> None:
    """A loop the correlationId guard might not see (ACS may give the follow-up a new one)."""
    server = make_server()
    url = f"{server.url}/v1/numbers"
    for number, target in (("+14255550001", "+14255550002"), ("+14255550002", "+14255550003")):
        async with http.put(f"{url}/{number}", json={"target": target}) as resp:
            assert resp.status == 201
    async with http.put(f"{url}/+14255550003", json={"target": "+14255550001"}) as resp:
        assert resp.status == 422
        (detail,) = (await resp.json())["detail"]
    assert detail["field"] == "target"
    assert "+14255550003 -> +14255550001 -> +14255550002 -> +14255550003" in detail["msg"]
    async with http.put(f"{url}/+14255550003", json={"target": USER}) as resp:
        assert resp.status == 201
