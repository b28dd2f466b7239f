"""CPU per IncomingCall of two source trees, measured in interleaved pairs of short wrk chunks on
relays that run side by side, so that this VM's speed swings (1.5x within minutes, seen in
`relay_bench.py`'s probes) fall on both trees alike; the figure is the median of the pairs'
ratios. Issue 14's "within 5 %" check, in wall-clock CPU rather than callgrind's instructions.

    python bench/hotpath_pairs.py --src /work/wt/before/src --src src --pairs 12

Both relays (`ringrelay serve` of each tree, SQLite seeded by that tree's own store, access log
off where the tree has the flag) run pinned to core 0 at once; only one is loaded at a time. The
fake Notification Hubs (TLS, SAS verified) and wrk (64 connections) share core 1. Each pair runs
one `--seconds` chunk on each tree, the order alternating from pair to pair; after a warm-up chunk
each. A chunk's figure is the relay's user+system CPU (from /proc) over the requests wrk
completed; per tree it also prints user and system CPU, minor page faults and context switches
per event (medians over the chunks) and the memory resident at the end. Every push is counted at
the hub at the end: none may be missing or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relay_bench import (  # noqa: E402
    HUB,
    KEY,
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


def counters(pid: int) -> dict[str, float]:
    """The process's user and system CPU seconds and minor page faults (/proc/PID/stat, fields
    10, 14 and 15: proc(5)) and its threads' context switches (/proc/PID/task/*/status)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    switches = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                switches += int(line.split()[1])
    return {
        "user": int(fields[11]) / tick,
        "sys": int(fields[12]) / tick,
        "minflt": float(fields[7]),
        "ctxsw": float(switches),
    }


def start_relay(tree: str, work: Path, tag: str, hub_port: int, ca: Path, a: argparse.Namespace):
    db = work / f"registry-{tag}.db"
    env = seed_with_tree(tree, db, a.identities, a.devices)
    quiet = ["--no-access-log"] if relay_has_flag(env, "--no-access-log") else []
    port = free_port()
    conn = (
        f"Endpoint=sb://127.0.0.1:{hub_port}/;SharedAccessKeyName="
        f"DefaultFullSharedAccessSignature;SharedAccessKey={KEY}"
    )
    proc = spawn(
        [sys.executable, "-m", "ringrelay", "serve", "--port", str(port), *quiet],
        0,
        {
            "PYTHONPATH": tree,
            "RINGRELAY_DATABASE_URL": f"sqlite:///{db}",
            "RINGRELAY_NH_CONNECTION_STRING": conn,
            "RINGRELAY_NH_HUB_NAME": HUB,
            "RINGRELAY_NH_CA_FILE": str(ca),
            "RINGRELAY_LOG_LEVEL": "WARNING",
        },
        work / f"relay-{tag}.log",
    )
    return proc, f"http://127.0.0.1:{port}"


async def run(a: argparse.Namespace) -> int:
    pin(1)
    work = Path(tempfile.mkdtemp(prefix="ringrelay-pairs-"))
    certs = make_test_certificates(work / "tls")
    hub_port = free_port()
    hub = spawn(
        [
            *(sys.executable, str(HERE / "fake_hub.py"), "--port", str(hub_port)),
            *("--tls-dir", str(work / "tls"), "--hub", HUB, "--key", KEY),
        ],
        1,
    )
    assert hub.stdout is not None
    if hub.stdout.readline().strip() != "ready":
        raise RuntimeError("fake hub failed to start")
    hub_url = f"https://127.0.0.1:{hub_port}"
    relays = [start_relay(t, work, str(i), hub_port, certs.ca_file, a) for i, t in enumerate(a.src)]
    chunks: list[list[float]] = [[] for _ in a.src]
    rss = [0.0 for _ in a.src]  # MiB resident at the end
    # per tree: user/system CPU, minor faults and context switches per event, each chunk
    parts: list[dict[str, list[float]]] = [
        {"user": [], "sys": [], "minflt": [], "ctxsw": []} for _ in a.src
    ]
    missing = duplicated = 0
    try:
        for proc, url in relays:
            await wait_ready(url, proc)

        async def chunk(i: int) -> float:
            proc, url = relays[i]
            before = counters(proc.pid)
            phase = await wrk_closed_loop(f"{url}/api/events", a.seconds, 64, a.identities)
            after = counters(proc.pid)
            await asyncio.sleep(0.3)  # the last requests' pushes land
            nonlocal missing, duplicated
            check = wrk_receipt_check(phase, await receipts(hub_url, certs.ca_file), a.devices)
            missing += check["missing"]
            duplicated += check["dupes"]
            per_event = {k: (after[k] - before[k]) / phase.events for k in after}
            for k, v in per_event.items():
                parts[i][k].append(v)
            return (per_event["user"] + per_event["sys"]) * 1e6

        for i in range(len(relays)):
            await chunk(i)  # warm-up: connections, caches, the first group commits
        for p in parts:
            for v in p.values():
                v.clear()
        for pair in range(a.pairs):
            order = range(len(relays)) if pair % 2 == 0 else reversed(range(len(relays)))
            got = {i: await chunk(i) for i in order}
            for i, us in got.items():
                chunks[i].append(us)
            print(
                f"pair {pair + 1:2d}: "
                + ", ".join(f"{us:4.0f} us" for _, us in sorted(got.items()))
                + "".join(f" | ratio {got[i] / got[0]:.3f}" for i in range(1, len(relays))),
                flush=True,
            )
        for i, (proc, _) in enumerate(relays):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss[i] = int(status.split("VmRSS:")[1].split()[0]) / 1024
    finally:
        for proc, _ in relays:
            proc.terminate()
        hub.terminate()
        for proc in [*(p for p, _ in relays), hub]:
            proc.wait(timeout=30)
    print(
        f"\nconditions: {a.devices} device(s) per callee, {a.identities:,} callees, "
        f"{a.pairs} pairs of {a.seconds:.0f} s wrk chunks (64 connections), relays side by side "
        f"on core 0, hub + wrk on core 1; python {sys.version.split()[0]}"
    )
    for i, tree in enumerate(a.src):
        v = chunks[i]
        line = f"{tree}: median {statistics.median(v):.0f} us CPU per IncomingCall "
        line += f"({min(v):.0f}-{max(v):.0f})"
        if i:
            ratios = sorted(x / y for x, y in zip(v, chunks[0], strict=True))
            line += f"; median pair ratio {statistics.median(ratios):.3f} "
            line += f"({ratios[0]:.3f}-{ratios[-1]:.3f}) against the first tree"
        print(line)
        m = {k: statistics.median(v) for k, v in parts[i].items()}
        print(
            f"    per IncomingCall (medians over the chunks): user "
            f"{m['user'] * 1e6:.0f} us, system {m['sys'] * 1e6:.0f} us, {m['minflt']:.2f} "
            f"minor page faults, {m['ctxsw']:.2f} context switches (all threads); "
            f"{rss[i]:.0f} MiB resident at the end"
        )
    print(f"pushes missing {missing}, duplicated {duplicated}")
    return 0 if missing == duplicated == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", action="append", help="a tree's src/ (repeat; first = baseline)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    a = parser.parse_args()
    a.src = [str(Path(s).resolve()) for s in (a.src or [str(HERE.parent / "src")])]
    if len(a.src) < 2:
        parser.error("give two trees: --src BASELINE/src --src OTHER/src")
    return asyncio.run(run(a))


if __name__ == "__main__":
    raise SystemExit(main())
