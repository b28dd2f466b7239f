"""Lean HTTP/2 server side of the fake providers, for the benchmark (`framing="lean"`).

It exists only to make the benchmark's fake cheap enough: in the direct benchmark the fake shares
the load core with the load generator, and on h2's server side it used 58-64 % of that core at
half of the 5-device peak (91 % at the peak), most of it in h2's frame and stream state machines.
Its event loop then ran single callbacks of 8-22 ms (one TLS read of a burst of pushes), and the
pushes stamped at the end of such a read showed as 15-30 ms of ringrelay's p99 while ringrelay
itself was neither waiting for its core nor busy (bench/README.md, "Session 6"). A fake that
saturates its core measures itself, not the relay.

It speaks only what a push client needs (RFC 9113): the client preface, SETTINGS (ours: the
concurrent-stream limit; windows and frame size at their defaults, as h2's server does), HEADERS
with CONTINUATION, padding and priority, DATA, flow control both ways, PING, RST_STREAM and
GOAWAY. Its receive window is replenished as h2's WindowManager does it (a WINDOW_UPDATE once
half the window has been consumed), so the client sees the same flow control as from the h2
server. Answers are HPACK-encoded without state (`h2frames.header_field`); requests are decoded
with hpack's Decoder. The fakes' own checks (`FakeAPNs.handle`, `FakeFCM.judge`) run unchanged.

The tests keep the h2 server (`framing="h2"`, the default): an implementation independent of the
relay's client (pyreqwest) is what judges that client. `tests/test_fake_apns_lean.py` drives this
server with the relay's client to show that it serves the benchmark correctly.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Any

import orjson
from hpack import Decoder
from hpack.exceptions import HPACKError

from ringrelay.fakes.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    HeaderBlocks,
    ProtocolViolation,
    encode_frame,
    header_field,
    read_frames,
    unpad,
)

if TYPE_CHECKING:
    from ringrelay.fakes.h2server import H2Owner, Headers, RequestHandler

_SETTING = struct.Struct(">HL")
_STATUS_200 = header_field(b":status", b"200")
# h2's WindowManager: replenish once half the window is consumed, or sooner once it is empty.
_REPLENISH_AT = DEFAULT_WINDOW // 2


class _Request:
    __slots__ = ("body", "headers", "unacknowledged")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.body = bytearray()
        self.unacknowledged = 0


class LeanConnection(asyncio.Protocol):
    """One client connection; the surface of h2server.H2ServerConnection."""

    _ids = 0

    def __init__(self, fake: H2Owner, on_request: RequestHandler) -> None:
        self.fake = fake
        self.on_request = on_request  # answers through `_send`, now or later
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, _Request] = {}
        self.highest_stream = 0
        self.token = ""  # the provider token this connection last used, and since when
        self.token_at = 0.0
        LeanConnection._ids += 1
        self.id = LeanConnection._ids
        self._inbox = bytearray()
        self._preface_seen = False
        self._decoder = Decoder()
        self._header_blocks = HeaderBlocks()
        self._out: list[bytes] = []
        self._unacknowledged = 0  # DATA bytes received since our last connection WINDOW_UPDATE
        # What the client lets us send: answers' bodies are a few dozen bytes, but a client
        # that keeps its window shut gets them queued, not sent past it (RFC 9113 §6.9).
        self._send_window = DEFAULT_WINDOW
        self._initial_stream_window = DEFAULT_WINDOW
        self._stream_windows: dict[int, int] = {}
        self._queued: list[tuple[int, bytes]] = []  # (stream id, body) waiting for window
        self._closing = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.fake.connections_opened += 1
        self.fake._connections.add(self)
        settings = _SETTING.pack(SETTINGS_MAX_CONCURRENT_STREAMS, self.fake.max_concurrent_streams)
        self._out.append(encode_frame(SETTINGS, 0, 0, settings))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        try:
            if not self._preface_seen:
                if len(inbox) < len(PREFACE):
                    return
                if inbox[: len(PREFACE)] != PREFACE:
                    raise ProtocolViolation(PROTOCOL_ERROR, "no client preface")
                self._preface_seen = True
                del inbox[: len(PREFACE)]
            for kind, flags, stream_id, payload in read_frames(inbox):
                self._on_frame(kind, flags, stream_id, payload)
        except ProtocolViolation as exc:
            self._goaway(exc.code, str(exc).encode())
            return
        self._flush()

    # --- frames in -----------------------------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_blocks.open and kind != CONTINUATION:
            raise ProtocolViolation(PROTOCOL_ERROR, "header block interrupted")
        if kind == DATA:
            self._on_data(stream_id, flags, payload)
        elif kind == HEADERS or kind == CONTINUATION:
            blocks = self._header_blocks
            done = (blocks.headers if kind == HEADERS else blocks.continuation)(
                stream_id, flags, payload
            )
            if done is not None:
                self._on_headers(*done)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & MAX_WINDOW
            if stream_id == 0:
                self._send_window += increment
                if self._send_window > MAX_WINDOW:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "connection window overflow")
            elif stream_id in self._stream_windows:
                self._stream_windows[stream_id] += increment
            self._send_queued()
        elif kind == PING:
            if not flags & ACK:
                self.fake.pings_received += 1
                self._out.append(encode_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self.requests.pop(stream_id, None)
            self._stream_windows.pop(stream_id, None)
            self._queued = [(s, body) for s, body in self._queued if s != stream_id]
        elif kind == GOAWAY:
            self._closing = True
        elif kind == PUSH_PROMISE:
            raise ProtocolViolation(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).

    def _on_headers(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            fields = self._decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise ProtocolViolation(PROTOCOL_ERROR, f"header block: {exc}") from exc
        if stream_id % 2 == 0 or stream_id <= self.highest_stream:
            raise ProtocolViolation(
                PROTOCOL_ERROR, f"stream {stream_id} is not a new client stream"
            )
        self.highest_stream = stream_id
        request = _Request([(bytes(n), bytes(v)) for n, v in fields])
        self._stream_windows[stream_id] = self._initial_stream_window
        if flags & END_STREAM:
            self.on_request(self, stream_id, request.headers, b"")
        else:
            self.requests[stream_id] = request

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        size = len(payload)  # padding counts against the window (RFC 9113 §6.1)
        self._unacknowledged += size
        if self._unacknowledged >= _REPLENISH_AT:
            self._out.append(
                encode_frame(WINDOW_UPDATE, 0, 0, self._unacknowledged.to_bytes(4, "big"))
            )
            self._unacknowledged = 0
        request = self.requests.get(stream_id)
        if request is None:
            return
        if flags & PADDED:
            payload = unpad(payload)
        request.body += payload
        if flags & END_STREAM:
            del self.requests[stream_id]
            self.on_request(self, stream_id, request.headers, bytes(request.body))
            return
        request.unacknowledged += size
        if request.unacknowledged >= _REPLENISH_AT:
            increment = request.unacknowledged.to_bytes(4, "big")
            self._out.append(encode_frame(WINDOW_UPDATE, 0, stream_id, increment))
            request.unacknowledged = 0

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self._initial_stream_window = value - self._initial_stream_window, value
                for stream_id in self._stream_windows:
                    self._stream_windows[stream_id] += delta
            elif code == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value < 2**24:
                raise ProtocolViolation(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
            # Our frames are small; the other settings do not bind a server's answers.
        self._out.append(encode_frame(SETTINGS, ACK, 0))
        self._send_queued()

    # --- answers -------------------------------------------------------------------------------

    def _send(
        self, stream_id: int, status: int, answer: Any, extra: Headers = (), flush: bool = True
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if stream_id not in self._stream_windows:
            return  # reset by the client meanwhile
        body = orjson.dumps(answer) if answer is not None else b""
        block = _STATUS_200 if status == 200 else header_field(b":status", b"%d" % status)
        for name, value in extra:
            block += header_field(name, value)
        if body:
            block += header_field(b"content-type", b"application/json")
            block += header_field(b"content-length", b"%d" % len(body))
            self._out.append(encode_frame(HEADERS, END_HEADERS, stream_id, block))
            self._queued.append((stream_id, body))
            self._send_queued()
        else:
            self._out.append(encode_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block))
            del self._stream_windows[stream_id]
        if flush:
            self._flush()

    def _send_queued(self) -> None:
        waiting = []
        for stream_id, body in self._queued:
            window = min(self._send_window, self._stream_windows.get(stream_id, 0))
            if len(body) > window:
                waiting.append((stream_id, body))  # bodies are far below a frame's size
                continue
            self._send_window -= len(body)
            del self._stream_windows[stream_id]
            self._out.append(encode_frame(DATA, END_STREAM, stream_id, body))
        self._queued = waiting

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()
        if self._closing and not self._stream_windows and self.transport is not None:
            self.transport.close()  # every stream it started is answered

    # --- what the tests and FakeAPNs ask for -------------------------------------------------

    def _goaway(self, code: int, debug: bytes) -> None:
        payload = self.highest_stream.to_bytes(4, "big") + code.to_bytes(4, "big") + debug
        self._out.append(encode_frame(GOAWAY, 0, 0, payload))
        self._closing = True
        self._flush()
        if code != NO_ERROR and self.transport is not None:
            self.transport.close()

    def goaway(self, reason: str) -> None:
        """As Apple does: GOAWAY with a JSON reason, then close once the answers are out."""
        self._goaway(NO_ERROR, orjson.dumps({"reason": reason}))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
