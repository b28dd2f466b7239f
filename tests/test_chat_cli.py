"""`ringrelay simulate chat-message` as a user runs it, against `ringrelay serve` (sandbox)."""

from __future__ import annotations

import json
import subprocess
import urllib.request

from tests.conftest import acs_id
from tests.test_cli import RINGRELAY, clean_env, served  # noqa: F401  (fixture)


def test_simulate_chat_message_pushes_the_recipients_alert_device(served) -> None:  # noqa: F811
    url, _, _ = served
    ada, bob = acs_id("cli-ada"), acs_id("cli-bob")
    for device, kind in (("phone", "alert"), ("phone-voip", "voip")):
        body = {"platform": "apns", "token": ("ab" if kind == "alert" else "cd") * 32}
        body["push_kind"] = kind
        req = urllib.request.Request(
            f"{url}/v1/identities/{ada}/devices/{device}",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(req).status == 201
    out = subprocess.run(
        [
            *RINGRELAY,
            "simulate",
            "chat-message",
            "--to",
            ada,
            "--from",
            bob,
            "--text",
            "Hi Ada",
            "--display-name",
            "Bob",
            "--server",
            url,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "ChatMessageReceived" in out.stdout
    assert "devices found: 1, pushes accepted: 1" in out.stdout
    assert "phone [apns] accepted via sandbox" in out.stdout
    with urllib.request.urlopen(f"{url}/v1/sandbox/pushes") as resp:
        (push,) = json.loads(resp.read())["pushes"]
    assert push["device_id"] == "phone"
    assert push["body"]["aps"]["alert"] == {"title": "Bob", "body": "Hi Ada"}
