"""The relay's HTTP/2 pool (pyreqwest) against an independent implementation: a TLS server on
loopback built on h2's server side, scripted per test to do what a real server may do and the
fake APNs does not: GOAWAY in the middle of a burst, a one-stream limit, refused streams,
unanswered PINGs, small flow-control windows, an untrusted certificate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from ringrelay.fakes.tls import make_test_certificates
from ringrelay.providers.http2 import Http2CertificateError, Http2Pool

Answer = Callable[["ServerConnection", int, dict[bytes, bytes], bytes], None]


@dataclass
class Script:
    # In the server's first SETTINGS frame (as Apple sends its one-stream limit)...
    first_settings: dict[int, int] = field(default_factory=dict)
    # ...or in a second one, which h2 applies once the client acknowledges it.
    settings: dict[int, int] = field(default_factory=dict)
    answer: Answer | None = None
    answer_pings: bool = True
    connections: int = 0
    max_open_seen: int = 0
    streams_seen: int = 0
    pings: int = 0
    bodies: list[bytes] = field(default_factory=list)
    # (connection number, the request's x-seq header) of every request that got a 200
    answered: list[tuple[int, bytes]] = field(default_factory=list)


class ServerConnection(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        script.connections += 1
        self.number = script.connections
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.requests: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
        self.ended: list[int] = []  # streams fully received, in order
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # The limits go in the server's first SETTINGS frame, as Apple sends its one stream.
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values=self.script.first_settings
        )
        self.h2.initiate_connection()
        if self.script.settings:
            self.h2.update_settings(self.script.settings)
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        if not self.script.answer_pings and b"\x00\x00\x08\x06\x00" in data:
            return  # a PING frame header (8 bytes, type 6, no ACK): swallow the whole read
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = (dict(event.headers or []), bytearray())
                self.script.streams_seen += 1
                self.script.max_open_seen = max(self.script.max_open_seen, len(self.requests))
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id][1].extend(event.data or b"")
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                headers, body = self.requests[event.stream_id]
                self.script.bodies.append(bytes(body))
                self.ended.append(event.stream_id)
                answer = self.script.answer or ServerConnection.ok
                answer(self, event.stream_id, headers, bytes(body))
            elif isinstance(event, h2.events.PingReceived):
                self.script.pings += 1
        self.flush()

    def ok(self, stream_id: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.script.answered.append((self.number, headers.get(b"x-seq", b"")))
        self.finish(stream_id, [(b":status", b"200"), (b"apns-id", b"id-1")])

    def finish(self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.requests.pop(stream_id, None)
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)
        self.flush()


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    certs = make_test_certificates(str(tmp_path / "tls"))
    servers: list[asyncio.Server] = []
    pools: list[Http2Pool] = []

    async def start(script: Script, *, trusted: bool = True, **kw: Any) -> Http2Pool:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ServerConnection(script), "127.0.0.1", 0, ssl=certs.server_context(["h2"])
        )
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        ca = certs.ca_file if trusted else None
        pool = Http2Pool(f"https://127.0.0.1:{port}", ca, **{"max_connections": 2, **kw})
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        await pool.close()
    for server in servers:
        server.close()


async def post(pool: Http2Pool, seq: int = 0, body: bytes = b"{}", limit: float = 5.0) -> Any:
    return await pool.request("POST", "/3/device/abcd", [("x-seq", str(seq), False)], body, limit)


async def test_goaway_mid_burst_fails_nothing_and_pushes_nothing_twice(serve) -> None:
    """As nginx's keepalive_requests does: after N requests the server sends GOAWAY naming the
    last stream it will process, then finishes those streams, and closes. The streams above it
    were never processed: the client must send them again on a new connection, and only them."""
    per_connection = 10

    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        if conn.number > 1 or len(conn.ended) == 1:
            conn.ok(stream_id, headers, body)  # the first: a new connection carries one alone
            return
        if len(conn.ended) < 1 + per_connection:
            return  # held until the connection has its N requests
        processed = conn.ended[: 1 + per_connection // 2]
        assert conn.transport is not None
        # GOAWAY first (RFC 9113 §6.8: last-stream-id, NO_ERROR), written as raw bytes since h2
        # refuses to send on a connection it has closed; then the answers, then the close.
        goaway = processed[-1].to_bytes(4, "big") + (0).to_bytes(4, "big")
        conn.transport.write(b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + goaway)
        for sid in processed[1:]:
            conn.ok(sid, conn.requests[sid][0], b"")
        conn.transport.close()

    script = Script(answer=answer)
    pool = await serve(script, max_connections=1)
    assert (await post(pool, -1)).status == 200
    answers = await asyncio.gather(*(post(pool, n) for n in range(per_connection)))
    assert [a.status for a in answers] == [200] * per_connection
    seqs = sorted(int(seq) for _, seq in script.answered)
    assert seqs == list(range(-1, per_connection))  # each processed exactly once
    assert {number for number, _ in script.answered} == {1, 2}
    # Sent again: only the streams above GOAWAY's last-stream-id.
    assert script.streams_seen == 1 + per_connection + per_connection // 2


async def test_one_stream_allowed_serves_32_senders_in_turn(serve) -> None:
    """APNs allows one stream until a connection's first success: 32 concurrent pushes must
    all be answered, each in its turn, none starved behind another."""

    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        asyncio.get_running_loop().call_later(0.005, conn.ok, stream_id, headers, body)

    limit = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}
    script = Script(first_settings=limit, answer=answer)
    pool = await serve(script, max_connections=1)
    started = time.monotonic()
    waits: list[float] = []

    async def timed(n: int) -> int:
        answer = await post(pool, n)
        waits.append(time.monotonic() - started)
        return int(answer.status)

    statuses = await asyncio.gather(*(timed(n) for n in range(32)))
    assert statuses == [200] * 32
    assert script.max_open_seen == 1
    assert max(waits) < 1.0, waits  # the bound: served in turn, not after timeouts
    # In order of arrival: every sender once, none served twice while another waited.
    assert sorted(int(seq) for _, seq in script.answered) == list(range(32))


async def test_a_refused_stream_is_sent_again(serve) -> None:
    refused: list[int] = []

    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        if not refused:
            refused.append(stream_id)
            conn.requests.pop(stream_id, None)
            conn.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            conn.flush()
        else:
            conn.ok(stream_id, headers, body)

    script = Script(answer=answer)
    pool = await serve(script)
    response = await post(pool)
    assert response.status == 200 and script.streams_seen == 2


async def test_idle_connections_are_pinged_and_dropped_when_mute(serve) -> None:
    answered = Script()
    pool = await serve(answered, ping_interval=0.1, ping_timeout=0.3)
    await post(pool)
    await asyncio.sleep(1.0)
    assert answered.pings >= 3
    assert (await post(pool)).status == 200
    assert answered.connections == 1  # kept: every PING was answered

    mute = Script(answer_pings=False)
    pool = await serve(mute, ping_interval=0.1, ping_timeout=0.3)
    await post(pool)
    await asyncio.sleep(1.0)
    assert (await post(pool)).status == 200
    assert mute.connections == 2  # the unanswered PING dropped the first connection


async def test_large_bodies_wait_for_window_updates(serve) -> None:
    script = Script(settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    pool = await serve(script)
    body = bytes(range(256)) * 20  # 5,120 bytes: APNs' VoIP limit, five windows' worth
    answers = await asyncio.gather(*(post(pool, n, body) for n in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert script.bodies == [body] * 20  # all of it, past the 64 KB connection window


async def test_status_headers_and_json_reason_per_stream(serve) -> None:
    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        conn.finish(
            stream_id,
            [(b":status", b"410"), (b"apns-id", b"the-id"), (b"content-type", b"application/json")],
            b'{"reason":"Unregistered"}',
        )

    pool = await serve(Script(answer=answer))
    response = await post(pool)
    assert response.status == 410
    assert response.headers["apns-id"] == "the-id"
    assert response.body == b'{"reason":"Unregistered"}'


async def test_a_retired_connection_takes_no_new_requests(serve) -> None:
    script = Script()
    pool = await serve(script)
    first = await post(pool)
    first.lane.retire()
    second = await post(pool)
    assert second.lane is not first.lane and script.connections == 2
    assert first.lane.closed and pool.lanes == [second.lane]


async def test_an_untrusted_certificate_is_a_certificate_error(serve) -> None:
    script = Script()
    pool = await serve(script, trusted=False)
    with pytest.raises(Http2CertificateError) as caught:
        await post(pool)
    assert caught.value.error.verify_message == "UnknownIssuer"
    assert script.streams_seen == 0


async def test_a_connection_that_answers_nothing_in_a_timeout_is_replaced(serve) -> None:
    """A half-open connection swallows every request until a PING (after an hour idle) would
    find it dead: after a timeout with no answer on it, the retry goes out on a new one."""

    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        if conn.number > 1 or headers.get(b"x-seq") == b"0":
            conn.ok(stream_id, headers, body)  # connection 1 goes silent after its first

    script = Script(answer=answer)
    pool = await serve(script)
    assert (await post(pool, 0)).status == 200
    with pytest.raises(TimeoutError):
        await post(pool, 1, limit=0.3)
    again = await post(pool, 2)
    assert again.status == 200 and script.connections == 2
