"""Client CPU per HTTP/2 request of `providers/http2.py` (pyreqwest) against the lean fake APNs,
with the interpreter's default GIL switch interval against a shorter one, alternating rounds.

    python bench/http2_client_cost.py                        # 5 ms (default) vs 0.5 ms
    python bench/http2_client_cost.py --switch-interval 0.001 --rounds 5

The fake (`FakeAPNs(framing="lean")`, TLS, bodies not kept) runs in a child process on core 1;
this process, pinned to core 0 with pyreqwest's runtime thread, sends `--requests` APNs-shaped
POSTs (~350 bytes, APNs's six headers) at `--concurrency` through one pool of up to 4
connections. The fake refuses the made-up provider token with 403 and a JSON reason, which the
client reads as it would Apple's. The figure is this process's user + system CPU (every thread)
per request; requests/s are printed too. Why: the relay's direct APNs/FCM path costs more per
push than the Notification Hubs path (bench/README.md, "Issue 20"), and pyreqwest's runtime
thread has to take the GIL from the event loop's thread for every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

FAKE = """
import asyncio, os, sys
os.sched_setaffinity(0, {1})
from ringrelay.fakes.apns import FakeAPNs

async def main():
    fake = FakeAPNs(framing="lean", record_bodies=False, validate_headers=False)
    print(await fake.start(tls_dir=sys.argv[1]), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


async def one_round(url: str, ca_file: str, a: argparse.Namespace) -> tuple[float, float]:
    from ringrelay.providers.http2 import Http2Pool

    pool = Http2Pool(url, ca_file, max_connections=4)
    body = b'{"aps":{},"data":{"eventId":107,"cp":"' + b"x" * 300 + b'"}}'
    headers = [
        ("authorization", "bearer made-up", True),
        ("apns-push-type", "voip", False),
        ("apns-topic", "com.example.calling.voip", False),
        ("apns-priority", "10", False),
        ("apns-expiration", "0", True),
        ("apns-id", "6c1c5f0c-6e8a-4a58-9e2b-1f0c1d2e3f40", True),
    ]
    path = "/3/device/" + "ab" * 32
    statuses: dict[int, int] = {}

    async def worker(count: int) -> None:
        for _ in range(count):
            answer = await pool.request("POST", path, headers, body, 5.0)
            statuses[answer.status] = statuses.get(answer.status, 0) + 1

    await worker(200)  # connections and TLS sessions up
    per_worker = a.requests // a.concurrency
    started_cpu, started = cpu_seconds(), time.monotonic()
    await asyncio.gather(*(worker(per_worker) for _ in range(a.concurrency)))
    used, took = cpu_seconds() - started_cpu, time.monotonic() - started
    await pool.close()
    if set(statuses) != {403}:
        raise RuntimeError(f"unexpected answers: {statuses}")
    n = per_worker * a.concurrency
    return used / n * 1e6, n / took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-interval", type=float, default=0.0005, help="seconds")
    a = parser.parse_args()
    os.sched_setaffinity(0, {0})
    from ringrelay.fakes.tls import make_test_certificates

    tls = tempfile.mkdtemp(prefix="ringrelay-h2cost-")
    certs = make_test_certificates(tls)
    fake = subprocess.Popen([sys.executable, "-c", FAKE, tls], stdout=subprocess.PIPE, text=True)
    assert fake.stdout is not None
    url = fake.stdout.readline().strip()
    default = sys.getswitchinterval()
    print(
        f"http2.py client against the lean fake APNs: {a.requests:,} POSTs per round at "
        f"concurrency {a.concurrency}, client on core 0, fake on core 1, {a.rounds} rounds "
        f"alternating; python {sys.version.split()[0]}, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    figures: dict[float, list[tuple[float, float]]] = {default: [], a.switch_interval: []}
    try:
        for round_ in range(1, a.rounds + 1):
            for interval in figures:
                sys.setswitchinterval(interval)
                us, rate = asyncio.run(one_round(url, str(certs.ca_file), a))
                figures[interval].append((us, rate))
                print(
                    f"  round {round_}, switch interval {interval * 1000:g} ms: "
                    f"{us:6.1f} us CPU per request, {rate:7,.0f} requests/s",
                    flush=True,
                )
    finally:
        sys.setswitchinterval(default)
        fake.terminate()
        fake.wait(timeout=10)
    base_us = statistics.median(u for u, _ in figures[default])
    base_rate = statistics.median(r for _, r in figures[default])
    for interval, got in figures.items():
        us = statistics.median(u for u, _ in got)
        rate = statistics.median(r for _, r in got)
        print(
            f"switch interval {interval * 1000:g} ms: median {us:.1f} us CPU per request "
            f"({us / base_us:.3f}x the default), {rate:,.0f} requests/s "
            f"({rate / base_rate:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
