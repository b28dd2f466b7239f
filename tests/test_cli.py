"""The console script as a user runs it: `ringrelay serve` and `ringrelay simulate` as processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import acs_id

RINGRELAY = [sys.executable, "-m", "ringrelay"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith(("RINGRELAY_", "ANH"))}


def serve(
    port: int, cwd: object, env: dict[str, str], *extra: str, log: Path | None = None
) -> subprocess.Popen[str]:
    """`ringrelay serve` as a user starts it, output captured: in a pipe for short tests, in
    `log` for long ones (a pipe nobody reads fills up and blocks the server's event loop)."""
    return subprocess.Popen(
        [*RINGRELAY, "serve", "--port", str(port), *extra],
        cwd=cwd,
        env=env,
        stdout=log.open("w") if log is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(url: str, proc: subprocess.Popen[str], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(proc.stdout.read() if proc.stdout else "serve failed") from None
            time.sleep(0.1)


@pytest.fixture
def served(tmp_path):
    port = free_port()
    proc = serve(port, tmp_path, clean_env())
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    yield url, proc, tmp_path
    proc.terminate()
    proc.wait(timeout=10)


def test_serve_defaults_and_simulate(served) -> None:
    url, proc, cwd = served
    callee = acs_id("cli")
    req = urllib.request.Request(
        f"{url}/v1/identities/{callee}/devices/phone",
        data=b'{"platform": "apns", "token": "' + b"ab" * 32 + b'"}',
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    assert urllib.request.urlopen(req).status == 201
    out = subprocess.run(
        [
            *RINGRELAY,
            "simulate",
            "incoming-call",
            "--to",
            callee,
            "--from",
            "4:+14255550123",
            "--display-name",
            "Front desk",
            "--server",
            url,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "devices found: 1, pushes accepted: 1" in out.stdout
    assert "phone [apns] accepted via sandbox" in out.stdout
    assert (cwd / "ringrelay.db").exists()  # the embedded default store

    proc.terminate()
    stdout, _ = proc.communicate(timeout=10)
    assert "store:    SQLite" in stdout
    assert "delivery: sandbox" in stdout


def test_simulate_reports_an_unreachable_server() -> None:
    out = subprocess.run(
        [
            *RINGRELAY,
            "simulate",
            "incoming-call",
            "--to",
            acs_id("x"),
            "--server",
            f"http://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert out.returncode == 1
    assert "cannot reach" in out.stderr


def test_serve_refuses_a_malformed_setting(tmp_path) -> None:
    env = clean_env() | {
        "ANHHubConnectionString": "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a",
        "ANHHubName": "hub",
    }
    out = subprocess.run(
        [*RINGRELAY, "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "ANHHubConnectionString" in out.stderr and "SharedAccessKey" in out.stderr


def test_access_log_never_shows_the_webhook_secret(tmp_path) -> None:
    port = free_port()
    env = clean_env() | {"RINGRELAY_WEBHOOK_SECRET": "hunter2-secret"}
    proc = serve(port, tmp_path, env, "--access-log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        req = urllib.request.Request(
            f"{url}/api/events?code=hunter2-secret&x=1",
            data=b"[]",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(req).status == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "/api/events?code=<redacted>&x=1" in out
    assert "hunter2-secret" not in out


async def test_sigterm_lets_in_flight_deliveries_finish(tmp_path, fake_nh, nh_settings) -> None:
    """Graceful shutdown: a delivery being pushed when SIGTERM arrives is finished, answered and
    recorded; nothing is cut off half-written."""
    import asyncio
    import json
    import signal

    import aiohttp

    from ringrelay.simulate import incoming_call_event

    port = free_port()
    env = clean_env() | {
        "RINGRELAY_NH_CONNECTION_STRING": nh_settings["nh_connection_string"],
        "RINGRELAY_NH_HUB_NAME": nh_settings["nh_hub_name"],
        "RINGRELAY_NH_CA_FILE": str(nh_settings["nh_ca_file"]),
    }
    proc = serve(port, tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    callee = acs_id("sigterm")
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{url}/v1/identities/{callee}/devices/phone",
            json={"platform": "fcm", "token": "fcm:sigterm"},
        ) as resp:
            assert resp.status == 201
        fake_nh.respond(201, times=1, delay=1.0)
        event = incoming_call_event(callee)

        async def deliver() -> tuple[int, dict]:
            async with http.post(f"{url}/api/events", data=json.dumps([event])) as resp:
                return resp.status, await resp.json()

        pending = asyncio.ensure_future(deliver())
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        status, body = await pending
    assert status == 200 and body["events"][0]["status"] == "delivered"
    # uvicorn re-raises the signal after its graceful shutdown, so the exit reads "terminated".
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)

    proc = serve(port, tmp_path, env)
    try:
        wait_healthy(url, proc)
        call = json.load(urllib.request.urlopen(f"{url}/v1/calls/{event['data']['correlationId']}"))
        assert call["events"][0]["deliveries"][0]["status"] == "accepted"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _start_fake(args: list[str], cwd: object) -> subprocess.Popen[str]:
    """`ringrelay fake ...`; returns once it has printed its configuration."""
    proc = subprocess.Popen(
        [*RINGRELAY, "fake", *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "received pushes" in line or line.startswith("ready"):
            return proc
    raise RuntimeError(f"fake did not start: {proc.wait(timeout=5)}")


def test_fake_apns_and_fcm_commands_run_the_whole_path_on_a_laptop(tmp_path) -> None:
    """What the README tells a developer: start the fakes, use the config they write, register
    an iPhone and an Android phone, simulate a call: both fakes accept a checked push."""
    fakes = [
        _start_fake(["apns", "--port", str(free_port()), "--tls-dir", "fake"], tmp_path),
        _start_fake(["fcm", "--port", str(free_port()), "--tls-dir", "fake"], tmp_path),
    ]
    try:
        config = tmp_path / "ringrelay.toml"
        config.write_text(
            (tmp_path / "fake" / "apns.toml").read_text()
            + (tmp_path / "fake" / "fcm.toml").read_text()
        )
        port = free_port()
        proc = serve(port, tmp_path, clean_env(), "--config", str(config))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        callee = acs_id("laptop")
        for device, body in (
            ("iphone", b'{"platform": "apns", "token": "' + b"cd" * 32 + b'"}'),
            ("pixel", b'{"platform": "fcm", "token": "fcm-laptop-token:APA91b"}'),
        ):
            req = urllib.request.Request(
                f"{url}/v1/identities/{callee}/devices/{device}",
                data=body,
                method="PUT",
                headers={"Content-Type": "application/json"},
            )
            assert urllib.request.urlopen(req).status == 201
        out = subprocess.run(
            [*RINGRELAY, "simulate", "incoming-call", "--to", callee, "--server", url],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "devices found: 2, pushes accepted: 2" in out.stdout
        assert "iphone [apns] accepted via apns" in out.stdout
        assert "pixel [fcm] accepted via fcm" in out.stdout
        proc.terminate()
        stdout, _ = proc.communicate(timeout=10)
        assert "delivery: APNs sandbox (com.contoso.calling" in stdout
        assert "FCM v1 (project contoso-calling" in stdout
    finally:
        for fake in fakes:
            fake.terminate()
            fake.wait(timeout=10)


def _run(
    args: list[str], cwd: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RINGRELAY, *args],
        cwd=cwd,
        env=clean_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )


CONFIG_FILES = {
    "bad.toml": "ring_window_seconds = \n",
    "typo.toml": "ring_windw_seconds = 30\n",
    "apns-typo.toml": '[[apns]]\nbundle_id = "com.contoso.calling"\nbundel = "x"\n',
}


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--config", "bad.toml"], {}, ["bad.toml: not valid TOML", "at line 1"]),
        (["serve", "--config", "typo.toml"], {}, ["typo.toml: ring_windw_seconds: unknown key"]),
        (["serve", "--config", "apns-typo.toml"], {}, ["apns[0].bundel: unknown key"]),
        (["serve"], {"RINGRELAY_LOG_LEVEL": "LOUD"}, ["RINGRELAY_LOG_LEVEL", "LOUD"]),
        (["serve"], {"RINGRELAY_APNS": "not json"}, ["RINGRELAY_APNS: not valid JSON"]),
        (
            ["serve"],
            {
                "RINGRELAY_NH_CONNECTION_STRING": "Endpoint=sb://127.0.0.1:9/;"
                "SharedAccessKeyName=a;SharedAccessKey=b",
                "RINGRELAY_NH_HUB_NAME": "hub",
                "RINGRELAY_NH_CA_FILE": "/nonexistent/ca.pem",
            },
            ["RINGRELAY_NH_CA_FILE: no such file /nonexistent/ca.pem"],
        ),
        (
            ["serve"],
            {"RINGRELAY_DATABASE_URL": "postgresql://postgres:pw@127.0.0.1:{port}/test"},
            ["cannot open the store", "RINGRELAY_DATABASE_URL=postgresql://postgres:***@"],
        ),
        (
            ["db", "upgrade"],
            {"RINGRELAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:{port}/test"},
            ["cannot open the store", "RINGRELAY_DATABASE_URL=postgresql://postgres@"],
        ),
        (
            ["keys", "list"],
            {"RINGRELAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:{port}/test"},
            ["cannot open the store", "RINGRELAY_DATABASE_URL=postgresql://postgres@"],
        ),
        (
            ["db", "upgrade"],
            {"RINGRELAY_DATABASE_URL": "sqlite:///./no/such/folder/r.db"},
            ["RINGRELAY_DATABASE_URL: the folder no/such/folder does not exist"],
        ),
        (
            ["simulate", "incoming-call", "--to", acs_id("x"), "--server", "127.0.0.1:8080"],
            {},
            ["--server must be a URL such as http://127.0.0.1:8080"],
        ),
        (["serve", "--port", "99999"], {}, ["--port: 99999 is not a TCP port"]),
        (["fake", "apns", "--port", "70000"], {}, ["--port: 70000 is not a TCP port"]),
        (
            ["serve", "--host", "0.0.0.0", "--port", "{port}"],
            {},
            [
                "RINGRELAY_AUTH_ISSUER",
                "RINGRELAY_AUTH_JWKS_URL",
                "ringrelay keys create",
                "--insecure",
            ],
        ),
    ],
    ids=[
        "malformed-toml",
        "unknown-toml-key",
        "unknown-apns-key",
        "log-level",
        "apns-not-json",
        "missing-nh-ca-file",
        "serve-postgres-unreachable",
        "db-upgrade-postgres-unreachable",
        "keys-postgres-unreachable",
        "db-upgrade-sqlite-folder-missing",
        "simulate-server-without-scheme",
        "serve-port-out-of-range",
        "fake-port-out-of-range",
        "public-host-without-auth",
    ],
)
def test_a_wrong_setting_is_one_line_naming_it(tmp_path, args, env, expected) -> None:
    """What a newcomer gets wrong first: one line naming the setting, never a traceback, and
    nothing started or created."""
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    port = str(free_port())  # nothing listens there
    args = [a.replace("{port}", port) for a in args]
    env = {k: v.replace("{port}", port) for k, v in env.items()}
    out = _run(args, tmp_path, env)
    assert out.returncode in (1, 2), out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for text in expected:
        assert text in out.stderr
    assert not (tmp_path / "no").exists()  # `db upgrade` made no folder


def test_a_fake_on_a_busy_port_says_so_in_one_line(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for provider in ("apns", "fcm", "notificationhubs"):
            out = _run(["fake", provider, "--port", str(port)], tmp_path)
            assert out.returncode == 1
            assert "Traceback" not in out.stderr
            assert "address already in use" in out.stderr and str(port) in out.stderr
            assert "--port" in out.stderr


def test_help_shows_the_defaults(tmp_path) -> None:
    serve_help = _run(["serve", "--help"], tmp_path).stdout
    assert "(default: 8080)" in serve_help and "(default: 127.0.0.1)" in serve_help
    assert "--forwarded-allow-ips" in serve_help
    fake_help = _run(["fake", "all", "--help"], tmp_path).stdout
    assert "(default: com.contoso.calling)" in fake_help


def test_forwarded_allow_ips_is_a_serve_flag(tmp_path) -> None:
    """Behind a proxy at 10.9.9.9 only its X-Forwarded-For is trusted: requests from loopback
    claiming other addresses count as one client (limit 2 per minute), so the third gets 429.
    uvicorn's default trusts loopback, where each claimed address would be its own client."""
    port = free_port()
    env = clean_env() | {"RINGRELAY_RATE_LIMIT_PER_CLIENT": "2"}
    proc = serve(port, tmp_path, env, "--forwarded-allow-ips", "10.9.9.9")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        answers = []
        for i in range(3):
            req = urllib.request.Request(
                f"{url}/v1/identities/{acs_id('fwd')}/devices",
                headers={"X-Forwarded-For": f"203.0.113.{i}"},
            )
            try:
                answers.append(urllib.request.urlopen(req).status)
            except urllib.error.HTTPError as exc:
                answers.append(exc.code)
        assert answers == [200, 200, 429]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _put(url: str, path: str, body: dict[str, str]) -> int:
    import json

    req = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(req).status


def test_fake_all_writes_one_config_and_simulate_says_what_happened_per_device(tmp_path) -> None:
    """`ringrelay fake all` + `ringrelay serve --config` + the README's quickstart registrations
    (the iPhone names app_id com.contoso.calling): iOS to the fake APNs, Android to the fake FCM,
    Windows through the fake hub. One Android token is dead: the summary says 3 of 4 devices
    accepted the push and what happened to each, not just "failed"."""
    import json
    import ssl

    fake = _start_fake(
        ["all", "--apns-port", "0", "--fcm-port", "0", "--nh-port", "0", "--tls-dir", "fake"],
        tmp_path,
    )
    try:
        config = tmp_path / "fake" / "ringrelay.toml"
        port = free_port()
        proc = serve(port, tmp_path, clean_env(), "--config", str(config))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        callee = acs_id("all")
        base = f"/v1/identities/{callee}/devices"
        iphone = {"platform": "apns", "token": "ab" * 32, "app_id": "com.contoso.calling"}
        assert _put(url, f"{base}/iphone-1", iphone) == 201
        assert _put(url, f"{base}/pixel-1", {"platform": "fcm", "token": "fcm-live:APA91b"}) == 201
        assert _put(url, f"{base}/pixel-2", {"platform": "fcm", "token": "fcm-dead:APA91b"}) == 201
        surface = {"platform": "wns", "token": "https://wns.example/chan?x=1"}
        assert _put(url, f"{base}/surface-1", surface) == 201

        fcm_url = json.loads(
            config.read_text().split("[[fcm]]")[1].split("endpoint = ")[1].split("\n")[0]
        )
        ctx = ssl.create_default_context(cafile=str(tmp_path / "fake" / "ca.pem"))
        script = urllib.request.Request(
            f"{fcm_url}/_fake/script",
            data=json.dumps(
                {"status": 404, "error_code": "UNREGISTERED", "token": "fcm-dead:APA91b"}
            ).encode(),
            method="POST",
        )
        assert urllib.request.urlopen(script, context=ctx).status == 204

        out = _run(["simulate", "incoming-call", "--to", callee, "--server", url], tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "result: 3 of 4 device(s) accepted the push, 1 rejected" in out.stdout
        assert "event status: failed (settled, but not every device accepted" in out.stdout
        assert "iphone-1 [apns] accepted via apns after 1 attempt(s): the provider took" in (
            out.stdout
        )
        assert "pixel-1 [fcm] accepted via fcm" in out.stdout
        assert "surface-1 [wns] accepted via notificationhubs" in out.stdout
        assert "pixel-2 [fcm] rejected via fcm after 1 attempt(s): the provider refused it" in (
            out.stdout
        )
        proc.terminate()
        stdout, _ = proc.communicate(timeout=10)
        assert "APNs sandbox (com.contoso.calling" in stdout
    finally:
        fake.terminate()
        fake.wait(timeout=10)
