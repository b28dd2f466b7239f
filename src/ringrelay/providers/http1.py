"""A small HTTP/1.1 client for one origin: keep-alive TLS connections, httptools parsing.

Why not aiohttp's client for the push path: a relay that forwards each webhook POST through a
shared `aiohttp.ClientSession` spent ~30 % of its CPU inside aiohttp (request/response objects,
timers, cookie and payload machinery) for what is one POST with fixed headers to one host. This
module writes the request in one `transport.write` and lets httptools (llhttp, the parser uvicorn
uses) parse the answer; `bench/relay_bench.py` measures the difference (see bench/README.md).
What it keeps from a full client: a bounded pool, connect and request timeouts, header-injection
checks, Content-Length and chunked bodies, `Connection: close`, and idle connections retired
before a server would drop them.

One request at a time per connection (no pipelining). A connection that fails or times out in
the middle of an exchange is closed, never reused; the caller decides whether to retry (a POST
may or may not have reached the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


class HttpError(Exception):
    """The exchange failed before a complete response arrived (connection, protocol)."""


class CertificateError(HttpError):
    """The server's TLS certificate did not verify: nothing was sent (a configuration error)."""

    def __init__(self, where: str, error: ssl.SSLCertVerificationError) -> None:
        super().__init__(f"{where}: {error.verify_message or error}")
        self.where = where
        self.error = error


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


class Http1Connection(asyncio.Protocol):
    """One keep-alive connection; it is also the parser's callback object, so a request
    allocates no parser and leaves no reference cycle for the garbage collector."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._parser = httptools.HttpResponseParser(self)
        # The response being read: None between exchanges.
        self._done: asyncio.Future[None] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._keep_alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._done is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"malformed response: {exc}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # Read here: llhttp resets its flags once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpError(f"connection lost: {exc or 'closed by the server'}"))

    def _fail(self, error: HttpError) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, head: bytes, body: bytes) -> HttpResponse:
        assert self.transport is not None
        done = self._done = asyncio.get_running_loop().create_future()
        self._headers, self._body, self._keep_alive = {}, [], False
        self.transport.write(head + body if len(body) < 16_384 else head)
        if len(body) >= 16_384:
            self.transport.write(body)
        try:
            await done
        except asyncio.CancelledError:
            self.close()  # the answer may still come: the connection is out of step
            raise
        finally:
            self._done = None
        if not self._keep_alive:
            self.close()
        self.idle_since = time.monotonic()
        return HttpResponse(self._parser.get_status_code(), self._headers, b"".join(self._body))


class Http1Pool:
    """Up to `max_connections` keep-alive connections to `host:port`; waiters queue in order."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        max_connections: int = 100,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        self._ssl = ssl_context
        self._host_header = host if port in (80, 443) else f"{host}:{port}"
        self.max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout  # under the usual 60-240 s of servers and balancers
        self._idle: deque[Http1Connection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[Http1Connection | None]] = deque()
        self._closing = False
        self.connections_made = 0

    def encode_head(self, method: str, target: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers.items():
            # CR or LF would let a caller's data (a device token, say) add headers or a body.
            if "\n" in value or "\r" in value or "\x00" in value:
                raise ValueError(f"header {name!r} holds a line break or NUL")
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {length}\r\n\r\n")
        return "".join(lines).encode("latin-1")

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes, time_limit: float
    ) -> HttpResponse:
        """One exchange; raises TimeoutError past `time_limit` (connect included) or HttpError."""
        head = self.encode_head(method, target, headers, len(body))
        async with asyncio.timeout(time_limit):
            conn = await self._acquire()
            try:
                return await conn.exchange(head, body)
            finally:
                self._release(conn)

    async def _acquire(self) -> Http1Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: least likely to have gone stale
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                return conn
            self._drop(conn)
        if self._open < self.max_connections:
            self._open += 1
            try:
                return await self._connect()
            except BaseException:
                self._open -= 1
                self._wake()
                raise
        waiter: asyncio.Future[Http1Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            conn_or_slot = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:  # handed over just as we gave up
                    self._release(handed)
                else:  # a slot was reserved for us
                    self._open -= 1
                    self._wake()
            raise
        if conn_or_slot is not None:
            return conn_or_slot
        try:  # a slot freed by a closed connection: open a new one in it
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self) -> Http1Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    Http1Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except ssl.SSLCertVerificationError as exc:  # an OSError too: caught first
            raise CertificateError(f"{self.host}:{self.port}", exc) from exc
        except OSError as exc:
            raise HttpError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self.connections_made += 1
        return conn

    def _release(self, conn: Http1Connection) -> None:
        if conn.closed or self._closing:
            self._drop(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _drop(self, conn: Http1Connection) -> None:
        conn.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        """A slot is free: the first live waiter opens a connection in it."""
        while self._waiters and self._open < self.max_connections:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            self._idle.pop().close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)  # let transports finish closing


def pool_for(
    url: str, ca_file: str | None, *, max_connections: int, connect_timeout: float
) -> tuple[Http1Pool, str]:
    """A pool for `url`'s origin (system trust store, or only `ca_file` when given) and the
    request target (path and query) to use with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"expected an https:// URL, got {url!r}")
    tls = parts.scheme == "https"
    ssl_ctx = ssl.create_default_context(cafile=ca_file) if tls else None
    port = parts.port or (443 if tls else 80)
    pool = Http1Pool(
        parts.hostname,
        port,
        ssl_ctx,
        max_connections=max_connections,
        connect_timeout=connect_timeout,
    )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return pool, target
