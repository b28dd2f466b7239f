"""Instructions per IncomingCall in the relay's process, counted by valgrind's callgrind: a figure
that does not move with this VM's speed or its neighbours, for before/after comparisons of the
hot path (issue 14's "within 5 %"), where `relay_bench.py`'s events/s swing by 1.5x between runs.

    python bench/hotpath_instructions.py --src /work/wt/before/src --src src

For each `--src` tree, alternately for `--rounds` rounds: the fake Notification Hubs (TLS, not
under valgrind) on core 1; `ringrelay serve` of that tree under callgrind with instrumentation off
on core 0, seeded with 2,000 callees x `--devices`; a warm-up of `--warm-up` events, then
instrumentation on (`callgrind_control -i on`), `--events` IncomingCall deliveries at
`--concurrency`, a dump, and instructions (Ir) per event. Every push must reach the hub once.

The count covers everything the process executes in the window (event loop, SQLite, TLS, the
kernel's share is not counted) while the relay is the bottleneck, so idle timers weigh little.
Under callgrind the relay runs ~50x slower; group-commit batches and concurrency therefore differ
from a native run, equally for every tree measured. The ratio is to the first `--src`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(a: argparse.Namespace) -> None:
    """One measurement, run with PYTHONPATH at the tree under test (seeding uses its store)."""
    sys.path.insert(0, str(HERE))
    import orjson
    from relay_bench import (  # type: ignore[import-not-found]
        HUB,
        KEY,
        RawPoster,
        WrkShapedBodies,
        free_port,
        make_bodies,
        pin,
        receipts,
        seed,
        spawn,
    )

    from ringrelay.fakes.tls import make_test_certificates

    async def go() -> None:
        pin(1)
        work = Path(tempfile.mkdtemp(prefix="ringrelay-ir-"))
        certs = make_test_certificates(work / "tls")
        hub_port, port = free_port(), free_port()
        hub = spawn(
            [
                *(sys.executable, str(HERE / "fake_hub.py"), "--port", str(hub_port)),
                *("--tls-dir", str(work / "tls"), "--hub", HUB, "--key", KEY),
            ],
            1,
        )
        db = work / "registry.db"
        await seed(db, a.identities, a.devices)
        out = work / "callgrind.out"
        conn = (
            f"Endpoint=sb://127.0.0.1:{hub_port}/;SharedAccessKeyName="
            f"DefaultFullSharedAccessSignature;SharedAccessKey={KEY}"
        )
        # Access logs off on every tree (earlier ones had no flag and logged none).
        helptext = subprocess.run(
            [sys.executable, "-m", "ringrelay", "serve", "--help"], capture_output=True, text=True
        ).stdout
        quiet = ["--no-access-log"] if "--no-access-log" in helptext else []
        relay = spawn(
            [
                *("valgrind", "--tool=callgrind", "--instr-atstart=no"),
                *(["--cache-sim=yes"] if a.cache_sim else []),
                *([f"--LL={a.last_level},8,64"] if a.cache_sim and a.last_level else []),
                *(["--branch-sim=yes"] if a.branch_sim else []),
                f"--callgrind-out-file={out}",
                *(sys.executable, "-m", "ringrelay", "serve", "--port", str(port), *quiet),
            ],
            0,
            {
                "RINGRELAY_DATABASE_URL": f"sqlite:///{db}",
                "RINGRELAY_NH_CONNECTION_STRING": conn,
                "RINGRELAY_NH_HUB_NAME": HUB,
                "RINGRELAY_NH_CA_FILE": str(certs.ca_file),
                "RINGRELAY_LOG_LEVEL": "WARNING",
                # valgrind's slowdown must not turn into timeouts (28 s is the most allowed)
                "RINGRELAY_WEBHOOK_DEADLINE_SECONDS": "25",
            },
            work / "relay.log",
        )
        try:
            assert hub.stdout is not None
            if hub.stdout.readline().strip() != "ready":
                raise RuntimeError("fake hub failed to start")
            url = f"http://127.0.0.1:{port}/api/events"
            deadline = time.monotonic() + 600
            poster = RawPoster(url, a.concurrency)
            while True:
                try:
                    if await poster.post(b"[]") == 200:
                        break
                except OSError:
                    pass
                if relay.poll() is not None or time.monotonic() > deadline:
                    log = (work / "relay.log").read_text(errors="replace")
                    raise RuntimeError(f"relay did not come up:\n{log[-3000:]}")
                await asyncio.sleep(0.5)
            # Made in slices just before they are sent: a long warm-up under valgrind outlives
            # the ring window, and an event older than that is (rightly) not pushed.
            bodies: list[tuple[str, bytes]] = []
            wrk_bodies = WrkShapedBodies(a.identities) if a.wrk_shaped else None
            statuses: dict[int, int] = {}

            async def send(count: int, slice_: int) -> None:
                for start in range(0, count, slice_):
                    n = min(slice_, count - start)
                    batch = wrk_bodies(n) if wrk_bodies else make_bodies(n, a.identities)
                    bodies.extend(batch)
                    await send_batch(batch)

            async def send_batch(batch: list[tuple[str, bytes]]) -> None:
                queue = iter(batch)

                async def worker() -> None:
                    for _, body in queue:
                        status = await poster.post(body)
                        statuses[status] = statuses.get(status, 0) + 1

                await asyncio.gather(*(worker() for _ in range(a.concurrency)))

            await send(a.warm_up, 1000)

            def control(*args: str) -> None:
                subprocess.run(
                    ["callgrind_control", *args, str(relay.pid)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )

            control("-i", "on")
            control("-z")
            started = time.monotonic()
            await send(a.events, a.events)  # one slice: no lulls
            seconds = time.monotonic() - started
            control("-d")
            control("-i", "off")
            poster.close()
            dumps = sorted(work.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
            text = dumps[-1].read_text(errors="replace")
            match = re.search(r"^(?:summary|totals): ([\d ]+)", text, re.M)
            names = re.search(r"^events: (.+)$", text, re.M)
            if match is None or names is None:
                raise RuntimeError(f"no totals in {dumps[-1]}")
            totals = map(int, match.group(1).split())
            counts = dict(zip(names.group(1).split(), totals, strict=True))
            if a.keep_dump:
                shutil.copy(dumps[-1], a.keep_dump)
            got = await receipts(f"https://127.0.0.1:{hub_port}", certs.ca_file)
            calls = [call for call, _ in got]
            wanted = {c for c, _ in bodies}
            per_call: dict[str, int] = {}
            for c in calls:
                per_call[c] = per_call.get(c, 0) + 1
            missing = sum(1 for c in wanted if per_call.get(c, 0) < a.devices)
            duplicated = sum(1 for c in wanted if per_call.get(c, 0) > a.devices)
            print(
                orjson.dumps(
                    {
                        "ir": counts["Ir"],
                        # with --cache-sim: last-level misses (instruction + data reads and
                        # writes), the simulated cost that instructions leave out
                        "ll_misses": sum(counts.get(k, 0) for k in ("ILmr", "DLmr", "DLmw")),
                        "d1_misses": counts.get("D1mr", 0) + counts.get("D1mw", 0),
                        # with --branch-sim: mispredicted conditional / indirect branches
                        "branch_misses": [counts.get("Bcm", 0), counts.get("Bim", 0)],
                        "events": a.events,
                        "seconds": seconds,
                        "statuses": {str(k): v for k, v in statuses.items()},
                        "missing": missing,
                        "duplicated": duplicated,
                    }
                ).decode(),
                flush=True,
            )
        finally:
            for proc in (relay, hub):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            shutil.rmtree(work, ignore_errors=True)

    asyncio.run(go())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", action="append", help="a tree's src/ (repeat; default: src)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--identities", type=int, default=2_000)
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--warm-up", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--keep-dump", help="copy the last round's callgrind dump here (for callgrind_annotate)"
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches (valgrind --cache-sim=yes, ~2x slower): L1 data and "
        "last-level misses per event",
    )
    parser.add_argument(
        "--last-level",
        type=int,
        help="with --cache-sim: the simulated last-level cache's size in bytes (8-way, 64-byte "
        "lines). valgrind takes the host's L3 (32 MB here, shared with other VMs); 524288 "
        "simulates this EPYC's 512 KB L2 per core instead, whose misses the L3 then serves",
    )
    parser.add_argument(
        "--branch-sim",
        action="store_true",
        help="also simulate branch prediction (valgrind --branch-sim=yes): mispredicted "
        "conditional and indirect branches per event",
    )
    parser.add_argument(
        "--wrk-shaped",
        action="store_true",
        help="post the deliveries wrk posts in relay_bench.py and hotpath_pairs.py (one "
        "serverCallId and context for all, ids counting up, eventTime in whole seconds) "
        "instead of make_bodies' (random ids, serverCallId and context per event)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        child(a)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt install valgrind)", file=sys.stderr)
        return 2
    trees = [str(Path(s).resolve()) for s in (a.src or [str(ROOT / "src")])]
    print(
        f"callgrind instructions per IncomingCall: {a.devices} device(s) per callee, "
        f"{a.identities:,} callees, {a.warm_up} warm-up + {a.events} measured events at "
        f"concurrency {a.concurrency}, {a.rounds} round(s), trees alternating; "
        f"python {sys.version.split()[0]}",
        flush=True,
    )
    figures: dict[str, list[float]] = {t: [] for t in trees}
    misses: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
    for round_ in range(1, a.rounds + 1):
        for tree in trees:
            args = [sys.executable, __file__, "--child", "--devices", str(a.devices)]
            args += ["--identities", str(a.identities), "--events", str(a.events)]
            args += ["--warm-up", str(a.warm_up), "--concurrency", str(a.concurrency)]
            args += ["--cache-sim"] if a.cache_sim else []
            args += ["--last-level", str(a.last_level)] if a.last_level else []
            args += ["--branch-sim"] if a.branch_sim else []
            args += ["--wrk-shaped"] if a.wrk_shaped else []
            if a.keep_dump:
                args += ["--keep-dump", f"{a.keep_dump}.{trees.index(tree)}"]
            env = {**os.environ, "PYTHONPATH": tree}
            done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            if done.returncode != 0 or not line.startswith("{"):
                print(done.stdout, done.stderr, file=sys.stderr)
                return 1
            import json

            r = json.loads(line)
            per_event = r["ir"] / r["events"]
            figures[tree].append(per_event)
            misses[tree].append((r["d1_misses"] / r["events"], r["ll_misses"] / r["events"]))
            cache = (
                f", {misses[tree][-1][0]:,.0f} L1d + {misses[tree][-1][1]:,.0f} LL misses/event"
                if a.cache_sim
                else ""
            )
            if a.branch_sim:
                cond, indirect = (n / r["events"] for n in r["branch_misses"])
                cache += f", {cond:,.0f} conditional + {indirect:,.0f} indirect mispredicted"
            print(
                f"  round {round_} {tree}: {per_event / 1e6:7.3f} M instructions/event{cache} "
                f"({r['events']} events in {r['seconds']:.1f} s under valgrind; statuses "
                f"{r['statuses']}, missing {r['missing']}, duplicated {r['duplicated']})",
                flush=True,
            )
            if r["missing"] or r["duplicated"] or set(r["statuses"]) != {"200"}:
                print("    pushes missing or duplicated, or answers not 200", flush=True)
                return 1
    base = statistics.median(figures[trees[0]])
    for tree in trees:
        med = statistics.median(figures[tree])
        spread = f"{min(figures[tree]) / 1e6:.3f}-{max(figures[tree]) / 1e6:.3f}"
        print(f"{tree}: median {med / 1e6:.3f} M ({spread}) = {med / base:.3f}x the first tree")
        if a.cache_sim:
            d1 = statistics.median(m[0] for m in misses[tree])
            ll = statistics.median(m[1] for m in misses[tree])
            d1_base = statistics.median(m[0] for m in misses[trees[0]])
            ll_base = statistics.median(m[1] for m in misses[trees[0]])
            print(
                f"    L1 data misses {d1:,.0f}/event = {d1 / d1_base:.3f}x, last-level misses "
                f"{ll:,.0f}/event = {ll / ll_base:.3f}x the first tree"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
