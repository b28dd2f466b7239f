"""The push path's HTTP/1.1 client (`providers/http1.py`) against a TLS server on loopback that
answers with exact bytes: keep-alive reuse, chunked and closing answers, timeouts, a server that
drops idle connections, header injection, the pool limit."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable

import pytest

from ringrelay.fakes.tls import make_test_certificates
from ringrelay.providers.http1 import CertificateError, Http1Pool, HttpError
from tests.test_cli import free_port

Answer = Callable[[bytes], bytes | None]  # request head -> raw response (None: say nothing)

OK = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nLocation: /hub/messages/42\r\n\r\n"


class RawServer:
    """Reads one request at a time per connection and writes what `answer` returns."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                reply = self.answer(head)
                if reply is None:
                    continue
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certs = make_test_certificates(tmp_path_factory.mktemp("http1-tls"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs.cert_file, certs.key_file)
    return server, ssl.create_default_context(cafile=str(certs.ca_file))


async def serve(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], answer: Answer, **pool_options: float
) -> AsyncIterator[tuple[RawServer, Http1Pool]]:
    raw = RawServer(answer)
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=tls[0])
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool("127.0.0.1", port, tls[1], **pool_options)  # type: ignore[arg-type]
    try:
        yield raw, pool
    finally:
        await pool.close()
        for writer in raw.writers:
            writer.close()
        server.close()


async def post(pool: Http1Pool, body: bytes = b'{"a":1}', limit: float = 2.0, **headers: str):
    return await pool.request("POST", "/hub/messages/?direct", headers, body, limit)


async def test_keep_alive_reuses_one_connection(tls) -> None:
    async for raw, pool in serve(tls, lambda head: OK):
        for _ in range(5):
            resp = await post(pool, Authorization="SharedAccessSignature sr=x")
            assert resp.status == 201 and resp.headers["location"] == "/hub/messages/42"
        assert raw.connections == 1 and pool.connections_made == 1
        first = raw.requests[0]
        assert first.startswith(b"POST /hub/messages/?direct HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in first
        assert b"\r\nAuthorization: SharedAccessSignature sr=x\r\n" in first
        assert b"\r\nContent-Length: 7\r\n\r\n" + b'{"a":1}' in first


async def test_chunked_body_and_connection_close(tls) -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async for raw, pool in serve(tls, lambda head: chunked):
        resp = await post(pool)
        assert (resp.status, resp.body) == (400, b"hello world")
        await post(pool)  # the closed connection is not reused
        assert raw.connections == 2 and pool.connections_made == 2


async def test_timeout_closes_the_connection_and_the_next_request_reconnects(tls) -> None:
    answers = iter([None, OK])  # the first request is never answered
    async for raw, pool in serve(tls, lambda head: next(answers)):
        with pytest.raises(TimeoutError):
            await post(pool, limit=0.3)
        # A late answer on the old connection must not be taken for the next request's.
        assert (await post(pool)).status == 201
        assert raw.connections == 2


async def test_server_closing_an_idle_connection_is_noticed(tls) -> None:
    async for raw, pool in serve(tls, lambda head: OK):
        await post(pool)
        for writer in raw.writers:
            writer.close()  # as a balancer does after its idle timeout
        await asyncio.sleep(0.1)
        assert (await post(pool)).status == 201
        assert raw.connections == 2


async def test_connection_lost_mid_response_is_an_error(tls) -> None:
    half = b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\nConnection: close\r\n\r\nshort"
    async for _, pool in serve(tls, lambda head: half):
        with pytest.raises(HttpError, match="connection lost"):
            await post(pool)


async def test_a_header_value_with_a_line_break_is_never_sent(tls) -> None:
    async for raw, pool in serve(tls, lambda head: OK):
        with pytest.raises(ValueError, match="ServiceBusNotification-DeviceHandle"):
            await post(pool, **{"ServiceBusNotification-DeviceHandle": "abc\r\nX-Evil: 1"})
        assert raw.requests == []


async def test_unreachable_server_is_an_error(tls) -> None:
    pool = Http1Pool("127.0.0.1", free_port(), tls[1])  # closed: nothing listens
    with pytest.raises(HttpError, match="cannot connect"):
        await post(pool)
    await pool.close()


async def test_pool_limit_queues_requests_in_order(tls) -> None:
    async for raw, pool in serve(tls, lambda head: OK, max_connections=2):
        results = await asyncio.gather(*(post(pool) for _ in range(20)))
        assert [r.status for r in results] == [201] * 20
        assert raw.connections <= 2 and len(raw.requests) == 20


async def test_untrusted_certificate_is_its_own_error(tmp_path) -> None:
    """A server whose CA is not trusted: CertificateError (a configuration error for the
    callers), not a connection error to retry."""
    certs = make_test_certificates(tmp_path / "other")
    server = await asyncio.start_server(
        lambda r, w: None, "127.0.0.1", 0, ssl=certs.server_context(["http/1.1"])
    )
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool("127.0.0.1", port, ssl.create_default_context())  # system trust only
    try:
        with pytest.raises(CertificateError, match="unable to get local issuer certificate"):
            await post(pool)
    finally:
        await pool.close()
        server.close()
