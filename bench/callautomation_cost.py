"""Cost of one Call Automation redirect through the SDK (routing/callautomation.py), against the
fake in another process: client CPU and wall time per call, SDK vs. a hand-signed aiohttp POST
of the same request (the floor). Quick: `python bench/callautomation_cost.py [N]`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

import aiohttp

from ringrelay.routing.callautomation import CallAutomation, repeatability_id

KEY = base64.b64encode(b"ringrelay-fake-callautomation-key").decode()


async def main(n: int) -> None:
    tls = Path(tempfile.mkdtemp()) / "tls"
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ringrelay",
            "fake",
            "callautomation",
            "--port",
            "0",
            "--tls-dir",
            str(tls),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        base = fake.stdout.readline().split(" on ")[1].strip()
        ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        async with aiohttp.ClientSession() as http:

            async def place() -> str:
                async with http.post(
                    f"{base}/_fake/calls",
                    json={"to": "4:+14255551212", "from": "4:+14255550123"},
                    ssl=ctx,
                ) as resp:
                    return str((await resp.json())["event"]["data"]["incomingCallContext"])

            client = CallAutomation(
                connection_string=f"endpoint={base}/;accesskey={KEY}", ca_file=str(tls / "ca.pem")
            )
            await client.start()
            sdk_cpu, sdk_wall = [], []
            for i in range(n):
                context = await place()
                c0, w0 = time.process_time(), time.perf_counter()
                result = await client.redirect(
                    context, "8:acs:r_u", repeatability_id(str(i)), time.time(), 5
                )
                sdk_cpu.append(time.process_time() - c0)
                sdk_wall.append(time.perf_counter() - w0)
                assert result.http_status == 204, result
            await client.close()

            host = base.split("://", 1)[1]
            raw_cpu, raw_wall = [], []
            for i in range(n):
                context = await place()
                c0, w0 = time.process_time(), time.perf_counter()
                body = json.dumps(
                    {
                        "incomingCallContext": context,
                        "target": {"rawId": "8:acs:r_u", "communicationUser": {"id": "8:acs:r_u"}},
                    }
                ).encode()
                path = "/calling/callConnections:redirect?api-version=2026-03-12"
                date = formatdate(usegmt=True)
                digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
                sig = base64.b64encode(
                    hmac.new(
                        base64.b64decode(KEY),
                        f"POST\n{path}\n{date};{host};{digest}".encode(),
                        hashlib.sha256,
                    ).digest()
                )
                headers = {
                    "x-ms-date": date,
                    "x-ms-content-sha256": digest,
                    "Authorization": "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
                    f"&Signature={sig.decode()}",
                    "Content-Type": "application/json",
                    "Repeatability-Request-ID": repeatability_id("raw", str(i)),
                    "Repeatability-First-Sent": date,
                }
                async with http.post(base + path, data=body, headers=headers, ssl=ctx) as resp:
                    assert resp.status == 204, await resp.text()
                raw_cpu.append(time.process_time() - c0)
                raw_wall.append(time.perf_counter() - w0)

        def us(values: list[float]) -> str:
            return f"median {statistics.median(values) * 1e6:.0f} us"

        print(f"{n} redirects each, client side, keep-alive connection, loopback TLS:")
        print(f"  SDK (azure-communication-callautomation): CPU {us(sdk_cpu)}, wall {us(sdk_wall)}")
        print(
            f"  hand-signed aiohttp POST (floor):          CPU {us(raw_cpu)}, wall {us(raw_wall)}"
        )
    finally:
        fake.terminate()
        fake.wait(5)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
