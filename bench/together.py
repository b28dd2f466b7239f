"""CPU per IncomingCall of several relays loaded at the same time on one core: each relay has its
own wrk, all run at once, and each window's figure is a relay's CPU over the events it answered.
This VM's speed swings (1.5x within minutes) then fall on every relay in the same moment, where
`hotpath_pairs.py`'s chunks, one relay after the other, each see a different moment.

    python bench/together.py --relay /work/wt/before/src --relay /work/wt/before/src --relay src
    python bench/together.py --relay src:notificationhubs --relay src:apns --relay src:fcm
    python bench/together.py --relay src:notificationhubs --relay src:apns --devices 5

A `--relay` is TREE (its `src/`; Notification Hubs), or TREE:TRANSPORT with TRANSPORT one of
notificationhubs, apns, fcm (direct_bench.py's fakes and configuration; the direct relays' callees
have devices of that platform only, the hub's the mixed fleet). The first relay is the baseline
of every ratio; naming the same relay twice gives the harness's own null. Relays run pinned to
core 0, the fakes and the wrks (`--connections` each) on core 1. The first window warms up and is
not counted; every push is counted at its fake after each window: none may be missing or
duplicated.

What "together" changes: each relay gets a share of the core, so none is saturated as it is
alone (its group commits and HTTP/2 writes gather fewer events: CPU per event is 1.5-2.5x its
solo figure), and the relays share core 0's caches, every switch between them evicting the
others' lines. Its ratios are steady (the null lands within 1.2 %, single windows within 7 %) but
they are ratios under sharing: they compare trees that differ in what they do per event
(bench/README, "Session 13"), not ones that differ in how much batching saves them, such as two
transports or two HTTP/2 clients (direct APNs cost 1.09x the hub path's CPU per event here, 0.90x
in direct_bench.py's solo peaks of the same day).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from direct_bench import start_fakes  # noqa: E402
from hotpath_pairs import counters  # noqa: E402
from relay_bench import (  # noqa: E402
    LOAD_CORE,
    SERVER_CORE,
    free_port,
    pin,
    receipts,
    relay_has_flag,
    seed_with_tree,
    spawn,
    wait_ready,
    wrk_closed_loop,
    wrk_receipt_check,
)

from ringrelay.fakes.tls import make_test_certificates  # noqa: E402
from ringrelay.models import Platform  # noqa: E402

TRANSPORTS = ("notificationhubs", "apns", "fcm")
PLATFORM = {"apns": Platform.APNS, "fcm": Platform.FCM}  # the hub path: the mixed fleet


def parse_relay(spec: str) -> tuple[str, str]:
    tree, _, transport = spec.rpartition(":")
    if transport in TRANSPORTS and tree:
        return str(Path(tree).resolve()), transport
    return str(Path(spec).resolve()), "notificationhubs"


def start_relay(
    tree: str,
    transport: str,
    env: dict[str, str],
    work: Path,
    tag: str,
    a: argparse.Namespace,
) -> tuple[subprocess.Popen[str], str]:
    db = work / f"registry-{tag}.db"
    tree_env = seed_with_tree(tree, db, a.identities, a.devices, PLATFORM.get(transport))
    quiet = ["--no-access-log"] if relay_has_flag(tree_env, "--no-access-log") else []
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "ringrelay", "serve", "--port", str(port), *quiet],
        SERVER_CORE,
        {
            "PYTHONPATH": tree,
            "RINGRELAY_DATABASE_URL": f"sqlite:///{db}",
            "RINGRELAY_LOG_LEVEL": "WARNING",
            **env,
        },
        work / f"relay-{tag}.log",
    )
    return proc, f"http://127.0.0.1:{port}"


async def run(a: argparse.Namespace) -> int:
    pin(LOAD_CORE)
    relays_wanted = [parse_relay(s) for s in a.relay]
    work = Path(tempfile.mkdtemp(prefix="ringrelay-together-"))
    fakes, transports = start_fakes(work)
    certs = make_test_certificates(work / "tls")
    relays: list[tuple[subprocess.Popen[str], str, str]] = []
    names = [f"{Path(t).parent.name or t}:{tr}" for t, tr in relays_wanted]
    cpu: list[list[float]] = [[] for _ in relays_wanted]
    parts: list[dict[str, list[float]]] = [{"user": [], "sys": []} for _ in relays_wanted]
    rates: list[list[float]] = [[] for _ in relays_wanted]
    missing = duplicated = 0
    load_at_start = os.getloadavg()
    try:
        for i, (tree, transport) in enumerate(relays_wanted):
            env, receipts_url = transports[transport]
            proc, url = start_relay(tree, transport, env, work, str(i), a)
            relays.append((proc, url, receipts_url))
        for proc, url, _ in relays:
            await wait_ready(url, proc)
        for window in range(a.windows + 1):
            before = [counters(proc.pid) for proc, _, _ in relays]
            phases = await asyncio.gather(
                *(
                    wrk_closed_loop(f"{url}/api/events", a.seconds, a.connections, a.identities)
                    for _, url, _ in relays
                )
            )
            after = [counters(proc.pid) for proc, _, _ in relays]
            await asyncio.sleep(0.5)  # the last requests' pushes land
            got: dict[str, list[tuple[str, float]]] = {}
            for _, _, receipts_url in relays:
                if receipts_url not in got:
                    got[receipts_url] = await receipts(receipts_url, certs.ca_file)
            us = []
            for i, ((_, _, receipts_url), phase) in enumerate(zip(relays, phases, strict=True)):
                check = wrk_receipt_check(phase, got[receipts_url], a.devices)
                missing += check["missing"]
                duplicated += check["dupes"]
                user = (after[i]["user"] - before[i]["user"]) / phase.events
                system = (after[i]["sys"] - before[i]["sys"]) / phase.events
                us.append((user + system) * 1e6)
                if window:
                    parts[i]["user"].append(user * 1e6)
                    parts[i]["sys"].append(system * 1e6)
                    rates[i].append(phase.events / phase.seconds)
            if not window:
                continue  # warm-up: connections, caches, the first group commits
            for i, v in enumerate(us):
                cpu[i].append(v)
            print(
                f"window {window:2d}: "
                + ", ".join(
                    f"{v:4.0f} us ({p.events / p.seconds:5.0f}/s)"
                    for v, p in zip(us, phases, strict=True)
                )
                + "".join(f" | {us[i] / us[0]:.3f}" for i in range(1, len(us))),
                flush=True,
            )
    finally:
        for proc in [*(p for p, _, _ in relays), *fakes]:
            proc.terminate()
        for proc in [*(p for p, _, _ in relays), *fakes]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(
        f"\nconditions: {len(relays_wanted)} relays loaded at once on core {SERVER_CORE}, "
        f"{a.devices} device(s) per callee, {a.identities:,} callees, {a.windows} windows of "
        f"{a.seconds:.0f} s, wrk with {a.connections} connections per relay and the fakes on core "
        f"{LOAD_CORE}; load average {load_at_start[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; python {sys.version.split()[0]}"
    )
    for i, name in enumerate(names):
        ratios = [cpu[i][k] / cpu[0][k] for k in range(len(cpu[0]))]
        print(
            f"{name}: median {statistics.median(cpu[i]):.0f} us CPU per IncomingCall "
            f"(user {statistics.median(parts[i]['user']):.0f}, system "
            f"{statistics.median(parts[i]['sys']):.0f}; {statistics.mean(rates[i]):.0f} events/s "
            f"on its share of the core)"
            + (
                ""
                if i == 0
                else f"; median ratio {statistics.median(ratios):.3f} "
                f"({min(ratios):.3f}-{max(ratios):.3f}) against the first"
            )
        )
    print(f"pushes missing {missing}, duplicated {duplicated}")
    return 1 if missing or duplicated else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relay", action="append", required=True, help="TREE or TREE:TRANSPORT")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    a: Any = parser.parse_args()
    if len(a.relay) < 2:
        parser.error("name at least two relays (the first is the baseline)")
    return asyncio.run(run(a))


if __name__ == "__main__":
    sys.exit(main())
