"""`ringrelay doctor`: checks this deployment for real, one finding per check.

The causes and their fixes follow the ACS guide's troubleshooting of calling pushes: a push is
dropped where the hub did not accept it (hub not linked, not configured for the platform,
deleted, certificate-mode APNs, a connection string without the Send right, invalid or
regenerated), where APNs/FCM did not accept it, or where the platform did not deliver it. The
transports are probed with a device token no device was ever given (all zeros): the provider's
answer to it tells whether our credentials, topic and project were accepted, without ringing
anyone.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
import uuid
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from ringrelay.config import Settings
from ringrelay.models import (
    DeliveryStatus,
    EventRecord,
    EventStatus,
    Platform,
    PushKind,
    Registration,
)
from ringrelay.payloads import CallPush, fcm_v1_message
from ringrelay.providers import PushProvider, PushRequest, PushResult
from ringrelay.redact import fingerprint
from ringrelay.relay import build_router

PROBE_APNS_TOKEN = "0" * 64  # hex, the length of a real token; never issued
PROBE_FCM_TOKEN = "0" * 152
PROBE_TIMEOUT = 5.0
MAX_CLOCK_SKEW = 30.0  # seconds; APNs judges a provider token's iat, Google a JWT's iat/exp
MIN_SECRET_CHARS = 16
# Event Grid's answer window and what ringrelay needs of the subscription (README, "Event Grid").
EVENT_TYPE = "Microsoft.Communication.IncomingCall"


@dataclass(slots=True)
class Finding:
    """One check: ok True (✓), False (✗) or None (advice that cannot be probed from here)."""

    area: str
    ok: bool | None
    what: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "•"}[self.ok]
        out = f"{mark} [{self.area}] {self.what}"
        if self.fix:
            out += f"\n    fix: {self.fix}" if self.ok is False else f"\n    {self.fix}"
        return out


def passed(findings: list[Finding]) -> bool:
    return all(f.ok is not False for f in findings)


def as_json(findings: list[Finding]) -> bytes:
    return orjson.dumps(
        {"ok": passed(findings), "findings": [asdict(f) for f in findings]},
        option=orjson.OPT_INDENT_2,
    )


def render(findings: list[Finding]) -> str:
    failed = sum(1 for f in findings if f.ok is False)
    summary = f"{failed} check(s) failed" if failed else "all checks passed"
    return "\n".join([*(f.line() for f in findings), summary])


def _probe_call() -> CallPush:
    return CallPush(
        event_id=0,
        cp="ringrelay-doctor-probe",
        call_id=f"ringrelay-doctor-{uuid.uuid4()}",
        recipient_id="8:acs:ringrelay-doctor",
        caller_id="8:acs:ringrelay-doctor",
        display_name="ringrelay doctor",
        video_call=False,
    )


def _probe_registration(platform: Platform, app_id: str | None) -> Registration:
    now = time.time()
    token = PROBE_APNS_TOKEN if platform is Platform.APNS else PROBE_FCM_TOKEN
    return Registration(
        "8:acs:ringrelay-doctor", "doctor-probe", platform, token, PushKind.VOIP, app_id,
        now, now, now + 60,
    )  # fmt: skip


def _probe_request(platform: Platform, app_id: str | None) -> PushRequest:
    return PushRequest(
        str(uuid.uuid4()),
        _probe_registration(platform, app_id),
        _probe_call(),
        time.time() + 30,
        PROBE_TIMEOUT,
        "ringrelay-doctor-probe",
    )


# --- Notification Hubs ------------------------------------------------------------------------


def _nh_finding(platform: Platform, hub: str, result: PushResult) -> Finding:
    fmt = {Platform.APNS: "apple", Platform.FCM: "fcmv1"}.get(platform, platform.value)
    area = "notificationhubs"
    what = f"direct send ({fmt}) to hub {hub}"
    status = result.http_status
    if status in (200, 201):
        return Finding(area, True, f"{what}: accepted (the key has the Send right)")
    if status == 401:
        return Finding(
            area,
            False,
            f"{what}: 401, the hub refused the connection string's key",
            "the key is wrong, was regenerated, or its policy lacks the Send right: copy the "
            "connection string of a policy with Send (DefaultFullSharedAccessSignature) from "
            "the hub's Access Policies into RINGRELAY_NH_CONNECTION_STRING / "
            "ANHHubConnectionString",
        )
    if status == 404:
        return Finding(
            area,
            False,
            f"{what}: 404, no such hub in this namespace",
            "check RINGRELAY_NH_HUB_NAME / ANHHubName (the hub's name, not the namespace's) "
            "and that the hub was not deleted (az notification-hub list --resource-group <rg> "
            "--namespace-name <ns>)",
        )
    if status == 403:
        return Finding(
            area,
            False,
            f"{what}: 403, forbidden ({result.reason})",
            "the namespace's quota is used up or its tier does not allow this: check the "
            "hub's pricing tier and usage in the portal (Notification Hubs → Usage)",
        )
    if status == 400 and not any(
        word in result.reason.lower() for word in ("credential", "not configured", "certificate")
    ):
        # No public source quotes the hub's answer to a handle no device has; a 400 that is
        # not about the hub's platform credentials is taken as the handle refused, which
        # needs the key accepted first.
        return Finding(
            area,
            True,
            f"{what}: the key was accepted; the hub refused only the probe's handle "
            f"({result.reason})",
        )
    if status == 400:
        return Finding(
            area,
            False,
            f"{what}: 400, the hub refused it ({result.reason})",
            (
                "configure the hub's Apple (APNs) credentials in token mode (.p8 key, Key ID, "
                "Team ID, bundle id): VoIP pushes need token-based APNs, not a certificate"
                if platform is Platform.APNS
                else "configure the hub's Google (FCM v1) credentials: the Firebase service "
                "account's private key, client email and project id"
            ),
        )
    if result.status is DeliveryStatus.TRANSIENT and status is None:
        return Finding(
            area,
            False,
            f"{what}: unreachable ({result.reason})",
            "check the namespace host in the connection string, DNS, and that outbound "
            "HTTPS (TCP 443) to *.servicebus.windows.net is allowed",
        )
    return Finding(area, False, f"{what}: {result.reason}", "see the hub's answer above")


async def _check_notification_hubs(settings: Settings, provider: PushProvider) -> list[Finding]:
    out: list[Finding] = []
    area = "notificationhubs"
    conn = settings.nh_connection()
    out.append(
        Finding(
            area,
            True,
            f"connection string parses: {conn.endpoint} key {conn.key_name!r} "
            f"({fingerprint(conn.key)}), hub URL {settings.nh_messages_url()}",
        )
    )
    version = settings.nh_api_version
    routes = settings.transport_routes()
    nh_platforms = [p for p in (Platform.APNS, Platform.FCM) if routes.get(p) == "notificationhubs"]
    if Platform.FCM in nh_platforms and version < "2020-06":
        out.append(
            Finding(
                area,
                False,
                f"API version {version}: too old for the fcmv1 format",
                "set RINGRELAY_NH_API_VERSION=2020-06 (the sample's 2015-01 predates FCM v1)",
            )
        )
    else:
        out.append(Finding(area, True, f"API version {version}"))
    hub = settings.nh_resource_uri().rsplit("/", 1)[-1]
    for platform in nh_platforms:
        result = await provider.send(_probe_request(platform, None))
        out.append(_nh_finding(platform, hub, result))
    return out


# --- APNs -------------------------------------------------------------------------------------

_APNS_FIXES = {
    "InvalidProviderToken": "the provider token was refused: key_id and team_id must be the "
    "ones of this .p8 (developer.apple.com → Certificates, IDs & Profiles → Keys), and the key "
    "must not be revoked",
    "MissingProviderToken": "no provider token was accepted: check key_file, key_id, team_id",
    "ExpiredProviderToken": "APNs thinks the provider token is over an hour old: this server's "
    "clock is wrong (run NTP, e.g. chrony)",
    "TopicDisallowed": "the key's team may not push to this topic: bundle_id must be an app of "
    "team {team} (VoIP topic {topic})",
    "BadTopic": "the topic {topic} is not valid: check bundle_id",
    "DeviceTokenNotForTopic": "tokens of this app are not for topic {topic}: check bundle_id",
    "BadEnvironmentKeyInToken": "this key is restricted to the other APNs environment: set "
    "environment = 'sandbox' or 'production' to match the key (or use an unrestricted key)",
    "BadEnvironmentKeyIdInToken": "this key is restricted to the other APNs environment: set "
    "environment to match the key",
    "Forbidden": "APNs refused the request: check the key's APNs service is enabled",
}


def _apns_finding(provider: Any, result: PushResult) -> Finding:
    area = f"apns:{provider.app_id}"
    topic = f"{provider.bundle_id}.voip"
    what = f"VoIP probe to {provider.host}:{provider.port} (topic {topic})"
    reason = result.reason.split()[-1] if result.reason else ""
    if result.status is DeliveryStatus.ACCEPTED or reason == "BadDeviceToken":
        return Finding(
            area,
            True,
            f"{what}: provider token and topic accepted "
            f"({'probe token refused as BadDeviceToken, as it must be' if reason else 'sent'})",
        )
    fix = _APNS_FIXES.get(reason)
    if fix is not None:
        return Finding(
            area,
            False,
            f"{what}: {result.reason}",
            fix.format(team=provider.token.team_id, topic=topic),
        )
    if result.status is DeliveryStatus.TRANSIENT and result.http_status is None:
        return Finding(
            area,
            False,
            f"{what}: unreachable ({result.reason})",
            "allow outbound TCP 443 to api.push.apple.com / api.sandbox.push.apple.com, check "
            "DNS, and the endpoint setting if any",
        )
    return Finding(area, False, f"{what}: {result.reason}", "see APNs' reason above")


async def _check_apns(settings: Settings, provider: Any) -> list[Finding]:
    area = f"apns:{provider.app_id}"
    out: list[Finding] = []
    token = provider.token
    try:
        header = token.header(time.time())
        out.append(
            Finding(
                area,
                True,
                f".p8 key {token.key_id} (team {token.team_id}) parses and signs ES256 "
                f"(provider token {fingerprint(header)})",
            )
        )
    except Exception as exc:  # a key that loads but cannot sign
        out.append(
            Finding(area, False, f".p8 key {token.key_id} cannot sign: {exc}", "download it again")
        )
        return out
    result = await provider.send(_probe_request(Platform.APNS, provider.app_id))
    out.append(_apns_finding(provider, result))
    return out


# --- FCM --------------------------------------------------------------------------------------


async def _check_fcm(settings: Settings, provider: Any) -> list[Finding]:
    from google.auth.exceptions import GoogleAuthError, RefreshError, TransportError

    area = f"fcm:{provider.app_id}"
    project = provider.project_id
    email = provider.token.credentials.service_account_email
    out = [Finding(area, True, f"service account {email} of project {project} parses")]
    try:
        authorization = await provider.token.header()
    except (RefreshError, ValueError) as exc:
        out.append(
            Finding(
                area,
                False,
                f"OAuth grant for {email}: refused ({exc})",
                "the service account's key was deleted or revoked, or the file was edited: "
                "create a new key (Firebase console → Project settings → Service accounts → "
                "Generate new private key) and point service_account_file at it",
            )
        )
        return out
    except (TransportError, GoogleAuthError, OSError) as exc:
        out.append(
            Finding(
                area,
                False,
                f"OAuth grant for {email}: token endpoint unreachable ({exc})",
                "allow outbound HTTPS to oauth2.googleapis.com",
            )
        )
        return out
    out.append(Finding(area, True, f"OAuth grant for {email}: access token issued"))

    body = fcm_v1_message(_probe_call(), 30, PROBE_FCM_TOKEN)
    body["validate_only"] = True  # projects.messages.send: check, never deliver
    what = f"validate_only send to project {project}"
    try:
        resp = await provider.post_message(authorization, orjson.dumps(body), PROBE_TIMEOUT)
    except Exception as exc:  # timeouts and connection errors alike
        out.append(
            Finding(
                area,
                False,
                f"{what}: unreachable ({type(exc).__name__}: {exc})",
                "allow outbound HTTPS (TCP 443) to fcm.googleapis.com",
            )
        )
        return out
    from ringrelay.providers.fcm import classify

    result = classify(resp.status, resp.body, None)
    if resp.status == 200 or (resp.status == 400 and "INVALID_ARGUMENT" in result.reason):
        out.append(
            Finding(
                area,
                True,
                f"{what}: credentials and project accepted"
                + (
                    " (probe token refused as invalid, as it must be)" if resp.status == 400 else ""
                ),
            )
        )
    elif resp.status == 401:
        out.append(
            Finding(
                area,
                False,
                f"{what}: {result.reason}",
                "FCM refused the access token: the service account may be disabled; create a "
                "new key for a service account of this project",
            )
        )
    elif resp.status == 403:
        out.append(
            Finding(
                area,
                False,
                f"{what}: {result.reason}",
                f"the service account {email} may not send for project {project}: use the "
                "project's own Firebase Admin SDK service account, or grant it the role "
                "'Firebase Cloud Messaging API Admin'",
            )
        )
    elif resp.status == 404:
        out.append(
            Finding(
                area,
                False,
                f"{what}: {result.reason}",
                f"project {project} has no FCM: enable the 'Firebase Cloud Messaging API' (V1) "
                "for it in the Google Cloud console",
            )
        )
    else:
        out.append(Finding(area, False, f"{what}: {result.reason}", "see FCM's answer above"))
    return out


# --- store, secrets, bind, clock --------------------------------------------------------------


async def _check_store(settings: Settings) -> tuple[list[Finding], Any]:
    from ringrelay.store import open_store

    store = open_store(settings.database_url, serving=False)
    try:
        await store.open()  # applies pending migrations, as `serve` and `db upgrade` do
        await store.ping()
    except Exception as exc:
        newer = "newer than this ringrelay" in str(exc)
        return [
            Finding(
                "store",
                False,
                f"{getattr(store, 'description', 'store')}: cannot open "
                f"({type(exc).__name__}: {exc})",
                "the schema was migrated by a newer ringrelay: run that version (or newer) "
                "here too; migrations only go forward"
                if newer
                else "check RINGRELAY_DATABASE_URL (host, port, user, database) and that the "
                "database accepts connections from here",
            )
        ], None
    out = [Finding("store", True, f"{store.description}: reachable, schema current")]
    probe = EventRecord(
        f"ringrelay-doctor-{uuid.uuid4()}",
        "ringrelay.doctor.probe",
        EventStatus.IGNORED,
        "doctor write probe",
        received_at=time.time(),
    )
    try:
        await store.record_event(probe, time.time())
        out.append(Finding("store", True, "writable (a probe event was recorded)"))
    except Exception as exc:
        out.append(
            Finding(
                "store",
                False,
                f"not writable ({type(exc).__name__}: {exc})",
                "the database user needs INSERT/UPDATE/DELETE on ringrelay's tables, and "
                "SQLite's file and folder must be writable",
            )
        )
    return out, store


def _check_webhook(settings: Settings) -> list[Finding]:
    area = "webhook"
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    nxt = settings.webhook_secret_next.get_secret_value() if settings.webhook_secret_next else None
    entra = settings.eventgrid_tenant_id is not None
    out: list[Finding] = []
    if secret is None and not entra:
        out.append(
            Finding(
                area,
                False,
                "no webhook secret and no Entra ID: anyone who finds the URL can make phones ring",
                "set RINGRELAY_WEBHOOK_SECRET and put ?code=<secret> in the Event Grid "
                "subscription's endpoint, or configure RINGRELAY_EVENTGRID_TENANT_ID and "
                "RINGRELAY_EVENTGRID_AUDIENCE",
            )
        )
    if secret is not None:
        if len(secret) < MIN_SECRET_CHARS:
            out.append(
                Finding(
                    area,
                    False,
                    f"webhook secret is {len(secret)} characters",
                    f"use at least {MIN_SECRET_CHARS} random characters "
                    "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
                )
            )
        else:
            out.append(Finding(area, True, f"webhook secret set ({fingerprint(secret)})"))
    if nxt is not None:
        if secret is None:
            out.append(
                Finding(
                    area,
                    False,
                    "RINGRELAY_WEBHOOK_SECRET_NEXT is set without RINGRELAY_WEBHOOK_SECRET",
                    "the next secret is for rotation: set the current one too, or rename it",
                )
            )
        elif nxt == secret:
            out.append(
                Finding(
                    area,
                    False,
                    "RINGRELAY_WEBHOOK_SECRET_NEXT equals RINGRELAY_WEBHOOK_SECRET",
                    "give the new secret, or unset RINGRELAY_WEBHOOK_SECRET_NEXT",
                )
            )
        else:
            out.append(Finding(area, True, "rotation: a second secret is accepted too"))
    if entra:
        out.append(
            Finding(
                area,
                True,
                f"Entra ID: tenant {settings.eventgrid_tenant_id}, audience "
                f"{settings.eventgrid_audience}",
            )
        )
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _check_bind(settings: Settings, host: str, store: Any) -> Finding:
    """What `serve` decides at start-up (Settings.registrar_auth_required), and whether
    anything could authenticate when it is required."""
    keys = await store.active_api_keys() if store is not None else 0
    loopback = _is_loopback(host)
    required = settings.registrar_auth_required(beyond_loopback=not loopback)
    means = [
        *(["JWT issuer"] if settings.registrar_auth_enabled else []),
        *([f"{keys} API key(s)"] if keys else []),
    ]
    how = ", ".join(means) or "nothing to authenticate with"
    fix = (
        "configure RINGRELAY_AUTH_ISSUER or create an API key (ringrelay keys create), or bind "
        "to 127.0.0.1 behind an authenticating proxy"
    )
    if required and not means:
        return Finding(
            "bind",
            False,
            f"{host}: registrar authentication is required but {how}: every registrar "
            "request would be refused",
            fix,
        )
    if required:
        return Finding("bind", True, f"{host}: registrar authentication required ({how})")
    if loopback:
        return Finding("bind", True, f"{host}: loopback, registrar authentication off")
    return Finding(
        "bind",
        False,
        f"{host} with registrar authentication off (RINGRELAY_AUTH_REQUIRED=false): anyone "
        "could register a phone for someone else's identity and receive their calls",
        "unset RINGRELAY_AUTH_REQUIRED (or set it to true) and " + fix,
    )


async def _server_date(url: str, ca_file: Any) -> float | None:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as session,
            session.get(url, ssl=ctx if url.startswith("https") else False) as resp,
        ):
            date = resp.headers.get("Date")
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    if not date:
        return None
    try:
        return parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


async def _check_clock(settings: Settings) -> Finding:
    """Compare this clock with an HTTPS server's Date header: the hub's or Google's token
    endpoint (APNs answers over HTTP/2 without a Date to compare with)."""
    candidates: list[tuple[str, Any]] = []
    if settings.nh_connection_string is not None:
        candidates.append((settings.nh_messages_url(), settings.nh_ca_file))
    for app in settings.fcm:
        from ringrelay.providers.fcm import read_service_account

        candidates.append(
            (str(read_service_account(app.service_account_file)["token_uri"]), app.ca_file)
        )
    for url, ca in candidates:
        before = time.time()
        theirs = await _server_date(url, ca)
        if theirs is None:
            continue
        skew = (before + time.time()) / 2 - theirs
        host = url.split("/")[2]
        if abs(skew) > MAX_CLOCK_SKEW:
            return Finding(
                "clock",
                False,
                f"this clock is {skew:+.0f}s off {host}'s",
                "APNs refuses provider tokens whose iat is off, Google refuses JWT assertions, "
                "and SAS tokens expire early: synchronise the clock (NTP, e.g. chrony)",
            )
        return Finding("clock", True, f"within {MAX_CLOCK_SKEW:.0f}s of {host}'s ({skew:+.1f}s)")
    return Finding(
        "clock",
        None,
        "not compared: no HTTPS endpoint with a Date header is configured",
        "make sure NTP runs: APNs and Google judge token times (iat) against theirs",
    )


def event_grid_checklist(settings: Settings) -> list[Finding]:
    """The subscription ringrelay needs, as `az` commands (learn.microsoft.com/cli/azure/
    eventgrid/event-subscription: --included-event-types, --max-delivery-attempts, --event-ttl
    in minutes, --azure-active-directory-tenant-id / -application-id-or-uri)."""
    code = "?code=<secret>" if settings.webhook_secret else ""
    endpoint = f"https://<your-host>/api/events{code}"
    auth = ""
    if settings.eventgrid_tenant_id:
        auth = (
            f" --azure-active-directory-tenant-id {settings.eventgrid_tenant_id}"
            f" --azure-active-directory-application-id-or-uri {settings.eventgrid_audience}"
        )
    create = (
        "az eventgrid event-subscription create --name ringrelay-incoming-call "
        "--source-resource-id <ACS resource id> "
        f'--endpoint "{endpoint}" --included-event-types {EVENT_TYPE} '
        f"--max-delivery-attempts 2 --event-ttl 1{auth}"
    )
    show = (
        "az eventgrid event-subscription show --name ringrelay-incoming-call "
        "--source-resource-id <ACS resource id> --include-full-endpoint-url "
        '--query "{types: filter.includedEventTypes, retry: retryPolicy, '
        'endpoint: destination.endpointUrl}"'
    )
    return [
        Finding(
            "eventgrid",
            None,
            f"subscription delivers {EVENT_TYPE} to {endpoint}: 2 attempts, 1 minute TTL "
            "(a late ring is worse than none)",
            f"create: {create}\n    check:  {show}",
        ),
        Finding(
            "eventgrid",
            None,
            "not checkable from here: the subscription belongs to ACS's Event Grid system "
            "topic, whose metrics show failed and dropped deliveries",
            "az monitor metrics list --resource <system topic resource id> --metric "
            "DeliveryAttemptFailCount DroppedEventCount --interval PT1M",
        ),
    ]


# --- the whole run ----------------------------------------------------------------------------


async def run_doctor(settings: Settings, *, host: str = "127.0.0.1") -> list[Finding]:
    findings, store = await _check_store(settings)
    try:
        findings += _check_webhook(settings)
        findings.append(await _check_bind(settings, host, store))
    finally:
        if store is not None:
            await store.close()

    router, sandbox, description = build_router(settings)
    findings.append(Finding("delivery", True, f"transports: {description}"))
    if sandbox is not None:
        findings.append(
            Finding(
                "delivery",
                None,
                "the sandbox serves "
                + ", ".join(
                    p.value for p, t in settings.transport_routes().items() if t == "sandbox"
                )
                + ": it records pushes and rings no phone",
                "configure Notification Hubs or [[apns]]/[[fcm]] for real deliveries",
            )
        )
    providers = router.providers()
    for provider in providers:
        await provider.start()
    try:
        for provider in providers:
            if provider.name == "notificationhubs":
                findings += await _check_notification_hubs(settings, provider)
            elif provider.name == "apns":
                findings += await _check_apns(settings, provider)
            elif provider.name == "fcm":
                findings += await _check_fcm(settings, provider)
    finally:
        for provider in providers:
            await provider.close()
    findings.append(await _check_clock(settings))
    findings += event_grid_checklist(settings)
    return findings


# --- one user: why did this phone not ring? ---------------------------------------------------


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def removal_cause(reason: str) -> str:
    """What a provider's reason for removing a token usually means, in the guide's words."""
    if "BadDeviceToken" in reason:
        return (
            "APNs called the token BadDeviceToken: usually a sandbox/production mix-up (a "
            "debug build's token sent to production APNs, or the other way round): match the "
            "[[apns]] environment (or the hub's APNs endpoint) to the build, then re-register"
        )
    if "Unregistered" in reason or "ExpiredToken" in reason or "410" in reason:
        return (
            "APNs says the token is no longer active: the app was uninstalled or its token "
            "changed; the app must register its new token"
        )
    if "UNREGISTERED" in reason or "404" in reason:
        return (
            "FCM says the token is unregistered: the app was uninstalled, its data cleared, "
            "or the token expired; the app must register its new token"
        )
    if "SENDER_ID_MISMATCH" in reason:
        return (
            "the token belongs to another Firebase project: the app's google-services.json "
            "and the [[fcm]] service account must be of the same project"
        )
    return "the provider declared the token dead: the app must register again"


_OUTCOME_FIX = {
    DeliveryStatus.CONFIG_ERROR: "a transport credential or setting is wrong: run `ringrelay "
    "doctor` (without --identity) to probe it",
    DeliveryStatus.REJECTED: "the provider refused this push for good; see the reason",
    DeliveryStatus.EXPIRED: "the ring window ended before a push got through: see the last "
    "error, the transport's health, and RINGRELAY_RING_WINDOW_SECONDS",
    DeliveryStatus.TRANSIENT: "the push is still being retried through Event Grid's redelivery",
    DeliveryStatus.IN_FLIGHT: "a push is under way",
}


async def diagnose_identity(
    settings: Settings, identity: str, store: Any = None, router: Any = None
) -> list[Finding]:
    """Findings for one identity; `store` and `router` are the running service's when given
    (the dashboard), else opened and built from the settings (the command)."""
    from ringrelay.store import open_store

    own = store is None
    if own:
        store = open_store(settings.database_url, serving=False)
        await store.open()
    try:
        regs = await store.list_registrations(identity, 0.0)  # expired ones too, until purged
        removed = await store.removed_registrations(identity)
        events = await store.recent_events(20, recipient=identity)
    finally:
        if own:
            await store.close()
    if router is None:
        router, _, _ = build_router(settings)
    now = time.time()
    area = "identity"
    out: list[Finding] = []

    last: dict[str, tuple[EventRecord, Any]] = {}  # device -> newest event and its outcome
    for ev in events:  # newest first
        for d in ev.deliveries:
            last.setdefault(d.device_id, (ev, d))

    ringable = 0
    for reg in regs:
        what = (
            f"device {reg.device_id}: {reg.platform.value} {reg.push_kind.value}"
            + (f" app {reg.app_id}" if reg.app_id else "")
            + f", token {fingerprint(reg.token)}, expires {_when(reg.expires_at)}"
        )
        if reg.expires_at <= now:
            out.append(
                Finding(
                    area,
                    False,
                    f"{what}: expired",
                    "the app must register again before its ttl_seconds run out (each app "
                    "start, and whenever PushKit/FCM hands it a new token)",
                )
            )
            continue
        if reg.push_kind is not PushKind.VOIP:
            out.append(
                Finding(area, None, f"{what}: an alert registration, it does not ring calls")
            )
            continue
        if router.for_registration(reg) is None:
            app = f" app {reg.app_id!r}" if reg.app_id else ""
            out.append(
                Finding(
                    area,
                    False,
                    f"{what}: no transport is configured for {reg.platform.value}{app}",
                    "configure that app ([[apns]]/[[fcm]] with this app_id) or a route for the "
                    "platform, or re-register with the app_id of a configured app",
                )
            )
            continue
        ringable += 1
        seen = last.get(reg.device_id)
        if seen is None:
            out.append(Finding(area, True, f"{what}: live; no push recorded yet"))
            continue
        ev, d = seen
        push = (
            f"last push (call {ev.correlation_id}, {_when(ev.received_at)}): {d.status.value}"
            f" via {d.provider or '-'} after {d.attempts} attempt(s)"
            + (f": {d.reason}" if d.reason else "")
            + (f", ref {d.provider_ref}" if d.provider_ref else "")
        )
        if d.status is DeliveryStatus.ACCEPTED:
            out.append(
                Finding(
                    area,
                    True,
                    f"{what}: live; {push}",
                    "accepted by the provider: if the phone still did not ring, the platform "
                    "did not deliver it (phone offline, app's PushKit/FCM handler, "
                    "notification settings)",
                )
            )
        else:
            out.append(Finding(area, False, f"{what}: live; {push}", _OUTCOME_FIX[d.status]))

    for r in removed:
        out.append(
            Finding(
                area,
                False if ringable == 0 else None,
                f"device {r.device_id} ({r.platform}, token {r.token_fingerprint}) removed "
                f"{_when(r.removed_at)}: {r.reason}",
                removal_cause(r.reason),
            )
        )

    for ev in events:
        call = f"call {ev.correlation_id} at {_when(ev.received_at)}"
        if ev.status is EventStatus.NO_DEVICES:
            out.append(
                Finding(
                    area,
                    None,
                    f"{call}: nobody to push to ({ev.reason})",
                    "the identity had no live VoIP registration at that moment",
                )
            )
        elif ev.status is EventStatus.EXPIRED and ev.reason:
            out.append(
                Finding(
                    area,
                    False,
                    f"{call}: not pushed, {ev.reason}",
                    "the event reached ringrelay after the phone would have stopped ringing: "
                    "Event Grid retried it late (this server was down or answered errors "
                    "then), or the subscription's TTL is longer than the ring window",
                )
            )

    if ringable == 0:
        if not regs and not removed:
            cause = (
                "no registration: the app never registered this identity here, or its "
                "registration expired and was purged; the app must PUT "
                f"/v1/identities/{identity}/devices/<device-id> with its VoIP token"
            )
        elif regs and all(r.push_kind is not PushKind.VOIP for r in regs if r.expires_at > now):
            live = [r for r in regs if r.expires_at > now]
            cause = (
                "no voip registration: the app registered only alert tokens; calls ring "
                "through the PushKit VoIP token (push_kind voip)"
                if live
                else "every registration expired: the app must register again"
            )
        elif not regs:
            cause = removal_cause(removed[0].reason)
        else:
            cause = "no registration that can ring: see the findings above"
        out.append(Finding(area, False, f"nothing can ring {identity}", cause))
    return out
