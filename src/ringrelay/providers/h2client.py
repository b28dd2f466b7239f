"""A small HTTP/2 client: long-lived, multiplexed TLS connections, built on h2 (python-hyper).

Why not a library client: aiohttp speaks HTTP/1.1 only; httpx's HTTP/2 runs ~10x slower than
aiohttp on this machine (../shared/notes/http-client-ceilings.md); aioapns closes connections
after 10 s idle, mints a provider token per connection, hard-codes Apple's hosts and polls for a
free stream every 10 ms. h2 does the protocol (framing, HPACK, flow control, settings); this
module only manages connections and streams for one origin.

What it guarantees its caller:
- the server's SETTINGS_MAX_CONCURRENT_STREAMS and flow-control windows are respected (Apple
  allows one stream until the first request with a valid provider token succeeds);
- a stream the server never processed (above GOAWAY's last-stream-id) is re-sent on a new
  connection at once, so a GOAWAY or a graceful shutdown loses no push;
- a connection lost mid-stream fails those streams with `H2ConnectionLost` (the server may or may
  not have acted: the caller decides whether to retry);
- idle connections are kept for hours and checked with PING (Apple: reuse connections, PING
  after about an hour idle; developer.apple.com "Sending notification requests to APNs").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

log = logging.getLogger("ringrelay.h2")

Header = tuple[bytes, bytes]


class H2Error(Exception):
    """The request got no HTTP answer."""


class H2ConnectionLost(H2Error):
    """The connection closed while the stream was open: the server may have processed it."""


class StreamNotProcessed(H2Error):
    """GOAWAY or REFUSED_STREAM: the server did not act on the stream, so resending is safe."""


@dataclass(slots=True)
class H2Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    connection: H2Connection | None = None  # which connection answered (to retire it)


@dataclass(slots=True)
class _Stream:
    future: asyncio.Future[H2Response]
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


_CLIENT_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,  # bytes in and out: no per-header str round trips
    # Our own headers are lowercase and well-formed; skipping h2's checks saves ~20 % per request.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class H2Connection(asyncio.Protocol):
    """One TLS connection carrying many concurrent streams."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.h2 = h2.connection.H2Connection(config=_CLIENT_CONFIG)
        # No Huffman coding of header literals: in pure Python (hpack) it was ~12 % of the CPU of
        # an APNs push (the JWT and :path are literals on every request); it saves ~70 bytes.
        self.h2.encoder.encode = functools.partial(  # type: ignore[method-assign]
            self.h2.encoder.encode, huffman=False
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.going_away = False
        self.last_activity = time.monotonic()
        self._flush_pending = False
        self._window_waiters: list[asyncio.Future[None]] = []
        self._ping: asyncio.Future[None] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- capacity ----------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and not self.going_away

    @property
    def free_streams(self) -> int:
        if not self.usable:
            return 0
        limit = min(
            self.h2.remote_settings.max_concurrent_streams, self.pool.streams_per_connection
        )
        return int(limit) - len(self.streams)

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from %s: %s", self.pool.authority, exc)
            self._flush()
            self._abort(H2ConnectionLost(f"protocol error: {exc}"))
            return
        self.last_activity = time.monotonic()
        for event in events:
            self._on_event(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(H2ConnectionLost("connection lost"))

    def pause_writing(self) -> None:  # pragma: no cover - small bodies never fill the buffer
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # --- events ------------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                for name, value in event.headers or ():
                    if name == b":status":
                        stream.status = int(value)
                    else:
                        stream.headers[name] = value
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and event.data:
                stream.body += event.data
            # Give the window back at once: responses are small, memory is not at risk.
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None and not stream.future.done():
                stream.future.set_result(
                    H2Response(stream.status, stream.headers, bytes(stream.body), self)
                )
            self._stream_closed()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None and not stream.future.done():
                error: H2Error
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    error = StreamNotProcessed("stream refused")
                else:
                    error = H2Error(f"stream reset by server ({event.error_code!r})")
                stream.future.set_exception(error)
            self._stream_closed()
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_window_waiters()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake_window_waiters()
            self.pool._capacity_changed()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        elif isinstance(event, h2.events.PingAckReceived):
            if self._ping is not None and not self._ping.done():
                self._ping.set_result(None)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.going_away = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        reason = (event.additional_data or b"")[:200].decode("utf-8", "replace")
        log.info(
            "%s sent GOAWAY (%r, last stream %d%s); reconnecting",
            self.pool.authority,
            event.error_code,
            last,
            f", {reason}" if reason else "",
        )
        for stream_id in [s for s in self.streams if s > last]:
            stream = self.streams.pop(stream_id)
            if not stream.future.done():
                stream.future.set_exception(StreamNotProcessed("not processed before GOAWAY"))
        if not self.streams:
            self.close()
        self.pool._capacity_changed()

    def _stream_closed(self) -> None:
        if self.going_away and not self.streams:
            self.close()
        self.pool._capacity_changed()

    # --- sending -----------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush_soon(self) -> None:
        # Requests started in the same loop iteration share one TLS record and one send().
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self._flush()

    def _wake_window_waiters(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def request(self, headers: Sequence[Header], body: bytes) -> H2Response:
        """Send one request; the caller has checked `free_streams` and applies the timeout."""
        stream_id = self.h2.get_next_available_stream_id()
        future: asyncio.Future[H2Response] = asyncio.get_running_loop().create_future()
        self.streams[stream_id] = _Stream(future)
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not body)
            if body and len(body) <= min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            ):
                self.h2.send_data(stream_id, body, end_stream=True)  # the usual case: one frame
                body = b""
            self._flush_soon()
            view = memoryview(body)
            while view:
                window = self.h2.local_flow_control_window(stream_id)
                if window <= 0:
                    waiter = asyncio.get_running_loop().create_future()
                    self._window_waiters.append(waiter)
                    await waiter
                    if self.closed:
                        raise H2ConnectionLost("connection closed while waiting for window")
                    continue
                chunk = min(window, self.h2.max_outbound_frame_size, len(view))
                self.h2.send_data(stream_id, view[:chunk].tobytes(), end_stream=chunk == len(view))
                self._flush_soon()
                view = view[chunk:]
            self.last_activity = time.monotonic()
            return await future
        except (asyncio.CancelledError, TimeoutError):
            # The caller gave up (timeout): tell the server, free the stream slot.
            if self.streams.pop(stream_id, None) is not None and not self.closed:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    self._flush()
                self._stream_closed()
            raise
        except h2.exceptions.H2Error as exc:
            self.streams.pop(stream_id, None)
            raise H2ConnectionLost(f"cannot send: {exc}") from exc

    async def ping(self, time_limit: float) -> bool:
        if not self.usable:
            return False
        if self._ping is None or self._ping.done():  # one PING in flight, shared by callers
            self._ping = asyncio.get_running_loop().create_future()
            self.h2.ping(b"ringrly!")
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
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.close_connection()
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


class H2Pool:
    """Up to `max_connections` connections to one origin; a request goes to the least busy one."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        max_connections: int = 8,
        # h2 counts open streams by walking them all on every request: past ~50 streams a
        # connection, another connection is cheaper (measured +10-18 % pushes/s at 320 streams).
        streams_per_connection: int = 50,
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

    async def request(
        self, headers: Sequence[Header], body: bytes, time_limit: float
    ) -> H2Response:
        """Send on a free stream; resend at once (once) if the server did not process it."""
        conn: H2Connection | None = None
        try:
            async with asyncio.timeout(time_limit):
                for attempt in (1, 2):
                    conn = await self._acquire()
                    try:
                        return await conn.request(headers, body)
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
            best: H2Connection | None = None
            for conn in self.connections:
                if conn.free_streams > 0 and (
                    best is None or conn.free_streams > best.free_streams
                ):
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
