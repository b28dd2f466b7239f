"""`ringrelay serve --workers 2` against 1 worker, in the same run, on PostgreSQL: IncomingCall
deliveries (one device per callee) into a relay whose provider is the fake Notification Hubs over
TLS, peak events/s of a closed loop, and the ratio.

    python bench/workers_bench.py            # 8 s per configuration
    python bench/workers_bench.py --seconds 15 --identities 50000

Layout: nothing is pinned. This machine has 2 cores, and the load generator (this process), the
fake hub and PostgreSQL share them with the relay's workers, so 2 workers cannot reach 2x; the
report gives each party's CPU use so that the ratio can be read against it. Every accepted
event's push is counted at the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

from relay_bench import (
    HUB,
    KEY,
    closed_loop,
    cpu_seconds,
    free_port,
    make_bodies,
    receipts,
    wait_ready,
)

from ringrelay.fakes.tls import make_test_certificates
from ringrelay.models import Platform, PushKind, Registration
from ringrelay.store.postgres import PostgresStore

HERE = Path(__file__).resolve().parent
PG_URL = os.environ.get("RINGRELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (the supervisor's workers)."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(tree_cpu(int(c)) for c in children)


def start(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None):
    """A process on any core (relay_bench.spawn pins; here the scheduler places everything)."""
    import subprocess

    return subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=log.open("w") if log is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def seed(url: str, identities: int) -> None:
    store = PostgresStore(url)
    await store.open()
    now = time.time()
    batch = []
    for n in range(identities):
        batch.append(
            Registration(
                identity=f"8:acs:bench_{n}",
                device_id="dev0",
                platform=Platform.APNS,
                token=f"{n:016x}" * 4,
                push_kind=PushKind.VOIP,
                app_id=None,
                created_at=now,
                updated_at=now,
                expires_at=now + 86400,
            )
        )
        if len(batch) >= 10_000:
            await store.bulk_insert_registrations(batch)
            batch = []
    if batch:
        await store.bulk_insert_registrations(batch)
    await store.close()


async def pg_cpu() -> float:
    """CPU seconds of every PostgreSQL server process on the machine (others' too: it is shared)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() in ("postgres", "postmaster"):
                    total += cpu_seconds(int(entry))
            except OSError:
                continue
    return total


async def run(a: argparse.Namespace) -> int:
    import asyncpg

    work = Path(tempfile.mkdtemp(prefix="ringrelay-workers-bench-"))
    certs = make_test_certificates(work / "tls")
    schema = f"rr_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_URL)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    url = f"{PG_URL}?search_path={schema}"
    hub_port = free_port()
    hub = start(
        [
            sys.executable,
            str(HERE / "fake_hub.py"),
            "--port",
            str(hub_port),
            "--tls-dir",
            str(work / "tls"),
            "--hub",
            HUB,
            "--key",
            KEY,
        ],
    )
    rows = []
    try:
        assert hub.stdout is not None
        if hub.stdout.readline().strip() != "ready":
            raise RuntimeError("fake hub failed to start")
        hub_url = f"https://127.0.0.1:{hub_port}"
        t0 = time.monotonic()
        await seed(url, a.identities)
        print(
            f"seeded {a.identities:,} callees x 1 device in PostgreSQL in "
            f"{time.monotonic() - t0:.1f} s",
            flush=True,
        )
        env = {
            "RINGRELAY_DATABASE_URL": url,
            "RINGRELAY_NH_CONNECTION_STRING": (
                f"Endpoint=sb://127.0.0.1:{hub_port}/;SharedAccessKeyName="
                f"DefaultFullSharedAccessSignature;SharedAccessKey={KEY}"
            ),
            "RINGRELAY_NH_HUB_NAME": HUB,
            "RINGRELAY_NH_CA_FILE": str(certs.ca_file),
            "RINGRELAY_LOG_LEVEL": "WARNING",
        }
        for workers in a.workers:
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "ringrelay",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ]
            proc = start(cmd, env, work / f"relay-{workers}.log")
            base = f"http://127.0.0.1:{port}"
            try:
                await wait_ready(base, proc)
                await asyncio.sleep(1.0 if workers > 1 else 0.2)  # every worker up
                bodies = make_bodies(int(a.seconds * 6000) + 3000, a.identities)
                await closed_loop(f"{base}/api/events", bodies[:2000], 1.0, 16, warm_up=True)
                await receipts(hub_url, certs.ca_file)
                cpu0 = {
                    "relay": tree_cpu(proc.pid),
                    "hub": cpu_seconds(hub.pid),
                    "load": cpu_seconds(os.getpid()),
                    "postgres": await pg_cpu(),
                }
                peak = await closed_loop(
                    f"{base}/api/events", bodies[2000:], a.seconds, a.concurrency
                )
                cpu1 = {
                    "relay": tree_cpu(proc.pid),
                    "hub": cpu_seconds(hub.pid),
                    "load": cpu_seconds(os.getpid()),
                    "postgres": await pg_cpu(),
                }
                await asyncio.sleep(0.5)
                got = await receipts(hub_url, certs.ca_file)
                ok = peak.statuses.get(200, 0)
                pushed = len({c for c, _ in got})
                rows.append(
                    {
                        "workers": workers,
                        "events_s": peak.rate,
                        "statuses": dict(peak.statuses),
                        "accepted": ok,
                        "pushed": pushed,
                        "cpu": {k: (cpu1[k] - cpu0[k]) / peak.seconds for k in cpu0},
                    }
                )
                r = rows[-1]
                cpu = "  ".join(f"{k} {v * 100:.0f}%" for k, v in r["cpu"].items())
                print(
                    f"workers={workers}: {r['events_s']:,.0f} events/s over {peak.seconds:.1f} s "
                    f"(HTTP {r['statuses']}; pushes at the hub {pushed:,} for {ok:,} answered "
                    f"200); CPU of one core: {cpu}",
                    flush=True,
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    finally:
        hub.kill()
        hub.wait()
        conn = await asyncpg.connect(PG_URL)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    if len(rows) >= 2:
        ratio = rows[-1]["events_s"] / rows[0]["events_s"]
        print(
            f"ratio {rows[-1]['workers']} workers / {rows[0]['workers']}: {ratio:.2f}x "
            f"({platform.node()}, {os.cpu_count()} cores, load generator, fake hub and "
            "PostgreSQL on the same cores, unpinned)",
            flush=True,
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
