"""Slow, idle and vanishing clients over raw sockets: the time a request may take to arrive, the
open connections per instance, the webhook's slots, and what a client disconnect logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import subprocess
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from ringrelay.simulate import incoming_call_event
from tests.conftest import RunningServer, acs_id, post_events, register
from tests.test_cli import RINGRELAY, clean_env, free_port, wait_healthy


async def open_raw(port: int, first: bytes = b"") -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


def unfinished_post(
    path: str, declared: int = 1000, sent: bytes = b'[{"id": "', method: str = "POST"
) -> bytes:
    """A request whose headers are complete and whose body stops after `sent`."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode() + sent


async def read_until_closed(reader: asyncio.StreamReader, seconds: float = 20) -> bytes:
    """Everything the server sends before it closes; a server that never closes fails here."""
    return await asyncio.wait_for(reader.read(), seconds)


# --- item 2: the time to receive a request ---------------------------------------------------


async def test_unfinished_requests_get_408_and_are_closed(make_server) -> None:
    server: RunningServer = make_server(header_timeout_seconds=0.5, body_timeout_seconds=0.5)
    callee = acs_id("slow")
    idle = await open_raw(server.port)
    partial_headers = await open_raw(server.port, b"POST /api/events HTTP/1.1\r\nHost: x\r\n")
    webhook_body = await open_raw(server.port, unfinished_post("/api/events"))
    registry_body = await open_raw(
        server.port,
        unfinished_post(
            f"/v1/identities/{callee}/devices/phone", sent=b'{"platform": "ap', method="PUT"
        ),
    )
    # After one answered request, the kept-alive connection's next request is timed too.
    second = await open_raw(
        server.port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n",
    )

    assert await read_until_closed(idle[0]) == b""  # nothing had begun: closed without a word
    answer = await read_until_closed(partial_headers[0])
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"headers" in answer
    answer = await read_until_closed(webhook_body[0])
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"body" in answer
    answer = await read_until_closed(registry_body[0])
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"RINGRELAY_BODY_TIMEOUT_SECONDS" in answer  # the registrar's answer names it too
    answer = await read_until_closed(second[0])
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer, answer
    for _, writer in (idle, partial_headers, webhook_body, registry_body, second):
        writer.close()


async def test_endless_headers_get_431(http, make_server) -> None:
    """Headers are held in memory until complete: past 64 KiB the connection is answered 431
    and closed (long before the header timeout), while a 1 MiB body right behind small headers
    is read as usual."""
    sandbox_server: RunningServer = make_server(header_timeout_seconds=120)
    reader, writer = await open_raw(sandbox_server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(40):
        writer.write(b"X-Filler: " + b"a" * 4000 + b"\r\n")
        try:
            await writer.drain()
        except ConnectionError:
            break
    answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    writer.close()

    big = json.dumps([{"id": "x", "data": "a" * (1024 * 1024 - 100)}]).encode()
    async with http.post(f"{sandbox_server.url}/api/events", data=big) as resp:
        assert resp.status == 200, await resp.text()


# --- item 2: open connections per instance ---------------------------------------------------

SLOW_CONNECTIONS = 400
MAX_CONNECTIONS = 100
SERVER_OPEN_FILES = 320  # the server's own limit: fewer than the slow connections


@pytest.fixture
def limited_server(tmp_path) -> Iterator[str]:
    """`ringrelay serve` in a process that may open only SERVER_OPEN_FILES files (as the 20,000
    of `ulimit -n` in the report, scaled down), with long timeouts: only the connection limit
    protects it here."""
    port = free_port()
    env = {
        **clean_env(),
        "RINGRELAY_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "RINGRELAY_HEADER_TIMEOUT_SECONDS": "120",
        "RINGRELAY_BODY_TIMEOUT_SECONDS": "120",
    }
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_OPEN_FILES, hard))

    proc = subprocess.Popen(
        [*RINGRELAY, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=limit_files,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)  # type: ignore[arg-type]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # a server that lost its way cannot stop either
            proc.kill()
            proc.wait(timeout=5)


async def test_a_body_refused_with_413_still_gets_its_answer(make_server) -> None:
    """The webhook answers 413 (with `connection: close`) before reading a body over the limit.
    A server that then closed at once, with the body still arriving, reset the connection and the
    client lost the answer (RFC 9112 §9.6); it answers, half-closes, and drops what still comes."""
    server: RunningServer = make_server()
    size = 4 * 1024 * 1024
    reader, writer = await open_raw(server.port, unfinished_post("/api/events", size, b""))
    await asyncio.sleep(0.3)  # answered by now; a server closing at once has closed
    writer.write(b"a" * size)  # the refused body, sent all the same
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"exceeds the" in answer
    writer.close()


async def test_many_slow_connections_leave_room_for_a_delivery(limited_server) -> None:
    url = limited_server
    port = int(url.rsplit(":", 1)[1])
    callee = acs_id("crowded")
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.put(
            f"{url}/v1/identities/{callee}/devices/phone",
            json={"platform": "apns", "token": "ab" * 32},
        ) as resp:
            assert resp.status == 201

        slow = []
        for i in range(SLOW_CONNECTIONS):
            first = (
                b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Le"
                if i % 2
                else unfinished_post("/api/events")
            )
            slow.append(await open_raw(port, first))

        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        event = incoming_call_event(callee)
        async with http.post(f"{url}/api/events", json=[event]) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["events"][0]["status"] == "delivered"

    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.read(), 2)
            return True
        except TimeoutError:
            return False

    # The server kept at most MAX_CONNECTIONS open: the oldest slow ones were closed.
    closed_count = sum(await asyncio.gather(*(closed(reader) for reader, _ in slow)))
    assert closed_count >= SLOW_CONNECTIONS - MAX_CONNECTIONS
    for _, writer in slow:
        writer.close()


# --- item 3: slow bodies do not hold the webhook's slots ---------------------------------------


async def test_slow_webhook_bodies_take_no_delivery_slot(http, make_server) -> None:
    server: RunningServer = make_server(webhook_max_concurrent=4, body_timeout_seconds=60)
    callee = acs_id("patient")
    await register(http, server, callee, "phone")
    slow = [await open_raw(server.port, unfinished_post("/api/events")) for _ in range(8)]
    async with http.get(f"{server.url}/healthz") as resp:  # the slow requests are under way
        assert resp.status == 200
    await asyncio.sleep(0.2)

    status, body = await post_events(http, server, [incoming_call_event(callee)])
    assert status == 200, body
    assert body["events"][0]["status"] == "delivered"
    assert server.relay.webhook_in_progress == 0  # the slow ones hold no slot
    for _, writer in slow:
        writer.close()


async def test_a_slow_webhook_body_is_answered_408_with_the_reason(make_server) -> None:
    server: RunningServer = make_server(body_timeout_seconds=0.5)
    reader, writer = await open_raw(server.port, unfinished_post("/api/events"))
    answer = await read_until_closed(reader)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert "RINGRELAY_BODY_TIMEOUT_SECONDS" in json.loads(body)["error"]
    writer.close()


# --- item 15: a client that goes away mid-request ----------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log() -> Iterator[_Records]:
    """Every record of ringrelay and uvicorn (whose loggers do not propagate to the root)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("ringrelay", "uvicorn")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


ABORTED = 20


async def test_an_aborted_request_logs_one_info_line(http, sandbox_server, server_log) -> None:
    registry = f"/v1/identities/{acs_id('gone')}/devices/phone"
    for i in range(ABORTED):
        request = (
            unfinished_post("/api/events")
            if i % 2
            else unfinished_post(registry, sent=b'{"platform": "a', method="PUT")
        )
        _, writer = await open_raw(sandbox_server.port, request)
        await asyncio.sleep(0.01)  # the server has the headers and waits for the body
        writer.transport.abort()

    def lines() -> list[str]:
        out = []
        for record in list(server_log.records):
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            out += text.splitlines()
        return out

    webhook_aborts = ABORTED // 2
    for _ in range(100):  # until the server has seen every disconnect, or something worse
        if len(server_log.records) >= webhook_aborts:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    levels = {logging.getLevelName(r.levelno) for r in server_log.records}
    assert levels == {"INFO"}, lines()
    # One line per aborted webhook request; FastAPI's routes answer an aborted body 400 silently.
    assert len(lines()) == webhook_aborts, lines()
    assert all("disconnected" in line for line in lines()), lines()
    async with http.get(f"{sandbox_server.url}/healthz") as resp:
        assert resp.status == 200


def test_serve_fits_the_open_file_limit_to_max_connections(tmp_path) -> None:
    def files(soft: int, hard: int) -> Any:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    # Too few files allowed at all: refused, naming the setting.
    out = subprocess.run(
        [*RINGRELAY, "serve", "--port", str(free_port()), "--max-connections", "5000"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=files(1000, 1000),
    )
    assert out.returncode == 2, out.stderr
    assert "RINGRELAY_MAX_CONNECTIONS: 5000 connections need 5064 open files" in out.stderr
    assert "ulimit -n" in out.stderr

    # Allowed but not granted: the soft limit is raised to fit.
    port = free_port()
    proc = subprocess.Popen(
        [*RINGRELAY, "serve", "--port", str(port), "--max-connections", "500"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=files(200, 1000),
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
        with open(f"/proc/{proc.pid}/limits") as limits:
            line = next(x for x in limits if x.startswith("Max open files"))
        assert line.split()[3:5] == ["564", "1000"], line
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def test_a_connection_past_the_limit_gets_503_when_all_are_busy(
    http, make_server, nh_settings, fake_nh
) -> None:
    """Every connection holds a delivery being handled (the hub is slow): none is waiting for a
    request, so none can be closed to make room, and the new one is told to retry."""
    server: RunningServer = make_server(**nh_settings, max_connections=8)
    callee = acs_id("busy")
    await register(http, server, callee, "phone")
    await http.close()  # its kept-alive connection would be the one closed to make room
    fake_nh.respond(201, times=8, delay=3)
    busy = []
    for _ in range(8):
        body = json.dumps([incoming_call_event(callee)]).encode()
        head = (
            "POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        busy.append(await open_raw(server.port, head + body))
    await asyncio.sleep(0.5)  # the deliveries are at the hub

    reader, writer = await open_raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"too many open connections" in answer
    for busy_reader, busy_writer in busy:  # the busy ones are answered as usual
        assert (await busy_reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200 ")
        busy_writer.close()
    writer.close()


def test_the_default_max_connections_fits_a_containers_1024_files(tmp_path) -> None:
    """A default start must work where the hard limit is 1024 (a container's usual ulimit): the
    default RINGRELAY_MAX_CONNECTIONS is fitted to it and the start-up log says so."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [*RINGRELAY, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    text = log.read_text()
    assert "open files limited to 1024 (ulimit -n): at most" in text
    assert "instead of the default 2048" in text
