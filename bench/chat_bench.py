"""Chat benchmark: ChatMessageReceived deliveries into ringrelay (through the fake Notification
Hubs over TLS), next to IncomingCall deliveries measured in the same run and the same way.

    python bench/chat_bench.py            # 50,000 recipients, 10 s phases
    python bench/chat_bench.py --quick    # 5,000 recipients, 4 s phases

Layout as relay_bench.py: ringrelay pinned to core 0, the load generator and the fake hub on
core 1. For each of 1 and 5 devices per recipient: a closed loop (64 connections) of IncomingCall
to VoIP devices (the call figure), then of ChatMessageReceived to alert devices in the
`notification` format, then in the Chat SDK's encrypted `sdk` format (one AES-256-CBC + HMAC per
device per message, each device with its own key, sealed at rest). Each phase's pushes are
counted at the hub: messages x devices must arrive, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from relay_bench import (
    HUB,
    KEY,
    LOAD_CORE,
    SERVER_CORE,
    closed_loop,
    free_port,
    make_bodies,
    pin,
    receipts,
    spawn,
    wait_ready,
)

from ringrelay.chat.keys import ChatKeyVault
from ringrelay.fakes.tls import make_test_certificates
from ringrelay.models import ChatFormat, Platform, PushKind, Registration
from ringrelay.simulate import chat_message_event
from ringrelay.store.sqlite import SQLiteStore

HERE = Path(__file__).resolve().parent
SENDER = "8:acs:bench_sender"


async def seed(path: Path, identities: int, devices: int, master: bytes) -> None:
    """Per n: `8:acs:bench_<n>` with VoIP devices (calls), `8:acs:chat_<n>` with alert devices
    in the notification format, `8:acs:sdk_<n>` with alert devices in the SDK format. Devices are
    3 APNs + 2 FCM of 5, as in relay_bench."""
    store = SQLiteStore(str(path))
    await store.open()
    vault = ChatKeyVault(master)
    now = time.time()
    batch: list[Registration] = []
    for n in range(identities):
        for prefix, kind, fmt in (
            ("bench", PushKind.VOIP, ChatFormat.NOTIFICATION),
            ("chat", PushKind.ALERT, ChatFormat.NOTIFICATION),
            ("sdk", PushKind.ALERT, ChatFormat.SDK),
        ):
            identity = f"8:acs:{prefix}_{n}"
            for d in range(devices):
                apns = d % 5 < 3
                batch.append(
                    Registration(
                        identity=identity,
                        device_id=f"dev{d}",
                        platform=Platform.APNS if apns else Platform.FCM,
                        token=(f"{n:016x}{d:08x}{ord(prefix[0]):08x}" * 2)
                        if apns
                        else f"fcm:{prefix}:{n}:{d}",
                        push_kind=kind,
                        app_id=None,
                        created_at=now,
                        updated_at=now,
                        expires_at=now + 86400,
                        chat_format=fmt,
                        chat_key=vault.seal(os.urandom(64), identity, f"dev{d}")
                        if fmt is ChatFormat.SDK
                        else None,
                    )
                )
        if len(batch) >= 30_000:
            await store.bulk_insert_registrations(batch)
            batch = []
    if batch:
        await store.bulk_insert_registrations(batch)
    await store.close()


def chat_bodies(count: int, identities: int, prefix: str) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        n = random.randrange(identities)
        event = chat_message_event(
            f"8:acs:{prefix}_{n}",
            SENDER,
            "Are we still on for the 3 pm review? I moved it to room 4.",
            "Bench Sender",
            thread_id=f"19:bench{n % 997}@thread.v2",
            message_id=f"{int(time.time() * 1000)}{i:07d}",
        )
        out.append((str(uuid.uuid4()), orjson.dumps([event])))
    return out


async def phase(
    url: str, hub_url: str, ca: Path, bodies: list[tuple[str, bytes]], seconds: float, devices: int
) -> dict[str, Any]:
    # Warm-up (connections, caches), then the hub's receipts are cleared and the phase counts.
    await closed_loop(url, bodies[:2000], 1.0, 64, warm_up=True)
    await receipts(hub_url, ca)
    measured = await closed_loop(url, bodies[2000:], seconds, 64)
    await asyncio.sleep(0.5)
    got = len(await receipts(hub_url, ca))
    expected = measured.events * devices
    return {
        "events_per_s": measured.rate,
        "pushes_per_s": got / measured.seconds,
        "statuses": dict(measured.statuses),
        "pushes": got,
        "expected": expected,
    }


async def run(a: Any) -> list[dict[str, Any]]:
    pin(LOAD_CORE)
    work = Path(tempfile.mkdtemp(prefix="ringrelay-chat-bench-"))
    certs = make_test_certificates(work / "tls")
    master = os.urandom(32)
    hub_port = free_port()
    hub = spawn(
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
        LOAD_CORE,
    )
    procs = [hub]
    rows: list[dict[str, Any]] = []
    try:
        assert hub.stdout is not None
        if hub.stdout.readline().strip() != "ready":
            raise RuntimeError("fake hub failed to start")
        hub_url = f"https://127.0.0.1:{hub_port}"
        conn = (
            f"Endpoint=sb://127.0.0.1:{hub_port}/;SharedAccessKeyName="
            f"DefaultFullSharedAccessSignature;SharedAccessKey={KEY}"
        )
        budget = int(a.seconds * 4000) + 4000  # more bodies than a fast machine would use
        for devices in (1, 5):
            db = work / f"registry-{devices}.db"
            t0 = time.monotonic()
            await seed(db, a.identities, devices, master)
            print(
                f"seeded 3 x {a.identities:,} recipients x {devices} device(s) in "
                f"{time.monotonic() - t0:.1f}s",
                flush=True,
            )
            port = free_port()
            env = {
                "RINGRELAY_DATABASE_URL": f"sqlite:///{db}",
                "RINGRELAY_NH_CONNECTION_STRING": conn,
                "RINGRELAY_NH_HUB_NAME": HUB,
                "RINGRELAY_NH_CA_FILE": str(certs.ca_file),
                "RINGRELAY_LOG_LEVEL": "WARNING",
                "RINGRELAY_CHAT_KEY_ENCRYPTION_KEY": base64.b64encode(master).decode(),
            }
            proc = spawn(
                [sys.executable, "-m", "ringrelay", "serve", "--port", str(port)],
                SERVER_CORE,
                env,
                work / f"ringrelay-{devices}.log",
            )
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url, proc)
            # Bodies are made just before their phase: a call's eventTime must be in the ring.
            for label, make in (
                ("IncomingCall -> voip", lambda: make_bodies(budget, a.identities)),
                ("chat, notification", lambda: chat_bodies(budget, a.identities, "chat")),
                ("chat, sdk (AES+HMAC)", lambda: chat_bodies(budget, a.identities, "sdk")),
            ):
                result = await phase(
                    f"{url}/api/events", hub_url, certs.ca_file, make(), a.seconds, devices
                )
                result.update(label=label, devices=devices)
                rows.append(result)
                print(
                    f"  {label:<22} {devices} device(s): {result['events_per_s']:7.0f} events/s, "
                    f"{result['pushes_per_s']:7.0f} pushes/s, pushes {result['pushes']}/"
                    f"{result['expected']}, HTTP {result['statuses']}",
                    flush=True,
                )
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 recipients, 4 s phases")
    parser.add_argument("--identities", type=int)
    parser.add_argument("--seconds", type=float)
    a = parser.parse_args()
    a.identities = a.identities or (5_000 if a.quick else 50_000)
    a.seconds = a.seconds or (4.0 if a.quick else 10.0)
    print(
        f"chat_bench: {platform.python_version()}, {os.cpu_count()} cores, "
        f"{a.identities:,} recipients per kind, {a.seconds:.0f} s phases",
        flush=True,
    )
    rows = asyncio.run(run(a))
    bad = [r for r in rows if r["pushes"] < r["expected"] or set(r["statuses"]) != {200}]
    for r in bad:
        print(
            f"FAIL {r['label']} x{r['devices']}: {r['pushes']}/{r['expected']} pushes, "
            f"HTTP {r['statuses']}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
