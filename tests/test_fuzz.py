"""Property-based fuzzing: the event parser and payload builder (hypothesis), and the HTTP API from
its own OpenAPI schema (schemathesis) against the real server. No 500, no crash, nothing invalid
stored. Case counts are fixed and printed so CI stays fast and the reader knows what ran."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from ringrelay.config import load_settings
from ringrelay.events.ingest import IngestError, parse_delivery
from ringrelay.models import Platform, is_raw_id
from ringrelay.payloads import PayloadError, call_push_from_incoming_call
from ringrelay.registry import RegistrationError, check_device_id, check_token
from ringrelay.simulate import incoming_call_event
from tests.conftest import RunningServer

PARSER_CASES = 300
HOSTILE_CASES = 100  # deep nesting, control characters (test_every_event_gets_a_storable_id...)
API_CASES_PER_OPERATION = 25
counted: Counter[str] = Counter()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def mutated_event(draw: Any) -> Any:
    event = incoming_call_event("8:acs:r_u")
    data = event["data"]
    key = draw(st.sampled_from([*data, "eventTime", "id", "eventType", "data"]))
    value = draw(json_values)
    if key in data:
        data[key] = value
    else:
        event[key] = value
    return event


@st.composite
def deliveries(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["random", "mutated", "bytes"]))
    if shape == "bytes":
        return draw(st.binary(max_size=200))
    if shape == "random":
        return json.dumps(draw(json_values)).encode()
    events = [mutated_event(draw) for _ in range(draw(st.integers(1, 3)))]
    return json.dumps(events).encode()


@settings(max_examples=PARSER_CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    deliveries(),
    st.sampled_from(
        [
            "application/json",
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
            "",
        ]
    ),
)
def test_parser_and_payload_builder_never_crash(body: bytes, content_type: str) -> None:
    counted["parser"] += 1
    try:
        events = parse_delivery(body, content_type)
    except IngestError as exc:
        assert exc.status == 400
        return
    for event in events:
        if event.error:
            continue
        try:
            push = call_push_from_incoming_call(event.data)
        except PayloadError as exc:
            assert str(exc).startswith("data")  # names the field
            continue
        assert push.call_id and push.recipient_id and push.cp


@st.composite
def hostile_deliveries(draw: st.DrawFn) -> bytes:
    """Events nested up to the 1,024 levels orjson reads (it writes only 254), and ids and types
    with control characters (PostgreSQL's text cannot hold U+0000)."""
    events: list[bytes] = []
    for _ in range(draw(st.integers(1, 4))):
        depth = draw(st.integers(1, 1000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        nested = opener * depth + b"null" + closer * depth
        event = incoming_call_event("8:acs:r_u")
        event["id"] = draw(st.one_of(st.none(), st.text(max_size=8), st.just("x\u0000")))
        event["eventType"] = draw(
            st.sampled_from([event["eventType"], "X\u0000", "\u001f", "x" * 300])
        )
        where = draw(st.sampled_from(["event", "data", "field"]))
        if where == "event":
            events.append(nested)
            continue
        text = json.dumps(event)
        if where == "data":
            text = text.replace('"data": {', '"data": {"deep": ' + nested.decode() + ", ", 1)
        else:
            text = text[:-1] + ', "deep": ' + nested.decode() + "}"
        events.append(text.encode())
    return b"[" + b",".join(events) + b"]"


@settings(max_examples=HOSTILE_CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_deliveries())
def test_every_event_gets_a_storable_id_and_type(body: bytes) -> None:
    counted["parser"] += 1
    try:
        events = parse_delivery(body, "application/json")
    except IngestError as exc:
        assert exc.status == 400 and "depth" in exc.reason  # past orjson's 1,024 levels
        return
    for event in events:
        for text, limit in ((event.id, 512), (event.type, 256)):
            assert len(text) <= limit
            assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text), event
        assert event.id


# --- the HTTP API from its OpenAPI schema -------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    server = RunningServer(
        load_settings(
            database_url=f"sqlite:///{db}", rate_limit_per_identity=0, rate_limit_per_client=0
        )
    ).start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["positive", "negative", "known-identity"])
def test_api_never_answers_500(fuzz_server: RunningServer, mode: str) -> None:
    """Every operation in /openapi.json, with schema-valid (positive) and invalid (negative)
    inputs, and with a real identity in the path so that bodies reach the store.

    Driven through hypothesis directly: schemathesis' pytest plugin does not load on pytest 9.
    """
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    generation = schemathesis.GenerationMode("negative" if mode == "negative" else "positive")
    for result in api.get_all_operations():
        operation = result.ok()
        fixed: dict[str, str] = {}
        if mode == "known-identity":
            # Deletes are left out here so that what was stored stays for the check below.
            if "{identity}" not in operation.path or operation.method.upper() == "DELETE":
                continue
            fixed["identity"] = "8:acs:fuzz_resource_user"
            if "{device_id}" in operation.path:
                fixed["device_id"] = "fuzz-device"

        @settings(
            max_examples=API_CASES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @given(
            case=operation.as_strategy(generation_mode=generation, path_parameters=fixed or None)
        )
        def call(case: Any) -> None:
            counted[f"{case.method} {case.path}"] += 1
            response = case.call(base_url=fuzz_server.url)
            assert response.status_code < 500, (case.method, case.path, response.text[:300])

        try:
            call()
        except Unsatisfiable:
            # No invalid input exists for an operation without parameters or body.
            assert mode == "negative", operation.label


def test_nothing_invalid_was_stored(fuzz_server: RunningServer) -> None:
    """After the fuzzing above, every stored registration still obeys the registration rules."""
    with sqlite3.connect(fuzz_server.settings.sqlite_path) as db:
        rows = db.execute(
            "SELECT identity, device_id, platform, token, expires_at - created_at "
            "FROM registrations"
        ).fetchall()
    for identity, device_id, platform, token, ttl in rows:
        assert is_raw_id(identity), identity
        try:
            check_device_id(device_id)
            check_token(Platform(platform), token)
        except RegistrationError as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"stored an invalid registration: {exc}")
        assert 300 <= round(ttl) <= 15_552_000
    total = sum(counted.values())
    print(
        f"\nfuzzing ran {counted['parser']} parser cases and {total - counted['parser']} API "
        f"cases over {len(counted) - 1} operations; {len(rows)} registrations stored, all valid"
    )
