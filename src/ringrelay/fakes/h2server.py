"""HTTP/2 server sides for the fake providers (APNs, FCM): the owner-facing surface both share.

Two implementations of one small surface, chosen by the fake's `framing`:
- `H2ServerConnection` (here), on h2's server side: an implementation independent of the relay's
  HTTP/2 client (pyreqwest: hyper's h2), so the tests that use it judge that client;
- `LeanConnection` (h2lean.py): lean framing for the benchmark's load core.

A connection hands each complete request to `on_request(conn, stream_id, headers, body)`, which
answers it, now or later, with `conn._send(stream_id, status, json_or_None, headers)`. Answers
given while a read is processed go out together in one write at its end.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import orjson


class H2Owner(Protocol):
    """What a server connection needs of the fake that owns it."""

    connections_opened: int
    pings_received: int
    max_concurrent_streams: int
    validate_headers: bool
    _connections: set[Any]


Headers = Sequence[tuple[bytes, bytes]]
RequestHandler = Callable[[Any, int, list[tuple[bytes, bytes]], bytes], None]


# Inbound checks follow the owner's validate_headers (on in the tests: they judge the client). The
# fake's own answers are well-formed; checking and Huffman-coding them only spends the load core.
def _server_config(validate_inbound: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=validate_inbound,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


_SERVER_CONFIGS = {True: _server_config(True), False: _server_config(False)}


class H2ServerConnection(asyncio.Protocol):
    _ids = 0

    def __init__(self, fake: H2Owner, on_request: RequestHandler) -> None:
        self.fake = fake
        self.on_request = on_request
        self.h2 = h2.connection.H2Connection(config=_SERVER_CONFIGS[fake.validate_headers])
        self.h2.encoder.encode = functools.partial(  # type: ignore[method-assign]
            self.h2.encoder.encode, huffman=False
        )
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self.highest_stream = 0
        self.token = ""  # the provider token this connection last used, and since when
        self.token_at = 0.0
        H2ServerConnection._ids += 1
        self.id = H2ServerConnection._ids

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.fake.connections_opened += 1
        self.fake._connections.add(self)
        self.h2.initiate_connection()
        self.h2.update_settings(
            {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.max_concurrent_streams}
        )
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.abort()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = (list(event.headers or []), bytearray())
                self.highest_stream = max(self.highest_stream, event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                request = self.requests.get(event.stream_id)
                if request is not None:
                    request[1].extend(event.data or b"")
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                request = self.requests.pop(event.stream_id, None)
                if request is not None:
                    self._answer(event.stream_id, request[0], bytes(request[1]))
            elif isinstance(event, h2.events.StreamReset):
                self.requests.pop(event.stream_id, None)
            elif isinstance(event, h2.events.PingReceived):
                self.fake.pings_received += 1  # h2 has queued the acknowledgement
        self._flush()

    def _answer(self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.on_request(self, stream_id, headers, body)

    def _send(
        self, stream_id: int, status: int, answer: Any, extra: Headers = (), flush: bool = True
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = orjson.dumps(answer) if answer is not None else b""
        headers = [(b":status", str(status).encode()), *extra]
        if body:
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode()))
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.H2Error:
            return  # the stream was reset or the connection is closing
        if flush:
            self._flush()

    def goaway(self, reason: str) -> None:
        """As Apple does: GOAWAY with a JSON reason, then close once the answers are out."""
        try:
            self.h2.close_connection(
                error_code=h2.errors.ErrorCodes.NO_ERROR,
                additional_data=orjson.dumps({"reason": reason}),
                last_stream_id=self.highest_stream,
            )
        except h2.exceptions.H2Error:
            pass
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
