"""Payload building, table-tested against the fixtures from Microsoft's docs and SDK tests."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from ringrelay.payloads import (
    EVENT_ID_INCOMING_CALL,
    EVENT_ID_INCOMING_PSTN_CALL,
    PayloadError,
    apns_voip_body,
    call_push_from_incoming_call,
    extract_cc,
    fcm_v1_message,
)
from ringrelay.simulate import make_incoming_call_context
from tests.conftest import acs_id, load_fixture

SPEC_EVENT = load_fixture("incomingcall.eventgrid.azure-rest-api-specs.json")
CLOUD_EVENT = load_fixture("incomingcall.cloudevents.azure-rest-api-specs.json")
DOCS_DELIVERY = load_fixture("incomingcall.eventgrid.azure-docs.json")
SDK_DICT = load_fixture("push.voip.ui-library-ios-test.fromDictionary.json")


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


HEADER = b64url(b'{"alg":"none","typ":"JWT"}')


def context_with(claims: object) -> str:
    return f"{HEADER}.{b64url(json.dumps(claims).encode())}."


def filled(event: dict, *, caller: str | None = None, kind: str | None = None) -> dict:
    """A spec example with its placeholders replaced by real identifiers and context."""
    event = copy.deepcopy(event)
    data = event["data"]
    data["to"]["rawId"] = acs_id("callee")
    data["from"]["rawId"] = caller or acs_id("caller")
    if kind:
        data["from"]["kind"] = kind
    data["correlationId"] = "4aaf485e-2991-4483-986f-518f60684c23"
    data["incomingCallContext"], _ = make_incoming_call_context("H4sIAAAAAAAAA81YbW8=")
    return event


@pytest.mark.parametrize("event", [SPEC_EVENT, CLOUD_EVENT], ids=["eventgrid", "cloudevents"])
def test_spec_examples_map_to_the_sdk_keys(event: dict) -> None:
    push = call_push_from_incoming_call(filled(event)["data"])
    data = push.data()
    # The keys the SDK's fromDictionary reads (UI library test fixture), minus its typo'd key.
    sdk_keys = {k.strip() for k in SDK_DICT} - {"convoId", "participantId"}
    assert sdk_keys <= set(data)
    assert data["eventId"] == EVENT_ID_INCOMING_CALL
    assert data["cp"] == "H4sIAAAAAAAAA81YbW8="
    assert data["callId"] == "4aaf485e-2991-4483-986f-518f60684c23"
    assert data["recipientId"] == acs_id("callee")
    assert data["callerId"] == acs_id("caller")
    assert data["displayName"] == "VOIP Caller"
    assert data["videoCall"] == "false"


def test_pstn_caller_gets_event_id_111() -> None:
    push = call_push_from_incoming_call(
        filled(SPEC_EVENT, caller="4:+18557047380", kind="phoneNumber")["data"]
    )
    assert push.event_id == EVENT_ID_INCOMING_PSTN_CALL
    by_prefix = filled(SPEC_EVENT, caller="4:+18557047380")
    by_prefix["data"]["from"].pop("kind")
    assert call_push_from_incoming_call(by_prefix["data"]).event_id == 111


def test_apns_body_is_the_samples_shape() -> None:
    body = apns_voip_body(call_push_from_incoming_call(filled(SPEC_EVENT)["data"]))
    assert body["aps"] == {}
    assert body["data"]["eventId"] == 107  # a JSON number on APNs


def test_fcm_message_has_only_string_values_and_ring_ttl() -> None:
    push = call_push_from_incoming_call(filled(SPEC_EVENT)["data"])
    message = fcm_v1_message(push, seconds_left=29.2, token="tok")["message"]
    assert all(isinstance(v, str) for v in message["data"].values())
    assert message["data"]["eventId"] == "107"
    assert message["android"] == {"priority": "HIGH", "ttl": "30s"}
    assert message["token"] == "tok"
    assert fcm_v1_message(push, seconds_left=-3)["message"]["android"]["ttl"] == "0s"


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (context_with({"cc": "H4sIAB/bOBb9", "shrToken": "x.y.z"}), "H4sIAB/bOBb9"),
        # Standard-alphabet and padded segments are tolerated.
        (
            "e30." + base64.b64encode(json.dumps({"cc": "QUJD+/=="}).encode()).decode() + ".",
            "QUJD+/==",
        ),
        (context_with({"cc": "QUJD"}).rstrip("."), "QUJD"),  # no signature segment at all
    ],
)
def test_extract_cc(context: str, expected: str) -> None:
    assert extract_cc(context) == expected


@pytest.mark.parametrize(
    ("context", "message"),
    [
        (None, "missing or not a string"),
        ("", "missing or not a string"),
        ("no-dots-here", "found no '.'"),
        ("e30.!!!!.", "not base64url"),
        ("e30." + b64url(b"not json") + ".", "not JSON"),
        ("e30." + b64url(b"[1,2]") + ".", "not a JSON object"),
        (context_with({"shrToken": "x"}), "no 'cc' claim"),
        (context_with({"cc": ""}), "no 'cc' claim"),
        (context_with({"cc": "not base64 at all!"}), "'cc' claim is not base64"),
        (context_with({"cc": "QUJ"}), "'cc' claim is not base64"),  # padding missing
        (context_with({"cc": "QU=J"}), "'cc' claim is not base64"),  # padding inside
        (context_with({"cc": "QUJD\n"}), "'cc' claim is not base64"),
        (context_with({"cc": "QUJDé==="}), "'cc' claim is not base64"),
        # The docs' own example is corrupted mid-payload (fixtures README): rejected, not a crash.
        (DOCS_DELIVERY[0]["data"]["incomingCallContext"], "data.incomingCallContext"),
        ("{incoming-call-contextValue}", "found no '.'"),
    ],
)
def test_extract_cc_rejects_with_the_field_named(context: object, message: str) -> None:
    with pytest.raises(PayloadError, match=r"data\.incomingCallContext") as err:
        extract_cc(context)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("to"), "data.to"),
        (lambda d: d["to"].pop("rawId"), "data.to.rawId"),
        (lambda d: d.update({"from": "x"}), "data.from"),
        (lambda d: d.pop("correlationId"), "data.correlationId"),
        (lambda d: d.update({"callerDisplayName": 5}), "data.callerDisplayName"),
        (lambda d: d.pop("incomingCallContext"), "data.incomingCallContext"),
    ],
)
def test_bad_event_data_names_the_field(mutate, field: str) -> None:
    data = filled(SPEC_EVENT)["data"]
    mutate(data)
    with pytest.raises(PayloadError, match=field.replace(".", r"\.")):
        call_push_from_incoming_call(data)


def test_missing_display_name_becomes_empty() -> None:
    data = filled(SPEC_EVENT)["data"]
    del data["callerDisplayName"]
    assert call_push_from_incoming_call(data).display_name == ""


def test_a_registrations_token_fingerprint_is_cached_and_follows_its_token() -> None:
    import dataclasses

    from ringrelay.models import Platform, PushKind, Registration
    from ringrelay.redact import fingerprint

    reg = Registration("8:acs:r_1", "phone", Platform.APNS, "ab" * 32, PushKind.VOIP, None, 0, 0, 1)
    assert reg.token_fingerprint() == fingerprint("ab" * 32) == reg.token_fingerprint()
    moved = dataclasses.replace(reg, token="cd" * 32)  # a new token: its own fingerprint
    assert moved.token_fingerprint() == fingerprint("cd" * 32) != reg.token_fingerprint()
    assert reg == dataclasses.replace(reg)  # the cache takes no part in equality
    assert "_token_fingerprint" not in repr(reg)
