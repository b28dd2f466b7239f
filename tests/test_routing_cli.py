"""Routing from the command line, as a user runs it: `[[rules]]` validated at start-up with the
rule and field named, `ringrelay rules test`, `ringrelay eventgrid filters`, `ringrelay numbers`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ringrelay.routing.filters import complement, subscription_filters
from ringrelay.routing.rules import Condition, Rule, first_match
from ringrelay.simulate import incoming_call_event
from tests.test_cli import RINGRELAY, clean_env, free_port

ACS = "endpoint=https://contoso.communication.azure.com/;accesskey=a2V5"

RULES = """
[[rules]]
name = "robots"
action = "ignore"
[[rules.conditions]]
operatorType = "StringIn"
key = "data.from.rawId"
values = ["4:+19995550000", "4:+19995550001"]

[[rules]]
name = "sales"
action = "redirect"
target = "+12065550100"
[[rules.conditions]]
operator = "StringBeginsWith"
key = "data.to.rawId"
values = ["4:+1425555"]
[[rules.conditions]]
operator = "StringNotContains"
key = "data.callerDisplayName"
values = ["internal"]

[[rules]]
name = "busy"
action = "reject"
reason = "busy"
"""


def run(
    args: list[str], tmp_path: Path, config: str, **env: str
) -> subprocess.CompletedProcess[str]:
    toml = tmp_path / "ringrelay.toml"
    toml.write_text(config)
    return subprocess.run(
        [*RINGRELAY, *args, "--config", str(toml)],
        cwd=tmp_path,
        env=clean_env() | {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_rule_is_refused_at_start_naming_rule_and_field(tmp_path: Path) -> None:
    bad = RULES.replace('values = ["4:+1425555"]', "values = [4]")
    out = run(
        ["serve", "--port", str(free_port())], tmp_path, bad, RINGRELAY_ACS_CONNECTION_STRING=ACS
    )
    assert out.returncode == 2
    assert "rules[1] (name 'sales').conditions[0]" in out.stderr, out.stderr
    assert "values must be strings" in out.stderr
    out = run(
        ["serve", "--port", str(free_port())], tmp_path, RULES
    )  # redirect/reject need Call Automation
    assert out.returncode == 2
    assert "rules[1] (name 'sales').action: redirect needs Call Automation" in out.stderr
    dup = RULES + '\n[[rules]]\nname = "busy"\naction = "ignore"\n'
    out = run(["rules", "test", "x.json"], tmp_path, dup, RINGRELAY_ACS_CONNECTION_STRING=ACS)
    assert out.returncode == 2 and "name 'busy' used twice" in out.stderr


def test_rules_test_says_which_rule_and_what_would_happen(tmp_path: Path) -> None:
    events = [
        incoming_call_event("4:+14255551212", "4:+14255550123", "Ann", event_id="e1"),
        incoming_call_event("4:+14255551212", "4:+19995550001", "x", event_id="e2"),
        incoming_call_event("8:acs:r_u", "4:+14255550123", "internal desk", event_id="e3"),
    ]
    (tmp_path / "events.json").write_text(json.dumps(events))
    out = run(
        ["rules", "test", "events.json"], tmp_path, RULES, RINGRELAY_ACS_CONNECTION_STRING=ACS
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "event e1" in text and "matches rule #2 'sales'" in text
    assert "would redirect to 4:+12065550100 (Call Automation)" in text
    assert "matches rule #1 'robots'" in text and "would ignore" in text
    assert "matches rule #3 'busy'" in text and "would reject (busy)" in text


def test_numbers_cli_and_rules_test_without_rules(tmp_path: Path) -> None:
    env = {"RINGRELAY_ACS_CONNECTION_STRING": ACS}
    out = run(
        ["numbers", "assign", "+14255551212", "8:acs:r_alice", "--label", "desk"],
        tmp_path,
        "",
        **env,
    )
    assert out.returncode == 0 and "+14255551212 -> 8:acs:r_alice" in out.stdout, out.stderr
    out = run(["numbers", "assign", "4255551212", "8:acs:r_alice"], tmp_path, "", **env)
    assert out.returncode == 2 and "e164" in out.stderr
    out = run(["numbers", "list"], tmp_path, "", **env)
    assert "8:acs:r_alice  (desk)" in out.stdout
    out = run(["numbers", "assign", "+12065550100", "+14255551212"], tmp_path, "", **env)
    assert out.returncode == 0
    out = run(["numbers", "assign", "+14255551212", "+12065550100"], tmp_path, "", **env)
    assert out.returncode == 2 and "would form a redirect loop" in out.stderr
    run(["numbers", "remove", "+12065550100"], tmp_path, "", **env)
    event = incoming_call_event("4:+14255551212", "4:+14255550123", event_id="e9")
    (tmp_path / "one.json").write_text(json.dumps(event))
    out = run(["rules", "test", "one.json"], tmp_path, "", **env)
    assert "would redirect to 8:acs:r_alice (number +14255551212 is assigned)" in out.stdout
    out = run(["numbers", "remove", "+14255551212"], tmp_path, "", **env)
    assert out.returncode == 0
    out = run(["rules", "test", "one.json"], tmp_path, "", **env)
    assert "would push to 4:+14255551212's devices" in out.stdout


def test_eventgrid_filters_cli(tmp_path: Path) -> None:
    env = {"RINGRELAY_ACS_CONNECTION_STRING": ACS}
    out = run(["eventgrid", "filters", "--format", "json"], tmp_path, RULES, **env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    webhook = plan["webhook_subscription"]
    assert webhook["exact"] and webhook["filter"]["advancedFilters"] == [
        {
            "operatorType": "StringNotIn",
            "key": "data.from.rawId",
            "values": ["4:+19995550000", "4:+19995550001"],
        }
    ]
    out = run(["eventgrid", "filters", "--format", "az"], tmp_path, RULES, **env)
    assert (
        "--advanced-filter data.from.rawId StringNotIn 4:+19995550000 4:+19995550001" in out.stdout
    )
    assert "--included-event-types Microsoft.Communication.IncomingCall" in out.stdout
    assert "[NOT EXACT]" in out.stdout  # 'busy' comes after a two-condition rule


def _rules() -> list[Rule]:
    import tomllib

    return [Rule.model_validate(r) for r in tomllib.loads(RULES)["rules"]]


def test_generated_filters_take_exactly_the_events_of_each_rule() -> None:
    """Evaluate each generated subscription filter (with our own Event Grid semantics) on many
    calls: where the plan says exact, it takes exactly the calls whose first match is its rule,
    and the webhook subscription exactly those no ignore rule drops."""
    rules = _rules()
    plan = subscription_filters(rules)
    callers = ["4:+19995550000", "4:+19995550001", "4:+14255550123", "8:acs:r_v"]
    callees = ["4:+14255551212", "4:+12065550100", "8:acs:r_u"]
    names = ["Ann", "internal line", None]
    events = []
    for caller in callers:
        for callee in callees:
            for name in names:
                ev = incoming_call_event(callee, caller, name or "")
                if name is None:
                    del ev["data"]["callerDisplayName"]
                events.append(ev)

    def takes(filter_doc: dict, event: dict) -> bool:
        conds = [Condition.model_validate(c) for c in filter_doc.get("advancedFilters", [])]
        return event["eventType"] in filter_doc["includedEventTypes"] and all(
            c.matches(event) for c in conds
        )

    checked = 0
    for index, entry in enumerate(plan["rules"]):
        if not entry["exact"]:
            continue
        for ev in events:
            first = first_match(rules, ev)
            assert takes(entry["filter"], ev) == (first is not None and first.index == index)
            checked += 1
    assert checked == 2 * len(events)  # robots and sales are exact; busy is not
    for ev in events:
        first = first_match(rules, ev)
        dropped = first is not None and first.rule.action == "ignore"
        assert takes(plan["webhook_subscription"]["filter"], ev) is not dropped


def test_complements() -> None:
    cond = Condition.model_validate(
        {"operatorType": "StringContains", "key": "data.callerDisplayName", "values": ["x"]}
    )
    assert complement(cond) is None  # a missing key fails both: not an exact complement
    cond = Condition.model_validate(
        {"operatorType": "StringContains", "key": "subject", "values": ["x"]}
    )
    inverse = complement(cond)
    assert inverse is not None and inverse.operator == "StringNotContains"
    rng = Condition.model_validate(
        {"operatorType": "NumberInRange", "key": "data.n", "values": [[1, 2]]}
    )
    assert complement(rng) is not None and complement(rng).operator == "NumberNotInRange"  # type: ignore[union-attr]


def test_simulate_pstn_call_end_to_end_with_the_fake(tmp_path: Path) -> None:
    """`ringrelay fake callautomation`, `ringrelay serve` and `ringrelay simulate pstn-call` as
    three processes: the number's call is redirected, the fake raises the follow-up, it rings."""
    import urllib.request

    from tests.test_cli import free_port, serve, wait_healthy

    server_port, fake_port = free_port(), free_port()
    fake = subprocess.Popen(
        [*RINGRELAY, "fake", "callautomation", "--port", str(fake_port), "--tls-dir", "tls",
         "--webhook", f"http://127.0.0.1:{server_port}/api/events"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = None
    try:
        assert fake.stdout is not None
        lines = [fake.stdout.readline() for _ in range(4)]
        connection = next(x for x in lines if "RINGRELAY_ACS_CONNECTION_STRING" in x)
        env = clean_env() | {
            "RINGRELAY_ACS_CONNECTION_STRING": connection.split("=", 1)[1].strip().strip("'"),
            "RINGRELAY_ACS_CA_FILE": str(tmp_path / "tls" / "ca.pem"),
            "RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}",
        }
        server = serve(server_port, tmp_path, env)
        url = f"http://127.0.0.1:{server_port}"
        wait_healthy(url, server)
        put = urllib.request.Request(
            f"{url}/v1/numbers/+14255551212",
            data=b'{"target": "8:acs:r_alice"}',
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(put).status == 201
        device = urllib.request.Request(
            f"{url}/v1/identities/8:acs:r_alice/devices/iphone",
            data=b'{"platform": "apns", "token": "' + b"ab" * 32 + b'"}',
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(device).status == 201
        out = subprocess.run(
            [*RINGRELAY, "simulate", "pstn-call", "--to", "+14255551212", "--from",
             "+14255550123", "--server", url, "--fake", f"https://127.0.0.1:{fake_port}",
             "--tls-dir", "tls"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout
        assert "2. routing: redirected — number +14255551212: redirected to 8:acs:r_alice" in text
        assert "3. Call Automation received redirect -> 8:acs:r_alice: HTTP 204" in text
        assert "4. ACS raised the follow-up IncomingCall for 8:acs:r_alice: delivered" in text
        assert "device iphone [apns] accepted via sandbox" in text
        assert "5. the sandbox holds 1 push(es)" in text
    finally:
        for proc in (server, fake):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)


def test_az_flags_spell_ranges_nulls_and_warn_on_bool_false() -> None:
    rules = [
        Rule.model_validate(
            {
                "name": "r",
                "action": "ignore",
                "conditions": [
                    {"operatorType": "NumberInRange", "key": "data.n", "values": [[1, 2], [5, 9]]},
                    {"operatorType": "IsNotNull", "key": "data.x"},
                    {"operatorType": "BoolEquals", "key": "data.b", "value": False},
                ],
            }
        )
    ]
    (entry,) = subscription_filters(rules)["rules"]
    assert "--advanced-filter data.n NumberInRange 1,2 5,9" in entry["az"]
    assert "--advanced-filter data.x IsNotNull --advanced-filter" in entry["az"]
    assert "az turns `BoolEquals false` into true" in entry["az_warning"]
    assert entry["filter"]["advancedFilters"][2] == {
        "operatorType": "BoolEquals",
        "key": "data.b",
        "value": False,
    }
