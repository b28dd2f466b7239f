"""Issue 20's other candidate, measured end to end: `providers/http2.py`'s `Http2Pool.request()`
on pycurl's CurlMulti (libcurl + nghttp2), driven by the asyncio loop. For benchmarks only: it
lacks what the service needs and pyreqwest gives (HTTP/2 PING on idle connections: pycurl does not
expose curl_easy_upkeep; retiring one connection on APNs' TooManyProviderTokenUpdates or
IdleTimeout; requests other than POST). `pip install pycurl` first.

    python bench/pycurl_pool.py --make-tree /tmp/rr-curl    # a copy of src/ that uses it
    python bench/direct_bench.py --quick --baseline-src /tmp/rr-curl/src
    python bench/together.py --relay src:apns --relay /tmp/rr-curl/src:apns
    PYTHONPATH=/tmp/rr-curl/src python bench/http2_client_cost.py --rounds 1

The glue: libcurl says which sockets to watch (CURLMOPT_SOCKETFUNCTION) and when to call back
(CURLMOPT_TIMERFUNCTION); the loop's readers, writers and one timer call `socket_action`, and
finished transfers are read off `info_read` (libcurl's multi-socket API, as its
`ephiperfifo.c` / `asiohiper.cpp` examples drive it). One multi handle multiplexes HTTP/2
streams (CURLPIPE_MULTIPLEX, CURLOPT_PIPEWAIT) over at most `max_connections` connections.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pycurl

from ringrelay.providers.http2 import (
    Header,
    Http2Answer,
    Http2CertificateError,
    Http2ConnectionLost,
)

HERE = Path(__file__).resolve().parent


class _Lane:
    """What `Http2Answer.lane` offers the providers; libcurl keeps its connections itself."""

    def retire(self) -> None:
        pass


_LANE = _Lane()


class CurlPool:
    def __init__(
        self,
        origin: str,
        ca_file: str | Path | None = None,
        *,
        max_connections: int = 8,
        **_: object,
    ) -> None:
        self.origin = origin.rstrip("/")
        self.authority = self.origin.split("://", 1)[-1]
        self.ca_file = str(ca_file) if ca_file else None
        self.lanes: list[Any] = []
        self.lanes_opened = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self._multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, max_connections)
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._timer: asyncio.TimerHandle | None = None
        self._free: list[Any] = []  # easy handles kept for reuse (reset between requests)
        self._watched: dict[int, int] = {}  # fd -> 1 reading | 2 writing

    def _on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        loop = self._loop
        assert loop is not None
        old = self._watched.pop(fd, 0)
        if old & 1:
            loop.remove_reader(fd)
        if old & 2:
            loop.remove_writer(fd)
        if what == pycurl.POLL_REMOVE:
            return
        mask = 0
        if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
            mask |= 1
        if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
            mask |= 2
        self._watched[fd] = mask

    def _on_timer(self, ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ms >= 0:  # -1: no timeout wanted
            assert self._loop is not None
            self._timer = self._loop.call_later(ms / 1000, self._act, pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, events: int) -> None:
        while self._multi.socket_action(fd, events)[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = self._multi.info_read()
            for c in ok:
                self._multi.remove_handle(c)
                if not c.future.done():
                    c.future.set_result(None)
            for c, errno, message in failed:
                self._multi.remove_handle(c)
                if not c.future.done():
                    c.future.set_exception(pycurl.error(errno, message))
            if not queued:
                break

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[Header],
        body: bytes,
        time_limit: float,
    ) -> Http2Answer:
        if method != "POST":
            raise NotImplementedError("the benchmark's glue sends POSTs only")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        c = self._free.pop() if self._free else pycurl.Curl()
        chunks: list[bytes] = []
        answer_headers: dict[str, str] = {}

        def header_line(line: bytes) -> None:
            name, sep, value = line.partition(b":")
            if sep:
                key = name.decode("latin-1").strip().lower()
                answer_headers[key] = value.decode("latin-1").strip()

        c.setopt(pycurl.URL, self.origin + path)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        c.setopt(pycurl.PIPEWAIT, 1)  # wait for a connection that can multiplex
        if self.ca_file:
            c.setopt(pycurl.CAINFO, self.ca_file)
        c.setopt(pycurl.POST, 1)
        c.setopt(pycurl.POSTFIELDS, body)
        # No "Expect: 100-continue", no default "Accept: */*".
        c.setopt(pycurl.HTTPHEADER, [f"{n}: {v}" for n, v, _ in headers] + ["Expect:", "Accept:"])
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(time_limit * 1000)))
        c.setopt(pycurl.WRITEFUNCTION, chunks.append)
        c.setopt(pycurl.HEADERFUNCTION, header_line)
        c.future = self._loop.create_future()
        self._multi.add_handle(c)
        try:
            await c.future
            status = c.getinfo(pycurl.RESPONSE_CODE)
        except pycurl.error as exc:
            errno, message = exc.args[0], str(exc.args[1])
            if errno == pycurl.E_OPERATION_TIMEDOUT:
                raise TimeoutError(message) from exc
            if errno in (pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CACERT_BADFILE):
                raise Http2CertificateError(self.authority, message) from exc
            raise Http2ConnectionLost(f"{self.authority}: {message}") from exc
        finally:
            c.reset()
            self._free.append(c)
        return Http2Answer(status, answer_headers, b"".join(chunks), _LANE)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._multi.close()


def make_tree(out: Path) -> Path:
    """A copy of this checkout's src/ whose providers use CurlPool instead of pyreqwest."""
    src = out / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(HERE.parent / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    http2 = src / "ringrelay" / "providers" / "http2.py"
    http2.write_text(
        http2.read_text()
        + "\n\n# Added by bench/pycurl_pool.py --make-tree: the pool on pycurl, for benchmarks.\n"
        + f"import sys as _sys  # noqa: E402\n_sys.path.insert(0, {str(HERE)!r})\n"
        + "from pycurl_pool import CurlPool as Http2Pool  # type: ignore  # noqa: E402\n"
    )
    return src


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--make-tree", type=Path, required=True, help="directory to create")
    a = parser.parse_args()
    print(make_tree(a.make_tree))
    return 0


if __name__ == "__main__":
    sys.exit(main())
