"""Each answer leaves the server in one write (status line, headers and body together), over a
real connection; an answer without a body (HEAD) is not held back, and a "100 Continue" still
goes out at once, before the body is sent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ringrelay import httpserver
from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id


class CountingTransport:
    """The connection's transport, recording every write the server makes to it."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def test_answers_leave_in_one_write_and_100_continue_at_once(make_server, monkeypatch):
    writes: list[bytes] = []
    bounded = httpserver.bounded_protocol

    def counting(limits: httpserver.ConnectionLimits) -> type[httpserver.BoundedHttpProtocol]:
        class Counting(bounded(limits)):  # type: ignore[misc,valid-type]
            def connection_made(self, transport: Any) -> None:
                super().connection_made(CountingTransport(transport, writes))

        return Counting

    monkeypatch.setattr(httpserver, "bounded_protocol", counting)
    server = make_server()
    body = json.dumps([incoming_call_event(acs_id("one-write"))]).encode()
    post = (
        f"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(post + b"\r\n" + body)
        answer = await read_answer(reader)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}"), answer
        assert writes == [answer]  # head and body in one write

        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a FastAPI route's answer
        answer = await read_answer(reader)
        assert answer.startswith(b"HTTP/1.1 200 ") and writes[1:] == [answer]

        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # no body is ever written
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 ") and writes[2:] == [head]
        del writes[2]

        writer.write(post + b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # not held back for the answer
        writer.write(body)
        answer = await read_answer(reader)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert writes[2:] == [interim, answer]
    finally:
        writer.close()
