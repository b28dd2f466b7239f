"""A small HTTP/2 client for one kind of traffic: many small POSTs with small answers, on
long-lived, multiplexed TLS connections to one origin (RFC 9113).

Why its own framing rather than h2 (python-hyper): on this machine h2 spent 86 us of CPU per
request (send_headers + send_data + receive_data), 8x what this module needs (11 us), and it was
a fifth of the relay's CPU on the APNs path (bench/README, "The APNs HTTP/2 client"). The traffic
needs little of HTTP/2: no server push, no priorities, bodies of a few KB, answers of a few
hundred bytes. What it needs is done here and checked against an independent implementation
(the fake APNs is built on h2's server side):
- requests are HPACK-encoded without state: fields whose name is in the static table reference
  it, and no literal is added to the dynamic table (RFC 7541 §6.2.2/§6.2.3), so there is no
  encoder state to keep in step with the server's decoder;
- answers are decoded with hpack's Decoder (the library: dynamic table, Huffman), which sees
  every header block of the connection in order, including those of streams we gave up, except
  repeats of a block that changed nothing in its table (`CachingDecoder`);
- flow control both ways (RFC 9113 §5.2, §6.9), SETTINGS, PING, GOAWAY, RST_STREAM, CONTINUATION.

What it guarantees its caller:
- the server's SETTINGS_MAX_CONCURRENT_STREAMS and flow-control windows are respected (Apple
  allows one stream until the first request with a valid provider token succeeds);
- a stream the server never processed (above GOAWAY's last-stream-id, or REFUSED_STREAM) is
  re-sent on a new connection at once, so a GOAWAY or a graceful shutdown loses no push;
- a connection lost mid-stream fails those streams with `H2ConnectionLost` (the server may or may
  not have acted: the caller decides whether to retry);
- idle connections are kept for hours and checked with PING (Apple: reuse connections, PING
  after about an hour idle; developer.apple.com "Sending notification requests to APNs").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.table import HeaderTable

log = logging.getLogger("ringrelay.h2")

# RFC 9113 §3.4 (connection preface), §6 (frame types and flags), §6.5.2 (settings), §7 (errors).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 3, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 7, 8, 9
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1

# Our side: answers are small, so a generous receive window means the connection window needs
# replenishing only rarely; an answer body past MAX_ANSWER_BODY resets its stream.
RECEIVE_WINDOW = 1 << 20
CONNECTION_RECEIVE_WINDOW = 16 << 20
MAX_ANSWER_BODY = 64 * 1024
_ROOMY_WINDOW = 16 * 1024  # a connection's send window that fits a few more pushes

_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_SETTING = struct.Struct(">HL")
_STATIC_FIELDS = {pair: i for i, pair in enumerate(HeaderTable.STATIC_TABLE, start=1)}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_NAMES.setdefault(_name, _index)


class H2Error(Exception):
    """The request got no HTTP answer."""


class H2ConnectionLost(H2Error):
    """The connection closed while the stream was open: the server may have processed it."""


class H2CertificateError(H2Error):
    """The server's TLS certificate did not verify: nothing was sent (a configuration error)."""

    def __init__(self, where: str, error: ssl.SSLCertVerificationError) -> None:
        super().__init__(f"{where}: {error.verify_message or error}")
        self.where = where
        self.error = error


class StreamNotProcessed(H2Error):
    """GOAWAY or REFUSED_STREAM: the server did not act on the stream, so resending is safe."""


class ProtocolViolation(Exception):
    """The peer broke RFC 9113: the connection ends with GOAWAY carrying `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- HPACK, request side (RFC 7541) ----------------------------------------------------------


def _integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 §5.1: an integer in an N-bit prefix, then 7-bit groups."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """RFC 7541 §5.2, without Huffman coding (in Python it costs more CPU than the bytes save)."""
    return _integer(len(value), 7, 0) + value


def header_field(name: bytes, value: bytes, *, sensitive: bool = False) -> bytes:
    """One header field, encoded without touching the dynamic table: an indexed field when the
    static table has the pair, else a literal "without indexing", or "never indexed" when
    `sensitive` (RFC 7541 §6.2.3: intermediaries must not compress it either; for credentials
    and per-request values). Names must be lowercase (RFC 9113 §8.2.1)."""
    if not sensitive and (index := _STATIC_FIELDS.get((name, value))):
        return _integer(index, 7, 0x80)
    first = 0x10 if sensitive else 0x00
    name_index = _STATIC_NAMES.get(name, 0)
    if name_index:
        return _integer(name_index, 4, first) + _string(value)
    return bytes((first,)) + _string(name) + _string(value)


def header_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode fields in order (pseudo-header fields first, RFC 9113 §8.3)."""
    return b"".join(header_field(name, value) for name, value in fields)


# --- HPACK, answer side ----------------------------------------------------------------------


class CachingDecoder:
    """hpack's Decoder that remembers the fields of header blocks which left its dynamic table
    as it was. A server answers many pushes with the same block (FCM: `:status`, content type,
    length; headers it indexed earlier come back as one-byte references), and decoding in pure
    Python cost 5.3 us per FCM answer (about 4 % of the relay's CPU per event); a repeat costs
    a dictionary lookup. A block decodes to the same fields as long as the table is unchanged,
    so the cache is emptied whenever a block changes the table (an insertion or a resize);
    such a block is not remembered either: its repeat would change the table again."""

    __slots__ = ("_cache", "_decoder", "hits")

    MAX_ENTRIES = 64  # distinct cacheable blocks are few; unique ones (APNs' apns-id) churn

    def __init__(self) -> None:
        self._decoder = Decoder()
        self._cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.hits = 0

    def __len__(self) -> int:
        """Blocks remembered now."""
        return len(self._cache)

    def _table_state(self) -> tuple[object, int, int]:
        table = self._decoder.header_table
        entries = table.dynamic_entries
        # The newest entry itself, compared by identity: an insertion puts a new tuple first,
        # and eviction happens only with an insertion or a resize. Holding the object (not its
        # id) matters: a block that evicts it and then inserts twice could get its freed
        # address, and so its id, for the new first entry.
        return entries[0] if entries else None, len(entries), table.maxsize

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        fields = self._cache.get(block)
        if fields is not None:
            self.hits += 1
            return fields
        before = self._table_state()
        fields = [
            (bytes(name), bytes(value)) for name, value in self._decoder.decode(block, raw=True)
        ]
        after = self._table_state()
        if after[0] is not before[0] or after[1:] != before[1:]:
            self._cache.clear()
        else:
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()
            self._cache[block] = fields
        return fields


# --- connections -----------------------------------------------------------------------------


@dataclass(slots=True)
class H2Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    connection: H2Connection | None = None  # which connection answered (to retire it)


@dataclass(slots=True)
class _Stream:
    future: asyncio.Future[H2Response]
    send_window: int
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


def encode_frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    length = len(payload)
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def read_frames(inbox: bytearray) -> Iterator[tuple[int, int, int, bytes]]:
    """The complete frames at the start of `inbox` as (type, flags, stream id, payload); what
    they took is removed from `inbox` when the iteration ends, however it ends. Frames over
    the default SETTINGS_MAX_FRAME_SIZE are refused (neither side here raises it)."""
    position = 0
    try:
        while len(inbox) - position >= 9:
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(inbox, position)
            length = (high << 8) | low
            if length > DEFAULT_MAX_FRAME:
                raise ProtocolViolation(FRAME_SIZE_ERROR, f"{length}-byte frame")
            end = position + 9 + length
            if end > len(inbox):
                break
            payload = bytes(inbox[position + 9 : end])
            position = end
            yield kind, flags, stream_id & MAX_STREAM_ID, payload
    finally:
        del inbox[:position]


class HeaderBlocks:
    """Joins a header block sent as HEADERS and CONTINUATION frames (RFC 9113 §6.2, §6.10): the
    HEADERS or CONTINUATION that ends it returns (stream id, the HEADERS frame's flags, block)."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: tuple[int, int, list[bytes]] | None = None

    @property
    def open(self) -> bool:
        """A block is incomplete: any frame but its CONTINUATION is a protocol error."""
        return self._open is not None

    def headers(self, stream_id: int, flags: int, payload: bytes) -> tuple[int, int, bytes] | None:
        if flags & PADDED:
            payload = unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            return stream_id, flags, payload
        self._open = (stream_id, flags, [payload])
        return None

    def continuation(
        self, stream_id: int, flags: int, payload: bytes
    ) -> tuple[int, int, bytes] | None:
        if self._open is None or self._open[0] != stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._open[2].append(payload)
        if not flags & END_HEADERS:
            return None
        stream_id, first_flags, fragments = self._open
        self._open = None
        return stream_id, first_flags, b"".join(fragments)


class H2Connection(asyncio.Protocol):
    """One TLS connection carrying many concurrent streams."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.going_away = False
        self.last_activity = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._decoder = CachingDecoder()
        self._next_stream_id = 1
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._flush_pending = False
        # What the server lets us send (RFC 9113 §6.5.2 defaults until its SETTINGS arrive).
        self._max_streams = MAX_STREAM_ID  # unlimited until told; the pool has its own cap
        self._initial_send_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._max_frame = DEFAULT_MAX_FRAME
        self._window_waiters: list[asyncio.Future[None]] = []
        self._received_unacknowledged = 0
        self._header_blocks = HeaderBlocks()
        self._ping: asyncio.Future[None] | None = None

    # --- capacity ----------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and not self.going_away

    @property
    def send_window(self) -> int:
        """Bytes of DATA the server lets this connection send now (RFC 9113 §6.9)."""
        return self._send_window

    @property
    def free_streams(self) -> int:
        if not self.usable:
            return 0
        return min(self._max_streams, self.pool.streams_per_connection) - len(self.streams)

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        settings = b"".join(
            _SETTING.pack(code, value)
            for code, value in (
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
            )
        )
        increment = CONNECTION_RECEIVE_WINDOW - DEFAULT_WINDOW
        self._send(PREFACE)
        self._send(encode_frame(SETTINGS, 0, 0, settings))
        self._send(encode_frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self._inbox += data
        try:
            for kind, flags, stream_id, payload in read_frames(self._inbox):
                self._on_frame(kind, flags, stream_id, payload)
        except ProtocolViolation as exc:
            log.warning("HTTP/2 protocol error from %s: %s", self.pool.authority, exc)
            self._send(encode_frame(GOAWAY, 0, 0, _goaway_payload(0, exc.code)))
            self._flush()
            self._abort(H2ConnectionLost(f"protocol error: {exc}"))
            return
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(H2ConnectionLost("connection lost"))

    def pause_writing(self) -> None:  # pragma: no cover - small bodies never fill the buffer
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # --- frames in -----------------------------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_blocks.open and kind != CONTINUATION:
            raise ProtocolViolation(PROTOCOL_ERROR, "header block interrupted")
        if kind == HEADERS or kind == CONTINUATION:
            blocks = self._header_blocks
            done = (blocks.headers if kind == HEADERS else blocks.continuation)(
                stream_id, flags, payload
            )
            if done is not None:
                self._on_headers(done[0], bool(done[1] & END_STREAM), done[2])
        elif kind == DATA:
            self._on_data(stream_id, flags, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == RST_STREAM:
            self._on_reset(stream_id, int.from_bytes(payload[:4], "big"))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == PING:
            if flags & ACK:
                if self._ping is not None and not self._ping.done():
                    self._ping.set_result(None)
            else:
                self._send(encode_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            self._on_goaway(payload)
        elif kind == PUSH_PROMISE:
            raise ProtocolViolation(PROTOCOL_ERROR, "PUSH_PROMISE after ENABLE_PUSH=0")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).

    def _on_headers(self, stream_id: int, end_stream: bool, block: bytes) -> None:
        try:
            # Decoded even when the stream is gone: the dynamic table must stay in step.
            fields = self._decoder.decode(block)
        except HPACKError as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"header block: {exc}") from exc
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        status = 0
        for name, value in fields:
            if name == b":status":
                if not value.isdigit():
                    raise ProtocolViolation(PROTOCOL_ERROR, f":status {value[:20]!r}")
                status = int(value)
            elif not stream.status:
                stream.headers[name] = value
        if stream.status == 0 and 100 <= status < 200:
            stream.headers.clear()  # an interim answer (RFC 9113 §8.1): the final one follows
            return
        if stream.status == 0:
            if not status:
                self._reset(stream_id, PROTOCOL_ERROR)
                self._fail_stream(stream_id, H2Error("answer without :status"))
                return
            stream.status = status
        if end_stream:
            self._complete(stream_id)

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        self._received_unacknowledged += len(payload)  # padding counts (RFC 9113 §6.1)
        if self._received_unacknowledged >= CONNECTION_RECEIVE_WINDOW // 2:
            increment, self._received_unacknowledged = self._received_unacknowledged, 0
            self._send(encode_frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if flags & PADDED:
            payload = unpad(payload)
        stream.body += payload
        if len(stream.body) > MAX_ANSWER_BODY:
            self._reset(stream_id, CANCEL)
            self._fail_stream(stream_id, H2Error(f"answer body over {MAX_ANSWER_BODY} bytes"))
        elif flags & END_STREAM:
            self._complete(stream_id)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        increment = int.from_bytes(payload[:4], "big") & MAX_WINDOW
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolViolation(FLOW_CONTROL_ERROR, "connection window overflow")
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.send_window += increment
        self._wake_window_waiters()

    def _on_reset(self, stream_id: int, code: int) -> None:
        if code == REFUSED_STREAM:
            self._fail_stream(stream_id, StreamNotProcessed("stream refused"))
        else:
            self._fail_stream(stream_id, H2Error(f"stream reset by server (error code {code})"))

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._max_streams = value
            elif code == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self._initial_send_window = value - self._initial_send_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif code == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise ProtocolViolation(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self._max_frame = value
            # HEADER_TABLE_SIZE bounds a dynamic table we never use; the others do not apply.
        self._send(encode_frame(SETTINGS, ACK, 0))
        if not self.ready.done():
            self.ready.set_result(None)
        self._wake_window_waiters()
        self.pool._capacity_changed()

    def _on_goaway(self, payload: bytes) -> None:
        last = int.from_bytes(payload[:4], "big") & MAX_STREAM_ID
        code = int.from_bytes(payload[4:8], "big")
        reason = payload[8:208].decode("utf-8", "replace")
        self.going_away = True
        log.info(
            "%s sent GOAWAY (error code %d, last stream %d%s); reconnecting",
            self.pool.authority,
            code,
            last,
            f", {reason}" if reason else "",
        )
        for stream_id in [s for s in self.streams if s > last]:
            self._fail_stream(stream_id, StreamNotProcessed("not processed before GOAWAY"))
        if not self.streams:
            self.close()
        self.pool._capacity_changed()

    def _complete(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id)
        if not stream.future.done():
            stream.future.set_result(
                H2Response(stream.status, stream.headers, bytes(stream.body), self)
            )
        self._stream_closed()

    def _fail_stream(self, stream_id: int, error: H2Error) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if not stream.future.done():
            stream.future.set_exception(error)
        self._stream_closed()

    def _stream_closed(self) -> None:
        if self.going_away and not self.streams:
            self.close()
        self.pool._capacity_changed()

    # --- frames out ----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self._outbox.append(data)

    def _flush(self) -> None:
        if not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush_soon(self) -> None:
        # Requests started in the same loop iteration share one TLS record and one send().
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self._flush()

    def _reset(self, stream_id: int, code: int) -> None:
        self._send(encode_frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))
        self._flush_soon()

    def _wake_window_waiters(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def request(self, header_block: bytes, body: bytes) -> H2Response:
        """Send one request (a block from `header_field`/`header_block`); the caller has checked
        `free_streams` and applies the timeout."""
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        if self._next_stream_id > MAX_STREAM_ID:
            self.retire()  # stream ids are spent (RFC 9113 §5.1.1): the next one opens afresh
        future: asyncio.Future[H2Response] = asyncio.get_running_loop().create_future()
        stream = _Stream(future, self._initial_send_window)
        self.streams[stream_id] = stream
        try:
            self._send_headers(stream_id, header_block, end_stream=not body)
            view = memoryview(body)
            while view and not future.done():
                window = min(stream.send_window, self._send_window)
                if window <= 0:
                    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._window_waiters.append(waiter)
                    await waiter
                    if self.closed:
                        raise H2ConnectionLost("connection closed while waiting for window")
                    continue
                chunk = min(window, self._max_frame, len(view))
                last = chunk == len(view)
                self._send(encode_frame(DATA, END_STREAM if last else 0, stream_id, view[:chunk]))
                stream.send_window -= chunk
                self._send_window -= chunk
                self._flush_soon()
                view = view[chunk:]
            self.last_activity = time.monotonic()
            return await future
        except (asyncio.CancelledError, TimeoutError):
            # The caller gave up (timeout): tell the server, free the stream slot.
            if self.streams.pop(stream_id, None) is not None and not self.closed:
                self._reset(stream_id, CANCEL)
                self._stream_closed()
            raise

    def _send_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        flags = END_STREAM if end_stream else 0
        if len(block) <= self._max_frame:
            self._send(encode_frame(HEADERS, flags | END_HEADERS, stream_id, block))
        else:
            first, rest = block[: self._max_frame], block[self._max_frame :]
            self._send(encode_frame(HEADERS, flags, stream_id, first))
            while rest:
                piece, rest = rest[: self._max_frame], rest[self._max_frame :]
                self._send(encode_frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, piece))
        self._flush_soon()

    async def ping(self, time_limit: float) -> bool:
        if not self.usable:
            return False
        if self._ping is None or self._ping.done():  # one PING in flight, shared by callers
            self._ping = asyncio.get_running_loop().create_future()
            self._send(encode_frame(PING, 0, 0, b"ringrly!"))
            self._flush()
        try:
            async with asyncio.timeout(time_limit):
                await asyncio.shield(self._ping)
            return True
        except TimeoutError:
            return False

    # --- closing -----------------------------------------------------------------------------

    def retire(self) -> None:
        """Take no new streams; close once the open ones are answered (the server said this
        connection is unusable, e.g. APNs' TooManyProviderTokenUpdates or Shutdown)."""
        self.going_away = True
        if not self.streams:
            self.close()
        self.pool._capacity_changed()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            last = max(self._next_stream_id - 2, 0)
            self._send(encode_frame(GOAWAY, 0, 0, _goaway_payload(last, NO_ERROR)))
            self._flush()
            self.transport.close()
        self._fail_all(H2ConnectionLost("connection closed"))

    def _abort(self, error: H2Error) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_all(error)

    def _fail_all(self, error: H2Error) -> None:
        self.closed = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(error)
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: a connect attempt may not be awaiting it
        self._wake_window_waiters()
        self.pool._forget(self)


def unpad(payload: bytes) -> bytes:
    """RFC 9113 §6.1/§6.2: the first byte is the padding length."""
    if not payload or payload[0] >= len(payload):
        raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def _goaway_payload(last_stream_id: int, code: int) -> bytes:
    return last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big")


class H2Pool:
    """Up to `max_connections` connections to one origin; a request goes to the busiest one that
    has a free stream and room in its send window."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        max_connections: int = 8,
        # A new connection past 32 streams: with 100, the benchmark's 64 concurrent pushes
        # shared one connection and 1-device throughput fell from ~4,460 to ~3,400 events/s
        # (the fake APNs, h2 on its side, walks its open streams on every frame).
        streams_per_connection: int = 32,
        connect_timeout: float = 5.0,
        ping_after_idle: float = 3600.0,
    ) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}"
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.streams_per_connection = streams_per_connection
        self.connect_timeout = connect_timeout
        self.ping_after_idle = ping_after_idle
        self.connections: list[H2Connection] = []
        self.connections_opened = 0
        self._connecting: asyncio.Task[H2Connection] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._keepalive: asyncio.Task[None] | None = None
        self._suspects: set[H2Connection] = set()
        self._checks: set[asyncio.Task[None]] = set()

    async def request(self, header_block: bytes, body: bytes, time_limit: float) -> H2Response:
        """Send on a free stream; resend at once (once) if the server did not process it."""
        conn: H2Connection | None = None
        try:
            async with asyncio.timeout(time_limit):
                for attempt in (1, 2):
                    conn = await self._acquire()
                    try:
                        return await conn.request(header_block, body)
                    except StreamNotProcessed:
                        if attempt == 2:
                            raise
        except TimeoutError:
            # A silent peer (half-open TCP) would swallow every retry: PING it, drop it if mute.
            if conn is not None and conn.usable and conn not in self._suspects:
                self._suspects.add(conn)
                task = asyncio.create_task(self._check(conn))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _check(self, conn: H2Connection) -> None:
        try:
            if not await conn.ping(time_limit=2.0):
                log.info("%s did not answer PING after a timeout; reconnecting", self.authority)
                conn.close()
        finally:
            self._suspects.discard(conn)

    async def _acquire(self) -> H2Connection:
        while True:
            # The busiest connection with a free stream and room in its send window: pushes
            # packed onto few connections share TLS records and sends on both sides (the fake
            # APNs at half the 5-device peak: 58-61 % of its core against 74-75 % when spread
            # over every connection a burst had opened). A connection whose window is nearly
            # spent waits for the server's WINDOW_UPDATE, so one with room goes first.
            best: H2Connection | None = None
            for conn in self.connections:
                free = conn.free_streams
                if free <= 0:
                    continue
                roomy = conn.send_window >= _ROOMY_WINDOW
                if best is None:
                    best = conn
                    continue
                best_roomy = best.send_window >= _ROOMY_WINDOW
                if roomy > best_roomy or (roomy == best_roomy and free < best.free_streams):
                    best = conn
            if best is not None:
                return best
            if len(self.connections) < self.max_connections:
                if self._connecting is None:
                    self._connecting = asyncio.create_task(self._connect())
                    # Retrieved here: every waiter may have timed out before it finishes.
                    self._connecting.add_done_callback(
                        lambda task: task.cancelled() or task.exception()
                    )
                connecting = self._connecting
                try:
                    # shield: one caller's timeout must not cancel the others' connection
                    await asyncio.shield(connecting)
                finally:
                    if self._connecting is connecting and connecting.done():
                        self._connecting = None
                continue
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> H2Connection:
        loop = asyncio.get_running_loop()
        conn = H2Connection(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                # A fresh name lookup per connection (Apple: do an uncached DNS lookup).
                transport, _ = await loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.ssl_context
                )
                ssl_object = transport.get_extra_info("ssl_object")
                if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                    transport.close()
                    raise H2Error(f"{self.authority} did not negotiate HTTP/2 (ALPN h2)")
                # The server's SETTINGS (max concurrent streams) must be known before sending.
                await conn.ready
        except ssl.SSLCertVerificationError as exc:  # an OSError too: caught first
            conn.closed = True
            raise H2CertificateError(self.authority, exc) from exc
        except (OSError, TimeoutError) as exc:
            conn.closed = True
            raise H2ConnectionLost(f"cannot connect to {self.authority}: {exc!r}") from exc
        self.connections.append(conn)
        self.connections_opened += 1
        if self._keepalive is None and self.ping_after_idle > 0:
            self._keepalive = asyncio.create_task(self._keep_alive())
        return conn

    def _capacity_changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _forget(self, conn: H2Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self._capacity_changed()

    async def _keep_alive(self) -> None:
        interval = max(1.0, min(60.0, self.ping_after_idle / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.streams or now - conn.last_activity < self.ping_after_idle:
                    continue
                if not await conn.ping(time_limit=10.0):
                    log.info("%s did not answer PING; closing the connection", self.authority)
                    conn.close()

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
