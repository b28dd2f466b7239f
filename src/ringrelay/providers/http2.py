"""HTTP/2 for the direct providers (APNs, FCM): a small pool of pyreqwest clients to one origin.

pyreqwest wraps Rust's reqwest/hyper/h2 (maintained, asyncio-native, TLS by rustls). It replaced
the project's own framing (`h2client.py`, issue 20): measured on this machine against nginx it
did 11,694 against 7,453 requests/s at 84 against 122 us of CPU per request, lost no request to
GOAWAY (the old client failed 17-29 of them in 3 runs of 5) and served 32 senders fairly on a
connection that allows one stream (the old one served one sender 3,663 times while the other 31
waited 3 s). Against the benchmark's lean fake, whose answers are the cheapest to decode, it
costs more CPU per request than the old client did there (~70 against ~37 us): bench/README.md
has those figures and the relay's own ("Issue 20").

What the library does, per connection (hyper's HTTP/2 client): the server's
SETTINGS_MAX_CONCURRENT_STREAMS and flow-control windows are respected, requests past the stream
limit wait in order (so no sender starves: Apple allows one stream until a connection's first
success), a stream the server did not process (above GOAWAY's last-stream-id, REFUSED_STREAM) is
sent again on a new connection, and a lost connection is replaced on the next request. What this
module adds:
- a pool: a pyreqwest client keeps one HTTP/2 connection per origin, so up to `max_connections`
  clients ("lanes") are opened, a new one when every lane has `streams_per_connection` streams;
- a new connection carries one request until it is answered (see `Lane.settled`);
- retiring a connection (`Lane.retire`): APNs' IdleTimeout, TooManyProviderTokenUpdates,
  Shutdown... say to continue on a new one; the lane takes no new request and closes when idle;
- keep-alive: connections are kept for hours and PINGed after `ping_interval` without a frame
  read (Apple: "reuse connections for hours to days, PING after about an hour idle"), dropped if
  the PING is not answered in `ping_timeout` (hyper's keep-alive);
- a connection that answered nothing while a request timed out (a half-open TCP connection
  swallows every request until the next PING) is retired, so the retry goes out on a new one;
- errors as three kinds: `Http2CertificateError` (our configuration: which CA to trust),
  `Http2ConnectionLost` (the server may have acted), `Http2Error` (no HTTP answer); a timeout
  raises TimeoutError.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import (
    ConnectError,
    NetworkError,
    PyreqwestError,
    RequestError,
)

log = logging.getLogger("ringrelay.http2")

# A new connection past 32 streams (the old client's figure: with 100 streams on one connection
# the fake APNs, h2 on its side, slowed down walking its open streams).
STREAMS_PER_CONNECTION = 32

# rustls' words for a certificate that did not verify (rustls::Error::InvalidCertificate's
# Display: "invalid peer certificate: UnknownIssuer", "...: NotValidForName", ...).
_CERTIFICATE_MARK = "invalid peer certificate"

Header = tuple[str, str, bool]  # name, value, sensitive (HPACK never-indexed, RFC 7541 §6.2.3)


class Http2Error(Exception):
    """The request got no HTTP answer."""


class Http2ConnectionLost(Http2Error):
    """The connection failed or closed while the request was under way: the server may have
    processed it."""


class Http2CertificateError(Http2Error):
    """The server's TLS certificate did not verify: nothing was sent (a configuration error).
    `error` is an ssl.SSLCertVerificationError carrying rustls' reason as `verify_message`, so
    this reads like the standard library's verification failure."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: certificate verify failed: {reason}")
        self.where = where
        error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {reason}")
        error.verify_message = reason
        self.error = error


@dataclass(slots=True)
class Http2Answer:
    status: int
    headers: Mapping[str, str]  # pyreqwest's HeaderMap: case-insensitive, read in place
    body: bytes
    lane: Lane  # the connection that answered (to retire it)


def _causes(exc: PyreqwestError) -> list[str]:
    details = getattr(exc, "details", None) or {}
    return [str(c.get("message", "")) for c in details.get("causes") or []]


def as_http2_error(exc: PyreqwestError, where: str) -> Http2Error:
    """pyreqwest's error -> one of ours. The certificate check comes first: a verification
    failure is a ConnectError too, and it must not be retried as a passing failure."""
    causes = _causes(exc)
    for cause in causes:
        if _CERTIFICATE_MARK in cause:
            reason = cause.split(_CERTIFICATE_MARK, 1)[1].lstrip(": ") or cause
            return Http2CertificateError(where, reason)
    detail = causes[-1] if causes else str(exc)
    if isinstance(exc, ConnectError | NetworkError):
        return Http2ConnectionLost(f"connection to {where} failed or lost: {detail}")
    return Http2Error(f"{where}: {detail}")


class Lane:
    """One pyreqwest client: one HTTP/2 connection (replaced by hyper when it is lost)."""

    __slots__ = (
        "answered_at",
        "client",
        "closed",
        "first_sent",
        "in_flight",
        "number",
        "pool",
        "retiring",
        "settled",
    )

    def __init__(self, pool: Http2Pool, client: Client, number: int) -> None:
        self.pool = pool
        self.client = client
        self.number = number
        self.in_flight = 0  # requests sent or waiting to be
        self.answered_at = 0.0  # monotonic time of the last answer
        self.retiring = False
        self.closed = False
        # hyper sends as soon as TLS is up, before the server's SETTINGS arrive, assuming 100
        # streams; a server allowing 1 (Apple, until a first success) may then reset the
        # connection (h2's server does). So a new lane carries one request until it is
        # answered, by which time the server's SETTINGS are known (they precede any answer).
        self.first_sent = False
        self.settled = asyncio.Event()

    def retire(self) -> None:
        """Take no new requests; close once those under way are answered (the server said this
        connection is unusable: APNs' TooManyProviderTokenUpdates, IdleTimeout, Shutdown...)."""
        if self.retiring:
            return
        self.retiring = True
        self.pool._retired(self)

    def _idle(self) -> None:
        if self.retiring and self.in_flight == 0 and not self.closed:
            self.closed = True
            self.pool._close_later(self)


class Http2Pool:
    """Up to `max_connections` HTTP/2 connections to one https origin."""

    def __init__(
        self,
        origin: str,
        ca_file: str | Path | None = None,
        *,
        max_connections: int = 8,
        streams_per_connection: int = STREAMS_PER_CONNECTION,
        connect_timeout: float = 5.0,
        ping_interval: float = 3600.0,
        ping_timeout: float = 20.0,
    ) -> None:
        self.origin = origin.rstrip("/")
        self.authority = self.origin.split("://", 1)[-1]
        self.max_connections = max_connections
        self.streams_per_connection = streams_per_connection
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        # The extra CA (the fakes' in tests and the benchmark) is added to the system's roots.
        self._ca_pem = Path(ca_file).read_bytes() if ca_file else None
        self.lanes: list[Lane] = []
        self.lanes_opened = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _build_client(self) -> Client:
        builder = (
            ClientBuilder()
            .http2_prior_knowledge()  # ALPN h2 only: APNs and FCM speak HTTP/2 over TLS
            .https_only(True)
            .connect_timeout(timedelta(seconds=self.connect_timeout))
            .pool_idle_timeout(None)  # keep connections for hours (reqwest's default: 90 s)
            .http2_keep_alive_interval(timedelta(seconds=self.ping_interval))
            .http2_keep_alive_timeout(timedelta(seconds=self.ping_timeout))
            .http2_keep_alive_while_idle(True)
            .follow_redirects(False)
            .referer(False)
            # Answers are small JSON: no accept-encoding header, nothing to decompress.
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .user_agent("ringrelay")
        )
        if self._ca_pem is not None:
            builder = builder.add_root_certificate_pem(self._ca_pem)
        return builder.build()

    def _lane(self) -> Lane:
        """The busiest usable lane with a free stream (pushes packed onto few connections share
        TLS records and sends on both sides); else a new lane while under `max_connections`;
        else the least busy one, where hyper queues the request behind the others, in order."""
        best: Lane | None = None
        least: Lane | None = None
        for lane in self.lanes:
            if lane.retiring:
                continue
            if lane.in_flight < self.streams_per_connection and (
                best is None or lane.in_flight > best.in_flight
            ):
                best = lane
            if least is None or lane.in_flight < least.in_flight:
                least = lane
        if best is not None:
            return best
        if least is None or len(self.lanes) < self.max_connections:
            self.lanes_opened += 1
            lane = Lane(self, self._build_client(), self.lanes_opened)
            self.lanes.append(lane)
            return lane
        return least

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[Header],
        body: bytes,
        time_limit: float,
    ) -> Http2Answer:
        lane = self._lane()
        lane.in_flight += 1
        first = False
        started = time.monotonic()
        try:
            if not lane.settled.is_set():
                if lane.first_sent:
                    async with asyncio.timeout(time_limit):
                        await lane.settled.wait()
                    time_limit -= time.monotonic() - started
                else:
                    lane.first_sent = first = True
            builder = lane.client.request(method, self.origin + path)
            for name, value, sensitive in headers:
                builder = builder.header(name, value, is_sensitive=sensitive)
            if body:
                builder = builder.body_bytes(body)
            request = builder.timeout(timedelta(seconds=max(time_limit, 0.001))).build()
            response = await request.send()
            data = bytes(await response.bytes())
        except TimeoutError:
            if lane.answered_at < started and not lane.retiring:
                log.info(
                    "%s answered nothing for %.1f s: a new connection", self.authority, time_limit
                )
                lane.retire()
            raise
        except RequestError as exc:
            raise as_http2_error(exc, self.authority) from exc
        except PyreqwestError as exc:
            raise Http2Error(f"{self.authority}: {exc}") from exc
        finally:
            if first:
                lane.settled.set()
            lane.in_flight -= 1
            if lane.retiring:
                lane._idle()
        lane.answered_at = time.monotonic()
        return Http2Answer(response.status, response.headers, data, lane)

    def _retired(self, lane: Lane) -> None:
        if lane in self.lanes:
            self.lanes.remove(lane)
        lane._idle()

    def _close_later(self, lane: Lane) -> None:
        task = asyncio.get_running_loop().create_task(self._close_lane(lane))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_lane(lane: Lane) -> None:
        try:
            await lane.client.close()
        except PyreqwestError as exc:  # pragma: no cover - closing an idle client
            log.debug("closing an HTTP/2 client: %s", exc)

    async def close(self) -> None:
        lanes, self.lanes = self.lanes, []
        for lane in lanes:
            lane.closed = True
            await self._close_lane(lane)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if lanes:
            # The clients' runtime threads finish their connections' tasks after close()
            # returns; an interpreter that exits meanwhile aborted in 3 of 6 runs (a runtime
            # thread taking the GIL during finalization). A moment here lets them end.
            await asyncio.sleep(0.05)
