"""The HTTP/2 client against an independent implementation: a TLS server on loopback built on
h2's server side, scripted per test to use the parts of the protocol that a real server may use
and that the fake APNs does not (small flow-control windows, CONTINUATION, padding, interim
answers, refused streams, a stream limit, a malformed frame)."""

from __future__ import annotations

import asyncio
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
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import InvalidTableIndex

from ringrelay.fakes.tls import make_test_certificates
from ringrelay.providers.h2client import (
    CachingDecoder,
    H2ConnectionLost,
    H2Pool,
    header_block,
    header_field,
)

Answer = Callable[["ServerConnection", int, dict[bytes, bytes], bytes], None]


def test_request_headers_decode_as_sent_without_touching_the_dynamic_table() -> None:
    long_value = b"x" * 300  # a length past the 7-bit prefix: multi-byte integer
    block = header_block(
        [
            (b":method", b"POST"),  # a static pair: one byte
            (b":scheme", b"https"),
            (b":authority", b"api.push.apple.com"),  # static name, literal value
            (b"apns-topic", b"com.example.app.voip"),  # new name
            (b"x-long", long_value),
        ]
    ) + header_field(b"authorization", b"bearer abc", sensitive=True)
    assert block[:2] == b"\x83\x87"
    decoder = Decoder()
    fields = decoder.decode(block, raw=True)
    assert [(bytes(n), bytes(v)) for n, v in fields] == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"api.push.apple.com"),
        (b"apns-topic", b"com.example.app.voip"),
        (b"x-long", long_value),
        (b"authorization", b"bearer abc"),
    ]
    assert isinstance(fields[-1], NeverIndexedHeaderTuple)
    assert len(decoder.header_table.dynamic_entries) == 0  # nothing for the server to track


def test_a_repeated_answer_block_decodes_from_the_cache_while_the_table_is_unchanged() -> None:
    encoder, decoder = Encoder(), CachingDecoder()
    # A server indexing its headers (as Google's front ends do): the first answer inserts them,
    # the ones after refer to the table with one-byte references, the same bytes each time.
    answer = [(b":status", b"200"), (b"content-type", b"application/json"), (b"x-id", b"a")]
    first = encoder.encode(answer)
    second = encoder.encode(answer)
    assert second != first and encoder.encode(answer) == second
    for block in (first, second, second, second):
        assert decoder.decode(block) == answer
    assert decoder.hits == 2  # the first of `second` decoded, its repeats remembered

    # The same bytes mean other fields once the table changed: a new insertion shifts the
    # dynamic indices (62 is now the new entry), so `second` must be decoded afresh.
    shifted = encoder.encode([(b":status", b"200"), (b"x-other", b"b")])
    assert decoder.decode(shifted) == [(b":status", b"200"), (b"x-other", b"b")]
    reference = Decoder()
    for block in (first, second, shifted):
        reference.decode(block, raw=True)
    expected = [(bytes(n), bytes(v)) for n, v in reference.decode(second, raw=True)]
    assert expected != answer  # the premise: these bytes now name other entries
    hits = decoder.hits
    assert decoder.decode(second) == expected
    assert decoder.hits == hits


def test_a_table_resize_in_a_block_invalidates_the_cache() -> None:
    encoder, decoder = Encoder(), CachingDecoder()
    answer = [(b"x-id", b"a")]
    inserting, referring = encoder.encode(answer), encoder.encode(answer)
    assert decoder.decode(inserting) == answer
    assert decoder.decode(referring) == answer
    assert decoder.decode(referring) == answer and decoder.hits == 1
    # A dynamic table size update to 0 evicts every entry (RFC 7541 §6.3): the reference now
    # points nowhere, and a remembered answer would hide the server's protocol error.
    encoder.header_table_size = 0
    assert decoder.decode(encoder.encode([(b":status", b"204")])) == [(b":status", b"204")]
    with pytest.raises(InvalidTableIndex):
        decoder.decode(referring)


def test_unique_answer_blocks_do_not_grow_the_cache() -> None:
    decoder = CachingDecoder()
    for n in range(1000):  # APNs answers carry a fresh apns-id each
        block = header_field(b":status", b"200") + header_field(b"apns-id", b"%036d" % n)
        assert decoder.decode(block)[1] == (b"apns-id", b"%036d" % n)
        assert 1 <= len(decoder) <= CachingDecoder.MAX_ENTRIES
    assert decoder.hits == 0


def test_a_block_that_replaces_the_whole_table_is_not_remembered() -> None:
    # A table with room for one entry. The block refers to that entry, then inserts two: the
    # first insertion evicts the old entry (freeing its tuple), the second evicts the first. If
    # the cache compared the newest entry by id(), the second's tuple could reuse the freed
    # address (CPython's tuple free list makes that the usual case) and the block would look
    # as if it left the table unchanged; its repeat would then come from the cache although
    # index 62 names another entry by then.
    def literal_indexed(name: bytes, value: bytes) -> bytes:  # RFC 7541 §6.2.1, short strings
        return bytes([0x40, len(name)]) + name + bytes([len(value)]) + value

    size_40 = bytes([0x3F, 40 - 31])  # dynamic table size update to 40 (§6.3): one entry fits
    setup = size_40 + literal_indexed(b"x-a", b"1")
    replacing = bytes([0x80 | 62]) + literal_indexed(b"x-b", b"2") + literal_indexed(b"x-c", b"3")
    decoder, reference = CachingDecoder(), Decoder()
    for block in (setup, replacing):
        decoder.decode(block)
        reference.decode(block, raw=True)
    expected = [(bytes(n), bytes(v)) for n, v in reference.decode(replacing, raw=True)]
    assert expected[0] == (b"x-c", b"3")  # the premise: 62 now names the newest entry
    assert decoder.decode(replacing) == expected
    assert decoder.hits == 0


@dataclass
class Script:
    settings: dict[int, int] = field(default_factory=dict)
    answer: Answer | None = None
    max_open_seen: int = 0
    streams_seen: int = 0
    bodies: list[bytes] = field(default_factory=list)


class ServerConnection(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.requests: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        if self.script.settings:
            self.h2.update_settings(self.script.settings)
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
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
                answer = self.script.answer or ServerConnection.ok
                answer(self, event.stream_id, headers, bytes(body))
        self.flush()

    def ok(self, stream_id: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.finish(stream_id, [(b":status", b"200"), (b"apns-id", b"id-1")])

    def finish(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes = b"", **kw: Any
    ) -> None:
        self.requests.pop(stream_id, None)
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True, **kw)
        self.flush()


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[Script], Any]]:
    certs = make_test_certificates(str(tmp_path / "tls"))
    servers: list[asyncio.Server] = []
    pools: list[H2Pool] = []

    async def start(script: Script) -> H2Pool:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ServerConnection(script),
            "127.0.0.1",
            0,
            ssl=certs.server_context(["h2"]),
        )
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        ctx = certs.client_context()
        ctx.set_alpn_protocols(["h2"])
        pool = H2Pool("127.0.0.1", port, ctx, max_connections=2)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        await pool.close()
    for server in servers:
        server.close()


HEADERS = header_block([(b":method", b"POST"), (b":scheme", b"https")]) + header_block(
    [(b":authority", b"127.0.0.1"), (b":path", b"/3/device/abcd")]
)


async def test_a_body_larger_than_the_window_waits_for_window_updates(serve) -> None:
    script = Script(settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    pool = await serve(script)
    body = bytes(range(256)) * 20  # 5,120 bytes: APNs' VoIP limit, five windows' worth
    answers = await asyncio.gather(*(pool.request(HEADERS, body, 5.0) for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert script.bodies == [body] * 20  # all of it, in order, past the 64 KB connection window


async def test_continuation_padding_and_an_interim_answer_are_understood(serve) -> None:
    big = b"v" * 40_000  # past the 16 KB frame: the server continues the block

    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        conn.h2.send_headers(stream_id, [(b":status", b"103"), (b"link", b"</x>")])
        conn.finish(
            stream_id,
            [(b":status", b"410"), (b"x-big", big)],
            b'{"reason":"Unregistered"}',
            pad_length=17,
        )

    pool = await serve(Script(answer=answer))
    response = await pool.request(HEADERS, b"{}", 5.0)
    assert response.status == 410
    assert response.headers[b"x-big"] == big
    assert b"link" not in response.headers  # the interim answer's fields are not the answer's
    assert response.body == b'{"reason":"Unregistered"}'


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
    response = await pool.request(HEADERS, b"{}", 5.0)
    assert response.status == 200 and script.streams_seen == 2


async def test_the_server_stream_limit_is_respected(serve) -> None:
    pending: list[int] = []

    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        pending.append(stream_id)
        asyncio.get_running_loop().call_later(0.01, lambda: conn.ok(pending.pop(0), {}, b""))

    script = Script(settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}, answer=answer)
    pool = await serve(script)
    pool.max_connections = 1
    answers = await asyncio.gather(*(pool.request(HEADERS, b"{}", 5.0) for _ in range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert script.max_open_seen == 1


async def test_ping_is_answered(serve) -> None:
    pool = await serve(Script())
    await pool.request(HEADERS, b"{}", 5.0)
    assert await pool.connections[0].ping(time_limit=2.0)


async def test_a_malformed_frame_fails_the_streams_and_drops_the_connection(serve) -> None:
    def answer(conn: ServerConnection, stream_id: int, headers: Any, body: bytes) -> None:
        # A DATA frame longer than the 16,384 bytes we allow (we never raised MAX_FRAME_SIZE).
        assert conn.transport is not None
        conn.transport.write((20_000).to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4))

    pool = await serve(Script(answer=answer))
    with pytest.raises(H2ConnectionLost):
        await pool.request(HEADERS, b"{}", 5.0)
    assert pool.connections == []
