"""The ceiling, measured in the same run: uvicorn + Starlette that parses the delivery and
forwards one POST per event through a shared aiohttp session (HTTPS, cached SAS) and does nothing
else: no registry, no ledger, no retries. The shape measured in
shared/notes/http-client-ceilings.md ("relay through a shared aiohttp.ClientSession"), plus TLS.
ringrelay's throughput as a share of this one is steadier than its raw figure on a noisy VM."""

from __future__ import annotations

import argparse
import contextlib
import ssl
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ringrelay.config import parse_connection_string
from ringrelay.providers.notificationhubs import make_sas_token


def build_app(conn_str: str, hub: str, ca_file: str) -> Starlette:
    conn = parse_connection_string(conn_str)
    resource = f"{conn.endpoint}{hub}"
    url = f"{resource}/messages/?direct&api-version=2020-06"
    sas = make_sas_token(resource, conn.key_name, conn.key, int(time.time()) + 3600)
    state: dict[str, aiohttp.ClientSession] = {}

    async def events(request: Request) -> Response:
        for event in orjson.loads(await request.body()):
            body = {"aps": {}, "data": {"callId": event["data"]["correlationId"]}}
            headers = {
                "Authorization": sas,
                "ServiceBusNotification-Format": "apple",
                "ServiceBusNotification-DeviceHandle": "ab" * 32,
                "Content-Type": "application/json",
            }
            async with state["session"].post(url, data=orjson.dumps(body), headers=headers) as r:
                await r.read()
        return Response(b"{}", media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx = ssl.create_default_context(cafile=ca_file)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            state["session"] = session
            yield

    return Starlette(routes=[Route("/api/events", events, methods=["POST"])], lifespan=lifespan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--hub", required=True)
    parser.add_argument("--ca-file", required=True)
    a = parser.parse_args()
    uvicorn.run(
        build_app(a.connection_string, a.hub, a.ca_file),
        host="127.0.0.1",
        port=a.port,
        log_level="warning",
        access_log=False,
    )
