"""The fake APNs and fake FCM in bench mode, in one process pinned to the load core; the receipts
of both are served like the fake hub's (`GET` / `DELETE /_fake/pushes` over HTTPS), so that the
relay benchmark's harness reads them unchanged."""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path

import uvloop
from aiohttp import web

from ringrelay.fakes.apns import FakeAPNs
from ringrelay.fakes.fcm import FakeFCM
from ringrelay.fakes.tls import make_test_certificates


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--apns-port", type=int, required=True)
    parser.add_argument("--fcm-port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--tls-dir", required=True)
    parser.add_argument("--team-id", required=True)
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--public-key", required=True, help="PEM of the APNs key's public half")
    parser.add_argument("--bundle-id", required=True)
    parser.add_argument("--service-account", required=True)
    parser.add_argument(
        "--framing",
        choices=["lean", "h2"],
        default="lean",
        help="the fakes' HTTP/2 server side (src/ringrelay/fakes/h2lean.py says why lean)",
    )
    args = parser.parse_args()

    apns = FakeAPNs(record_bodies=False, validate_headers=False, framing=args.framing)
    apns.add_key(args.team_id, args.key_id, Path(args.public_key).read_bytes(), {args.bundle_id})
    fcm = FakeFCM(record_bodies=False, validate_headers=False, framing=args.framing)
    await apns.start("127.0.0.1", args.apns_port, args.tls_dir)
    await fcm.start("127.0.0.1", args.fcm_port, args.tls_dir)
    fcm.trust_service_account(args.service_account)

    async def pushes(request: web.Request) -> web.Response:
        return web.json_response({"receipts": apns.receipts.as_json() + fcm.receipts.as_json()})

    async def reset(request: web.Request) -> web.Response:
        apns.receipts.clear()
        fcm.receipts.clear()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/_fake/pushes", pushes)
    app.router.add_delete("/_fake/pushes", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = make_test_certificates(args.tls_dir).server_context(["http/1.1"])
    await web.TCPSite(runner, "127.0.0.1", args.control_port, ssl_context=ctx).start()
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
