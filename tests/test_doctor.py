"""`ringrelay doctor` over the wire: every transport probed against the project's fakes, set to
fail each way; each test asserts the finding and its fix. Then `--identity`: why one user's
phone did not ring, for each of ringrelay's own outcomes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ringrelay.config import load_settings
from ringrelay.fakes import tls
from ringrelay.fakes.apns import FakeAPNs, write_signing_key
from ringrelay.fakes.fcm import FakeFCM, write_service_account
from ringrelay.models import Platform, PushKind, Registration
from ringrelay.ops.doctor import Finding, diagnose_identity, passed, run_doctor
from ringrelay.simulate import incoming_call_event
from ringrelay.store import open_store
from tests.conftest import BackgroundLoop, acs_id, apns_token, post_events, register

TEAM = "TEAM123456"
KEY = "KEYAAAAAAA"
BUNDLE = "com.contoso.calling"
SECRET = "a-webhook-secret-of-some-length"


@pytest.fixture(scope="module")
def apns_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("doctor-apns") / f"AuthKey_{KEY}.p8"
    return path, write_signing_key(path)


@pytest.fixture
def fake_apns(_apns_session: FakeAPNs) -> FakeAPNs:
    _apns_session.reset()
    return _apns_session


@pytest.fixture(scope="module")
def _apns_session(
    background_loop: BackgroundLoop, certs: tls.TestCertificates, apns_key: tuple[Path, bytes]
) -> Iterator[FakeAPNs]:
    fake = FakeAPNs()
    fake.add_key(TEAM, KEY, apns_key[1], {BUNDLE})
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    yield fake
    background_loop.run(fake.stop())


@pytest.fixture(scope="module")
def fake_fcm(
    background_loop: BackgroundLoop,
    certs: tls.TestCertificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeFCM, Path]]:
    fake = FakeFCM()
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    account = tmp_path_factory.mktemp("doctor-fcm") / "service-account.json"
    write_service_account(account, "contoso-calling", fake.token_uri)
    fake.trust_service_account(account)
    yield fake, account
    background_loop.run(fake.stop())


def _apns(fake: FakeAPNs, certs: tls.TestCertificates, key: Path, **over: Any) -> dict[str, Any]:
    app = {
        "bundle_id": BUNDLE,
        "team_id": TEAM,
        "key_id": KEY,
        "key_file": key,
        "endpoint": fake.base_url,
        "ca_file": certs.ca_file,
        "timeout_seconds": 2.0,
    }
    return {**app, **over}


def _fcm(fake: FakeFCM, certs: tls.TestCertificates, account: Path) -> dict[str, Any]:
    return {
        "service_account_file": account,
        "endpoint": fake.base_url,
        "ca_file": certs.ca_file,
        "timeout_seconds": 2.0,
    }


async def doctor(tmp_path: Path, **overrides: Any) -> list[Finding]:
    overrides.setdefault("database_url", f"sqlite:///{tmp_path / 'doctor.db'}")
    overrides.setdefault("webhook_secret", SECRET)
    return await run_doctor(load_settings(**overrides))


def find(findings: list[Finding], area: str, text: str) -> Finding:
    for f in findings:
        if f.area.startswith(area) and text in f.what:
            return f
    raise AssertionError(f"no {area} finding with {text!r}: {[f.line() for f in findings]}")


# --- Notification Hubs -------------------------------------------------------------------------


async def test_working_hub_passes_every_check(tmp_path, fake_nh, nh_settings) -> None:
    findings = await doctor(tmp_path, **nh_settings)
    assert passed(findings), [f.line() for f in findings if f.ok is False]
    ok = find(findings, "notificationhubs", "direct send (apple)")
    assert ok.ok is True and "Send right" in ok.what
    assert find(findings, "notificationhubs", "direct send (fcmv1)").ok is True
    # The probes went over the wire, with the token no device has.
    assert {p["handle"] for p in fake_nh.pushes} >= {"0" * 64}
    assert find(findings, "clock", "within").ok is True
    assert find(findings, "store", "writable").ok is True


async def test_wrong_key_is_a_401_with_the_access_policy_fix(tmp_path, fake_nh, certs) -> None:
    wrong = fake_nh.connection_string().replace(fake_nh.key, "not-the-key")
    findings = await doctor(
        tmp_path, nh_connection_string=wrong, nh_hub_name=fake_nh.hub, nh_ca_file=certs.ca_file
    )
    f = find(findings, "notificationhubs", "direct send (apple)")
    assert f.ok is False and "401" in f.what
    assert "Send right" in f.fix and "Access Policies" in f.fix
    assert not passed(findings)


async def test_missing_hub_is_a_404_naming_the_hub_setting(tmp_path, fake_nh, certs) -> None:
    findings = await doctor(
        tmp_path,
        nh_connection_string=fake_nh.connection_string(),
        nh_hub_name="deleted-hub",
        nh_ca_file=certs.ca_file,
    )
    f = find(findings, "notificationhubs", "direct send (apple) to hub deleted-hub")
    assert f.ok is False and "404" in f.what
    assert "ANHHubName" in f.fix and "deleted" in f.fix


async def test_quota_or_tier_is_a_403(tmp_path, fake_nh, nh_settings) -> None:
    fake_nh.respond(403, times=5)
    findings = await doctor(tmp_path, **nh_settings)
    f = find(findings, "notificationhubs", "direct send (apple)")
    assert f.ok is False and "403" in f.what and "tier" in f.fix


async def test_hub_without_apns_credentials_says_token_mode(tmp_path, fake_nh, nh_settings) -> None:
    fake_nh.platforms = {"fcmv1"}
    findings = await doctor(tmp_path, **nh_settings)
    f = find(findings, "notificationhubs", "direct send (apple)")
    assert f.ok is False and "400" in f.what and "credentials" in f.what
    assert "token mode" in f.fix and "certificate" in f.fix
    assert find(findings, "notificationhubs", "direct send (fcmv1)").ok is True


async def test_hub_refusing_only_the_probe_handle_passes(tmp_path, fake_nh, nh_settings) -> None:
    fake_nh.respond(400, times=2)  # "scripted 400": nothing about credentials
    findings = await doctor(tmp_path, **nh_settings)
    f = find(findings, "notificationhubs", "direct send (apple)")
    assert f.ok is True and "refused only the probe's handle" in f.what


async def test_old_api_version_with_fcm_v1(tmp_path, fake_nh, nh_settings) -> None:
    findings = await doctor(tmp_path, **nh_settings, nh_api_version="2015-01")
    f = find(findings, "notificationhubs", "API version 2015-01")
    assert f.ok is False and "2020-06" in f.fix


async def test_clock_off_is_found_from_the_hubs_date(tmp_path, fake_nh, nh_settings) -> None:
    fake_nh.clock_offset = -600
    findings = await doctor(tmp_path, **nh_settings)
    f = find(findings, "clock", "off")
    # Date has whole seconds: the skew read is 600 s give or take one.
    skew = int(f.what.split("clock is ")[1].split("s off")[0])
    assert f.ok is False and 599 <= skew <= 601 and "NTP" in f.fix


# --- APNs --------------------------------------------------------------------------------------


async def test_apns_accepted_provider_token_is_told_by_bad_device_token(
    tmp_path, fake_apns, certs, apns_key
) -> None:
    findings = await doctor(tmp_path, apns=[_apns(fake_apns, certs, apns_key[0])])
    f = find(findings, "apns:com.contoso.calling", "VoIP probe")
    assert f.ok is True and "BadDeviceToken" in f.what
    assert find(findings, "apns", ".p8 key KEYAAAAAAA").ok is True
    assert passed(findings), [x.line() for x in findings if x.ok is False]


async def test_apns_unknown_key_id_is_invalid_provider_token(
    tmp_path, fake_apns, certs, apns_key
) -> None:
    app = _apns(fake_apns, certs, apns_key[0], key_id="KEYZZZZZZZ")
    findings = await doctor(tmp_path, apns=[app])
    f = find(findings, "apns", "VoIP probe")
    assert f.ok is False and "InvalidProviderToken" in f.what
    assert "key_id and team_id" in f.fix


async def test_apns_wrong_team_is_invalid_provider_token(
    tmp_path, fake_apns, certs, apns_key
) -> None:
    findings = await doctor(
        tmp_path, apns=[_apns(fake_apns, certs, apns_key[0], team_id="OTHER12345")]
    )
    f = find(findings, "apns", "VoIP probe")
    assert f.ok is False and "InvalidProviderToken" in f.what


async def test_apns_wrong_topic_is_topic_disallowed(tmp_path, fake_apns, certs, apns_key) -> None:
    app = _apns(fake_apns, certs, apns_key[0], bundle_id="com.fabrikam.other")
    findings = await doctor(tmp_path, apns=[app])
    f = find(findings, "apns:com.fabrikam.other", "VoIP probe")
    assert f.ok is False and "TopicDisallowed" in f.what
    assert "com.fabrikam.other.voip" in f.fix and TEAM in f.fix


async def test_apns_environment_restricted_key(tmp_path, fake_apns, certs, apns_key) -> None:
    fake_apns.respond(403, "BadEnvironmentKeyInToken")
    findings = await doctor(tmp_path, apns=[_apns(fake_apns, certs, apns_key[0])])
    f = find(findings, "apns", "VoIP probe")
    assert f.ok is False and "environment" in f.fix


async def test_apns_unreachable(tmp_path, certs, apns_key) -> None:
    app = {
        "bundle_id": BUNDLE,
        "team_id": TEAM,
        "key_id": KEY,
        "key_file": apns_key[0],
        "endpoint": "https://127.0.0.1:9",
        "ca_file": certs.ca_file,
        "timeout_seconds": 1.0,
    }
    findings = await doctor(tmp_path, apns=[app])
    f = find(findings, "apns", "VoIP probe")
    assert f.ok is False and "unreachable" in f.what and "443" in f.fix


# --- FCM ---------------------------------------------------------------------------------------


async def test_fcm_validate_only_passes(tmp_path, fake_fcm, certs) -> None:
    fake, account = fake_fcm
    before = len(fake.pushes)
    findings = await doctor(tmp_path, fcm=[_fcm(fake, certs, account)])
    assert find(findings, "fcm:contoso-calling", "OAuth grant").ok is True
    f = find(findings, "fcm:contoso-calling", "validate_only send")
    assert f.ok is True and "credentials and project accepted" in f.what
    assert len(fake.pushes) == before  # nothing was delivered
    assert passed(findings)


async def test_fcm_bad_service_account_is_refused_at_the_oauth_grant(
    tmp_path, fake_fcm, certs
) -> None:
    fake, _ = fake_fcm
    stranger = tmp_path / "revoked.json"
    write_service_account(stranger, "contoso-calling", fake.token_uri)  # never trusted
    findings = await doctor(tmp_path, fcm=[_fcm(fake, certs, stranger)])
    f = find(findings, "fcm", "OAuth grant")
    assert f.ok is False and "refused" in f.what
    assert "Generate new private key" in f.fix


async def test_fcm_account_of_another_project_is_permission_denied(
    tmp_path, fake_fcm, certs
) -> None:
    fake, _ = fake_fcm
    other = tmp_path / "other.json"
    info = write_service_account(other, "fabrikam-other", fake.token_uri)
    fake.trust_service_account(other)
    info["project_id"] = "contoso-calling"  # the file names a project its account cannot send to
    other.write_text(json.dumps(info))
    findings = await doctor(tmp_path, fcm=[_fcm(fake, certs, other)])
    f = find(findings, "fcm", "validate_only send")
    assert f.ok is False and "403" in f.what and "Firebase Cloud Messaging API Admin" in f.fix


# --- settings ----------------------------------------------------------------------------------


async def test_webhook_without_secret_or_entra(tmp_path) -> None:
    findings = await run_doctor(load_settings(database_url=f"sqlite:///{tmp_path / 'd.db'}"))
    f = find(findings, "webhook", "no webhook secret")
    assert f.ok is False and "?code=" in f.fix


async def test_short_secret_and_lone_next_secret(tmp_path) -> None:
    findings = await doctor(tmp_path, webhook_secret="short")
    assert find(findings, "webhook", "5 characters").ok is False
    findings = await run_doctor(
        load_settings(database_url=f"sqlite:///{tmp_path / 'd.db'}", webhook_secret_next=SECRET)
    )
    assert find(findings, "webhook", "_NEXT is set without").ok is False


async def test_public_bind_without_auth_is_unsafe(tmp_path) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'd.db'}", webhook_secret=SECRET)
    findings = await run_doctor(settings, host="0.0.0.0")
    f = find(findings, "bind", "0.0.0.0")
    assert f.ok is False and "RINGRELAY_AUTH_ISSUER" in f.fix
    assert "required but nothing to authenticate with" in f.what
    assert find(await run_doctor(settings), "bind", "loopback").ok is True
    # Turned off explicitly: open to anyone on that address.
    off = settings.model_copy(update={"auth_required": False})
    f = find(await run_doctor(off, host="0.0.0.0"), "bind", "0.0.0.0")
    assert f.ok is False and "RINGRELAY_AUTH_REQUIRED" in f.fix


async def test_unreachable_store(tmp_path) -> None:
    findings = await doctor(tmp_path, database_url="postgresql://nobody@127.0.0.1:9/none")
    f = find(findings, "store", "cannot open")
    assert f.ok is False and "RINGRELAY_DATABASE_URL" in f.fix


async def test_store_migrated_by_a_newer_version(tmp_path) -> None:
    import sqlite3

    db = tmp_path / "newer.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version=99")
    findings = await doctor(tmp_path, database_url=f"sqlite:///{db}")
    f = find(findings, "store", "cannot open")
    assert f.ok is False and "schema version 99" in f.what and "newer ringrelay" in f.fix


async def test_event_grid_checklist_has_the_az_commands(tmp_path) -> None:
    findings = await doctor(tmp_path)
    f = find(findings, "eventgrid", "2 attempts")
    assert f.ok is None
    assert "--max-delivery-attempts 2 --event-ttl 1" in f.fix
    assert "--included-event-types Microsoft.Communication.IncomingCall" in f.fix


# --- the command -------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringrelay", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_cli_exit_code_and_json(tmp_path) -> None:
    env = {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}
    good = _cli("doctor", "--json", env={**env, "RINGRELAY_WEBHOOK_SECRET": SECRET})
    assert good.returncode == 0, good.stdout
    doc = json.loads(good.stdout)
    assert doc["ok"] is True and {"area", "ok", "what", "fix"} <= doc["findings"][0].keys()
    bad = _cli("doctor", env=env)
    assert bad.returncode == 1
    assert "✗ [webhook] no webhook secret" in bad.stdout and "fix:" in bad.stdout
    broken = _cli("doctor", "--json", env={**env, "RINGRELAY_RING_WINDOW_SECONDS": "1"})
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["findings"][0]["area"] == "config"


# --- one identity: why did the phone not ring? ------------------------------------------------


async def identity_findings(server: Any, identity: str) -> list[Finding]:
    return await diagnose_identity(server.settings, identity)


async def test_identity_without_registration(http, sandbox_server) -> None:
    findings = await identity_findings(sandbox_server, acs_id("nobody"))
    f = find(findings, "identity", "nothing can ring")
    assert f.ok is False and "no registration" in f.fix and "PUT" in f.fix


async def test_identity_with_alert_registration_only(http, sandbox_server) -> None:
    callee = acs_id("alert-only")
    resp = await register(http, sandbox_server, callee, "phone", push_kind="alert")
    assert resp.status in (200, 201)
    findings = await identity_findings(sandbox_server, callee)
    assert find(findings, "identity", "alert registration").ok is None
    f = find(findings, "identity", "nothing can ring")
    assert f.ok is False and "no voip registration" in f.fix


async def test_identity_with_expired_registration(http, sandbox_server) -> None:
    callee = acs_id("lapsed")
    store = sandbox_server.relay.store
    then = time.time() - 7200
    await store.bulk_insert_registrations(
        [
            Registration(
                callee, "old-phone", Platform.APNS, apns_token(7), PushKind.VOIP, None,
                then, then, then + 300,
            )
        ]
    )  # fmt: skip
    findings = await identity_findings(sandbox_server, callee)
    f = find(findings, "identity", "device old-phone")
    assert f.ok is False and "expired" in f.what and "register again" in f.fix
    assert "expired" in find(findings, "identity", "nothing can ring").fix


async def test_identity_pruned_as_bad_device_token(
    http, make_server, tmp_path, fake_apns, certs, apns_key
) -> None:
    server = make_server(apns=[_apns(fake_apns, certs, apns_key[0])])
    callee = acs_id("mixup")
    token = apns_token(11)
    await register(http, server, callee, "iphone", token=token)
    fake_apns.respond(400, "BadDeviceToken", device_token=token)
    _status, body = await post_events(http, server, [incoming_call_event(callee)])
    assert body["events"][0]["deliveries"][0]["status"] == "rejected"
    findings = await identity_findings(server, callee)
    f = find(findings, "identity", "device iphone")
    assert f.ok is False and "BadDeviceToken" in f.what
    assert "sandbox/production mix-up" in f.fix
    assert "sandbox/production" in find(findings, "identity", "nothing can ring").fix


async def test_identity_config_error_points_at_doctor(
    http, make_server, fake_nh, nh_settings
) -> None:
    server = make_server(**nh_settings)
    callee = acs_id("misconfigured")
    await register(http, server, callee, "iphone")
    fake_nh.respond(401, times=50)
    _status, body = await post_events(http, server, [incoming_call_event(callee)])
    assert body["events"][0]["deliveries"][0]["status"] == "config_error"
    findings = await identity_findings(server, callee)
    f = find(findings, "identity", "device iphone")
    assert f.ok is False and "config_error" in f.what and "401" in f.what
    assert "ringrelay doctor" in f.fix


async def test_identity_push_expired_while_retrying(
    http, make_server, fake_nh, nh_settings
) -> None:
    server = make_server(**nh_settings, ring_window_seconds=5)
    callee = acs_id("slowhub")
    await register(http, server, callee, "iphone")
    fake_nh.respond(503, times=1000)
    event = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=4))
    _status, body = await post_events(http, server, [event])
    assert body["events"][0]["deliveries"][0]["status"] == "expired"
    findings = await identity_findings(server, callee)
    f = find(findings, "identity", "device iphone")
    assert f.ok is False and "expired" in f.what and "HTTP 503" in f.what
    assert "ring window ended" in f.fix


async def test_identity_call_past_the_ring_window(http, sandbox_server) -> None:
    callee = acs_id("late")
    await register(http, sandbox_server, callee, "phone")
    old = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=50))
    await post_events(http, sandbox_server, [old])
    findings = await identity_findings(sandbox_server, callee)
    f = find(findings, "identity", "not pushed")
    assert f.ok is False and "ring window" in f.what and "Event Grid retried it late" in f.fix


async def test_identity_transport_not_configured_for_its_app(
    http, make_server, tmp_path, fake_apns, certs, apns_key
) -> None:
    server = make_server(apns=[_apns(fake_apns, certs, apns_key[0])])
    callee = acs_id("otherapp")
    now = time.time()
    store = open_store(server.settings.database_url, serving=False)
    await store.open()
    try:
        await store.bulk_insert_registrations(
            [
                Registration(
                    callee, "ipad", Platform.APNS, apns_token(3), PushKind.VOIP,
                    "com.removed.app", now, now, now + 3600,
                )
            ]
        )  # fmt: skip
    finally:
        await store.close()
    findings = await identity_findings(server, callee)
    f = find(findings, "identity", "device ipad")
    assert f.ok is False and "no transport is configured for apns app 'com.removed.app'" in f.what


async def test_identity_accepted_push_names_the_platform_drop(http, sandbox_server) -> None:
    callee = acs_id("rang")
    await register(http, sandbox_server, callee, "phone")
    _status, _body = await post_events(http, sandbox_server, [incoming_call_event(callee)])
    findings = await identity_findings(sandbox_server, callee)
    f = find(findings, "identity", "device phone")
    assert f.ok is True and "accepted via sandbox" in f.what
    assert "the platform did not deliver it" in f.fix
    assert passed(findings)
