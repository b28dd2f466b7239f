"""Command-line parts of call routing: `ringrelay numbers`, `rules test`, `eventgrid filters`,
`fake callautomation` and `simulate pstn-call` (registered by cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

CONFIG_HELP = "TOML settings file (also RINGRELAY_CONFIG)"


def _settings(args: argparse.Namespace) -> Any:
    from ringrelay.config import ConfigError, load_settings

    try:
        return load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"ringrelay: {exc}", file=sys.stderr)
        return None


async def _with_store(settings: Any, job: Any) -> Any:
    from ringrelay.store import open_store

    store = open_store(settings.database_url)
    await store.open()
    try:
        return await job(store)
    finally:
        await store.close()


# --- numbers -------------------------------------------------------------------------------


def numbers_command(args: argparse.Namespace) -> int:
    from ringrelay.routing.numbers import (
        NumberAssignment,
        NumberError,
        check_assignment_target,
        check_e164,
        redirect_loop,
    )

    settings = _settings(args)
    if settings is None:
        return 2

    async def run(store: Any) -> int:
        if args.action == "list":
            for a in await store.list_numbers():
                print(f"{a.e164:16}  {a.target}" + (f"  ({a.label})" if a.label else ""))
            return 0
        try:
            number = check_e164(args.e164)
            target = check_assignment_target(args.target, number) if args.action == "assign" else ""
        except NumberError as exc:
            print(f"ringrelay numbers: {exc}", file=sys.stderr)
            return 2
        if args.action == "remove":
            if not await store.delete_number(number):
                print(f"ringrelay numbers: {number} is not assigned", file=sys.stderr)
                return 1
            print(f"removed {number}")
            return 0
        loop = await redirect_loop(store, number, target)
        if loop is not None:
            print(f"ringrelay numbers: target: would form a redirect loop: {loop}", file=sys.stderr)
            return 2
        now = time.time()
        existing = await store.get_number(number)
        await store.put_number(
            NumberAssignment(
                number, target, args.label or "", existing.created_at if existing else now, now
            )
        )
        print(f"{number} -> {target}" + (" (reassigned)" if existing else ""))
        if not settings.call_automation_configured:
            print(
                "note: calls to it are redirected only once Call Automation is configured "
                "(RINGRELAY_ACS_CONNECTION_STRING)"
            )
        return 0

    return int(asyncio.run(_with_store(settings, run)))


# --- rules test ----------------------------------------------------------------------------


def _events_of(path: str) -> list[dict[str, Any]]:
    doc = json.loads(Path(path).read_text())
    events = doc if isinstance(doc, list) else [doc]
    return [e for e in events if isinstance(e, dict)]


def rules_test_command(args: argparse.Namespace) -> int:
    """Which rule matches each event of the file and what would happen; nothing is done."""
    from ringrelay.routing.numbers import phone_number_of
    from ringrelay.routing.rules import event_view, first_match

    settings = _settings(args)
    if settings is None:
        return 2
    try:
        events = _events_of(args.event_file)
    except (OSError, ValueError) as exc:
        print(f"ringrelay rules test: {args.event_file}: {exc}", file=sys.stderr)
        return 2
    if not events:
        print("ringrelay rules test: no event object in the file", file=sys.stderr)
        return 2
    print(f"{len(settings.rules)} rule(s) configured")

    async def numbers(store: Any) -> dict[str, str]:
        return {a.e164: a.target for a in await store.list_numbers()}

    assigned: dict[str, str] | None = None
    for event in events:
        view = event_view(event)
        data = view.get("data") if isinstance(view.get("data"), dict) else {}
        to = (data.get("to") or {}).get("rawId", "?") if isinstance(data, dict) else "?"
        print(f"event {view.get('id')} ({view.get('eventType')}) to {to}:")
        match = first_match(settings.rules, event)
        if match is not None:
            rule = match.rule
            print(f"  matches rule #{match.index + 1} {rule.name!r}")
            for c in rule.conditions:
                print(f"    {c.key} {c.operator} {c.values or ''}".rstrip())
            what = {
                "push": f"push to {rule.target or to}'s devices",
                "redirect": f"redirect to {rule.target} (Call Automation)",
                "reject": f"reject ({rule.reason or 'none'}) (Call Automation)",
                "ignore": "ignore (answered 200, nothing pushed)",
            }[rule.action]
            print(f"  would {what}")
            continue
        print("  no rule matches")
        number = phone_number_of(str(to))
        if number is not None:
            if assigned is None:
                assigned = asyncio.run(_with_store(settings, numbers))
            if number in assigned:
                print(f"  would redirect to {assigned[number]} (number {number} is assigned)")
                continue
        print(f"  would push to {to}'s devices")
    return 0


# --- eventgrid filters ---------------------------------------------------------------------


def eventgrid_filters_command(args: argparse.Namespace) -> int:
    from ringrelay.routing.filters import subscription_filters

    settings = _settings(args)
    if settings is None:
        return 2
    plan = subscription_filters(settings.rules)
    if args.format == "json":
        print(json.dumps(plan, indent=2))
        return 0
    blocks = [("ringrelay's webhook subscription", plan["webhook_subscription"])]
    blocks += [(f"rule {r['rule']!r} ({r['action']})", r) for r in plan["rules"]]
    for title, block in blocks:
        print(f"# {title}" + ("" if block["exact"] else "  [NOT EXACT]"))
        for note in block["notes"]:
            print(f"#   {note}")
        if args.format == "az":
            if block.get("az_warning"):
                print(f"#   {block['az_warning']}")
            print(
                f"az eventgrid event-subscription create --name … --source-resource-id … "
                f"--endpoint … {block['az']}"
            )
        else:
            print(json.dumps({"filter": block["filter"]}, indent=2))
        print()
    return 0


# --- fake and simulation ---------------------------------------------------------------------


def fake_callautomation_command(args: argparse.Namespace) -> int:
    from ringrelay.fakes import callautomation

    asyncio.run(
        callautomation.run_forever(args.host, args.port, args.tls_dir, args.webhook, args.key)
    )
    return 0


async def _pstn_call(args: argparse.Namespace) -> int:
    import ssl

    import aiohttp

    ca = Path(args.tls_dir) / "ca.pem"
    ctx = ssl.create_default_context(cafile=str(ca)) if ca.is_file() else None
    to = args.to if args.to.startswith("4:") else f"4:{args.to}"
    caller = args.caller if args.caller.startswith("4:") else f"4:{args.caller}"
    server = args.server.rstrip("/")
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    async with aiohttp.ClientSession() as http:
        print(f"1. the PSTN carrier rings {to} from {caller}: ACS raises an IncomingCall")
        async with http.post(
            f"{args.fake.rstrip('/')}/_fake/calls",
            json={"to": to, "from": caller},
            ssl=ctx if ctx is not None else True,
        ) as resp:
            placed = await resp.json()
        correlation = placed["event"]["data"]["correlationId"]
        answer = placed.get("webhook_answer")
        if placed.get("webhook_status") is None:
            print("   the fake could not reach ringrelay: start it with --webhook <ringrelay>")
            return 1
        print(f"   ringrelay answered HTTP {placed['webhook_status']} (callId {correlation})")
        for report in answer.get("events", []) if isinstance(answer, dict) else []:
            reason = f" — {report['reason']}" if report.get("reason") else ""
            print(f"2. routing: {report['status']}{reason}")
        async with http.get(
            f"{args.fake.rstrip('/')}/_fake/actions", ssl=ctx if ctx is not None else True
        ) as resp:
            actions = [
                a for a in (await resp.json())["actions"] if a.get("correlationId") == correlation
            ]
        for a in actions:
            target = (a.get("target") or {}).get("rawId", a.get("reason"))
            print(f"3. Call Automation received {a['kind']} -> {target}: HTTP {a['status']}")
        if not any(a["kind"] == "redirect" and a["status"] == 204 for a in actions):
            print("   no redirect: nothing more to see")
            return 0
        events: list[dict[str, Any]] = []
        for _ in range(100):
            async with http.get(f"{server}/v1/calls/{correlation}", headers=headers) as resp:
                events = (await resp.json()).get("events", []) if resp.status == 200 else []
            if len(events) >= 2 and all(e["status"] != "pending" for e in events):
                break
            await asyncio.sleep(0.05)
        for ev in events[1:]:
            print(
                f"4. ACS raised the follow-up IncomingCall for {ev['recipient']}: {ev['status']}"
                + (f" — {ev['reason']}" if ev.get("reason") else "")
            )
            for d in ev["deliveries"]:
                print(
                    f"   - device {d['device_id']} [{d['platform']}] {d['status']} "
                    f"via {d['provider'] or '-'}"
                )
        async with http.get(
            f"{server}/v1/sandbox/pushes?call_id={correlation}", headers=headers
        ) as resp:
            if resp.status == 200:
                pushes = (await resp.json())["pushes"]
                print(
                    f"5. the sandbox holds {len(pushes)} push(es) for this call "
                    f"(GET {server}/v1/sandbox/pushes?call_id={correlation})"
                )
    return 0


def simulate_pstn_call_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_pstn_call(args))
    except OSError as exc:
        print(f"ringrelay simulate pstn-call: {exc}", file=sys.stderr)
        return 1


def add_commands(sub: Any, simulate_sub: Any, fake_sub: Any, eventgrid_sub: Any) -> None:
    """Register the routing commands on cli.py's parsers (`eventgrid` is shared with the
    deployment's `eventgrid subscription`)."""
    numbers = sub.add_parser("numbers", help="PSTN number assignment (number -> identity)")
    numbers_sub = numbers.add_subparsers(dest="action", required=True)
    assign = numbers_sub.add_parser("assign", help="redirect a number's calls to an identity")
    assign.add_argument("e164", help="+14255551212")
    assign.add_argument("target", help="8:acs:<resource>_<user>, 8:orgid:<id> or +E.164")
    assign.add_argument("--label", default="")
    listing = numbers_sub.add_parser("list", help="list assigned numbers")
    remove = numbers_sub.add_parser("remove", help="remove a number's assignment")
    remove.add_argument("e164")
    for p in (assign, listing, remove):
        p.add_argument("--config", help=CONFIG_HELP)
    numbers.set_defaults(func=numbers_command)

    rules = sub.add_parser("rules", help="call routing rules")
    rules_sub = rules.add_subparsers(dest="action", required=True)
    test = rules_sub.add_parser("test", help="which rule an event matches, without acting")
    test.add_argument("event_file", metavar="EVENT.json")
    test.add_argument("--config", help=CONFIG_HELP)
    test.set_defaults(func=rules_test_command)

    filters = eventgrid_sub.add_parser("filters", help="advanced filters equivalent to the rules")
    filters.add_argument("--format", choices=["arm", "az", "json"], default="arm")
    filters.add_argument("--config", help=CONFIG_HELP)
    filters.set_defaults(func=eventgrid_filters_command)

    pstn = simulate_sub.add_parser(
        "pstn-call", help="a PSTN call through the fake Call Automation, step by step"
    )
    pstn.add_argument("--to", required=True, help="the number called, +14255551212")
    pstn.add_argument("--from", dest="caller", required=True, help="the caller, +14255550123")
    pstn.add_argument("--server", default="http://127.0.0.1:8080")
    pstn.add_argument("--fake", default="https://127.0.0.1:9446", help="fake Call Automation")
    pstn.add_argument("--tls-dir", default="./ringrelay-fake-tls", help="the fake's CA")
    pstn.add_argument("--api-key", help="a read-scoped API key, when keys are in use")
    pstn.set_defaults(func=simulate_pstn_call_command)

    ca = fake_sub.add_parser(
        "callautomation", help="fake Call Automation (HTTPS, HMAC checked, Redirect/Reject)"
    )
    ca.add_argument("--host", default="127.0.0.1")
    ca.add_argument("--port", type=int, default=9446)
    ca.add_argument("--tls-dir", default="./ringrelay-fake-tls", help="where to write the CA")
    ca.add_argument("--webhook", help="ringrelay's webhook URL for the IncomingCalls it raises")
    ca.add_argument("--key", help="access key (base64); default: a fixed test key")
    ca.set_defaults(func=fake_callautomation_command)
