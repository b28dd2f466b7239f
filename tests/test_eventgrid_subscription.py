"""The Event Grid subscription as code: the generated ARM template checked against the Event
Grid resource schema (the REST spec's definitions, tests/fixtures/eventgrid/, with the documented
value ranges), round-tripped back to the settings; the az command; the Bicep file and the
committed ARM JSON agreeing with the generator."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest

from ringrelay.provisioning.eventgrid import (
    API_VERSION,
    CALL_LIFECYCLE,
    CHAT,
    INCOMING_CALL,
    SubscriptionError,
    SubscriptionSpec,
    arm_template,
    az_command,
    spec_from_arm,
)
from tests.test_cli import RINGRELAY, clean_env

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads(
    (
        Path(__file__).parent / "fixtures/eventgrid/eventsubscription-2022-06-15.schema.json"
    ).read_text()
)
DEFS: dict[str, Any] = SCHEMA["definitions"]
RANGES: dict[str, list[int]] = SCHEMA["_ranges"]
ENDPOINT = "https://relay.example.com/api/events"
ACS_STORAGE = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
    "Microsoft.Storage/storageAccounts/deadletters"
)


# --- a validator for the spec's subset of OpenAPI 2.0 (with Azure's discriminators) ----------


def _subtype(base: str, value: object) -> str | None:
    for name, d in DEFS.items():
        refs = [a.get("$ref", "") for a in d.get("allOf", [])]
        if f"#/definitions/{base}" in refs and d.get("x-ms-discriminator-value") == value:
            return name
    return None


def _properties(name: str) -> tuple[dict[str, Any], list[str]]:
    """A definition's properties and required names, its allOf bases included."""
    d = DEFS[name]
    props, required = dict(d.get("properties", {})), list(d.get("required", []))
    for base in d.get("allOf", []):
        p, r = _properties(base["$ref"].rsplit("/", 1)[1])
        props, required = {**p, **props}, required + r
    return props, required


def validate(
    value: Any, schema: dict[str, Any], path: str, errors: list[str], owner: str = ""
) -> None:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if "discriminator" in DEFS[name] and isinstance(value, dict):
            key = DEFS[name]["discriminator"]
            sub = _subtype(name, value.get(key))
            if sub is None:
                errors.append(f"{path}.{key}: no {name} subtype for {value.get(key)!r}")
                return
            name = sub
        props, required = _properties(name)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object ({name})")
            return
        for r in required:
            if r not in value:
                errors.append(f"{path}.{r}: required by {name}")
        for key, item in value.items():
            if key not in props:
                errors.append(f"{path}.{key}: not a property of {name}")
                continue
            if props[key].get("readOnly"):
                errors.append(f"{path}.{key}: read-only in {name}")
            bounds = RANGES.get(f"{name}.{key}")
            if bounds and isinstance(item, int) and not bounds[0] <= item <= bounds[1]:
                errors.append(f"{path}.{key}: {item} outside {bounds[0]}-{bounds[1]}")
            bounds = RANGES.get(f"{name}.{key}#items")
            if bounds and isinstance(item, list) and not bounds[0] <= len(item) <= bounds[1]:
                errors.append(f"{path}.{key}: {len(item)} items, outside {bounds[0]}-{bounds[1]}")
            validate(item, props[key], f"{path}.{key}", errors)
        return
    kind = schema.get("type")
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if kind in checks and not checks[kind](value):
        errors.append(f"{path}: expected {kind}, got {type(value).__name__}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]", errors)


def template_errors(template: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    (resource,) = template["resources"]
    if resource["type"] != "Microsoft.EventGrid/eventSubscriptions":
        errors.append("resource type")
    if resource["apiVersion"] != "2022-06-15":
        errors.append("apiVersion: the schema checked is 2022-06-15's")
    if not re.fullmatch(r"[A-Za-z0-9-]{3,64}", resource["name"]):
        errors.append("name: 3-64 alphanumeric characters")
    body = {k: v for k, v in resource.items() if k in ("properties",)}
    validate(body, {"$ref": "#/definitions/EventSubscription"}, "resource", errors)
    return errors


def full_spec() -> SubscriptionSpec:
    return SubscriptionSpec(
        endpoint=ENDPOINT,
        name="rr-all-options",
        event_types=[INCOMING_CALL, *CALL_LIFECYCLE, *CHAT],
        entra_tenant_id="11111111-2222-3333-4444-555555555555",
        entra_audience="api://ringrelay-webhook",
        max_delivery_attempts=30,
        event_ttl_minutes=1440,
        max_events_per_batch=5000,
        preferred_batch_kb=1024,
        advanced_filters=[
            {"operatorType": "StringBeginsWith", "key": "data.to.rawId", "values": ["8:acs:"]},
            {"operatorType": "BoolEquals", "key": "data.isVideo", "value": True},
            {"operatorType": "NumberInRange", "key": "data.n", "values": [[1, 5]]},
            {"operatorType": "IsNotNull", "key": "data.serverCallId"},
        ],
        dead_letter_storage_id=ACS_STORAGE,
        dead_letter_container="ringrelay",
    )


# --- the tests --------------------------------------------------------------------------------


def test_the_default_template_is_valid_and_carries_the_recommended_policy() -> None:
    template = arm_template(SubscriptionSpec(endpoint=ENDPOINT))
    assert template_errors(template) == []
    props = template["resources"][0]["properties"]
    assert props["filter"]["includedEventTypes"] == [INCOMING_CALL]
    assert props["retryPolicy"] == {"maxDeliveryAttempts": 2, "eventTimeToLiveInMinutes": 1}
    assert props["destination"]["properties"]["maxEventsPerBatch"] == 1
    assert "code=" in props["destination"]["properties"]["endpointUrl"]  # from the parameter
    assert template["parameters"]["webhookSecret"]["type"] == "secureString"


def test_every_option_at_its_limits_is_valid_and_round_trips() -> None:
    spec = full_spec()
    template = arm_template(spec)
    assert template_errors(template) == []
    assert spec_from_arm(json.loads(json.dumps(template))) == spec
    plain = SubscriptionSpec(endpoint=ENDPOINT, with_secret=False)
    assert spec_from_arm(arm_template(plain)) == plain
    assert "webhookSecret" not in arm_template(plain)["parameters"]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("retryPolicy", "maxDeliveryAttempts"), 31, "outside 1-30"),
        (("retryPolicy", "eventTimeToLiveInMinutes"), 0, "outside 1-1440"),
        (("destination", "properties", "maxEventsPerBatch"), 5001, "outside 1-5000"),
        (("destination", "endpointType"), "Webhook", "no EventSubscriptionDestination subtype"),
        (("filter", "includedEventType"), [INCOMING_CALL], "not a property"),
        (("eventDeliverySchema",), "CloudEvents", "not one of"),
        (("topic",), "x", "read-only"),
        (("filter", "advancedFilters"), [{"key": "k", "values": ["v"]}], "operatorType"),
    ],
)
def test_the_validator_catches_what_azure_would_refuse(path, value, expected) -> None:
    """The check is not vacuous: each tampered template fails it for the expected reason."""
    template = deepcopy(arm_template(SubscriptionSpec(endpoint=ENDPOINT)))
    node = template["resources"][0]["properties"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = template_errors(template)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_delivery_attempts": 0}, "--max-delivery-attempts"),
        ({"event_ttl_minutes": 1441}, "--event-ttl"),
        ({"endpoint": "http://relay.example.com/api/events"}, "https://"),
        ({"endpoint": ENDPOINT + "?code=abc"}, "without a query"),
        ({"name": "no spaces please"}, "--name"),
        ({"entra_tenant_id": "t"}, "--entra"),
        ({"dead_letter_storage_id": ACS_STORAGE}, "--dead-letter"),
        (
            {"advanced_filters": [{"operatorType": "StringIn", "key": "k", "values": ["v"] * 26}]},
            "25",
        ),
        ({"advanced_filters": [{"operatorType": "Like", "key": "k"}]}, "operatorType"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(change, named) -> None:
    spec = SubscriptionSpec(**({"endpoint": ENDPOINT} | change))
    with pytest.raises(SubscriptionError, match=re.escape(named)):
        arm_template(spec)


def az_args(command: str) -> dict[str, list[str]]:
    words = shlex.split(command.replace("\\\n", " "), posix=True)
    assert words[:4] == ["az", "eventgrid", "event-subscription", "create"]
    out: dict[str, list[str]] = {}
    key = ""
    for w in words[4:]:
        if w.startswith("--"):
            key = w
            out.setdefault(key, [])
            if key == "--advanced-filter":
                out[key].append("|")
        else:
            out[key].append(w)
    return out


def test_the_az_command_says_the_same_as_the_template() -> None:
    spec = full_spec()
    args = az_args(az_command(spec))
    assert args["--name"] == [spec.name]
    assert args["--endpoint-type"] == ["webhook"]
    assert args["--included-event-types"] == spec.event_types
    assert args["--max-delivery-attempts"] == ["30"]
    assert args["--event-ttl"] == ["1440"]
    assert args["--max-events-per-batch"] == ["5000"]
    assert args["--preferred-batch-size-in-kilobytes"] == ["1024"]
    assert args["--azure-active-directory-tenant-id"] == [spec.entra_tenant_id]
    assert args["--azure-active-directory-application-id-or-uri"] == [spec.entra_audience]
    assert args["--deadletter-endpoint"] == [
        f"{ACS_STORAGE}/blobServices/default/containers/ringrelay"
    ]
    assert " ".join(args["--advanced-filter"]) == (
        "| data.to.rawId StringBeginsWith 8:acs: | data.isVideo BoolEquals true "
        "| data.n NumberInRange 1,5 | data.serverCallId IsNotNull"
    )
    # The secret stays in the environment of whoever runs the command.
    assert args["--endpoint"] == [ENDPOINT + "?code=${RINGRELAY_WEBHOOK_SECRET:?set it first}"]


def test_the_committed_arm_json_is_what_the_generator_makes() -> None:
    committed = json.loads((ROOT / "deploy/eventgrid-subscription.json").read_text())
    assert committed == arm_template(SubscriptionSpec(endpoint=ENDPOINT))
    assert template_errors(committed) == []


def test_the_bicep_file_declares_the_same_resource_and_defaults() -> None:
    bicep = (ROOT / "deploy/eventgrid-subscription.bicep").read_text()
    assert f"'Microsoft.EventGrid/eventSubscriptions@{API_VERSION}'" in bicep
    assert "scope: acs" in bicep
    defaults = dict(re.findall(r"^param (\w+) \w+ = (.+)$", bicep, re.M))
    assert defaults["maxDeliveryAttempts"] == "2"
    assert defaults["eventTimeToLiveInMinutes"] == "1"
    assert defaults["maxEventsPerBatch"] == "1"
    assert defaults["preferredBatchSizeInKilobytes"] == "64"
    assert defaults["subscriptionName"] == "'ringrelay-incoming-call'"
    quoted = set(re.findall(r"'(Microsoft\.Communication\.\w+)'", bicep))
    assert quoted == {INCOMING_CALL, *CALL_LIFECYCLE, *CHAT}
    for low, high, name in ((1, 30, "maxDeliveryAttempts"), (1, 1440, "eventTimeToLiveInMinutes")):
        block = bicep.split(f"param {name} ")[0].rsplit("\n\n", 1)[-1]
        assert f"@minValue({low})" in block and f"@maxValue({high})" in block
    assert "@secure()" in bicep.split("param webhookSecret")[0].rsplit("\n\n", 1)[-1]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RINGRELAY, "eventgrid", "subscription", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_prints_both_for_the_running_configuration(tmp_path) -> None:
    env = clean_env() | {
        "RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}",
        "RINGRELAY_WEBHOOK_SECRET": "not-to-be-printed-0123456789",
        "RINGRELAY_EVENTGRID_TENANT_ID": "11111111-2222-3333-4444-555555555555",
        "RINGRELAY_EVENTGRID_AUDIENCE": "api://ringrelay-webhook",
    }
    out = run("--endpoint", ENDPOINT, "--entra", "--call-lifecycle", env=env)
    assert out.returncode == 0, out.stderr
    assert "not-to-be-printed" not in out.stdout + out.stderr
    az, _, arm = out.stdout.partition("\n# ARM template")
    args = az_args(az.split("\n", 1)[1])
    assert args["--azure-active-directory-application-id-or-uri"] == ["api://ringrelay-webhook"]
    assert args["--included-event-types"] == [INCOMING_CALL, *CALL_LIFECYCLE]
    template = json.loads(arm.split("\n", 1)[1])
    assert template_errors(template) == []
    spec = spec_from_arm(template)
    assert (spec.entra_tenant_id, spec.with_secret) == (env["RINGRELAY_EVENTGRID_TENANT_ID"], True)

    only = run("--endpoint", ENDPOINT, "--print", "arm", env=env)
    assert json.loads(only.stdout)["resources"][0]["name"] == "ringrelay-incoming-call"


def test_the_command_refuses_bad_options(tmp_path) -> None:
    env = clean_env() | {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}"}
    out = run("--endpoint", ENDPOINT, "--max-delivery-attempts", "31", env=env)
    assert out.returncode == 2 and "--max-delivery-attempts: 1-30" in out.stderr
    out = run("--endpoint", ENDPOINT, "--entra", env=env)
    assert out.returncode == 2 and "RINGRELAY_EVENTGRID_TENANT_ID" in out.stderr
    out = run("--endpoint", ENDPOINT, env=env)  # no secret, no Entra: allowed, with a warning
    assert out.returncode == 0 and "warning" in out.stderr
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"advancedFilters": [{"operatorType": "IsNotNull", "key": "x"}]}))
    out = run("--endpoint", ENDPOINT, "--advanced-filters", str(filters), "--print", "arm", env=env)
    assert json.loads(out.stdout)["resources"][0]["properties"]["filter"]["advancedFilters"] == [
        {"operatorType": "IsNotNull", "key": "x"}
    ]
