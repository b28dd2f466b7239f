"""Call routing over the wire: rules, number assignment, redirect/reject through the fake Call
Automation (HTTPS, HMAC verified), once per call leg, and the redirect loop."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from ringrelay.fakes import tls
from ringrelay.fakes.callautomation import FakeCallAutomation
from tests.conftest import BackgroundLoop, RunningServer, acs_id, post_events, register

PSTN = "+14255551212"
CALLER = "4:+14255550123"
USER = acs_id("routing-user")


@pytest.fixture(scope="module")
def _fake_ca_module(
    background_loop: BackgroundLoop, certs: tls.TestCertificates
) -> Iterator[FakeCallAutomation]:
    fake = FakeCallAutomation()
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    yield fake
    background_loop.run(fake.stop())


@pytest.fixture
def fake_ca(_fake_ca_module: FakeCallAutomation) -> FakeCallAutomation:
    _fake_ca_module.reset()
    _fake_ca_module.webhook_url = None
    return _fake_ca_module


@pytest.fixture
def ca_settings(fake_ca: FakeCallAutomation, certs: tls.TestCertificates) -> dict[str, Any]:
    return {"acs_connection_string": fake_ca.connection_string(), "acs_ca_file": certs.ca_file}


async def assign(http: aiohttp.ClientSession, server: RunningServer, number: str, target: str):
    async with http.put(f"{server.url}/v1/numbers/{number}", json={"target": target}) as resp:
        return resp.status, await resp.json()


def the_event(answer: Any) -> dict[str, Any]:
    assert isinstance(answer, dict), answer
    (report,) = answer["events"]
    return report


async def test_pstn_number_redirects_once_and_the_followup_rings_the_user(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
    background_loop: BackgroundLoop,
) -> None:
    server = make_server(**ca_settings)
    assert (await register(http, server, USER, "phone-1")).status == 201
    status, body = await assign(http, server, PSTN, USER)
    assert status == 201 and body["target"] == USER

    first = fake_ca.place_call(f"4:{PSTN}", CALLER)
    status, answer = await post_events(http, server, [first])
    report = the_event(answer)
    assert status == 200 and report["status"] == "redirected", answer
    assert f"number {PSTN}" in report["reason"]
    (redirect,) = [a for a in fake_ca.actions if a["kind"] == "redirect"]
    assert redirect["status"] == 204
    assert redirect["target"] == {"rawId": USER, "communicationUser": {"id": USER}}

    # Event Grid redelivers the first event: not redirected twice, same answer.
    status, answer = await post_events(http, server, [first])
    assert status == 200 and the_event(answer)["status"] == "redirected"
    assert len([a for a in fake_ca.actions if a["kind"] == "redirect"]) == 1

    # The follow-up IncomingCall for the user (same correlationId) is pushed, never routed.
    (followup,) = fake_ca.followups
    assert followup["data"]["correlationId"] == first["data"]["correlationId"]
    status, answer = await post_events(http, server, [followup])
    report = the_event(answer)
    assert status == 200 and report["status"] == "delivered", answer
    assert [d["device_id"] for d in report["deliveries"]] == ["phone-1"]
    assert len(fake_ca.actions) == 1


OTHER = acs_id("routing-other")


def rule(name: str, action: str, *conditions: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "action": action, "conditions": list(conditions), **extra}


FROM_PSTN = {"operatorType": "StringBeginsWith", "key": "data.from.rawId", "values": ["4:+1425"]}


async def test_rules_in_order_first_match_wins_and_each_action(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    rules = [
        rule(
            "spam",
            "reject",
            {"operatorType": "StringIn", "key": "data.from.rawId", "values": ["4:+19995550000"]},
            reason="busy",
        ),
        rule(
            "quiet",
            "ignore",
            {
                "operatorType": "StringContains",
                "key": "data.callerDisplayName",
                "values": ["ROBOT"],
            },
        ),
        rule("to-other", "push", FROM_PSTN, target=OTHER),
        rule("never-reached", "reject", FROM_PSTN),
    ]
    server = make_server(rules=rules, **ca_settings)
    await register(http, server, USER, "u1")
    await register(http, server, OTHER, "o1")

    spam = fake_ca.place_call(USER, "4:+19995550000")
    _, answer = await post_events(http, server, [spam])
    report = the_event(answer)
    assert report["status"] == "call_rejected" and "rule 'spam'" in report["reason"], answer
    (reject,) = fake_ca.actions
    assert reject["kind"] == "reject" and reject["reason"] == "busy" and reject["status"] == 204

    robot = fake_ca.place_call(USER, "4:+14255550123", display_name="a robot caller")
    _, answer = await post_events(http, server, [robot])
    assert the_event(answer)["status"] == "ignored"

    # Matches "to-other" and "never-reached": the first wins, and pushes to OTHER's devices.
    person = fake_ca.place_call(USER, "4:+14255550123", display_name="Ann")
    _, answer = await post_events(http, server, [person])
    report = the_event(answer)
    assert report["status"] == "delivered", answer
    assert [(d["identity"], d["device_id"]) for d in report["deliveries"]] == [(OTHER, "o1")]

    # No rule matches a VoIP caller: today's behaviour, a push to data.to.
    voip = fake_ca.place_call(USER, acs_id("someone"))
    _, answer = await post_events(http, server, [voip])
    assert [d["device_id"] for d in the_event(answer)["deliveries"]] == ["u1"]
    assert len(fake_ca.actions) == 1


async def test_redirect_rule_retries_a_5xx_with_the_same_repeatability_id(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    server = make_server(rules=[rule("pstn", "redirect", FROM_PSTN, target=USER)], **ca_settings)
    fake_ca.respond(503)
    call = fake_ca.place_call(f"4:{PSTN}", CALLER)
    _, answer = await post_events(http, server, [call])
    assert the_event(answer)["status"] == "redirected", answer
    first, second = fake_ca.actions
    assert (first["status"], second["status"]) == (503, 204)
    assert first["request_id"] == second["request_id"] and first["request_id"]
    assert first["first_sent"] == second["first_sent"]


async def test_redirect_of_a_call_that_is_gone_is_recorded_not_retried(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    server = make_server(**ca_settings)
    await assign(http, server, PSTN, USER)
    call = fake_ca.place_call(f"4:{PSTN}", CALLER)
    fake_ca.end_call(call["data"]["correlationId"])
    status, answer = await post_events(http, server, [call])
    report = the_event(answer)
    assert status == 200 and report["status"] == "failed", answer
    assert "refused by Call Automation: HTTP 404" in report["reason"]
    assert [a["status"] for a in fake_ca.actions] == [404]
    # A redelivery finds the outcome in the ledger: no second request.
    _, answer = await post_events(http, server, [call])
    assert the_event(answer)["status"] == "failed"
    assert len(fake_ca.actions) == 1
    async with http.get(f"{server.url}/v1/calls/{call['data']['correlationId']}") as resp:
        assert "HTTP 404" in (await resp.json())["events"][0]["reason"]


async def test_wrong_access_key_is_a_configuration_error(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    certs: tls.TestCertificates,
) -> None:
    wrong = base64.b64encode(b"not the resource key").decode()
    server = make_server(
        acs_connection_string=fake_ca.connection_string(wrong), acs_ca_file=certs.ca_file
    )
    await assign(http, server, PSTN, USER)
    call = fake_ca.place_call(f"4:{PSTN}", CALLER)
    status, answer = await post_events(http, server, [call])
    report = the_event(answer)
    assert status == 200 and report["status"] == "failed", answer
    assert "configuration error" in report["reason"] and "HTTP 401" in report["reason"]
    assert "RINGRELAY_ACS_CONNECTION_STRING" in report["reason"]
    assert [a["status"] for a in fake_ca.actions] == [401]
    assert fake_ca.actions[0]["error"] == "signature mismatch"


async def test_the_loop_one_subscription_receives_both_events(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    """The seed's scenario: a PSTN number redirected to an ACS user; ACS posts the follow-up to
    the same webhook. A rule that matches every PSTN caller would redirect the follow-up too (to
    the user it already rings): it is recognised and pushed instead."""
    rules = [rule("all-pstn", "redirect", FROM_PSTN, target=USER)]
    server = make_server(rules=rules, **ca_settings)
    fake_ca.webhook_url = f"{server.url}/api/events"
    await register(http, server, USER, "phone-1")
    call = fake_ca.place_call(f"4:{PSTN}", CALLER)
    _, answer = await post_events(http, server, [call])
    assert the_event(answer)["status"] == "redirected"
    correlation = call["data"]["correlationId"]
    for _ in range(200):
        async with http.get(f"{server.url}/v1/calls/{correlation}") as resp:
            events = (await resp.json())["events"]
        if len(events) == 2 and events[1]["status"] != "pending":
            break
        await asyncio.sleep(0.02)
    statuses = sorted(e["status"] for e in events)
    assert statuses == ["delivered", "redirected"], events
    assert [a["kind"] for a in fake_ca.actions] == ["redirect"]
    async with http.get(f"{server.url}/v1/sandbox/pushes?call_id={correlation}") as resp:
        assert len((await resp.json())["pushes"]) == 1


async def test_loop_guard_own_callee_and_redirect_limit(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    third = acs_id("third")

    def to(who: str) -> dict[str, Any]:
        return {"operatorType": "StringIn", "key": "data.to.rawId", "values": [who]}

    rules = [
        # redirects a call to the identity it is already for
        rule("self", "redirect", to(USER), target=USER),
        rule("other", "redirect", to(OTHER), target=USER),
        rule("third", "redirect", to(third), target=OTHER),
    ]
    server = make_server(rules=rules, **ca_settings)
    for who, device in ((USER, "u1"), (OTHER, "o1"), (third, "t1")):
        await register(http, server, who, device)
    call = fake_ca.place_call(USER, CALLER)
    _, answer = await post_events(http, server, [call])
    assert the_event(answer)["status"] == "delivered" and fake_ca.actions == []

    # OTHER's leg of the same call is redirected to USER (1 redirect); a third leg of the call
    # would be a second redirect, past RINGRELAY_MAX_REDIRECTS=1: pushed where it is.
    correlation = call["data"]["correlationId"]
    leg = fake_ca.place_call(OTHER, CALLER, correlation_id=correlation)
    _, answer = await post_events(http, server, [leg])
    assert the_event(answer)["status"] == "redirected"
    leg3 = fake_ca.place_call(third, CALLER, correlation_id=correlation)
    _, answer = await post_events(http, server, [leg3])
    report = the_event(answer)
    assert report["status"] == "delivered", answer
    assert [d["device_id"] for d in report["deliveries"]] == ["t1"]
    assert len(fake_ca.actions) == 1


async def test_two_instances_on_postgresql_redirect_once(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    import uuid

    from tests.test_store_contract import PG_URL, _drop_schema, _postgres_store

    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)
    try:
        url = f"{PG_URL}?search_path={schema}"
        first = make_server(database_url=url, **ca_settings)
        second = make_server(database_url=url, **ca_settings)
        await assign(http, first, PSTN, USER)
        fake_ca.respond(204, delay=0.3)  # a slow answer: both deliveries overlap it
        call = fake_ca.place_call(f"4:{PSTN}", CALLER)
        answers = await asyncio.gather(
            post_events(http, first, [call]), post_events(http, second, [call])
        )
        statuses = sorted(the_event(a)["status"] for _, a in answers)
        # One instance redirected; the other saw the claim in flight and answered 503 so that
        # Event Grid retries; the retry finds the redirect done.
        assert statuses == ["pending", "redirected"], answers
        assert sorted(code for code, _ in answers) == [200, 503]
        _, answer = await post_events(http, second, [call])
        assert the_event(answer)["status"] == "redirected"
        assert len([a for a in fake_ca.actions if a["kind"] == "redirect"]) == 1
    finally:
        for server in (first, second):
            server.stop()
        await _drop_schema(schema)


async def test_a_retry_after_a_timeout_is_executed_once(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    """The first attempt times out at our end but the service carries it out; the retry carries
    the same Repeatability-Request-ID, so it gets the first answer instead of "already
    redirected" (400), and the call is redirected once."""
    server = make_server(acs_timeout_seconds=0.3, **ca_settings)
    await assign(http, server, PSTN, USER)
    fake_ca.respond(204, delay=0.8)
    call = fake_ca.place_call(f"4:{PSTN}", CALLER)
    _, answer = await post_events(http, server, [call])
    assert the_event(answer)["status"] == "redirected", answer
    await asyncio.sleep(0.8)  # let the slow first request finish at the fake
    kinds = [(a["status"], bool(a.get("replayed"))) for a in fake_ca.actions]
    assert (204, True) in kinds and (204, False) in kinds, fake_ca.actions
    assert len({a["request_id"] for a in fake_ca.actions}) == 1
    assert len(fake_ca.followups) == 1  # one redirect, one follow-up IncomingCall


async def test_redirect_targets_teams_user_and_phone_number(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
    ca_settings: dict[str, Any],
) -> None:
    teams = "8:orgid:2da3b3c2-3a8b-4b5e-9f0e-5f6f2b1d9e11"

    def to(number: str) -> dict[str, Any]:
        return {"operatorType": "StringIn", "key": "data.to.phoneNumber.value", "values": [number]}

    rules = [
        rule("teams", "redirect", to("+14255551212"), target=teams),
        rule("mobile", "redirect", to("+14255551313"), target="+12065550100"),
    ]
    server = make_server(rules=rules, **ca_settings)
    for number in ("+14255551212", "+14255551313"):
        _, answer = await post_events(http, server, [fake_ca.place_call(f"4:{number}", CALLER)])
        assert the_event(answer)["status"] == "redirected", answer
    first, second = (a["target"] for a in fake_ca.actions)
    assert first == {
        "rawId": teams,
        "microsoftTeamsUser": {
            "userId": "2da3b3c2-3a8b-4b5e-9f0e-5f6f2b1d9e11",
            "isAnonymous": False,
            "cloud": "PUBLIC",
        },
    }
    assert second["phoneNumber"]["value"] == "+12065550100"
    assert [f["data"]["to"]["rawId"] for f in fake_ca.followups] == [teams, "4:+12065550100"]


async def test_rules_see_the_envelope_in_both_schemas(
    make_server: Callable[..., RunningServer], http: aiohttp.ClientSession
) -> None:
    """Envelope keys (`subject`, `eventType`) reach the rules for an Event Grid event and for a
    CloudEvent (whose `type` answers to `eventType`); push and ignore need no Call Automation."""
    from ringrelay.simulate import incoming_call_event

    rules = [
        rule(
            "pstn-subject",
            "ignore",
            {"operatorType": "StringBeginsWith", "key": "subject", "values": ["/PHONECALL/"]},
            {
                "operatorType": "StringIn",
                "key": "eventType",
                "values": ["microsoft.communication.incomingcall"],
            },
        )
    ]
    server = make_server(rules=rules)
    await register(http, server, USER, "u1")
    grid = incoming_call_event(USER, CALLER)
    _, answer = await post_events(http, server, [grid])
    assert the_event(answer)["status"] == "ignored", answer
    cloud = incoming_call_event(USER, CALLER)
    cloud_event = {
        "id": cloud["id"],
        "source": cloud["topic"],
        "subject": cloud["subject"],
        "type": cloud["eventType"],
        "specversion": "1.0",
        "time": cloud["eventTime"],
        "data": cloud["data"],
    }
    _, answer = await post_events(
        http, server, [cloud_event], content_type="application/cloudevents-batch+json"
    )
    assert the_event(answer)["status"] == "ignored", answer
    voip = incoming_call_event(USER, acs_id("caller"))  # subject without /phoneCall
    _, answer = await post_events(http, server, [voip])
    assert the_event(answer)["status"] == "delivered", answer


async def test_untrusted_certificate_is_a_configuration_error_not_retried(
    make_server: Callable[..., RunningServer],
    http: aiohttp.ClientSession,
    fake_ca: FakeCallAutomation,
) -> None:
    server = make_server(acs_connection_string=fake_ca.connection_string())  # no CA file
    await assign(http, server, PSTN, USER)
    call = fake_ca.place_call(f"4:{PSTN}", CALLER)
    status, answer = await post_events(http, server, [call])
    report = the_event(answer)
    assert status == 200 and report["status"] == "failed", answer
    assert "TLS certificate of Call Automation not trusted" in report["reason"]
    assert "RINGRELAY_ACS_CA_FILE" in report["reason"]
    assert fake_ca.actions == []  # never reached the fake
