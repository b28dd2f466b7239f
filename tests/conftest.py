"""Shared fixtures: the real server on loopback (uvicorn in a thread), the fake providers as real
servers, and an HTTP client. Tests talk over sockets; nothing in-process is mocked."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn

from ringrelay.app import create_app
from ringrelay.config import Settings, load_settings
from ringrelay.fakes.notificationhubs import FakeNotificationHubs
from ringrelay.fakes.tls import TestCertificates, make_test_certificates
from ringrelay.httpserver import uvicorn_config

FIXTURES = Path(__file__).parent / "fixtures" / "events"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


class RunningServer:
    """`ringrelay`'s ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.relay = self.app.state.relay
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The same server as `ringrelay serve`: the bounded protocol (httpserver.py).
        config = uvicorn_config(self.app, settings, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )

    def start(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ringrelay test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()


class BackgroundLoop:
    """An event loop in a thread, for fake providers that must outlive a test's own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture(scope="session")
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_test_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def _fake_nh_session(
    background_loop: BackgroundLoop, certs: TestCertificates
) -> Iterator[FakeNotificationHubs]:
    fake = FakeNotificationHubs(hub="ringrelay-test", key="s3cr3t/key+with=chars")
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    yield fake
    background_loop.run(fake.stop())


@pytest.fixture
def fake_nh(_fake_nh_session: FakeNotificationHubs) -> FakeNotificationHubs:
    """The fake Notification Hubs (HTTPS on loopback), emptied for each test."""
    _fake_nh_session.reset()
    return _fake_nh_session


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start a ringrelay server with settings overrides; stopped at the end of the test."""
    servers: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        overrides.setdefault("database_url", f"sqlite:///{tmp_path / f'rr{len(servers)}.db'}")
        server = RunningServer(load_settings(**overrides)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sandbox_server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture
def nh_settings(fake_nh: FakeNotificationHubs, certs: TestCertificates) -> dict[str, Any]:
    return {
        "nh_connection_string": fake_nh.connection_string(),
        "nh_hub_name": fake_nh.hub,
        "nh_ca_file": certs.ca_file,
    }


@pytest.fixture
def nh_server(
    make_server: Callable[..., RunningServer], nh_settings: dict[str, Any]
) -> RunningServer:
    return make_server(**nh_settings)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- helpers used by several test modules ---------------------------------------------------

ACS_RESOURCE = "98e4cbef-70e7-4733-8594-063c4a72d711"


def acs_id(user: str) -> str:
    return f"8:acs:{ACS_RESOURCE}_{user}"


def apns_token(seed: int) -> str:
    return f"{seed:08x}" * 8


async def register(
    http: aiohttp.ClientSession,
    server: RunningServer,
    identity: str,
    device_id: str,
    **body: Any,
) -> aiohttp.ClientResponse:
    body.setdefault("platform", "apns")
    body.setdefault("token", apns_token(abs(hash((identity, device_id))) % 2**32))
    async with http.put(
        f"{server.url}/v1/identities/{identity}/devices/{device_id}", json=body
    ) as resp:
        await resp.read()
        return resp


async def post_events(
    http: aiohttp.ClientSession,
    server: RunningServer,
    events: Any,
    *,
    content_type: str = "application/json",
    query: str = "",
) -> tuple[int, Any]:
    async with http.post(
        f"{server.url}/api/events{query}",
        data=json.dumps(events).encode(),
        headers={"Content-Type": content_type},
    ) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many cases the property-based fuzzing generated (tests/test_fuzz.py)."""
    import sys

    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is None or not fuzz.counted:
        return
    counted = fuzz.counted
    api = sum(v for k, v in counted.items() if k != "parser")
    terminalreporter.write_line(
        f"fuzzing: {counted['parser']} parser/payload cases, {api} API cases over "
        f"{len(counted) - 1} operations (bounded: {fuzz.PARSER_CASES + fuzz.HOSTILE_CASES} "
        "parser cases, "
        f"{fuzz.API_CASES_PER_OPERATION} per operation and mode)"
    )
