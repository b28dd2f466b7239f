"""The Azure Functions app (function_app.py) as the Functions host would call it: binding objects
built with `azure.functions` (`HttpRequest`, `EventGridEvent`) handed to the app's functions, the
documented unit-test pattern, against PostgreSQL and the fake Notification Hubs over TLS. The
Functions host itself is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

func = pytest.importorskip("azure.functions")

from ringrelay.config import ConfigError, load_settings  # noqa: E402
from ringrelay.hosting.functions import FunctionsHost, TransientDeliveryFailure  # noqa: E402
from ringrelay.simulate import incoming_call_event  # noqa: E402
from tests.conftest import acs_id, apns_token  # noqa: E402
from tests.test_store_contract import PG_URL, _drop_schema, _postgres_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CALLEE = acs_id("functions-callee")


def load_function_app(name: str) -> Any:
    """Import function_app.py afresh, the way the Python worker indexes it."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def functions_by_name(app: Any) -> dict[str, Any]:
    # The worker indexes the app once; get_functions() refuses a second call (names "reused").
    if not hasattr(app, "_indexed_for_test"):
        app._indexed_for_test = {fn.get_function_name(): fn for fn in app.get_functions()}
    return app._indexed_for_test


def trigger_event(raw: dict[str, Any]) -> Any:
    when = datetime.fromisoformat(raw["eventTime"].replace("Z", "+00:00")[:26] + "+00:00")
    return func.EventGridEvent(
        id=raw["id"],
        data=raw["data"],
        topic=raw["topic"],
        subject=raw["subject"],
        event_type=raw["eventType"],
        event_time=when,
        data_version=raw["dataVersion"],
    )


@pytest.fixture
async def function_app(monkeypatch, nh_settings):
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)  # creates the schema, or skips/fails as the suite says
    for key in list(__import__("os").environ):
        if key.upper().startswith(("RINGRELAY_", "ANH")):
            monkeypatch.delenv(key)
    # The sample's setting names for the hub, as in local.settings.json.example.
    monkeypatch.setenv("ANHHubConnectionString", nh_settings["nh_connection_string"])
    monkeypatch.setenv("ANHHubName", nh_settings["nh_hub_name"])
    monkeypatch.setenv("RINGRELAY_NH_CA_FILE", str(nh_settings["nh_ca_file"]))
    monkeypatch.setenv("RINGRELAY_DATABASE_URL", f"{PG_URL}?search_path={schema}")
    monkeypatch.setenv("RINGRELAY_WEBHOOK_DEADLINE_SECONDS", "1")
    module = load_function_app(f"function_app_{schema}")
    try:
        yield module
    finally:
        if module.app.startup_task_done:  # as the worker does at exit (AsgiFunctionApp.__del__)
            await module.app.middleware.notify_shutdown()
            module.app.startup_task_done = False
        await module.host.stop()
        sys.modules.pop(module.__name__, None)
        await _drop_schema(schema)


async def call_http(module: Any, method: str, path: str, body: Any = None) -> Any:
    fn = functions_by_name(module.app)["http_app_func"]
    req = func.HttpRequest(
        method=method,
        url=f"http://localhost:7071{path}",
        headers={"Content-Type": "application/json"},
        body=json.dumps(body).encode() if body is not None else b"",
    )
    return await fn.get_user_function()(req, None)


async def test_app_declares_an_asgi_http_function_and_an_event_grid_trigger(function_app) -> None:
    fns = functions_by_name(function_app.app)
    assert set(fns) == {"http_app_func", "IncomingCallEventHandler"}
    trigger = [b.type for b in fns["IncomingCallEventHandler"].get_bindings()]
    assert trigger == ["eventGridTrigger"]
    http = fns["http_app_func"].get_bindings()
    assert {b.type for b in http} == {"httpTrigger", "http"}
    (route,) = [b for b in http if b.type == "httpTrigger"]
    assert route.route == "/{*route}"
    host_json = json.loads((ROOT / "host.json").read_text())
    # Routes arrive with the app's own paths (/api/events, /v1/...), not under /api/api/.
    assert host_json["extensions"]["http"]["routePrefix"] == ""


async def test_registry_calls_through_the_asgi_function(function_app) -> None:
    token = apns_token(501)
    resp = await call_http(
        function_app,
        "PUT",
        f"/v1/identities/{CALLEE}/devices/iphone",
        {"platform": "apns", "token": token},
    )
    assert resp.status_code == 201, resp.get_body()
    # The sample's registrar route, served by the same function.
    resp = await call_http(
        function_app,
        "POST",
        "/api/add_device_token",
        {
            "acsMri": CALLEE,
            "deviceInfos": [
                {"deviceUUID": "pixel", "deviceToken": "fcm-token_1", "platform": "android"}
            ],
        },
    )
    assert resp.status_code == 201, resp.get_body()
    resp = await call_http(function_app, "GET", f"/v1/identities/{CALLEE}/devices")
    assert resp.status_code == 200
    devices = {d["device_id"]: d for d in json.loads(resp.get_body())["devices"]}
    assert set(devices) == {"iphone", "pixel"}
    assert token not in resp.get_body().decode()  # listed as a fingerprint
    resp = await call_http(function_app, "PUT", f"/v1/identities/{CALLEE}/devices/bad", {})
    assert resp.status_code == 422
    resp = await call_http(function_app, "GET", "/readyz")
    assert resp.status_code == 200
    assert json.loads(resp.get_body())["checks"]["store"] == "ok"


async def test_incoming_call_through_the_trigger_reaches_the_provider(
    function_app, fake_nh
) -> None:
    token = apns_token(502)
    resp = await call_http(
        function_app,
        "PUT",
        f"/v1/identities/{CALLEE}/devices/iphone",
        {"platform": "apns", "token": token},
    )
    assert resp.status_code == 201
    raw = incoming_call_event(CALLEE, display_name="Alice")
    trigger = functions_by_name(function_app.app)["IncomingCallEventHandler"]
    assert await trigger.get_user_function()(trigger_event(raw)) is None
    pushes = [p for p in fake_nh.pushes if p.get("status") == 201]
    assert [p["handle"] for p in pushes] == [token]
    assert pushes[0]["body"]["data"]["callId"] == raw["data"]["correlationId"]
    assert pushes[0]["body"]["data"]["displayName"] == "Alice"
    # The same delivery again (Event Grid retrying after a lost answer): nothing pushed twice.
    await trigger.get_user_function()(trigger_event(raw))
    assert len([p for p in fake_nh.pushes if p.get("status") == 201]) == 1
    resp = await call_http(function_app, "GET", f"/v1/calls/{raw['data']['correlationId']}")
    assert json.loads(resp.get_body())["events"][0]["status"] == "delivered"


async def test_trigger_started_first_shares_the_relay_with_the_http_function(
    function_app, fake_nh
) -> None:
    """The trigger may be a worker's first invocation: it starts the relay, HTTP reuses it."""
    raw = incoming_call_event(CALLEE)
    trigger = functions_by_name(function_app.app)["IncomingCallEventHandler"]
    await trigger.get_user_function()(trigger_event(raw))  # nobody registered: no devices
    store = function_app.host.relay.store
    resp = await call_http(function_app, "GET", f"/v1/calls/{raw['data']['correlationId']}")
    assert json.loads(resp.get_body())["events"][0]["status"] == "no_devices"
    assert function_app.host.relay.store is store


async def test_a_transient_failure_raises_and_the_retry_pushes_only_what_is_missing(
    function_app, fake_nh
) -> None:
    ok, flaky = apns_token(503), apns_token(504)
    for device, token in (("ok", ok), ("flaky", flaky)):
        resp = await call_http(
            function_app,
            "PUT",
            f"/v1/identities/{CALLEE}/devices/{device}",
            {"platform": "apns", "token": token},
        )
        assert resp.status_code == 201
    fake_nh.respond(503, times=1000, handle=flaky)
    raw = incoming_call_event(CALLEE)
    trigger = functions_by_name(function_app.app)["IncomingCallEventHandler"].get_user_function()
    with pytest.raises(TransientDeliveryFailure) as failed:
        await trigger(trigger_event(raw))
    assert failed.value.report.status.value == "pending"
    fake_nh.script.clear()  # the hub recovers; Event Grid retries the same event
    await trigger(trigger_event(raw))
    accepted = [p["handle"] for p in fake_nh.pushes if p.get("status") == 201]
    assert sorted(accepted) == sorted([ok, flaky])  # ok was not pushed a second time


async def test_a_malformed_trigger_event_is_recorded_not_retried(function_app) -> None:
    trigger = functions_by_name(function_app.app)["IncomingCallEventHandler"].get_user_function()
    event = func.EventGridEvent(
        id="",
        data={},
        topic="t",
        subject="s",
        event_type="Microsoft.Communication.IncomingCall",
        event_time=datetime.now(UTC),
        data_version="1.0",
    )
    assert await trigger(event) is None  # returns: a retry could not fix it


def test_sqlite_is_refused_unless_allowed(tmp_path) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'rr.db'}")
    with pytest.raises(ConfigError, match="PostgreSQL") as refused:
        FunctionsHost(settings)
    assert "RINGRELAY_FUNCTIONS_ALLOW_SQLITE" in str(refused.value)
    FunctionsHost(settings, allow_sqlite=True)  # a local single-worker run


def test_requirements_txt_matches_the_package_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["functions"])
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert listed == wanted


def test_local_settings_example_carries_the_sample_names() -> None:
    values = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    for name in ("ANHHubConnectionString", "ANHHubName", "ANHHubUrl", "ANHHubApiVersion"):
        assert name in values
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values["RINGRELAY_DATABASE_URL"].startswith("postgresql://")
