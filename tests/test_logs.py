"""Structured logs: `RINGRELAY_LOG_FORMAT=json` makes every line of `ringrelay serve`'s output
one JSON object, with callId/eventId/deviceId on the lines about a call; the access log is on
by default and never shows the webhook's secret."""

from __future__ import annotations

import json
import urllib.request

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, apns_token
from tests.test_cli import clean_env, free_port, serve, wait_healthy


def _post(url: str, body: object, method: str = "POST") -> int:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req) as resp:
        return int(resp.status)


def test_json_lines_with_call_fields_and_a_redacted_access_log(
    tmp_path, fake_nh, nh_settings
) -> None:
    port = free_port()
    env = clean_env() | {
        "RINGRELAY_LOG_FORMAT": "json",
        "RINGRELAY_WEBHOOK_SECRET": "hunter2-secret-of-length",
        "RINGRELAY_NH_CONNECTION_STRING": nh_settings["nh_connection_string"],
        "RINGRELAY_NH_HUB_NAME": nh_settings["nh_hub_name"],
        "RINGRELAY_NH_CA_FILE": str(nh_settings["nh_ca_file"]),
    }
    proc = serve(port, tmp_path, env)  # no --access-log: on by default
    callee = acs_id("jsonlog")
    token = apns_token(99)
    event = incoming_call_event(callee)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        body = {"platform": "apns", "token": token}
        assert _post(f"{url}/v1/identities/{callee}/devices/iphone", body, "PUT") in (200, 201)
        fake_nh.respond(400, times=1)  # refused: the relay logs a warning about this device
        assert _post(f"{url}/api/events?code=hunter2-secret-of-length", [event]) == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)

    lines = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line parses
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any("/api/events?code=<redacted>" in line["message"] for line in access)
    assert "hunter2-secret" not in out
    assert token not in out  # the token only as a fingerprint
    (refused,) = [line for line in lines if line["logger"] == "ringrelay.delivery"]
    assert refused["level"] == "WARNING" and "rejected" in refused["message"]
    assert refused["callId"] == event["data"]["correlationId"]
    assert refused["eventId"] == event["id"]
    assert refused["deviceId"] == "iphone"
