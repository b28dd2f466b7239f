"""The baseline: the same job done the way Microsoft's sample does it (IncomingCallEventHandler.cs):
look the callee up, then for each device one after another a new HTTP client, a new SAS token and
one POST, no retries. A new Python client means a new SSL context and a new TLS connection, as a
new .NET HttpClient per push means a new connection. Only the sample's per-push costs are modelled;
parsing and payload building reuse ringrelay's code so that the comparison is about delivery."""

from __future__ import annotations

import argparse
import sqlite3
import ssl
import time

import aiohttp
import orjson
from aiohttp import web

from ringrelay.config import parse_connection_string
from ringrelay.payloads import apns_voip_body, call_push_from_incoming_call, fcm_v1_message
from ringrelay.providers.notificationhubs import make_sas_token


def new_ssl_context(ca_file: str, trust: str) -> ssl.SSLContext:
    """What a fresh client's TLS set-up costs.

    `system`: a new Python client to a public-CA endpoint (the real hub) loads the system trust
    store; the test CA is added so that the fake hub verifies. `ca-only`: only the one test
    certificate is loaded, so a push costs little more than a new TCP+TLS connection (closer to
    .NET, whose new HttpClient opens a connection but does not reload the OS trust store).
    """
    if trust == "system":
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(ca_file)
        return ctx
    return ssl.create_default_context(cafile=ca_file)


def build_app(db_path: str, conn_str: str, hub: str, ca_file: str, trust: str) -> web.Application:
    conn = parse_connection_string(conn_str)
    resource = f"{conn.endpoint}{hub}"
    url = f"{resource}/messages/?direct&api-version=2015-01"
    db = sqlite3.connect(db_path, check_same_thread=False)

    async def events(request: web.Request) -> web.Response:
        for event in orjson.loads(await request.read()):
            call = call_push_from_incoming_call(event["data"])
            rows = db.execute(
                "SELECT platform, token FROM registrations WHERE identity = ?",
                (call.recipient_id,),
            ).fetchall()
            for platform, token in rows:
                sas = make_sas_token(resource, conn.key_name, conn.key, int(time.time()) + 300)
                fmt = "apple" if platform == "apns" else "fcmv1"
                body = apns_voip_body(call) if fmt == "apple" else fcm_v1_message(call, 45)
                headers = {
                    "Authorization": sas,
                    "ServiceBusNotification-Format": fmt,
                    "ServiceBusNotification-DeviceHandle": token,
                    "Content-Type": "application/json",
                }
                if fmt == "apple":
                    headers["ServiceBusNotification-Apns-Push-Type"] = "voip"
                ctx = new_ssl_context(ca_file, trust)
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
                    session.post(url, data=orjson.dumps(body), headers=headers) as resp,
                ):
                    await resp.read()  # the sample only logs the outcome
        return web.Response(status=200)

    app = web.Application(client_max_size=2**20)
    app.router.add_post("/api/events", events)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--hub", required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--trust", choices=["system", "ca-only"], default="system")
    a = parser.parse_args()
    web.run_app(
        build_app(a.db, a.connection_string, a.hub, a.ca_file, a.trust),
        host="127.0.0.1",
        port=a.port,
        access_log=None,
        print=None,
    )
