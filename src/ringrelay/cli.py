"""`ringrelay` command line: serve, simulate, fake providers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote_plus

import orjson

from ringrelay import __version__
from ringrelay.config import ConfigError, Settings, load_settings
from ringrelay.store import Store, StoreInUse, open_store


def redact_secret_query(path: str) -> str:
    """`path?query` with the value of every `code` parameter replaced. Names are compared
    decoded, as the webhook reads them (Starlette's `parse_qsl`), or `?c%6Fde=<secret>` would
    authenticate and still be logged in clear."""
    head, sep, query = path.partition("?")
    if not sep:
        return path
    fields = query.split("&")
    for i, field in enumerate(fields):
        name, _, _ = field.partition("=")
        if unquote_plus(name) == "code":
            fields[i] = f"{name}=<redacted>"
    return f"{head}?{'&'.join(fields)}"


class _RedactSecretQuery(logging.Filter):
    """The webhook URL carries its secret as `?code=`: keep it out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            path = str(args[2])
            if "?" in path:
                args[2] = redact_secret_query(path)
                record.args = tuple(args)
        return True


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings | None:
    """The settings, or None after saying on stderr which one is wrong."""
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except ConfigError as exc:
        print(f"ringrelay: {exc}", file=sys.stderr)
        return None


@contextlib.asynccontextmanager
async def _opened_store(settings: Settings) -> AsyncIterator[Store]:
    # Not a serving store: an admin command may share a SQLite file with a running server.
    store = open_store(settings.database_url, serving=False)
    await store.open()  # also applies pending migrations
    try:
        yield store
    finally:
        await store.close()


def _redacted_url(url: str) -> str:
    """The database URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _store_error(settings: Settings, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    return (
        f"ringrelay: cannot open the store at RINGRELAY_DATABASE_URL="
        f"{_redacted_url(settings.database_url)}: {reason}"
    )


async def _check_store(settings: Settings) -> str | None:
    """Open the store once (applying migrations) so that an unreachable database is one line
    naming the setting, not a traceback from inside the server's start-up."""
    try:
        async with _opened_store(settings):
            return None
    except Exception as exc:  # asyncpg, sqlite3 and OS errors alike: all say why in one line
        return _store_error(settings, exc)


async def _active_api_keys(settings: Settings) -> int:
    async with _opened_store(settings) as store:
        return await store.active_api_keys()


def _auth_note(settings: Settings) -> str:
    """Whether a server with these settings asks for the key (creating one changes nothing)."""
    if settings.auth_required is True or settings.registrar_auth_enabled:
        return "this configuration requires registrar authentication: servers accept the key now"
    if settings.auth_required is False:
        return (
            "this configuration turns registrar authentication off (RINGRELAY_AUTH_REQUIRED="
            "false): servers accept anonymous requests and do not need the key; set "
            "RINGRELAY_AUTH_REQUIRED=true and restart `ringrelay serve` to require it"
        )
    return (
        "with this configuration a server on a non-loopback address requires registrar "
        "authentication, one on loopback does not (RINGRELAY_AUTH_REQUIRED unset): to require "
        "the key there too, set RINGRELAY_AUTH_REQUIRED=true and restart `ringrelay serve`"
    )


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
                print(_auth_note(settings))
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
                if settings.registrar_auth_required(beyond_loopback=True) and not (
                    settings.registrar_auth_enabled or await store.active_api_keys()
                ):
                    print(
                        "no active API key is left and no JWT issuer is configured: a server "
                        "that requires registrar authentication now answers 503 to every "
                        "registrar request until a key is created (it does not open)"
                    )
            return 0

    try:
        return asyncio.run(run())
    except Exception as exc:  # see _check_store
        print(_store_error(settings, exc), file=sys.stderr)
        return 1


def _db(args: argparse.Namespace) -> int:

    settings = _settings(args)
    if settings is None:
        return 2

    async def upgrade() -> str:
        async with _opened_store(settings) as store:  # migrations run (locked on PostgreSQL)
            return store.description

    try:
        description = asyncio.run(upgrade())
    except Exception as exc:  # see _check_store
        print(_store_error(settings, exc), file=sys.stderr)
        return 1
    print(f"schema up to date: {description}")
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


def _routing_line(settings: Settings) -> str:
    if not settings.rules and not settings.call_automation_configured:
        return ""
    ca = (
        "Call Automation configured"
        if settings.call_automation_configured
        else "no Call Automation"
    )
    return f"  routing:  {len(settings.rules)} rule(s), {ca}\n"


_HOW_TO_AUTHENTICATE = (
    "configure a JWT issuer for users' tokens (RINGRELAY_AUTH_ISSUER with RINGRELAY_AUTH_AUDIENCE "
    "and RINGRELAY_AUTH_JWKS_URL or RINGRELAY_AUTH_PUBLIC_KEY_FILE; README, Security) or create "
    "an API key for a backend (`ringrelay keys create --name <backend>`)"
)


def _auth_problem(settings: Settings, args: argparse.Namespace) -> str | None:
    """Why `serve` must not listen on a non-loopback address as configured, if it must not."""
    if _is_loopback(args.host):
        return None
    if not settings.registrar_auth_required(beyond_loopback=not args.insecure):
        if args.insecure:
            return None
        return (
            "registrar authentication is off (RINGRELAY_AUTH_REQUIRED=false): anyone could "
            "register a phone for someone else's identity and receive their calls. Unset it or "
            f"set it to true and {_HOW_TO_AUTHENTICATE}; or bind to 127.0.0.1 behind an "
            "authenticating proxy, or pass --insecure."
        )
    if not settings.registrar_auth_enabled and not asyncio.run(_active_api_keys(settings)):
        return (
            "registrar authentication is required there, and nothing could authenticate (no "
            f"JWT issuer, no active API key): {_HOW_TO_AUTHENTICATE}; or bind to 127.0.0.1 "
            "behind an authenticating proxy, or pass --insecure to run without authentication "
            "(with RINGRELAY_AUTH_REQUIRED unset)."
        )
    return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ringrelay.app import create_app
    from ringrelay.httpserver import ensure_file_limit, uvicorn_config

    overrides = {"max_connections": args.max_connections} if args.max_connections else {}
    settings = _settings(args, **overrides)
    if settings is None:
        return 2
    from ringrelay.logs import configure

    configure(settings.log_level, settings.log_format)
    settings, problem = ensure_file_limit(settings)
    if problem is not None:
        print(f"ringrelay: {problem}", file=sys.stderr)
        return 2
    if args.workers != 1:  # refused with SQLite before anything is opened
        from ringrelay.hosting.workers import check_workers

        try:
            check_workers(settings, args.workers)
        except ConfigError as exc:
            print(f"ringrelay: {exc}", file=sys.stderr)
            return 2
    store_problem = asyncio.run(_check_store(settings))
    if store_problem is not None:
        print(store_problem, file=sys.stderr)
        return 1
    problem = _auth_problem(settings, args)
    if problem is not None:
        print(f"ringrelay: refusing to listen on {args.host}: {problem}", file=sys.stderr)
        return 2
    # Decided once, here: whether registrar callers must authenticate never changes with the
    # keys in the database (see Settings.registrar_auth_required).
    beyond_loopback = not _is_loopback(args.host)
    settings = settings.model_copy(
        update={
            "auth_required": settings.registrar_auth_required(
                beyond_loopback=beyond_loopback and not args.insecure
            )
        }
    )
    if beyond_loopback and not settings.auth_required:
        logging.getLogger("ringrelay").warning(
            "INSECURE: listening on %s with no registrar authentication (--insecure)", args.host
        )
    if args.workers != 1:
        return _serve_workers(args, settings)
    logging.getLogger("uvicorn.access").addFilter(_RedactSecretQuery())
    app = create_app(settings)
    relay = app.state.relay
    try:
        relay.store.reserve()  # a second server on one SQLite file stops here, port unbound
    except StoreInUse as exc:
        print(f"ringrelay: {exc}", file=sys.stderr)
        return 2
    banner = (
        f"ringrelay {__version__} on http://{args.host}:{args.port}\n"
        f"  store:    {relay.store.description}\n"
        f"  delivery: {relay.delivery_description}\n"
        f"  auth:     {relay.guard.description}\n"
        + _routing_line(settings)
        + f"  webhook:  POST http://{args.host}:{args.port}/api/events"
        + ("?code=<secret>" if settings.webhook_secret else " (no secret set)")
    )
    if settings.log_format == "json":  # every line of output is then one JSON object
        logging.getLogger("ringrelay").info(banner.replace("\n", ";").replace("  ", " "))
    else:
        print(banner, flush=True)
    config = uvicorn_config(
        app,
        settings,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        backlog=args.backlog,
        # Our handler (text or JSON) formats uvicorn's lines too, the access log's included.
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.webhook_deadline_seconds) + 2,
        # None: uvicorn's own default ($FORWARDED_ALLOW_IPS, else 127.0.0.1).
        forwarded_allow_ips=args.forwarded_allow_ips,
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


async def _post(url: str, payload: bytes, api_key: str | None = None) -> tuple[int, Any]:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=payload, headers=headers) as resp,
    ):
        text = await resp.read()
        try:
            return resp.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return resp.status, text.decode(errors="replace")


def _server_problem(args: argparse.Namespace) -> str | None:
    from urllib.parse import urlsplit

    server = urlsplit(str(args.server))
    if server.scheme not in ("http", "https") or not server.hostname:
        return (
            f"ringrelay simulate: --server must be a URL such as http://127.0.0.1:8080, "
            f"not {args.server!r}"
        )
    return None


def _webhook_url(args: argparse.Namespace) -> str:
    url = str(args.server).rstrip("/") + "/api/events"
    secret = args.secret or os.environ.get("RINGRELAY_WEBHOOK_SECRET")
    if secret:
        from urllib.parse import quote

        url += "?code=" + quote(secret, safe="")
    return url


def _print_deliveries(deliveries: list[dict[str, Any]]) -> None:
    for d in deliveries:
        line = (
            f"    - {d['device_id']} [{d['platform']}] {d['status']}"
            f" via {d['provider'] or '-'} after {d['attempts']} attempt(s)"
        )
        if d.get("reason"):
            line += f": {d['reason']}"
        print(line)


def _post_and_show(
    args: argparse.Namespace, url: str, body: object, title: str, expect: str, **kw: Any
) -> tuple[int, dict[str, Any]] | None:
    """POST, print the title line; None (after saying why) when the answer is not usable."""
    import aiohttp

    problem = _server_problem(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return None
    try:
        status, answer = asyncio.run(_post(url, orjson.dumps(body), **kw))
    except (OSError, aiohttp.ClientError) as exc:
        print(f"ringrelay simulate: cannot reach {args.server}: {exc}", file=sys.stderr)
        return None
    print(f"{title}: HTTP {status}")
    if not isinstance(answer, dict) or expect not in answer:
        print(f"  server said: {answer}")
        return None
    return status, answer


def _send_events(args: argparse.Namespace, event: dict[str, Any], title: str) -> int:
    posted = _post_and_show(args, _webhook_url(args), [event], title, "events")
    if posted is None:
        return 1
    status, answer = posted
    from ringrelay.simulate import summarize

    for report in answer["events"]:
        print("\n".join(summarize(report)))
    return 0 if status == 200 else 1


def _simulate(args: argparse.Namespace) -> int:
    from ringrelay.simulate import incoming_call_event

    event = incoming_call_event(
        args.to, args.caller, args.display_name, correlation_id=args.call_id
    )
    call_id = event["data"]["correlationId"]
    return _send_events(args, event, f"IncomingCall {event['id']} (callId {call_id}) to {args.to}")


def _simulate_chat_message(args: argparse.Namespace) -> int:
    from ringrelay.simulate import chat_message_event

    event = chat_message_event(
        args.to, args.sender, args.text, args.display_name, thread_id=args.thread
    )
    data = event["data"]
    title = (
        f"ChatMessageReceived {event['id']} (messageId {data['messageId']}, "
        f"thread {data['threadId']}) to {args.to}"
    )
    return _send_events(args, event, title)


def _simulate_call_ended(args: argparse.Namespace) -> int:
    from ringrelay.simulate import call_ended_event

    event = call_ended_event(args.call_id)
    return _send_events(args, event, f"CallEnded {event['id']} (callId {args.call_id})")


def _simulate_answered(args: argparse.Namespace) -> int:
    """The callee answered on `--device`: what a backend sends through the stop-ringing API."""
    body: dict[str, Any] = {"answered_device": args.device, "reason": "answered_elsewhere"}
    if args.identity:
        body["identity"] = args.identity
    url = f"{str(args.server).rstrip('/')}/v1/calls/{args.call_id}/stop-ringing"
    api_key = args.api_key or os.environ.get("RINGRELAY_API_KEY")
    title = f"answered on {args.device} (callId {args.call_id})"
    posted = _post_and_show(args, url, body, title, "devices", api_key=api_key)
    if posted is None:
        return 1
    status, answer = posted
    stopped = sum(1 for d in answer["devices"] if d["status"] == "accepted")
    print(
        f"  stop status: {answer['status']}"
        + (f" ({answer['reason']})" if answer.get("reason") else "")
    )
    print(f"  devices stopped: {stopped}")
    _print_deliveries(answer["devices"])
    return 0 if status == 200 else 1


def _doctor(args: argparse.Namespace) -> int:
    from ringrelay.ops.doctor import (
        Finding,
        as_json,
        diagnose_identity,
        passed,
        render,
        run_doctor,
    )

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        findings = [
            Finding("config", False, str(exc), "fix the setting named above (README, Settings)")
        ]
    else:
        if args.identity:
            findings = asyncio.run(diagnose_identity(settings, args.identity))
        else:
            findings = asyncio.run(run_doctor(settings, host=args.host))
    if args.json:
        sys.stdout.buffer.write(as_json(findings) + b"\n")
    else:
        print(render(findings))
    return 0 if passed(findings) else 1


async def _get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        text = await resp.read()
        try:
            return resp.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return resp.status, text.decode(errors="replace")


def _trace(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from ringrelay.ops.trace import call_trace, render

    if args.server:
        url = f"{args.server.rstrip('/')}/v1/calls/{quote(args.call_id, safe='')}"
        key = args.api_key or os.environ.get("RINGRELAY_API_KEY")
        headers = {"X-API-Key": key} if key else {}
        try:
            status, trace = asyncio.run(_get(url, headers))
        except OSError as exc:
            print(f"ringrelay trace: cannot reach {args.server}: {exc}", file=sys.stderr)
            return 1
        if status != 200:
            detail = trace.get("detail") if isinstance(trace, dict) else trace
            print(f"ringrelay trace: HTTP {status}: {detail}", file=sys.stderr)
            return 1
    else:
        settings = _settings(args)
        if settings is None:
            return 2

        async def from_store() -> dict[str, Any] | None:
            async with _opened_store(settings) as store:
                events = await store.events_for_call(args.call_id)
            return call_trace(args.call_id, events, None) if events else None

        found = asyncio.run(from_store())
        if found is None:
            print(f"ringrelay trace: no event recorded for callId {args.call_id}", file=sys.stderr)
            return 1
        trace = found
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(trace, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(render(trace))
    return 0


async def _fake_all(args: argparse.Namespace) -> None:
    """`ringrelay fake all`: fake APNs, FCM and Notification Hubs in one process, and ONE config
    file that points `ringrelay serve --config` at all three (iOS and Android direct, the other
    platforms through the hub)."""
    from pathlib import Path

    from ringrelay.fakes import apns, fcm, notificationhubs

    _, apns_config, apns_info = await apns.start_for_cli(
        args.host, args.apns_port, args.tls_dir, args.bundle_id, args.team_id
    )
    _, fcm_config, fcm_info = await fcm.start_for_cli(
        args.host, args.fcm_port, args.tls_dir, args.project
    )
    _, nh_config, nh_info = await notificationhubs.start_for_cli(
        args.host, args.nh_port, args.tls_dir, args.hub, args.key
    )
    # Top-level keys before the tables: in TOML a key after [[fcm]] would belong to that table.
    config = f"{nh_config}\n{apns_config}\n{fcm_config}"
    written = Path(args.tls_dir) / "ringrelay.toml"
    written.write_text(config)
    print(
        f"{apns_info}\n{fcm_info}\n{nh_info}\n"
        f"config for all three written to {written.resolve()}; run:\n"
        f"  ringrelay serve --config {written}\n"
        "ready",
        flush=True,
    )
    await asyncio.Event().wait()


def _fake(args: argparse.Namespace) -> int:
    try:
        if args.provider == "all":
            asyncio.run(_fake_all(args))
        elif args.provider == "apns":
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
    except OSError as exc:  # a busy port, an address this machine does not have
        flag = "the --*-port options" if args.provider == "all" else "--port"
        print(
            f"ringrelay fake {args.provider}: {exc} (choose another with {flag})", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _port(text: str) -> int:
    """A TCP port for a listening server; argparse names the option when this raises."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1 to 65535)")
    return port


def _fake_port(text: str) -> int:
    """As _port, and 0 for any free port (a fake prints the port it got)."""
    return 0 if text.strip() == "0" else _port(text)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default that is a value; an unset option's help says what applies instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every command's --help shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ringrelay", description="Azure Communication Services events in, VoIP pushes out."
    )
    parser.add_argument("--version", action="version", version=f"ringrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    config_help = "TOML settings file (also RINGRELAY_CONFIG; default: none)"
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8080, help="TCP port to listen on")
    serve.add_argument("--config", help=config_help)
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log every request (the webhook's ?code= is redacted)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        help="open client connections per instance (default: RINGRELAY_MAX_CONNECTIONS, 2048)",
    )
    serve.add_argument(
        "--backlog",
        type=int,
        default=2048,
        help="connections the kernel queues before they are accepted (default 2048)",
    )
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
    serve.add_argument(
        "--forwarded-allow-ips",
        metavar="ADDRESSES",
        help="comma-separated proxy addresses (or '*') whose X-Forwarded-For/-Proto are "
        "trusted as the client's; passed to uvicorn (default: $FORWARDED_ALLOW_IPS, "
        "else 127.0.0.1)",
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
    call.add_argument("--display-name", default="ringrelay simulator", help="caller's name")
    call.add_argument("--call-id", help="the call's correlationId (default: a new one)")
    call.set_defaults(func=_simulate)
    chat = sim_sub.add_parser(
        "chat-message", help="a Microsoft.Communication.ChatMessageReceived for one recipient"
    )
    chat.add_argument("--to", required=True, help="recipient rawId")
    chat.add_argument(
        "--from",
        dest="sender",
        default="8:acs:00000000-0000-0000-0000-000000000000_sender",
        help="sender rawId",
    )
    chat.add_argument("--text", default="Hello from the ringrelay simulator")
    chat.add_argument("--display-name", default="ringrelay simulator", help="sender's name")
    chat.add_argument("--thread", help="thread id (default: a new 19:<hex>@thread.v2)")
    chat.set_defaults(func=_simulate_chat_message)
    ended = sim_sub.add_parser("call-ended", help="a Microsoft.Communication.CallEnded")
    ended.add_argument("--call-id", required=True, help="the ringing call's correlationId")
    ended.set_defaults(func=_simulate_call_ended)
    answered = sim_sub.add_parser(
        "answered", help="the callee answered on one device (POST /v1/calls/{callId}/stop-ringing)"
    )
    answered.add_argument("--call-id", required=True, help="the ringing call's correlationId")
    answered.add_argument("--device", required=True, help="the device that answered")
    answered.add_argument("--identity", help="the callee (default: every callee of the call)")
    answered.add_argument(
        "--api-key", help="an API key with the register scope (default: RINGRELAY_API_KEY)"
    )
    answered.set_defaults(func=_simulate_answered)
    for p in (call, chat, ended, answered):
        p.add_argument("--server", default="http://127.0.0.1:8080", help="ringrelay's base URL")
        p.add_argument("--secret", help="webhook secret (default: $RINGRELAY_WEBHOOK_SECRET)")
    simulate_sub = sim_sub

    keys = sub.add_parser("keys", help="API keys for trusted backends")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (shown once)")
    create.add_argument("--name", required=True, help="who uses it, e.g. 'signup-service'")
    create.add_argument(
        "--scope",
        action="append",
        choices=["register", "read", "admin"],
        help="repeatable (default: register)",
    )
    keys_sub.add_parser("list", help="list keys (never the secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    for p in (keys,):
        p.add_argument("--config", help=config_help)
    keys.set_defaults(func=_keys)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="action", required=True)
    db_sub.add_parser("upgrade", help="apply pending schema migrations")
    db.add_argument("--config", help=config_help)
    db.set_defaults(func=_db)

    doctor = sub.add_parser(
        "doctor", help="check every configured transport, the store and the settings for real"
    )
    doctor.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    doctor.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    doctor.add_argument(
        "--host", default="127.0.0.1", help="the address serve will listen on (bind safety)"
    )
    doctor.add_argument("--identity", metavar="RAWID", help="why this user's phone does (not) ring")
    doctor.set_defaults(func=_doctor)

    trace = sub.add_parser("trace", help="a call's story: deliveries, attempts, outcomes")
    trace.add_argument("call_id", metavar="CALLID", help="the call's correlationId")
    trace.add_argument(
        "--server",
        help="ask a running server (full story) instead of the configured store (final states)",
    )
    trace.add_argument("--api-key", help="with --server: a read key (default: RINGRELAY_API_KEY)")
    trace.add_argument("--json", action="store_true")
    trace.add_argument("--config", help="TOML settings file (also RINGRELAY_CONFIG)")
    trace.set_defaults(func=_trace)

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
    tls_help = "where to write the CA, keys and config"
    port_help = "TCP port (0: any free port)"

    def apns_options(p: argparse.ArgumentParser) -> None:
        # The README's quickstart registers its iPhone with app_id com.contoso.calling.
        p.add_argument("--bundle-id", default="com.contoso.calling", help="the app's bundle id")
        p.add_argument("--team-id", default="FAKETEAM01", help="Apple team id")

    def fcm_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--project", default="contoso-calling", help="Firebase project id")

    def nh_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hub", default="ringrelay", help="hub name")
        p.add_argument("--key", default="ringrelay-fake-key", help="SAS key the hub checks")

    everything = fake_sub.add_parser(
        "all", help="fake APNs + FCM + Notification Hubs, and one config for all three"
    )
    everything.add_argument("--host", default="127.0.0.1", help="address to listen on")
    everything.add_argument("--apns-port", type=_fake_port, default=9444, help=port_help)
    everything.add_argument("--fcm-port", type=_fake_port, default=9445, help=port_help)
    everything.add_argument("--nh-port", type=_fake_port, default=9443, help=port_help)
    everything.add_argument("--tls-dir", default="./ringrelay-fake-tls", help=tls_help)
    apns_options(everything)
    fcm_options(everything)
    nh_options(everything)
    everything.set_defaults(func=_fake)
    nh = fake_sub.add_parser("notificationhubs", help="fake Azure Notification Hubs over TLS")
    nh.add_argument("--host", default="127.0.0.1", help="address to listen on")
    nh.add_argument("--port", type=_fake_port, default=9443, help=port_help)
    nh.add_argument("--tls-dir", default="./ringrelay-fake-tls", help=tls_help)
    nh_options(nh)
    nh.set_defaults(func=_fake)
    apns = fake_sub.add_parser("apns", help="fake APNs (HTTP/2 over TLS, JWT checked)")
    apns.add_argument("--host", default="127.0.0.1", help="address to listen on")
    apns.add_argument("--port", type=_fake_port, default=9444, help=port_help)
    apns.add_argument("--tls-dir", default="./ringrelay-fake-tls", help=tls_help)
    apns_options(apns)
    apns.set_defaults(func=_fake)
    fcm = fake_sub.add_parser("fcm", help="fake FCM HTTP v1 with its OAuth token endpoint")
    fcm.add_argument("--host", default="127.0.0.1", help="address to listen on")
    fcm.add_argument("--port", type=_fake_port, default=9445, help=port_help)
    fcm.add_argument("--tls-dir", default="./ringrelay-fake-tls", help=tls_help)
    fcm_options(fcm)
    fcm.set_defaults(func=_fake)

    from ringrelay.routing.commands import add_commands

    add_commands(sub, simulate_sub, fake_sub, eventgrid_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
