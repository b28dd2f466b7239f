"""`ringrelay` command line: serve, simulate, fake providers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ringrelay import __version__
from ringrelay.config import ConfigError, Settings, load_settings
from ringrelay.store import Store, open_store


class _RedactSecretQuery(logging.Filter):
    """The webhook URL carries its secret as `?code=`: keep it out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            path = str(args[2])
            if "code=" in path:
                args[2] = re.sub(r"(?<=[?&]code=)[^&]*", "<redacted>", path)
                record.args = tuple(args)
        return True


def _settings(args: argparse.Namespace) -> Settings | None:
    """The settings, or None after saying on stderr which one is wrong."""
    try:
        return load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"ringrelay: {exc}", file=sys.stderr)
        return None


@contextlib.asynccontextmanager
async def _opened_store(settings: Settings) -> AsyncIterator[Store]:
    store = open_store(settings.database_url)
    await store.open()  # also applies pending migrations
    try:
        yield store
    finally:
        await store.close()


async def _active_api_keys(settings: Settings) -> int:
    async with _opened_store(settings) as store:
        return await store.active_api_keys()


def _keys(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from ringrelay.auth.apikeys import new_api_key

    settings = _settings(args)
    if settings is None:
        return 2

    async def run() -> int:
        async with _opened_store(settings) as store:
            if args.action == "create":
                try:
                    full, record = new_api_key(args.name, args.scope or ["register"])
                except ValueError as exc:
                    print(f"ringrelay keys: {exc}", file=sys.stderr)
                    return 2
                await store.create_api_key(record)
                print(
                    f"created API key {record.key_id} ({record.name}), scopes: "
                    f"{' '.join(record.scopes)}"
                )
                print("the key is shown only now; store it in your backend's secret store:")
                print(full)
            elif args.action == "list":
                for key in await store.list_api_keys():
                    when = datetime.fromtimestamp(key.created_at, UTC).isoformat(timespec="seconds")
                    state = "revoked" if key.revoked_at else "active"
                    print(f"{key.key_id}  {state:7}  {' '.join(key.scopes):20}  {when}  {key.name}")
            else:
                if not await store.revoke_api_key(args.key_id, time.time()):
                    print(f"ringrelay keys: no active key {args.key_id}", file=sys.stderr)
                    return 1
                print(f"revoked API key {args.key_id}")
            return 0

    return asyncio.run(run())


def _db(args: argparse.Namespace) -> int:

    settings = _settings(args)
    if settings is None:
        return 2

    async def upgrade() -> str:
        async with _opened_store(settings) as store:  # migrations run (locked on PostgreSQL)
            return store.description

    print(f"schema up to date: {asyncio.run(upgrade())}")
    return 0


class _CountingReader:
    """A text file that counts what was read, for the import's progress line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.chars = 0

    def read(self, size: int, /) -> str:
        data: str = self.stream.read(size)
        self.chars += len(data)
        return data


def _import(args: argparse.Namespace) -> int:
    from ringrelay.migration.jsonstream import JsonStreamError, iter_json_values
    from ringrelay.migration.sample_mongo import ImportReport, import_documents
    from ringrelay.relay import build_router

    settings = _settings(args)
    if settings is None:
        return 2
    try:
        size = os.path.getsize(args.file)
        stream = open(args.file, encoding="utf-8-sig")  # closed by the with below
    except OSError as exc:
        print(f"ringrelay import: {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    reader = _CountingReader(stream)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    last = [0.0]

    def progress(report: ImportReport, final: bool = False) -> None:
        now = time.monotonic()
        if show and (final or now - last[0] >= 0.5):
            last[0] = now
            done = min(reader.chars / size, 1.0) if size else 1.0
            bar = "#" * int(done * 30)
            print(
                f"\r[{bar:<30}] {done:4.0%}  {report.documents:,} documents, "
                f"{report.imported + report.refreshed:,} stored, {report.refused:,} refused",
                end="",
                file=sys.stderr,
                flush=True,
            )

    router, _, _ = build_router(settings)
    ttl = args.ttl_seconds or settings.default_ttl_seconds

    async def run() -> ImportReport:
        async with _opened_store(settings) as store:
            return await import_documents(
                iter_json_values(reader),
                store,
                router,
                ttl,
                batch_size=args.batch_size,
                progress=progress,
            )

    try:
        with stream:
            report = asyncio.run(run())
    except JsonStreamError as exc:
        print(
            f"\nringrelay import: {args.file}: {exc}; the documents before it were imported "
            "(importing the file again after fixing it is safe)",
            file=sys.stderr,
        )
        return 2
    except UnicodeDecodeError as exc:
        print(f"\nringrelay import: {args.file}: not UTF-8 text ({exc.reason})", file=sys.stderr)
        return 2
    except Exception as exc:
        # The store went away for longer than the batch retries (the documents before the
        # failing batch are stored; the import is idempotent).
        print(
            f"\nringrelay import: the store failed ({type(exc).__name__}: {exc}); run the "
            "import again: what is stored already is only refreshed",
            file=sys.stderr,
        )
        return 1
    if show:
        progress(report, final=True)
        print(file=sys.stderr)
    print(f"import of {args.file} (Microsoft sample's MongoDB registrar collection):")
    for line in report.lines():
        print(f"  {line}")
    return 1 if report.refused else 0


def _export(args: argparse.Namespace) -> int:
    from ringrelay.migration.export import export_lines

    settings = _settings(args)
    if settings is None:
        return 2

    async def run(out: Any) -> int:
        count = 0
        async with _opened_store(settings) as store:
            async for line in export_lines(store, time.time(), args.format):
                out.write(line)
                count += 1
        return count

    if args.output in (None, "-"):
        count = asyncio.run(run(sys.stdout.buffer))
        sys.stdout.flush()
    else:
        with open(args.output, "wb") as out:
            count = asyncio.run(run(out))
    print(
        f"ringrelay export: {count} line(s) ({args.format}); they carry the device tokens in "
        "full: keep the file as safe as the database",
        file=sys.stderr,
    )
    return 0


def _eventgrid_subscription(args: argparse.Namespace) -> int:
    from ringrelay.provisioning.eventgrid import (
        CALL_LIFECYCLE,
        CHAT,
        INCOMING_CALL,
        SubscriptionError,
        SubscriptionSpec,
        arm_template,
        az_command,
    )

    settings = _settings(args)
    if settings is None:
        return 2
    filters: list[Any] = []
    if args.advanced_filters:
        try:
            with open(args.advanced_filters, "rb") as f:
                loaded = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError) as exc:
            print(f"ringrelay eventgrid: --advanced-filters: {exc}", file=sys.stderr)
            return 2
        # A list of filters, or an object carrying them as `advancedFilters`.
        filters = loaded.get("advancedFilters", []) if isinstance(loaded, dict) else loaded
        if not isinstance(filters, list):
            print("ringrelay eventgrid: --advanced-filters: expected a JSON list", file=sys.stderr)
            return 2
    tenant = args.entra_tenant_id or (settings.eventgrid_tenant_id if args.entra else None)
    audience = args.entra_audience or (settings.eventgrid_audience if args.entra else None)
    if args.entra and not (tenant and audience):
        print(
            "ringrelay eventgrid: --entra needs RINGRELAY_EVENTGRID_TENANT_ID and "
            "RINGRELAY_EVENTGRID_AUDIENCE (or --entra-tenant-id and --entra-audience)",
            file=sys.stderr,
        )
        return 2
    types = [INCOMING_CALL]
    if args.call_lifecycle:
        types += CALL_LIFECYCLE
    if args.chat:
        types += CHAT
    spec = SubscriptionSpec(
        endpoint=args.endpoint,
        name=args.name,
        event_types=types,
        with_secret=settings.webhook_secret is not None,
        entra_tenant_id=tenant,
        entra_audience=audience,
        max_delivery_attempts=args.max_delivery_attempts,
        event_ttl_minutes=args.event_ttl,
        max_events_per_batch=args.max_events_per_batch,
        advanced_filters=filters,
        dead_letter_storage_id=args.dead_letter_storage,
        dead_letter_container=args.dead_letter_container,
    )
    try:
        command, template = az_command(spec), arm_template(spec)
    except SubscriptionError as exc:
        print(f"ringrelay eventgrid: {exc}", file=sys.stderr)
        return 2
    if not spec.with_secret and not spec.entra_tenant_id:
        print(
            "ringrelay eventgrid: warning: neither RINGRELAY_WEBHOOK_SECRET nor --entra is set; "
            "anyone who finds the endpoint could post events to it",
            file=sys.stderr,
        )
    arm = orjson.dumps(template, option=orjson.OPT_INDENT_2).decode()
    if args.print in ("az", "both"):
        if args.print == "both":
            print("# az CLI (ACS_RESOURCE_ID: the Communication Services resource id)")
        print(command)
    if args.print in ("arm", "both"):
        if args.print == "both":
            print(
                "\n# ARM template: az deployment group create -g <group> --template-file <this> "
                "--parameters communicationServicesName=<acs> webhookSecret=<secret>"
            )
        print(arm)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ringrelay.app import create_app

    settings = _settings(args)
    if settings is None:
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if (
        not _is_loopback(args.host)
        and not settings.registrar_auth_enabled
        and not asyncio.run(_active_api_keys(settings))
    ):
        if not args.insecure:
            print(
                f"ringrelay: refusing to listen on {args.host} with no registrar authentication: "
                "anyone could register a phone for someone else's identity and receive their "
                "calls. Configure RINGRELAY_AUTH_ISSUER (see README, Security), bind to "
                "127.0.0.1 behind an authenticating proxy, or pass --insecure.",
                file=sys.stderr,
            )
            return 2
        logging.getLogger("ringrelay").warning(
            "INSECURE: listening on %s with no registrar authentication (--insecure)", args.host
        )
    if args.workers != 1:
        return _serve_workers(args, settings)
    logging.getLogger("uvicorn.access").addFilter(_RedactSecretQuery())
    app = create_app(settings)
    relay = app.state.relay
    print(
        f"ringrelay {__version__} on http://{args.host}:{args.port}\n"
        f"  store:    {relay.store.description}\n"
        f"  delivery: {relay.delivery_description}\n"
        f"  webhook:  POST http://{args.host}:{args.port}/api/events"
        + ("?code=<secret>" if settings.webhook_secret else " (no secret set)"),
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.webhook_deadline_seconds) + 2,
    )
    server = uvicorn.Server(config)
    # Everything allocated at start-up lives as long as the process: move it out of the
    # collector's sight, and collect young objects less often (the relay allocates many
    # short-lived ones per request; see ../shared/notes/http-client-ceilings.md).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    server.run()
    return 0


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    from ringrelay.hosting.workers import check_workers, serve_workers
    from ringrelay.relay import make_relay

    try:
        check_workers(settings, args.workers)
    except ConfigError as exc:
        print(f"ringrelay: {exc}", file=sys.stderr)
        return 2
    relay = make_relay(settings)  # for the banner only: each worker builds its own
    print(
        f"ringrelay {__version__} on http://{args.host}:{args.port}, {args.workers} workers\n"
        f"  store:    {relay.store.description}\n"
        f"  delivery: {relay.delivery_description}",
        flush=True,
    )
    serve_workers(settings, args.config, args.host, args.port, args.workers, args.access_log)
    return 0


async def _post(url: str, payload: bytes) -> tuple[int, Any]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp,
    ):
        text = await resp.read()
        try:
            return resp.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return resp.status, text.decode(errors="replace")


def _simulate(args: argparse.Namespace) -> int:
    from ringrelay.simulate import incoming_call_event

    event = incoming_call_event(args.to, args.caller, args.display_name)
    url = args.server.rstrip("/") + "/api/events"
    secret = args.secret or os.environ.get("RINGRELAY_WEBHOOK_SECRET")
    if secret:
        from urllib.parse import quote

        url += "?code=" + quote(secret, safe="")
    try:
        status, answer = asyncio.run(_post(url, orjson.dumps([event])))
    except OSError as exc:
        print(f"ringrelay simulate: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    call_id = event["data"]["correlationId"]
    print(f"IncomingCall {event['id']} (callId {call_id}) to {args.to}: HTTP {status}")
    if not isinstance(answer, dict) or "events" not in answer:
        print(f"  server said: {answer}")
        return 1
    for report in answer["events"]:
        deliveries = report.get("deliveries", [])
        accepted = sum(1 for d in deliveries if d["status"] == "accepted")
        print(
            f"  event status: {report['status']}"
            + (f" ({report['reason']})" if report.get("reason") else "")
        )
        print(f"  devices found: {len(deliveries)}, pushes accepted: {accepted}")
        for d in deliveries:
            line = (
                f"    - {d['device_id']} [{d['platform']}] {d['status']}"
                f" via {d['provider'] or '-'} after {d['attempts']} attempt(s)"
            )
            if d.get("reason"):
                line += f": {d['reason']}"
            print(line)
    return 0 if status == 200 else 1


def _fake(args: argparse.Namespace) -> int:
    if args.provider == "apns":
        from ringrelay.fakes import apns

        asyncio.run(
            apns.run_forever(args.host, args.port, args.tls_dir, args.bundle_id, args.team_id)
        )
    elif args.provider == "fcm":
        from ringrelay.fakes import fcm

        asyncio.run(fcm.run_forever(args.host, args.port, args.tls_dir, args.project))
    else:
        from ringrelay.fakes import notificationhubs

        asyncio.run(
            notificationhubs.run_forever(args.host, args.port, args.tls_dir, args.hub, args.key)
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringrelay", description="Azure Communication Services events in, VoIP pushes out."
    )
    parser.add_argument("--version", action="version", version=f"ringrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes behind the one port (PostgreSQL only; default 1)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without registrar authentication (warns)",
    )
    serve.set_defaults(func=_serve)

    sim = sub.add_parser("simulate", help="post a realistic event to a running server")
    sim_sub = sim.add_subparsers(dest="event", required=True)
    call = sim_sub.add_parser("incoming-call", help="a Microsoft.Communication.IncomingCall")
    call.add_argument("--to", required=True, help="callee rawId, e.g. 8:acs:<resource>_<user>")
    call.add_argument(
        "--from",
        dest="caller",
        default="8:acs:00000000-0000-0000-0000-000000000000_caller",
        help="caller rawId (4:+<E.164> for a phone caller)",
    )
    call.add_argument("--display-name", default="ringrelay simulator")
    call.add_argument("--server", default="http://127.0.0.1:8080")
    call.add_argument("--secret", help="webhook secret (default: RINGRELAY_WEBHOOK_SECRET)")
    call.set_defaults(func=_simulate)

    keys = sub.add_parser("keys", help="API keys for trusted backends")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (shown once)")
    create.add_argument("--name", required=True, help="who uses it, e.g. 'signup-service'")
    create.add_argument(
        "--scope",
        action="append",
        choices=["register", "read", "admin"],
        help="repeatable; default: register",
    )
    keys_sub.add_parser("list", help="list keys (never the secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    for p in (keys,):
        p.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    keys.set_defaults(func=_keys)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="action", required=True)
    db_sub.add_parser("upgrade", help="apply pending schema migrations")
    db.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    db.set_defaults(func=_db)

    imp = sub.add_parser("import", help="import registrations from another registrar")
    imp_sub = imp.add_subparsers(dest="source", required=True)
    mongo = imp_sub.add_parser(
        "sample-mongo",
        help="a mongoexport (JSON lines or --jsonArray) of Microsoft's sample's registrar",
    )
    mongo.add_argument("file", help="the mongoexport output")
    mongo.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    mongo.add_argument(
        "--ttl-seconds", type=int, help="lifetime of the imported registrations (default: setting)"
    )
    mongo.add_argument("--batch-size", type=int, default=1000, help="registrations per commit")
    mongo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    mongo.set_defaults(func=_import)

    export = sub.add_parser("export", help="every live registration, as JSON lines")
    export.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.add_argument(
        "--format",
        choices=["jsonl", "sample-mongo"],
        default="jsonl",
        help="jsonl: ringrelay's fields; sample-mongo: Microsoft's sample's documents",
    )
    export.set_defaults(func=_export)

    eventgrid = sub.add_parser("eventgrid", help="the Event Grid side of the deployment")
    eventgrid_sub = eventgrid.add_subparsers(dest="action", required=True)
    egsub = eventgrid_sub.add_parser(
        "subscription",
        help="the az command and ARM template of the subscription feeding this relay",
    )
    egsub.add_argument(
        "--endpoint",
        required=True,
        help="webhook URL without the secret: https://<host>/api/events",
    )
    egsub.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    egsub.add_argument("--name", default="ringrelay-incoming-call", help="subscription name")
    egsub.add_argument(
        "--entra",
        action="store_true",
        help="Entra ID delivery, with RINGRELAY_EVENTGRID_TENANT_ID/_AUDIENCE",
    )
    egsub.add_argument("--entra-tenant-id", help="overrides RINGRELAY_EVENTGRID_TENANT_ID")
    egsub.add_argument("--entra-audience", help="overrides RINGRELAY_EVENTGRID_AUDIENCE")
    egsub.add_argument("--call-lifecycle", action="store_true", help="also CallStarted/Ended/...")
    egsub.add_argument("--chat", action="store_true", help="also the chat events")
    egsub.add_argument("--max-delivery-attempts", type=int, default=2)
    egsub.add_argument("--event-ttl", type=int, default=1, help="minutes")
    egsub.add_argument("--max-events-per-batch", type=int, default=1)
    egsub.add_argument(
        "--advanced-filters", help="JSON file: a list of advanced filters (or {advancedFilters})"
    )
    egsub.add_argument("--dead-letter-storage", help="storage account resource id")
    egsub.add_argument("--dead-letter-container", help="blob container for dead letters")
    egsub.add_argument("--print", choices=["az", "arm", "both"], default="both")
    egsub.set_defaults(func=_eventgrid_subscription)

    fake = sub.add_parser("fake", help="run a fake provider for local end-to-end runs")
    fake_sub = fake.add_subparsers(dest="provider", required=True)
    nh = fake_sub.add_parser("notificationhubs", help="fake Azure Notification Hubs over TLS")
    nh.add_argument("--host", default="127.0.0.1")
    nh.add_argument("--port", type=int, default=9443)
    nh.add_argument("--tls-dir", default="./ringrelay-fake-tls", help="where to write the CA")
    nh.add_argument("--hub", default="ringrelay")
    nh.add_argument("--key", default="ringrelay-fake-key")
    nh.set_defaults(func=_fake)
    apns = fake_sub.add_parser("apns", help="fake APNs (HTTP/2 over TLS, JWT checked)")
    apns.add_argument("--host", default="127.0.0.1")
    apns.add_argument("--port", type=int, default=9444)
    apns.add_argument("--tls-dir", default="./ringrelay-fake-tls", help="CA, key and config")
    apns.add_argument("--bundle-id", default="com.example.calling")
    apns.add_argument("--team-id", default="FAKETEAM01")
    apns.set_defaults(func=_fake)
    fcm = fake_sub.add_parser("fcm", help="fake FCM HTTP v1 with its OAuth token endpoint")
    fcm.add_argument("--host", default="127.0.0.1")
    fcm.add_argument("--port", type=int, default=9445)
    fcm.add_argument("--tls-dir", default="./ringrelay-fake-tls", help="CA, account and config")
    fcm.add_argument("--project", default="example-calling")
    fcm.set_defaults(func=_fake)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
