"""The ASGI application: wiring of settings, store, providers and the HTTP routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ringrelay import __version__
from ringrelay.config import Settings
from ringrelay.delivery import Dispatcher, ProviderRouter
from ringrelay.metrics import Metrics
from ringrelay.models import Platform
from ringrelay.providers import PushProvider
from ringrelay.providers.sandbox import SandboxProvider
from ringrelay.security import Guard
from ringrelay.store import Store, open_store

log = logging.getLogger("ringrelay")


def build_router(settings: Settings) -> tuple[ProviderRouter, SandboxProvider | None, str]:
    """Providers per platform (and per app for direct transports) from the settings; returns the
    router, the sandbox if any platform uses it, and a description for start-up and /readyz."""
    transports = settings.transport_routes()
    routes: dict[Platform, PushProvider] = {}
    apps: dict[Platform, dict[str, PushProvider]] = {}
    described: list[str] = []
    sandbox: SandboxProvider | None = None
    nh: PushProvider | None = None
    for platform, transport in transports.items():
        if transport == "sandbox":
            if sandbox is None:
                sandbox = SandboxProvider(settings.sandbox_capacity)
                described.append(sandbox.description)
            routes[platform] = sandbox
        elif transport == "notificationhubs":
            if nh is None:
                nh = _notification_hubs(settings)
                described.append(nh.description)
            routes[platform] = nh
        else:
            by_app = _direct_apps(settings, transport)
            apps[platform] = by_app
            described += [p.description for p in by_app.values()]
            if len(by_app) == 1:  # one app: registrations need not name it
                routes[platform] = next(iter(by_app.values()))
    return ProviderRouter(routes, apps), sandbox, "; ".join(described) or "none"


def _notification_hubs(settings: Settings) -> PushProvider:
    from ringrelay.providers.notificationhubs import NotificationHubsProvider

    return NotificationHubsProvider(
        settings.nh_connection(),
        settings.nh_messages_url(),
        settings.nh_resource_uri(),
        settings.nh_api_version,
        timeout=settings.nh_timeout_seconds,
        sas_ttl=settings.nh_sas_ttl_seconds,
        ca_file=str(settings.nh_ca_file) if settings.nh_ca_file else None,
        max_connections=settings.nh_max_connections,
        max_in_flight=settings.nh_max_in_flight,
    )


def _direct_apps(settings: Settings, transport: str) -> dict[str, PushProvider]:
    by_app: dict[str, PushProvider] = {}
    if transport == "apns":
        from ringrelay.providers.apns import ApnsProvider, ProviderToken, load_signing_key

        # One provider token per signing key, whichever apps use it (Apple: the same token may
        # be used on every connection; renewing it per connection earns 429s).
        tokens: dict[tuple[str, str], ProviderToken] = {}
        for app in settings.apns:
            token = tokens.get((app.team_id, app.key_id))
            if token is None:
                token = ProviderToken(app.team_id, app.key_id, load_signing_key(app.key_file))
                tokens[(app.team_id, app.key_id)] = token
            by_app[app.name] = ApnsProvider(
                app_id=app.name,
                bundle_id=app.bundle_id,
                token=token,
                environment=app.environment,
                endpoint=app.endpoint,
                ca_file=str(app.ca_file) if app.ca_file else None,
                timeout=app.timeout_seconds,
                max_connections=app.max_connections,
                max_in_flight=app.max_in_flight,
            )
    else:
        from ringrelay.providers.fcm import FcmProvider

        for fcm in settings.fcm:
            by_app[fcm.name] = FcmProvider(
                app_id=fcm.name,
                service_account_file=fcm.service_account_file,
                endpoint=fcm.endpoint,
                ca_file=str(fcm.ca_file) if fcm.ca_file else None,
                timeout=fcm.timeout_seconds,
                max_connections=fcm.max_connections,
                max_in_flight=fcm.max_in_flight,
            )
    return by_app


@dataclass
class Relay:
    """Everything a request handler needs, kept on `app.state.relay`."""

    settings: Settings
    store: Store
    router: ProviderRouter
    dispatcher: Dispatcher
    metrics: Metrics
    sandbox: SandboxProvider | None
    delivery_description: str
    guard: Guard
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    webhook_in_progress: int = 0  # deliveries being handled now (see webhook_max_concurrent)


def make_relay(settings: Settings) -> Relay:
    metrics = Metrics()
    store = open_store(settings.database_url)
    router, sandbox, description = build_router(settings)
    dispatcher = Dispatcher(
        store, router, metrics, ring_window_seconds=settings.ring_window_seconds
    )
    return Relay(
        settings, store, router, dispatcher, metrics, sandbox, description, Guard(settings, store)
    )


async def _purge_loop(relay: Relay) -> None:
    while True:
        await asyncio.sleep(relay.settings.purge_interval_seconds)
        try:
            counts = await relay.store.purge(time.time(), relay.settings.ledger_retention_seconds)
            if counts.registrations or counts.events or counts.deliveries:
                log.info(
                    "purged %d expired registration(s), %d event(s), %d delivery record(s)",
                    counts.registrations,
                    counts.events,
                    counts.deliveries,
                )
        except Exception:
            log.exception("purge failed; will try again")


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """422 naming each bad field; never echoes the input (it may be a token)."""
    detail = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        field_path = [p for p in loc if p not in ("body", "path", "query")]
        detail.append(
            {
                "field": ".".join(field_path) or (loc[-1] if loc else "body"),
                "loc": loc,
                "msg": str(err.get("msg", "invalid")).removeprefix("Value error, "),
            }
        )
    return JSONResponse({"detail": detail}, status_code=422)


_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOC_PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")


class ResponseGuard:
    """Security headers on every response, and an unhandled error becomes a logged, plain 500
    (no stack trace to the client). Pure ASGI: no per-request task or body copy. The
    interactive docs pages load scripts, so they do without the CSP."""

    def __init__(self, app: ASGIApp, max_request_bytes: int = 64 * 1024) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _SECURITY_HEADERS if scope["path"] in _DOC_PAGES else [*_SECURITY_HEADERS, _CSP]
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        if scope["path"] != "/api/events":  # the webhook enforces its own, larger limit
            if self._declared_too_large(scope):
                await self._answer(send_with_headers, 413, b'{"error":"request body too large"}')
                return
            receive = self._limited(receive)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a clean answer; the server closes the connection
            await self._answer(send_with_headers, 500, b'{"error":"internal error"}')

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                return bool(value.isdigit() and int(value) > self.max_request_bytes)
        return False

    def _limited(self, receive: Receive) -> Receive:
        """Counts a streamed body; past the limit the route sees a 413 HTTPException."""
        limit = self.max_request_bytes
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(status_code=413, detail="request body too large")
            return message

        return limited_receive


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


def create_app(settings: Settings, relay: Relay | None = None) -> FastAPI:
    from ringrelay import compat_api, registry_api, webhook

    relay = relay or make_relay(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await relay.store.open()
        for provider in relay.router.providers():
            await provider.start()
        log.info(
            "ringrelay %s: store %s, delivery %s",
            __version__,
            relay.store.description,
            relay.delivery_description,
        )
        relay.tasks.append(asyncio.create_task(_purge_loop(relay)))
        try:
            yield
        finally:
            for task in relay.tasks:
                task.cancel()
            for provider in relay.router.providers():
                await provider.close()
            await relay.store.close()

    app = RelayApp(
        title="ringrelay",
        version=__version__,
        summary="Azure Communication Services events in, VoIP pushes out.",
        lifespan=lifespan,
    )
    app.state.relay = relay
    app.add_middleware(ResponseGuard, max_request_bytes=settings.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()))

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Store reachable and a provider configured")
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        ready = True
        try:
            await relay.store.ping()
            checks["store"] = "ok"
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
        return Response(generate_latest(relay.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    webhook.install(app)
    app.webhook = ResponseGuard(webhook.asgi_endpoint)
    app.include_router(registry_api.router)
    app.include_router(compat_api.router)
    return app
