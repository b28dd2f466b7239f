"""The relay hosted by Azure Functions (Python v2 model; `function_app.py` at the repository root
wires this to `azure.functions`, which this module does not import: a runtime install without the
[functions] extra must still import every ringrelay module).

One `FunctionsHost` per worker process: a worker serves many invocations, HTTP and Event Grid
trigger alike, and may be recycled at any time, so start-up (store pool, provider connections) is
done once, by whichever invocation comes first, under a lock.

What each entry point guarantees (the README's Deploy section says the same):
- the webhook (`POST /api/events` through the HTTP function) answers 503 while a transient
  failure remains; Event Grid retries, the ledger makes the retry push only unsettled devices;
- the Event Grid trigger cannot answer: a transient failure raises `TransientDeliveryFailure`,
  the Functions host reports the invocation failed, and Event Grid retries the same event id,
  with the same ledger. A malformed event or one for nobody returns normally (no retry helps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from ringrelay.config import ConfigError, Settings
from ringrelay.delivery.dispatcher import EventReport
from ringrelay.events.trigger import event_from_trigger
from ringrelay.models import EventStatus
from ringrelay.relay import Relay, make_relay

log = logging.getLogger("ringrelay.functions")

ALLOW_SQLITE_SETTING = "RINGRELAY_FUNCTIONS_ALLOW_SQLITE"


class TransientDeliveryFailure(Exception):
    """Some push of the event may still succeed: raised so that Event Grid retries it."""

    def __init__(self, report: EventReport) -> None:
        pending = sum(1 for d in report.deliveries if not d.status.settled)
        super().__init__(
            f"event {report.event_id}: {pending} delivery(ies) failed transiently; "
            "raising so that Event Grid retries"
        )
        self.report = report


def check_store(settings: Settings, allow_sqlite: bool) -> None:
    """Functions runs several workers at once and recycles them: a SQLite file cannot be shared."""
    if settings.database_url.startswith("sqlite:") and not allow_sqlite:
        raise ConfigError(
            "RINGRELAY_DATABASE_URL: Azure Functions runs several workers and recycles them, and "
            "a SQLite file belongs to one process: use PostgreSQL (postgresql://user@host/db). "
            f"For a local run with one worker only, set {ALLOW_SQLITE_SETTING}=1."
        )


class FunctionsHost:
    """The relay of one Functions worker: an ASGI app for the HTTP function, and the handler of
    the Event Grid trigger, sharing one `Relay`."""

    def __init__(self, settings: Settings, *, allow_sqlite: bool = False) -> None:
        from ringrelay.app import create_app

        check_store(settings, allow_sqlite)
        self.settings = settings
        self.relay: Relay = make_relay(settings)
        self.app = create_app(settings, self.relay)
        self._lock: asyncio.Lock | None = None
        self._running: contextlib.AsyncExitStack | None = None

    async def ensure_started(self) -> None:
        """Open the store and start the providers, once per worker whatever calls first."""
        if self._running is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._running is not None:
                return
            from ringrelay.app import relay_running

            stack = contextlib.AsyncExitStack()
            await stack.enter_async_context(relay_running(self.relay))
            self._running = stack
            log.info("Functions worker started: store %s", self.relay.store.description)

    async def stop(self) -> None:
        if self._running is not None:
            stack, self._running = self._running, None
            await stack.aclose()

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app handed to `func.AsgiFunctionApp`. Its lifespan messages start/stop the
        shared relay (idempotently: the trigger may have started it already)."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.ensure_started()
                    except Exception as exc:
                        log.exception("start-up failed")
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.ensure_started()
        await self.app(scope, receive, send)

    async def handle_trigger_event(
        self, event_id: object, event_type: object, event_time: object, data: Any
    ) -> EventReport:
        """One event from the Event Grid trigger, through the webhook's pipeline. Raises
        `TransientDeliveryFailure` while a push may still succeed (Event Grid then retries)."""
        await self.ensure_started()
        received_at = time.time()
        event = event_from_trigger(event_id, event_type, event_time, data)
        deadline = received_at + self.settings.webhook_deadline_seconds
        report = await self.relay.dispatcher.handle(event, received_at, deadline)
        log.info("trigger event %s: %s", report.event_id, report.status.value)
        if report.status is EventStatus.PENDING:
            raise TransientDeliveryFailure(report)
        return report


def host_from_environment() -> FunctionsHost:
    """The worker's host, from the app settings (environment variables; `local.settings.json`
    `Values` locally) and `RINGRELAY_CONFIG` if set."""
    import os

    from ringrelay.config import load_settings

    allow = os.environ.get(ALLOW_SQLITE_SETTING, "").strip().lower() in ("1", "true", "yes")
    return FunctionsHost(load_settings(), allow_sqlite=allow)
