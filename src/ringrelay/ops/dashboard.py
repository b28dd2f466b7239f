"""`/dashboard`: server-rendered pages for whoever is on call, no JavaScript and no build step.

Overview (events per minute, success rate, p99 event -> first push, transports' health, charts
as inline SVG), recent calls with their traces, a registration search by identity (tokens as
fingerprints only), removed tokens, and `doctor`. Behind the `admin` scope: an API key in
`X-API-Key` / `Authorization: Bearer`, or given once to the login form (kept in an HttpOnly,
SameSite=Strict cookie); open with no authentication configured, like the rest of the API
(which `serve` allows on loopback only).
"""

from __future__ import annotations

import html
import math
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ringrelay.auth.tokens import AuthError
from ringrelay.models import EventStatus
from ringrelay.ops.trace import call_trace, iso
from ringrelay.redact import fingerprint
from ringrelay.relay import Relay

router = APIRouter(prefix="/dashboard", include_in_schema=False)
COOKIE = "ringrelay_dashboard_key"
WINDOW_MINUTES = 30
PUSHED = (EventStatus.DELIVERED, EventStatus.FAILED, EventStatus.EXPIRED, EventStatus.PENDING)

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1b1f24;color:#fff;padding:10px 20px;display:flex;gap:18px;align-items:center}
header a{color:#cfd6df;text-decoration:none}header a:hover{color:#fff}
header b{margin-right:12px}main{padding:16px 20px;max-width:1200px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #dde1e6;
border-radius:6px;padding:10px 14px;min-width:150px}.card .v{font-size:24px;font-weight:600}
table{border-collapse:collapse;background:#fff;width:100%;margin:8px 0 16px}
td,th{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}.ok{color:#1a7f37}.bad{color:#cf222e}.info{color:#6e7781}
.status-accepted,.status-delivered{color:#1a7f37}.status-rejected,.status-config_error,
.status-failed,.status-expired,.status-no_devices{color:#cf222e;font-weight:600}
svg{background:#fff;border:1px solid #dde1e6;border-radius:6px}code{font-size:12px}
form.inline{display:inline}input[type=text],input[type=password]{width:420px;padding:4px}
"""


# --- access --------------------------------------------------------------------------------


async def _require_admin(request: Request) -> None:
    relay: Relay = request.app.state.relay
    guard = relay.guard
    try:
        principal = await guard.principal(request)  # open when authentication is off
    except HTTPException as exc:
        # No key in the headers: the sign-in form's cookie may carry one.
        key = request.cookies.get(COOKIE)
        if exc.status_code != 401 or not key:
            raise
        try:
            principal = await guard._api_key_principal(key)
        except AuthError as err:
            raise HTTPException(status_code=401, detail=f"unauthenticated: {err}") from None
    if "admin" not in principal.scopes:
        raise HTTPException(status_code=403, detail="the dashboard needs the 'admin' scope")


def _refused(status: int, detail: str) -> HTMLResponse:
    body = (
        f"<h1>{status}</h1><p>{html.escape(detail)}</p>"
        '<form method="post" action="/dashboard/login">'
        '<p>API key with the admin scope: <input type="password" name="key"> '
        '<button type="submit">Sign in</button></p></form>'
    )
    return HTMLResponse(_page("Sign in", body, nav=False), status_code=status)


async def _guarded(request: Request) -> HTMLResponse | None:
    try:
        await _require_admin(request)
    except HTTPException as exc:
        return _refused(exc.status_code, str(exc.detail))
    return None


@router.post("/login")
async def login(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    # A one-field urlencoded form: parsed here rather than with python-multipart.
    form = parse_qs((await request.body())[:4096].decode(errors="replace"))
    key = (form.get("key") or [""])[0]
    try:
        principal = await relay.guard._api_key_principal(key.strip())
    except AuthError as exc:
        return _refused(401, str(exc))
    if "admin" not in principal.scopes:
        return _refused(403, "this key lacks the 'admin' scope")
    resp = RedirectResponse("/dashboard", status_code=303)
    secure = request.url.scheme == "https"
    resp.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", secure=secure)
    return resp


# --- rendering -----------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str, *, nav: bool = True) -> str:
    links = (
        '<a href="/dashboard">Overview</a><a href="/dashboard/calls">Calls</a>'
        '<a href="/dashboard/identities">Registrations</a>'
        '<a href="/dashboard/removed">Removed tokens</a><a href="/dashboard/doctor">Doctor</a>'
        '<a href="/metrics">/metrics</a>'
        if nav
        else ""
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)} · '
        f"ringrelay</title><style>{_CSS}</style></head><body><header><b>ringrelay</b>{links}"
        f"</header><main><h1>{_e(title)}</h1>{body}</main></body></html>"
    )


def _card(title: str, value: Any, note: str = "") -> str:
    return (
        f'<div class="card"><div>{_e(title)}</div><div class="v">{_e(value)}</div>'
        f"<div>{_e(note)}</div></div>"
    )


def _status(value: Any) -> str:
    return f'<span class="status-{_e(value)}">{_e(value)}</span>'


def _bars(title: str, values: list[float], labels: list[str], unit: str = "") -> str:
    """A bar chart as inline SVG (one bar per value; the first and last labels under it)."""
    width, height, pad = 560, 160, 28
    top = max(values, default=0) or 1
    n = max(len(values), 1)
    step = (width - 2 * pad) / n
    bars = []
    for i, v in enumerate(values):
        h = (height - 2 * pad) * v / top
        x = pad + i * step
        bars.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="#2f81f7"><title>{_e(labels[i])}: {v:g}{unit}</title></rect>'
        )
    first = _e(labels[0]) if labels else ""
    last = _e(labels[-1]) if labels else ""
    return (
        f'<figure><figcaption>{_e(title)}</figcaption><svg role="img" aria-label="{_e(title)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<text x="{pad}" y="16" font-size="11">max {top:g}{unit}</text>{"".join(bars)}'
        f'<text x="{pad}" y="{height - 8}" font-size="11">{first}</text>'
        f'<text x="{width - pad}" y="{height - 8}" font-size="11" text-anchor="end">{last}</text>'
        "</svg></figure>"
    )


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _counter_samples(counter: Any) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    ]


# --- pages ---------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def overview(request: Request) -> Response:
    if (refused := await _guarded(request)) is not None:
        return refused
    relay: Relay = request.app.state.relay
    now = time.time()
    events = await relay.store.recent_events(2000)
    calls = [e for e in events if e.correlation_id and now - e.received_at < WINDOW_MINUTES * 60]
    per_minute = [0.0] * WINDOW_MINUTES
    for e in calls:
        per_minute[min(WINDOW_MINUTES - 1, int((now - e.received_at) // 60))] += 1
    per_minute.reverse()
    minutes = [
        time.strftime("%H:%M", time.gmtime(now - 60 * (WINDOW_MINUTES - 1 - i)))
        for i in range(WINDOW_MINUTES)
    ]
    pushed = [e for e in calls if e.status in PUSHED]
    delivered = sum(1 for e in pushed if e.status is EventStatus.DELIVERED)
    success = f"{100 * delivered / len(pushed):.1f} %" if pushed else "-"
    no_devices = sum(1 for e in calls if e.status is EventStatus.NO_DEVICES)

    latencies = relay.dispatcher.calls.first_push_latencies()
    recent_lat = [s for at, s in latencies if now - at < WINDOW_MINUTES * 60]
    p99 = _quantile(recent_lat, 0.99)
    p99_by_minute = []
    for i in range(WINDOW_MINUTES):
        start = now - 60 * (WINDOW_MINUTES - i)
        bucket = [s for at, s in latencies if start <= at < start + 60]
        p99_by_minute.append(round((_quantile(bucket, 0.99) or 0.0) * 1000, 1))

    outcomes: Counter[tuple[str, str]] = Counter()
    for labels, value in _counter_samples(relay.metrics.outcomes):
        outcomes[(labels["provider"], labels["status"])] += int(value)
    transports = sorted({p for p, _ in outcomes})
    statuses = sorted({s for _, s in outcomes})
    outcome_rows = "".join(
        f"<tr><td>{_e(p)}</td>"
        + "".join(f"<td>{outcomes.get((p, s), 0)}</td>" for s in statuses)
        + "</tr>"
        for p in transports
    )
    outcome_table = (
        "<table><tr><th>transport</th>"
        + "".join(f"<th>{_status(s)}</th>" for s in statuses)
        + f"</tr>{outcome_rows}</table>"
        if transports
        else "<p class='info'>no push yet since this instance started</p>"
    )
    outcome_chart = ""
    if transports:
        keys = [(p, s) for p in transports for s in statuses if outcomes.get((p, s))]
        outcome_chart = _bars(
            "Outcomes by transport (since start)",
            [float(outcomes[k]) for k in keys],
            [f"{p} {s}" for p, s in keys],
        )

    health_rows = []
    last_problem: dict[str, str] = {}
    for a in relay.dispatcher.calls.recent_attempts():
        key = f"{a.provider}:{a.app}" if a.app else a.provider
        if a.status != "accepted":
            last_problem[key] = f"{a.status}: {a.reason}"
        else:
            last_problem.pop(key, None)
    limits = relay.dispatcher._limits
    for p in relay.router.providers():
        app = str(getattr(p, "app_id", "") or "")
        key = f"{p.name}:{app}" if app else p.name
        counter = limits.get(id(p))
        problem = last_problem.get(key)
        state = (
            f'<span class="bad">✗ {_e(problem)}</span>'
            if problem
            else '<span class="ok">✓ last push accepted (or none yet)</span>'
        )
        health_rows.append(
            f"<tr><td>{_e(p.description)}</td><td>{counter.count if counter else '-'} / "
            f"{counter.limit if counter else '-'}</td><td>{state}</td></tr>"
        )

    body = (
        '<div class="cards">'
        + _card(
            f"calls, last {WINDOW_MINUTES} min",
            len(calls),
            f"{len(calls) / WINDOW_MINUTES:.2f} / min",
        )
        + _card("delivered to every device", success, f"of {len(pushed)} calls with devices")
        + _card("calls with nobody to push to", no_devices)
        + _card(
            "p99 eventTime → first push",
            "-" if p99 is None else f"{p99 * 1000:.0f} ms",
            "this instance",
        )
        + "</div>"
        + _bars(f"Calls per minute (last {WINDOW_MINUTES} min, UTC)", per_minute, minutes)
        + _bars("p99 eventTime → first accepted push per minute", p99_by_minute, minutes, " ms")
        + "<h2>Transports</h2><table><tr><th>transport</th><th>in flight / limit</th>"
        f"<th>health</th></tr>{''.join(health_rows)}</table>"
        + f"<h2>Outcomes by transport</h2>{outcome_table}{outcome_chart}"
        + f"<p>store: {_e(relay.store.description)}</p>"
    )
    return HTMLResponse(_page("Overview", body))


@router.get("/calls", response_class=HTMLResponse)
async def calls(request: Request) -> Response:
    if (refused := await _guarded(request)) is not None:
        return refused
    relay: Relay = request.app.state.relay
    events = [e for e in await relay.store.recent_events(200) if e.correlation_id]
    rows = "".join(
        f"<tr><td>{_e(iso(e.received_at))}</td>"
        f'<td><a href="/dashboard/calls/{quote(e.correlation_id or "", safe="")}">'
        f"{_e(e.correlation_id)}</a></td><td>{_e(e.recipient)}</td><td>{_status(e.status)}</td>"
        f"<td>{len(e.deliveries)}</td><td>{_e(e.reason)}</td></tr>"
        for e in events
    )
    body = (
        "<table><tr><th>received</th><th>callId</th><th>callee</th><th>status</th>"
        f"<th>devices</th><th>reason</th></tr>{rows}</table>"
        if rows
        else "<p class='info'>no call recorded</p>"
    )
    return HTMLResponse(_page("Recent calls", body))


@router.get("/calls/{call_id}", response_class=HTMLResponse)
async def call_page(call_id: str, request: Request) -> Response:
    if (refused := await _guarded(request)) is not None:
        return refused
    relay: Relay = request.app.state.relay
    events = await relay.store.events_for_call(call_id)
    if not events:
        return HTMLResponse(
            _page("Call not found", "<p>no event recorded for this callId</p>"), 404
        )
    trace = call_trace(call_id, events, relay.dispatcher.calls)
    parts = []
    for ev in trace["events"]:
        receipts = "".join(
            f"<li>received {_e(r['received_at'])}, Event Grid delivery count "
            f"{_e(r['delivery_count'] if r['delivery_count'] is not None else '-')}, instance "
            f"{_e(r['instance'])}</li>"
            for r in ev["receipts"]
        )
        first = (
            f"<p>first accepted push {_e(ev['first_push_at'])}: "
            f"{_e(ev['first_push_after_event_seconds'])} s after eventTime, "
            f"{_e(ev['first_push_after_receipt_seconds'])} s after receipt</p>"
            if ev["first_push_at"]
            else ""
        )
        devices = []
        for d in ev["deliveries"]:
            attempts = "".join(
                f"<tr><td>#{a['attempt']}</td><td>{_e(a['at'])}</td><td>{_e(a['provider'])} "
                f"{_e(a['app'])}</td><td>{_status(a['status'])}</td><td>{_e(a['http_status'])}"
                f"</td><td>{a['latency_ms']:.1f} ms</td><td>{_e(a['reason'])}</td>"
                f"<td><code>{_e(a['provider_ref'])}</code></td></tr>"
                for a in d["attempt_log"]
            )
            devices.append(
                f'<tr class="device"><td>{_e(d["device_id"])}</td><td>{_e(d["platform"])}</td>'
                f"<td>{_status(d['status'])}</td><td>{_e(d['provider'])}</td>"
                f"<td>{d['attempts']}</td><td>{_e(d['reason'])}</td>"
                f"<td><code>{_e(d['provider_ref'])}</code></td><td>{_e(d['token'])}</td>"
                f"<td>{_e(d['explanation'])}</td></tr>"
                + (
                    f'<tr><td></td><td colspan="8"><table><tr><th>attempt</th><th>at</th>'
                    f"<th>transport</th><th>status</th><th>HTTP</th><th>latency</th>"
                    f"<th>reason</th><th>provider ref</th></tr>{attempts}</table></td></tr>"
                    if attempts
                    else ""
                )
            )
        parts.append(
            f"<h2>event {_e(ev['id'])}: {_status(ev['status'])}</h2>"
            f"<p>{_e(ev['explanation'])}</p>"
            + (f"<p>reason: {_e(ev['reason'])}</p>" if ev["reason"] else "")
            + f"<p>callee {_e(ev['recipient'])}; eventTime {_e(ev['event_time'] or '-')}; "
            f"devices found: {ev['devices_found']}</p><ul>{receipts}</ul>{first}"
            + (
                "<table><tr><th>device</th><th>platform</th><th>final state</th>"
                "<th>transport</th><th>attempts</th><th>reason</th><th>provider ref</th>"
                f"<th>token</th><th>what it means</th></tr>{''.join(devices)}</table>"
                if devices
                else ""
            )
        )
    return HTMLResponse(_page(f"Call {call_id}", "".join(parts)))


@router.get("/identities", response_class=HTMLResponse)
async def identities(request: Request, rawid: str = "") -> Response:
    if (refused := await _guarded(request)) is not None:
        return refused
    from ringrelay.ops.doctor import diagnose_identity

    relay: Relay = request.app.state.relay
    form = (
        '<form method="get" action="/dashboard/identities"><input type="text" name="rawid" '
        f'placeholder="8:acs:…" value="{_e(rawid)}"> <button type="submit">Search</button></form>'
    )
    if not rawid:
        return HTMLResponse(_page("Registrations", form))
    now = time.time()
    regs = await relay.store.list_registrations(rawid.strip(), 0.0)
    reg_rows = "".join(
        f"<tr><td>{_e(r.device_id)}</td><td>{_e(r.platform.value)}</td>"
        f"<td>{_e(r.push_kind.value)}</td><td>{_e(r.app_id or '-')}</td>"
        f"<td>{_e(fingerprint(r.token))}</td><td>{_e(iso(r.expires_at))}"
        f"{' (expired)' if r.expires_at <= now else ''}</td></tr>"
        for r in regs
    )
    findings = await diagnose_identity(
        relay.settings, rawid.strip(), store=relay.store, router=relay.router
    )
    finding_rows = "".join(
        f'<tr><td class="{ {True: "ok", False: "bad", None: "info"}[f.ok] }">'
        f"{ {True: '✓', False: '✗', None: '•'}[f.ok] }</td><td>{_e(f.what)}</td>"
        f"<td>{_e(f.fix)}</td></tr>"
        for f in findings
    )
    body = (
        form
        + "<h2>Devices</h2>"
        + (
            "<table><tr><th>device</th><th>platform</th><th>kind</th><th>app</th>"
            f"<th>token</th><th>expires</th></tr>{reg_rows}</table>"
            if reg_rows
            else "<p class='bad'>no registration</p>"
        )
        + "<h2>Why it does (not) ring</h2><table><tr><th></th><th>finding</th><th>fix</th></tr>"
        f"{finding_rows}</table>"
    )
    return HTMLResponse(_page(f"Registrations of {rawid}", body))


@router.get("/removed", response_class=HTMLResponse)
async def removed(request: Request) -> Response:
    if (refused := await _guarded(request)) is not None:
        return refused
    from ringrelay.ops.doctor import removal_cause

    relay: Relay = request.app.state.relay
    rows = "".join(
        f"<tr><td>{_e(iso(r.removed_at))}</td>"
        f'<td><a href="/dashboard/identities?rawid={quote(r.identity, safe="")}">'
        f"{_e(r.identity)}</a></td><td>{_e(r.device_id)}</td><td>{_e(r.platform)}</td>"
        f"<td>{_e(r.token_fingerprint)}</td><td>{_e(r.reason)}</td>"
        f"<td>{_e(removal_cause(r.reason))}</td></tr>"
        for r in await relay.store.recent_removals(200)
    )
    body = (
        "<table><tr><th>removed</th><th>identity</th><th>device</th><th>platform</th>"
        f"<th>token</th><th>provider's reason</th><th>usually means</th></tr>{rows}</table>"
        if rows
        else "<p class='info'>no token removed</p>"
    )
    return HTMLResponse(_page("Removed tokens", body))


@router.get("/doctor", response_class=HTMLResponse)
async def doctor(request: Request) -> Response:
    if (refused := await _guarded(request)) is not None:
        return refused
    from ringrelay.ops.doctor import run_doctor

    relay: Relay = request.app.state.relay
    findings = await run_doctor(relay.settings)
    rows = "".join(
        f'<tr><td class="{ {True: "ok", False: "bad", None: "info"}[f.ok] }">'
        f"{ {True: '✓', False: '✗', None: '•'}[f.ok] }</td><td>{_e(f.area)}</td>"
        f"<td>{_e(f.what)}</td><td><pre>{_e(f.fix)}</pre></td></tr>"
        for f in findings
    )
    failed = sum(1 for f in findings if f.ok is False)
    body = (
        f'<p class="{"bad" if failed else "ok"}">'
        f"{f'{failed} check(s) failed' if failed else 'all checks passed'} "
        "(probes just sent, as `ringrelay doctor` sends them)</p>"
        f"<table><tr><th></th><th>area</th><th>check</th><th>fix</th></tr>{rows}</table>"
    )
    return HTMLResponse(_page("Doctor", body))
