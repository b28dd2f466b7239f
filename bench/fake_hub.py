"""The fake Notification Hubs in bench mode (no bodies kept, only (callId, receipt time)), as its
own process so that it can be pinned to a core."""

from __future__ import annotations

import argparse
import asyncio
import gc

import uvloop

from ringrelay.fakes.notificationhubs import FakeNotificationHubs


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-dir", required=True)
    parser.add_argument("--hub", default="bench")
    parser.add_argument("--key", default="bench-key")
    args = parser.parse_args()
    fake = FakeNotificationHubs(hub=args.hub, key=args.key, record_bodies=False)
    await fake.start("127.0.0.1", args.port, args.tls_dir)
    # As `ringrelay serve` does: the start-up objects frozen out of the collector's walks and
    # fewer, larger collections (full ones of 12-22 ms had shown as relay latency at p99).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    # uvloop (installed with uvicorn[standard]): the fakes share a core with the load generator,
    # and their cost must not be what the benchmark measures.
    uvloop.run(main())
