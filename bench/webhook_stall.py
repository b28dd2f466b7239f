"""How long one large delivery keeps the event loop from other requests: the slowest `/healthz`
answer (polled every 5 ms) while `ringrelay serve` handles one delivery of the given kind.

    PYTHONPATH=src python bench/webhook_stall.py empty ignored badcalls calls huge

Kinds: `empty` 5,000 `{}` (each rejected and recorded), `ignored` 5,000 events of an unhandled
type, `badcalls` 5,000 IncomingCalls without a call context (rejected), `calls` 470
IncomingCalls to one registered device (what fits in 1 MiB), `huge` 349,524 `{}` in 1 MiB
(refused 413). Bounded: one delivery per kind, a fresh SQLite store in a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import orjson

from ringrelay.simulate import incoming_call_event

CALLEE = "8:acs:bench_stall"


def batch(kind: str) -> list[Any]:
    when = "2026-01-01T00:00:00Z"
    if kind == "empty":
        return [{}] * 5000
    if kind == "huge":
        return [{}] * 349_524
    if kind == "ignored":
        return [
            {"id": f"e{i}", "eventType": "X.Y", "eventTime": when, "data": {}} for i in range(5000)
        ]
    if kind == "badcalls":
        call = "Microsoft.Communication.IncomingCall"
        return [
            {"id": f"c{i}", "eventType": call, "eventTime": when, "data": {"to": {"rawId": CALLEE}}}
            for i in range(5000)
        ]
    if kind == "calls":
        return [incoming_call_event(CALLEE) for _ in range(470)]
    raise SystemExit(f"unknown kind {kind!r}")


async def measure(url: str, kind: str) -> str:
    body = orjson.dumps(batch(kind))
    worst = 0.0
    done = False

    async def poll() -> None:
        nonlocal worst
        async with aiohttp.ClientSession() as http:
            while not done:
                started = time.perf_counter()
                async with http.get(f"{url}/healthz") as resp:
                    await resp.read()
                worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.005)

    poller = asyncio.create_task(poll())
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.post(
            f"{url}/api/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            status = resp.status
            await resp.read()
        took = time.perf_counter() - started
    await asyncio.sleep(0.2)
    done = True
    await poller
    return (
        f"{kind:9} {len(body):>9,} bytes -> {status} in {took * 1000:5.0f} ms; "
        f"slowest /healthz meanwhile {worst * 1000:4.0f} ms"
    )


async def main(kinds: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGRELAY_")}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ringrelay", "serve", "--port", str(port)],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(150):
                    try:
                        async with http.get(f"{url}/healthz"):
                            break
                    except OSError:
                        await asyncio.sleep(0.1)
                token = {"platform": "apns", "token": "ab" * 32}
                async with http.put(f"{url}/v1/identities/{CALLEE}/devices/p", json=token) as r:
                    assert r.status == 201, await r.text()
            for kind in kinds:
                print(await measure(url, kind), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["empty", "ignored", "badcalls", "calls", "huge"]))
