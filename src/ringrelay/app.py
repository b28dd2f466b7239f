"""The ASGI application: wires the running service (`relay.Relay`) to the HTTP routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from ringrelay import __version__
from ringrelay.api import calls, compat, numbers, registry, webhook
from ringrelay.api.middleware import ResponseGuard, validation_error_response
from ringrelay.config import Settings
from ringrelay.ops import dashboard
from ringrelay.relay import Relay, make_relay, purge_loop, refresh_registration_counts
from ringrelay.store import StoreNotWritable

log = logging.getLogger("ringrelay")


class RelayApp(FastAPI):
    """FastAPI, with the webhook served on a short path: Event Grid's POSTs skip the routing and
    dependency machinery (about a tenth of the hot path's CPU on the benchmark); the route stays
    declared for the OpenAPI schema."""

    webhook: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.webhook is not None and scope["type"] == "http" and scope["path"] == "/api/events":
            scope["app"] = self
            await self.webhook(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


@contextlib.asynccontextmanager
async def relay_running(relay: Relay) -> AsyncIterator[None]:
    """Open the store, start the providers and the purge loop; undo it all on the way out. The
    ASGI lifespan runs it, and so does any other host of the relay (Azure Functions)."""
    await relay.store.open()
    for provider in relay.router.providers():
        await provider.start()
    call_router = relay.call_router
    if call_router is not None and call_router.call_automation is not None:
        await call_router.call_automation.start()
        log.info("call routing: %s", call_router.call_automation.description)
    log.info(
        "ringrelay %s: store %s, delivery %s, registrar auth %s",
        __version__,
        relay.store.description,
        relay.delivery_description,
        relay.guard.description,
    )
    if not relay.guard.required and await relay.store.active_api_keys():
        # Keys no longer switch authentication on by existing (issue 17): say so, since a
        # deployment may have relied on that.
        log.warning(
            "registrar authentication is off, yet API keys are active: they are not "
            "required; set RINGRELAY_AUTH_REQUIRED=true to require them"
        )
    elif relay.guard.required and await relay.guard.no_credential_can_pass():
        log.warning(
            "registrar authentication is required but nothing can authenticate (no JWT "
            "issuer, no active API key): registrar requests get 503 until `ringrelay keys "
            "create` makes a key"
        )
    relay.tasks.append(asyncio.create_task(purge_loop(relay)))
    try:
        yield
    finally:
        for task in relay.tasks:
            task.cancel()
        for provider in relay.router.providers():
            await provider.close()
        if call_router is not None and call_router.call_automation is not None:
            await call_router.call_automation.close()
        await relay.store.close()


def create_app(settings: Settings, relay: Relay | None = None) -> FastAPI:
    relay = relay or make_relay(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with relay_running(relay):
            yield

    app = RelayApp(
        title="ringrelay",
        version=__version__,
        summary="Azure Communication Services events in, VoIP pushes out.",
        lifespan=lifespan,
    )
    app.state.relay = relay
    app.add_middleware(
        ResponseGuard,
        max_request_bytes=settings.max_request_bytes,
        body_timeout=settings.body_timeout_seconds,
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(StoreNotWritable)
    async def _not_writable(request: Request, exc: StoreNotWritable) -> JSONResponse:
        # The storage's fault (disk full, read-only), not the request's: retry later. The
        # cause is the store's own words (a path and SQLite's or PostgreSQL's message).
        log.error("store not writable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"error": f"store not writable: {exc}; nothing was stored, retry later"},
            status_code=503,
            headers={"Retry-After": "30"},
        )

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Store reachable and writable, a provider configured",
    )
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        ready = True
        try:
            await relay.store.ping()
            checks["store"] = "ok"
        except StoreNotWritable as exc:
            checks["store"] = f"not writable: {exc}"
            ready = False
        except Exception as exc:
            checks["store"] = f"unreachable: {type(exc).__name__}"
            ready = False
        providers = relay.router.providers()
        checks["delivery"] = relay.delivery_description if providers else "no provider"
        ready = ready and bool(providers)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics() -> Response:
        await refresh_registration_counts(relay)
        return Response(generate_latest(relay.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    webhook.install(app)
    app.webhook = webhook.asgi_endpoint  # guards itself: security headers, plain 500s
    app.include_router(registry.router)
    app.include_router(calls.router)
    app.include_router(compat.router)
    app.include_router(numbers.router)
    app.include_router(dashboard.router)
    return app
