"""The HTTP server: uvicorn with a bound on how long a request may take to arrive and on how many
connections one instance keeps open (slow or idle clients, "slowloris").

What uvicorn 0.55 offers, read in its source, and why none of it is enough here:
- `timeout_keep_alive` (5 s) closes a connection idle *between* requests only: it is not armed
  for a fresh connection, and the first byte received cancels it, so a client that trickles its
  headers, or sends nothing at all, keeps its connection for ever.
- `limit_concurrency` answers 503 once connections (or tasks) reach the limit, checked when a
  request's headers are complete: idle unfinished connections still pile up, and then every
  legitimate request is the one answered 503.
- `h11_max_incomplete_event_size` bounds the size of the headers (h11 only), not their time;
  httptools has no such option; `backlog` is the kernel's queue of connections not yet accepted.
So the HTTP/1.1 protocol (uvicorn's httptools one) is subclassed: each connection has one timer
for the request being received (headers, then body), headers over MAX_HEADER_BYTES are refused
(neither httptools nor uvicorn bound them), and a connection over the limit makes room by closing
the connection that has waited longest for its request to arrive.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ringrelay.config import Settings

log = logging.getLogger("ringrelay.http")

# The body timer of the protocol fires this long after the application's own body timeout (the
# webhook and ResponseGuard answer 408 with a reason first; this one is the backstop).
BODY_TIMEOUT_GRACE_SECONDS = 1.0
# Set in a request's ASGI scope once its whole body has been received.
BODY_RECEIVED = "ringrelay.body_received"

# File descriptors kept for everything but client connections: the listening socket, the event
# loop, the store, log files, and outgoing provider connections (added from the settings).
RESERVED_FILES = 64
LOG_INTERVAL_SECONDS = 10.0
# A request's headers (URL included): Event Grid's, with an Entra token, are a few KiB.
MAX_HEADER_BYTES = 64 * 1024
# How long a connection answered 431 reads and drops what the client still sends, then closes.
LINGER_SECONDS = 1.0

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_TOO_LARGE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_OVERLOADED_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _answer(template: bytes, body: bytes) -> bytes:
    return template % (len(body), body)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float  # seconds from waiting for a request to the end of its headers
    body_timeout: float  # seconds from the end of the headers to the end of the body
    max_connections: int  # open client connections per instance

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            settings.header_timeout_seconds,
            settings.body_timeout_seconds,
            settings.max_connections,
        )


class CloseTally:
    """Connections closed or refused by the limits, logged as counts at most once per
    LOG_INTERVAL_SECONDS: a flood of connections must not become a flood of log lines."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.next_log = 0.0
        self.flush: asyncio.TimerHandle | None = None

    def count(self, loop: asyncio.AbstractEventLoop, what: str) -> None:
        self.counts[what] += 1
        if loop.time() >= self.next_log:
            self._log(loop)
        elif self.flush is None:  # what is counted meanwhile is said when the interval ends
            self.flush = loop.call_at(self.next_log, self._log, loop)

    def _log(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush = None
        if not self.counts:
            return
        refused = any(what.startswith("refused") for what in self.counts)
        log.log(
            logging.WARNING if refused else logging.INFO,
            "connections %s (since the last such line)",
            "; ".join(f"{what}: {n}" for what, n in self.counts.items()),
        )
        self.counts.clear()
        self.next_log = loop.time() + LOG_INTERVAL_SECONDS


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request's arrival timed and the connections
    counted. Use `bounded_protocol(limits)`: each server gets its own subclass, holding the
    limits and the connections that are receiving a request, oldest first."""

    limits: ClassVar[ConnectionLimits]
    receiving: ClassVar[dict[BoundedHttpProtocol, None]]  # insertion order = waiting longest
    lingering: ClassVar[dict[BoundedHttpProtocol, None]]  # answered, about to close
    closes: ClassVar[CloseTally]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None  # closing after an answer (linger)
        # The request's deadline (loop time), and one timer armed at or before it. Moving the
        # deadline later (every request on a kept-alive connection) only stores a float: the
        # timer, when it fires early, re-arms itself at the deadline. Three timers armed and
        # cancelled per request had cost ~4 % of an IncomingCall's instructions.
        self._deadline: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_timer_at = 0.0
        self._in_headers = False  # a request has begun, its headers are not complete
        self._body_pending = False  # its headers are complete, its body is not
        self._refused = False  # over the limit with every connection busy: 503 when it speaks
        self._header_bytes = 0  # received in chunks that ended inside the headers
        self._discarding = False  # answered and closing: what arrives is dropped

    # --- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self._refuse()
            return
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.receiving.pop(self, None)
        self.lingering.pop(self, None)
        super().connection_lost(exc)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its request; False if every other
        connection is busy with a request already received."""
        for closing in list(self.lingering):  # already answered: closed for good now
            del self.lingering[closing]
            if not closing.transport.is_closing():
                closing.transport.close()
                return True
        while self.receiving:
            oldest = next(iter(self.receiving))
            del self.receiving[oldest]
            if oldest.transport.is_closing():
                continue
            self.closes.count(self.loop, "closed to make room (RINGRELAY_MAX_CONNECTIONS)")
            oldest._give_up(b'{"error":"connection closed: too many open connections"}')
            return True
        return False

    def _refuse(self) -> None:
        """Answer 503 once the request's first bytes are read: closing a socket with unread
        data resets it, and the client would lose the answer."""
        self.closes.count(
            self.loop, "refused with 503, every connection busy (RINGRELAY_MAX_CONNECTIONS)"
        )
        self._refused = True
        self._timer = self.loop.call_later(self.limits.header_timeout, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._refused:
            if not self.transport.is_closing():
                self.transport.write(
                    _answer(
                        _OVERLOADED_503, b'{"error":"overloaded: too many open connections; retry"}'
                    )
                )
                self.transport.close()
            return
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():
            # The chunk ended inside the headers, so all of it was headers: httptools and
            # uvicorn keep them in memory, with no limit of their own.
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self.closes.count(self.loop, f"closed, headers over {MAX_HEADER_BYTES} bytes")
                self._linger(_answer(_TOO_LARGE_431, b'{"error":"request headers too large"}'))

    def _linger(self, answer: bytes) -> None:
        """Answer, then close as `close_after_answer` does. A lingering connection is the first
        to go when room is needed."""
        cycle = self.cycle  # a pipelined request still being handled: its answer is not sent
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(answer)
        self.close_after_answer()

    def close_after_answer(self) -> None:
        """Close once the answer is out, reading and dropping what the client is still sending
        for a moment first. Closing with unread data resets the connection, and the client,
        still writing its body, loses the answer: a 413 for a body over the limit, or the 431
        above. RFC 9112 §9.6 asks for this staged close (half-close, keep reading). uvicorn
        closes at once after an answer that says `connection: close`; its cycle's transport
        (`OneWriteResponse`) calls this instead."""
        if self.transport.is_closing() or self._discarding:
            return
        self._stop_timer()
        self.receiving.pop(self, None)
        self.lingering[self] = None
        self._discarding = True
        self.pipeline.clear()  # requests sent after it are not answered (RFC 9112 §9.6)
        self.flow.resume_reading()  # paused while a body waited for the application
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    # --- the request being received -------------------------------------------------------

    def _await_request(self) -> None:
        self.receiving.pop(self, None)
        self.receiving[self] = None
        self._start_timer(self.limits.header_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous and self.cycle is not None:
            self.cycle.transport = OneWriteResponse(self, self.cycle)  # type: ignore[assignment]
        self._in_headers = False
        self._body_pending = True
        self._start_timer(self.limits.body_timeout + BODY_TIMEOUT_GRACE_SECONDS)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # Said in the request's scope (a per-request dict), so that the application need not
        # time a body that is already here: usually the whole request came in one read.
        self.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]
        self._body_pending = False
        self._stop_timer()
        self.receiving.pop(self, None)
        if self.cycle is not None and self.cycle.response_complete and not self._discarding:
            self._await_request()  # answered before its body ended: the next request may come

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (
            not self.transport.is_closing()
            and not self._discarding
            and not self._body_pending
            and not self.pipeline
        ):
            self._await_request()

    def _start_timer(self, seconds: float) -> None:
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        if self._deadline_timer is None or self._deadline_timer_at > deadline:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._arm(deadline)

    def _stop_timer(self) -> None:
        self._deadline = None  # an armed timer finds no deadline and ends

    def _arm(self, at: float) -> None:
        self._deadline_timer_at = at
        self._deadline_timer = self.loop.call_at(at, self._deadline_reached)

    def _deadline_reached(self) -> None:
        self._deadline_timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # moved later since the timer was armed
            self._arm(deadline)
            return
        self._deadline = None
        self._timed_out()

    def _timed_out(self) -> None:
        what = "body" if self._body_pending else "headers"
        if self._body_pending:
            self.closes.count(self.loop, "closed, body late (RINGRELAY_BODY_TIMEOUT_SECONDS)")
        elif self._in_headers:
            self.closes.count(self.loop, "closed, headers late (RINGRELAY_HEADER_TIMEOUT_SECONDS)")
        self.receiving.pop(self, None)
        self._give_up(b'{"error":"request %s not received in time"}' % what.encode())

    def _give_up(self, reason: bytes) -> None:
        """Close, answering 408 when a request had begun and nothing was answered yet; a
        request already handed to the application sees a disconnect."""
        self._stop_timer()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        # While headers arrive, `cycle` is still the previous request's (kept-alive connection).
        busy = self._body_pending and cycle is not None and not cycle.response_complete
        if self._in_headers or (busy and cycle is not None and not cycle.response_started):
            self.transport.write(_answer(_TIMEOUT_408, reason))
        if busy and cycle is not None:
            cycle.disconnected = True  # the application's sends become no-ops, receive ends
            cycle.message_event.set()
        self.transport.close()


class OneWriteResponse:
    """The transport a request's cycle writes to: it holds the response's head (status line and
    headers, one write of uvicorn's) until the body's first write, and sends both in one. uvicorn
    writes them apart: two send() calls and two TCP segments per answer, where the webhook's
    answer is a few hundred bytes. A head with no body write (HEAD) goes out when the answer
    completes; a streamed answer's head would go with its first chunk (ringrelay streams none).
    Not flushed at the end of the loop step: that callback made the loop poll once more per
    answer whenever it was not saturated."""

    __slots__ = ("_close", "_cycle", "_done", "_head", "_transport")

    def __init__(self, protocol: BoundedHttpProtocol, cycle: Any) -> None:
        self._transport = protocol.transport
        self._close = protocol.close_after_answer  # lingers: see there
        self._cycle = cycle
        self._head: bytes | None = None
        self._done = cycle.on_response  # the protocol's: the next request may come
        cycle.on_response = self._complete

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif self._cycle is not None and self._cycle.response_started:
            # The first write since the answer began is its head (a "100 Continue" comes
            # before the answer begins and goes out at once).
            self._head = data
            self._cycle = None  # later writes are the body's
        else:
            self._transport.write(data)

    def _complete(self) -> None:
        self.flush()
        self._done()

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def bounded_protocol(limits: ConnectionLimits) -> type[BoundedHttpProtocol]:
    """A protocol class for one server: its own limits and its own table of connections."""

    class ServerProtocol(BoundedHttpProtocol):
        pass

    ServerProtocol.limits = limits
    ServerProtocol.receiving = {}
    ServerProtocol.lingering = {}
    ServerProtocol.closes = CloseTally()
    return ServerProtocol


def reserved_files(settings: Settings) -> int:
    """File descriptors for everything but client connections."""
    outgoing = sum(app.max_connections for app in settings.apns) + sum(
        app.max_connections for app in settings.fcm
    )
    if settings.nh_connection_string is not None:
        outgoing += settings.nh_max_connections
    return RESERVED_FILES + outgoing


def ensure_file_limit(settings: Settings) -> tuple[Settings, str | None]:
    """Raise the soft limit on open files to what max_connections needs (up to the hard limit).
    When the hard limit is too low: a max_connections left at its default is fitted to it (a
    container's 1024 must not stop a default start; logged), one the user set is refused with a
    message naming the setting."""
    reserved = reserved_files(settings)
    needed = settings.max_connections + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return settings, None
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return settings, None
    fitted = hard - reserved
    if "max_connections" in settings.model_fields_set or fitted < 64:
        return settings, (
            f"RINGRELAY_MAX_CONNECTIONS: {settings.max_connections} connections need "
            f"{needed} open files, but this process may open {hard} (ulimit -n); lower "
            f"RINGRELAY_MAX_CONNECTIONS to {max(fitted, 0)} or less, or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.getLogger("ringrelay").warning(
        "open files limited to %d (ulimit -n): at most %d connections instead of the default "
        "%d (RINGRELAY_MAX_CONNECTIONS)",
        hard,
        fitted,
        settings.max_connections,
    )
    return settings.model_copy(update={"max_connections": fitted}), None


def uvicorn_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ringrelay: the bounded HTTP/1.1 protocol and its limits."""
    options.setdefault("lifespan", "on")
    return uvicorn.Config(
        app, http=bounded_protocol(ConnectionLimits.from_settings(settings)), **options
    )
