"""Event Grid subscription filters equivalent to the routing rules (`ringrelay eventgrid filters`).

Event Grid ANDs advanced filters and ORs the values inside one; it has no OR across filters and
no NOT. So each rule becomes one subscription filter: its own conditions, plus the complement of
every earlier rule (first match wins) where an exact complement exists. A complement is exact
when the two operators split every event in two, the missing-key case included (StringIn /
StringNotIn, NumberIn / NumberNotIn, NumberInRange / NumberNotInRange, IsNullOrUndefined /
IsNotNull), or when the key is one that every IncomingCall carries (then StringContains /
StringNotContains and the other pairs are exact too). Anything else is printed with
`exact: false` and the reason. Limits (event-filtering.md, "Limitations"): 25 advanced filters
and 25 filter values across all filters of one subscription.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from ringrelay.events.ingest import INCOMING_CALL
from ringrelay.routing.rules import Condition, Rule

MAX_FILTERS = 25
MAX_VALUES = 25

# Present in every IncomingCall (MicrosoftDocs/azure-docs
# articles/event-grid/communication-services-voice-video-events.md).
ALWAYS_PRESENT = frozenset(
    k.lower()
    for k in (
        "id",
        "subject",
        "eventType",
        "topic",
        "data.to.rawId",
        "data.to.kind",
        "data.from.rawId",
        "data.from.kind",
        "data.correlationId",
        "data.serverCallId",
        "data.incomingCallContext",
    )
)

_ALWAYS_EXACT = {
    "StringIn": "StringNotIn",
    "NumberIn": "NumberNotIn",
    "NumberInRange": "NumberNotInRange",
    "IsNullOrUndefined": "IsNotNull",
}
_EXACT_WHEN_PRESENT = {
    "StringContains": "StringNotContains",
    "StringBeginsWith": "StringNotBeginsWith",
    "StringEndsWith": "StringNotEndsWith",
}


def complement(condition: Condition) -> Condition | None:
    """The condition matching exactly the events `condition` does not, if Event Grid has one."""
    pairs = {**_ALWAYS_EXACT, **{v: k for k, v in _ALWAYS_EXACT.items()}}
    if condition.key.lower() in ALWAYS_PRESENT:
        pairs.update(_EXACT_WHEN_PRESENT)
        pairs.update({v: k for k, v in _EXACT_WHEN_PRESENT.items()})
    other = pairs.get(condition.operator)
    if other is None:
        return None
    return Condition.model_validate(
        {"operatorType": other, "key": condition.key, "values": list(condition.values)}
    )


def _value_count(filters: list[dict[str, Any]]) -> int:
    return sum(len(f.get("values", [])) + (1 if "value" in f else 0) for f in filters)


def _plan(conditions: list[Condition], notes: list[str]) -> dict[str, Any]:
    advanced = [c.as_event_grid() for c in conditions]
    if len(advanced) > MAX_FILTERS:
        notes.append(f"{len(advanced)} advanced filters: Event Grid takes at most {MAX_FILTERS}")
    if _value_count(advanced) > MAX_VALUES:
        notes.append(
            f"{_value_count(advanced)} filter values: Event Grid takes at most {MAX_VALUES}"
        )
    arm: dict[str, Any] = {"includedEventTypes": [INCOMING_CALL]}
    if advanced:
        arm["advancedFilters"] = advanced
        arm["enableAdvancedFilteringOnArrays"] = True
    plan: dict[str, Any] = {
        "exact": not notes,
        "notes": notes,
        "filter": arm,
        "az": az_flags(conditions),
    }
    if any(c.operator == "BoolEquals" and c.values[0] is False for c in conditions):
        # azure-cli builds the filter with bool(<text>), and bool("false") is True.
        plan["az_warning"] = "az turns `BoolEquals false` into true: use the ARM JSON"
    return plan


def _excluding(earlier: Sequence[Rule], notes: list[str]) -> list[Condition]:
    out: list[Condition] = []
    for rule in earlier:
        if not rule.conditions:
            notes.append(f"rule {rule.name!r} matches every call: later rules never run")
            continue
        inverse = complement(rule.conditions[0]) if len(rule.conditions) == 1 else None
        if inverse is None:
            notes.append(
                f"cannot exclude the events of earlier rule {rule.name!r} (Event Grid has no "
                "NOT of several conditions, or no exact complement of this operator)"
            )
            continue
        out.append(inverse)
    return out


def subscription_filters(rules: Sequence[Rule]) -> dict[str, Any]:
    """One filter per rule (the events that rule takes), and the filter for ringrelay's own
    webhook subscription: every IncomingCall but those an `ignore` rule drops."""
    per_rule = []
    for index, rule in enumerate(rules):
        notes: list[str] = []
        conditions = [*rule.conditions, *_excluding(rules[:index], notes)]
        per_rule.append({"rule": rule.name, "action": rule.action, **_plan(conditions, notes)})

    notes = []
    webhook: list[Condition] = []
    seen_other = False
    for rule in rules:
        if rule.action != "ignore":
            seen_other = True
            continue
        if seen_other:
            notes.append(
                f"ignore rule {rule.name!r} comes after other rules: the events it drops cannot "
                "be told apart in Event Grid; ringrelay keeps dropping them"
            )
            continue
        webhook += _excluding([rule], notes)
    return {"webhook_subscription": _plan(webhook, notes), "rules": per_rule}


def _az_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # a range: low,high
        return ",".join(_az_value(v) for v in value)
    return str(value)


def az_flags(conditions: Sequence[Condition]) -> str:
    """`az eventgrid event-subscription create` flags: `--advanced-filter KEY OPERATOR VALUE...`
    (ranges as `low,high`, no value for IsNullOrUndefined / IsNotNull), one flag per condition,
    as azure-cli parses them (Azure/azure-cli `src/azure-cli/azure/cli/command_modules/
    eventgrid/advanced_filter.py`)."""
    parts = ["--included-event-types", INCOMING_CALL]
    for c in conditions:
        parts += ["--advanced-filter", c.key, c.operator, *(_az_value(v) for v in c.values)]
    if conditions:
        parts += ["--enable-advanced-filtering-on-arrays", "true"]
    return shlex.join(parts)
