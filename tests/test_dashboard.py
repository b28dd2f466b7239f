"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a
server with real data from the fake Notification Hubs. Screenshots are written to
test-artifacts/dashboard/ (or $RINGRELAY_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, apns_token, post_events, register

CHROMIUM = os.environ.get("RINGRELAY_CHROMIUM", "/usr/bin/chromium")
# The launch flags the project uses everywhere: no sandbox (root in CI), no GPU, no network
# chatter of the browser's own (updates, sync, QUIC).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(
    os.environ.get(
        "RINGRELAY_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts" / "dashboard"
    )
)


def _browser_missing() -> str | None:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {missing}")
        pytest.skip(f"dashboard browser tests skipped: {missing}")
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ringrelay-chromium-") as profile:
        async with async_playwright() as p:
            # A fresh profile (user data dir) per test.
            context = await p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS
            )
            try:
                yield context
            finally:
                await context.close()


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_pages_load_with_real_data_and_a_trace_shows_each_device(
    browser, http, make_server, fake_nh, nh_settings
) -> None:
    server = make_server(**nh_settings)
    callee = acs_id("dashboard")
    token = apns_token(42)
    await register(http, server, callee, "iphone", token=token)
    await register(http, server, callee, "pixel", platform="fcm", token="fcm-token-" + "y" * 60)
    fake_nh.respond(500, times=1, handle=token)  # the iPhone's push is retried once
    event = incoming_call_event(callee)
    status, _ = await post_events(http, server, [event])
    assert status == 200
    call_id = event["data"]["correlationId"]
    await post_events(http, server, [incoming_call_event(acs_id("nobody-registered"))])

    page = await browser.new_page()
    resp = await page.goto(f"{server.url}/dashboard")
    assert resp.status == 200
    assert await page.title() == "Overview · ringrelay"
    # The stylesheet applies (the page's CSP lets inline styles through, and no script).
    csp = resp.headers["content-security-policy"]
    assert "style-src 'unsafe-inline'" in csp and "script-src" not in csp
    assert "default-src 'none'" in csp
    header_bg = await page.eval_on_selector("header", "e => getComputedStyle(e).backgroundColor")
    assert header_bg == "rgb(27, 31, 36)"
    assert await page.locator("svg").count() >= 2  # calls per minute, latency over time
    assert "Notification Hubs" in await page.inner_text("main")
    card = await page.inner_text(".cards")
    assert "calls with nobody to push to" in card and "p99" in card
    await shot(page, "overview")

    await page.click("text=Calls")
    await page.click(f"text={call_id}")
    assert page.url.endswith(f"/dashboard/calls/{call_id}")
    rows = page.locator("tr.device")
    assert await rows.count() == 2
    text = await page.inner_text("main")
    assert "iphone" in text and "pixel" in text and "accepted" in text
    assert "Event Grid delivery count" in text and "after eventTime" in text
    assert "#1" in text and "#2" in text and "transient" in text  # the iPhone's retry
    assert token not in await page.content()  # a fingerprint, never the token
    await shot(page, "call-trace")

    await page.goto(f"{server.url}/dashboard/identities")
    await page.fill("input[name=rawid]", callee)
    await page.click("button[type=submit]")
    text = await page.inner_text("main")
    assert "iphone" in text and "sha256:" in text and token not in await page.content()
    assert "last push" in text
    await shot(page, "registrations")

    await page.goto(f"{server.url}/dashboard/identities?rawid={acs_id('nobody-registered')}")
    assert "nothing can ring" in await page.inner_text("main")

    await page.goto(f"{server.url}/dashboard/removed")
    assert await page.title() == "Removed tokens · ringrelay"

    await page.goto(f"{server.url}/dashboard/doctor")
    text = await page.inner_text("main")
    assert "direct send (apple)" in text and "accepted" in text
    await shot(page, "doctor")


def _create_key(database_url: str, scope: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ringrelay", "keys", "create", "--name", scope, "--scope", scope],
        capture_output=True,
        text=True,
        env={**os.environ, "RINGRELAY_DATABASE_URL": database_url},
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


async def test_unauthenticated_access_is_refused(browser, make_server, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'auth.db'}"
    admin = _create_key(database_url, "admin")
    reader = _create_key(database_url, "read")
    # (Authentication is on with an active key here; `auth_required` says so where the
    # setting exists, and is ignored where it does not.)
    server = make_server(database_url=database_url, auth_required=True)

    page = await browser.new_page()
    resp = await page.goto(f"{server.url}/dashboard")
    assert resp.status == 401
    assert await page.locator("input[name=key]").count() == 1
    resp = await page.goto(f"{server.url}/dashboard/calls")
    assert resp.status == 401
    await shot(page, "refused")

    await page.goto(f"{server.url}/dashboard")
    await page.fill("input[name=key]", reader)
    await page.click("button[type=submit]")
    assert "lacks the 'admin' scope" in await page.inner_text("body")

    await page.fill("input[name=key]", "rr_not_a_key")
    await page.click("button[type=submit]")
    assert "unknown API key" in await page.inner_text("body")

    await page.fill("input[name=key]", admin)
    await page.click("button[type=submit]")
    assert await page.title() == "Overview · ringrelay"
    resp = await page.goto(f"{server.url}/dashboard/calls")
    assert resp.status == 200  # the cookie carries the key on
    cookies = await browser.cookies()
    (cookie,) = [c for c in cookies if c["name"] == "ringrelay_dashboard_key"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


@pytest.fixture(scope="module")
def apns_app(background_loop: Any, certs: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ringrelay.fakes.apns import FakeAPNs, write_signing_key

    key = tmp_path_factory.mktemp("dashboard-apns") / "AuthKey.p8"
    fake = FakeAPNs()
    fake.add_key("TEAM123456", "KEYAAAAAAA", write_signing_key(key), {"com.contoso.calling"})
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    app = {
        "bundle_id": "com.contoso.calling", "team_id": "TEAM123456", "key_id": "KEYAAAAAAA",
        "key_file": key, "endpoint": fake.base_url, "ca_file": certs.ca_file,
    }  # fmt: skip
    yield fake, app
    background_loop.run(fake.stop())


async def test_pruned_token_and_config_error_are_explained(
    browser, http, make_server, apns_app
) -> None:
    fake, app = apns_app
    fake.reset()
    server = make_server(apns=[app])
    mixup, dead_token = acs_id("mixup-dash"), apns_token(77)
    await register(http, server, mixup, "iphone", token=dead_token)
    fake.respond(400, "BadDeviceToken", device_token=dead_token)
    await post_events(http, server, [incoming_call_event(mixup)])
    wrong_app = acs_id("wrong-key-dash")
    await register(http, server, wrong_app, "ipad", token=apns_token(78))
    fake.respond(403, "InvalidProviderToken", device_token=apns_token(78))
    config = incoming_call_event(wrong_app)
    await post_events(http, server, [config])

    page = await browser.new_page()
    await page.goto(f"{server.url}/dashboard/removed")
    text = await page.inner_text("main")
    assert "BadDeviceToken" in text and "sandbox/production mix-up" in text
    assert dead_token not in await page.content()
    await shot(page, "removed")
    await page.click(f"text={mixup}")
    assert "nothing can ring" in await page.inner_text("main")

    await page.goto(f"{server.url}/dashboard/calls/{config['data']['correlationId']}")
    text = await page.inner_text("main")
    assert "config_error" in text and "InvalidProviderToken" in text
    assert "ringrelay doctor" in text
    await page.goto(f"{server.url}/dashboard")
    health = await page.inner_text("table")
    assert "✗" in health and "InvalidProviderToken" in health
    await shot(page, "overview-config-error")
