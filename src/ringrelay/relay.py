"""The running service: settings, store, providers, dispatcher and guard, built once per process
and shared by every route (kept on `app.state.relay`)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ringrelay.auth.guard import Guard
from ringrelay.chat.keys import ChatKeyVault, parse_master_key
from ringrelay.config import Settings
from ringrelay.delivery.dispatcher import Dispatcher
from ringrelay.delivery.router import ProviderRouter
from ringrelay.events.table import event_kinds
from ringrelay.metrics import Metrics, provider_gauges
from ringrelay.models import Platform
from ringrelay.providers import PushProvider
from ringrelay.providers.sandbox import SandboxProvider
from ringrelay.routing.calls import CallRouter, build_call_router
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
    # Seals and opens the apps' chat keys; None without RINGRELAY_CHAT_KEY_ENCRYPTION_KEY.
    chat_keys: ChatKeyVault | None = None
    webhook_in_progress: int = 0  # deliveries being handled now (see webhook_max_concurrent)
    call_router: CallRouter | None = None  # rules, numbers, Call Automation (routing/)


def make_relay(settings: Settings) -> Relay:
    metrics = Metrics()
    store = open_store(settings.database_url)
    router, sandbox, description = build_router(settings)
    call_router = build_call_router(settings, store)
    master = settings.chat_key_encryption_key
    chat_keys = ChatKeyVault(parse_master_key(master.get_secret_value())) if master else None
    dispatcher = Dispatcher(
        store,
        router,
        metrics,
        ring_window_seconds=settings.ring_window_seconds,
        kinds=event_kinds(settings, call_router, chat_keys),
    )
    metrics.watch(provider_gauges(router.providers(), dispatcher._limits))
    return Relay(
        settings,
        store,
        router,
        dispatcher,
        metrics,
        sandbox,
        description,
        Guard(settings, store),
        call_router=call_router,
        chat_keys=chat_keys,
    )


REGISTRATION_COUNT_MAX_AGE = 30.0  # seconds: the gauge need not be fresher


async def refresh_registration_counts(relay: Relay) -> None:
    """Keeps the registrations-by-platform/kind gauge: at most one GROUP BY per 30 s, on a
    scrape (several Prometheus servers may scrape each instance)."""
    metrics = relay.metrics
    now = time.time()
    if now - metrics.registrations_counted_at < REGISTRATION_COUNT_MAX_AGE:
        return
    metrics.registrations_counted_at = now
    try:
        counts = await relay.store.registration_counts(now)
    except Exception:
        log.warning("counting registrations for the metrics failed; will try again")
        return
    metrics.set_registration_counts(counts)


async def purge_loop(relay: Relay) -> None:
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
