"""Routing rules: conditions with Event Grid's advanced-filter semantics, and what to do on a match.

Semantics (learn.microsoft.com/azure/event-grid/event-filtering; MicrosoftDocs/azure-docs
`articles/event-grid/event-filtering.md`), so that a rule can be moved into an Event Grid
subscription unchanged:
- keys are dot paths into the event (`subject`, `eventType`, `data.to.rawId`);
- string comparisons ignore case;
- the values of one condition are OR'd, the conditions of a rule AND'd;
- an array key is checked value by value ("FOR_EACH key IN (v1, v2, v3)"), and key values of
  another type than the filter's are ignored;
- a missing key is "not matched" for NumberGreaterThan, NumberGreaterThanOrEquals,
  NumberLessThan, NumberLessThanOrEquals, NumberIn, BoolEquals, StringContains,
  StringNotContains, StringBeginsWith, StringNotBeginsWith, StringEndsWith, StringNotEndsWith,
  StringIn, and "matched" for NumberNotIn and StringNotIn (the page's note, verbatim list).
Not settled by the page, decided here: NumberInRange with a missing key does not match (as every
other positive operator); NumberNotInRange with a missing key matches (as NumberNotIn, its
set-exclusion sibling); a JSON `null` is treated as a missing key (IsNullOrUndefined says the
two are alike); envelope keys (`id`, `subject`, `eventType`, `topic`...) are looked up ignoring
case, as the page spells them both ways (`ID`, `Subject`, `EventType`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ringrelay.models import is_raw_id

# Event Grid: 512 characters per string value (event-filtering.md, Limitations).
MAX_STRING_VALUE = 512

NUMBER_SET_OPS = ("NumberIn", "NumberNotIn")
NUMBER_COMPARE_OPS = (
    "NumberLessThan",
    "NumberGreaterThan",
    "NumberLessThanOrEquals",
    "NumberGreaterThanOrEquals",
)
NUMBER_RANGE_OPS = ("NumberInRange", "NumberNotInRange")
STRING_OPS = (
    "StringContains",
    "StringNotContains",
    "StringBeginsWith",
    "StringNotBeginsWith",
    "StringEndsWith",
    "StringNotEndsWith",
    "StringIn",
    "StringNotIn",
)
NULL_OPS = ("IsNullOrUndefined", "IsNotNull")
OPERATORS = (
    *NUMBER_SET_OPS,
    *NUMBER_COMPARE_OPS,
    *NUMBER_RANGE_OPS,
    "BoolEquals",
    *STRING_OPS,
    *NULL_OPS,
)
# "FAIL_MATCH" operators: true unless some key value hits some filter value.
NEGATED = frozenset(
    {
        "NumberNotIn",
        "NumberNotInRange",
        "StringNotContains",
        "StringNotBeginsWith",
        "StringNotEndsWith",
        "StringNotIn",
    }
)
# A missing key matches only these (the page's note; NumberNotInRange decided above).
MATCH_WHEN_MISSING = frozenset({"NumberNotIn", "StringNotIn", "NumberNotInRange"})

Operator = Literal[
    "NumberIn",
    "NumberNotIn",
    "NumberLessThan",
    "NumberGreaterThan",
    "NumberLessThanOrEquals",
    "NumberGreaterThanOrEquals",
    "NumberInRange",
    "NumberNotInRange",
    "BoolEquals",
    "StringContains",
    "StringNotContains",
    "StringBeginsWith",
    "StringNotBeginsWith",
    "StringEndsWith",
    "StringNotEndsWith",
    "StringIn",
    "StringNotIn",
    "IsNullOrUndefined",
    "IsNotNull",
]

_MISSING = object()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def lookup(event: dict[str, Any], key: str) -> Any:
    """The value at the dot path `key`, or `_MISSING`. Each segment is matched exactly first,
    then ignoring case."""
    node: Any = event
    for part in key.split("."):
        if not isinstance(node, dict):
            return _MISSING
        if part in node:
            node = node[part]
            continue
        lowered = part.lower()
        for name, value in node.items():
            if isinstance(name, str) and name.lower() == lowered:
                node = value
                break
        else:
            return _MISSING
    return node


def event_view(envelope: dict[str, Any]) -> dict[str, Any]:
    """The event as rules see it: a CloudEvent also answers to the Event Grid schema's names
    (`eventType` for `type`, `topic` for `source`), so one rule fits both schemas."""
    if "specversion" not in envelope and "specVersion" not in envelope:
        return envelope
    view = dict(envelope)
    view.setdefault("eventType", envelope.get("type"))
    view.setdefault("topic", envelope.get("source"))
    view.setdefault("eventTime", envelope.get("time"))
    return view


class Condition(BaseModel):
    """One advanced filter: `{operatorType, key, values | value}` as Event Grid writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    operator: Operator = Field(validation_alias="operatorType", alias="operatorType")
    key: str = Field(min_length=1, max_length=256)
    values: list[Any] = Field(default_factory=list)
    value: Any = None

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        if any(not part.strip() for part in key.split(".")):
            raise ValueError("a dot path like data.to.rawId, with no empty segment")
        return key

    @model_validator(mode="after")
    def _check_values(self) -> Condition:
        op = self.operator
        given = self.values if self.values else ([] if self.value is None else [self.value])
        if self.values and self.value is not None:
            raise ValueError("give `values` or `value`, not both")
        if op in NULL_OPS:
            if given:
                raise ValueError(f"{op} takes no values")
            return self
        if not given:
            raise ValueError(f"{op} needs `values` (or `value`)")
        if op in NUMBER_COMPARE_OPS:
            if len(given) != 1 or not _is_number(given[0]):
                raise ValueError(f"{op} compares with one number (`value`)")
        elif op in NUMBER_SET_OPS:
            if not all(_is_number(v) for v in given):
                raise ValueError(f"{op} values must be numbers")
        elif op in NUMBER_RANGE_OPS:
            for pair in given:
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or not all(_is_number(v) for v in pair)
                    or pair[0] > pair[1]
                ):
                    raise ValueError(f"{op} values must be [low, high] number pairs, low <= high")
        elif op == "BoolEquals":
            if len(given) != 1 or not isinstance(given[0], bool):
                raise ValueError("BoolEquals compares with one boolean (`value`)")
        else:
            for v in given:
                if not isinstance(v, str):
                    raise ValueError(f"{op} values must be strings")
                if len(v) > MAX_STRING_VALUE:
                    raise ValueError(f"a string value is limited to {MAX_STRING_VALUE} characters")
        object.__setattr__(self, "values", list(given))
        object.__setattr__(self, "value", None)
        return self

    # --- evaluation ----------------------------------------------------------------------

    def matches(self, event: dict[str, Any]) -> bool:
        found = lookup(event, self.key)
        missing = found is _MISSING or found is None
        op = self.operator
        if op == "IsNullOrUndefined":
            return missing
        if op == "IsNotNull":
            return not missing
        if missing:
            return op in MATCH_WHEN_MISSING
        keys = found if isinstance(found, list) else [found]
        hit = _PREDICATES[op]
        if op in NUMBER_COMPARE_OPS or op == "BoolEquals":
            filters: Sequence[Any] = self.values[:1]
        else:
            filters = self.values
        any_hit = any(hit(k, f) for f in filters for k in keys if _same_type(op, k))
        return not any_hit if op in NEGATED else any_hit

    def as_event_grid(self) -> dict[str, Any]:
        """The ARM JSON shape (`operatorType`, `key`, `value` | `values`)."""
        out: dict[str, Any] = {"operatorType": self.operator, "key": self.key}
        if self.operator in NUMBER_COMPARE_OPS or self.operator == "BoolEquals":
            out["value"] = self.values[0]
        elif self.operator not in NULL_OPS:
            out["values"] = list(self.values)
        return out


def _same_type(op: str, value: object) -> bool:
    if op == "BoolEquals":
        return isinstance(value, bool)
    if op.startswith("Number"):
        return _is_number(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    return isinstance(value, str)


def _fold(value: Any) -> str:
    return str(value).casefold()


_PREDICATES: dict[str, Callable[[Any, Any], bool]] = {
    "NumberIn": lambda k, f: float(k) == float(f),
    "NumberNotIn": lambda k, f: float(k) == float(f),
    "NumberLessThan": lambda k, f: float(k) < float(f),
    "NumberGreaterThan": lambda k, f: float(k) > float(f),
    "NumberLessThanOrEquals": lambda k, f: float(k) <= float(f),
    "NumberGreaterThanOrEquals": lambda k, f: float(k) >= float(f),
    "NumberInRange": lambda k, f: float(f[0]) <= float(k) <= float(f[1]),
    "NumberNotInRange": lambda k, f: float(f[0]) <= float(k) <= float(f[1]),
    "BoolEquals": lambda k, f: k is f,
    "StringContains": lambda k, f: _fold(f) in _fold(k),
    "StringNotContains": lambda k, f: _fold(f) in _fold(k),
    "StringBeginsWith": lambda k, f: _fold(k).startswith(_fold(f)),
    "StringNotBeginsWith": lambda k, f: _fold(k).startswith(_fold(f)),
    "StringEndsWith": lambda k, f: _fold(k).endswith(_fold(f)),
    "StringNotEndsWith": lambda k, f: _fold(k).endswith(_fold(f)),
    "StringIn": lambda k, f: _fold(k) == _fold(f),
    "StringNotIn": lambda k, f: _fold(k) == _fold(f),
}

RejectReason = Literal["none", "busy", "forbidden"]
ActionName = Literal["push", "redirect", "reject", "ignore"]


def normalize_target(value: str) -> str:
    """A redirect/push target as a raw id: `+14255551212` becomes `4:+14255551212`."""
    text = value.strip()
    if text.startswith("+"):
        text = "4:" + text
    return text


def check_target(value: str) -> str:
    """An ACS identity (8:acs:), a Teams user (8:orgid:, 8:gcch:, 8:dod:) or an E.164 phone
    number (4:+<digits> or +<digits>); returns the raw id."""
    from ringrelay.routing.numbers import E164_RE

    raw = normalize_target(value)
    if raw.startswith("4:"):
        if not E164_RE.match(raw[2:]):
            raise ValueError("a phone number must be E.164: +<country code><number>, 7-15 digits")
        return raw
    if not is_raw_id(raw) or raw.startswith("28:"):
        raise ValueError(
            "expected an ACS identity (8:acs:...), a Teams user (8:orgid:...) or +E.164 number"
        )
    return raw


class Rule(BaseModel):
    """`[[rules]]` in the TOML file: conditions (all must hold) and one action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._\- ]+$")
    conditions: list[Condition] = Field(default_factory=list)
    action: ActionName
    # push: an identity to ring instead of data.to; redirect: where to (required)
    target: str | None = None
    reason: RejectReason | None = None  # reject only; default none

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        return None if value is None else check_target(value)

    @model_validator(mode="after")
    def _check_action(self) -> Rule:
        if self.action == "redirect" and self.target is None:
            raise ValueError("target: required for action = redirect")
        if self.action in ("reject", "ignore") and self.target is not None:
            raise ValueError(f"target: not used by action = {self.action}")
        if self.action == "push" and self.target is not None and self.target.startswith("4:"):
            raise ValueError("target: a push rings an ACS or Teams identity, not a phone number")
        if self.reason is not None and self.action != "reject":
            raise ValueError("reason: only for action = reject")
        return self

    def matches(self, event: dict[str, Any]) -> bool:
        return all(c.matches(event) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class RuleMatch:
    index: int
    rule: Rule


def first_match(rules: Sequence[Rule], envelope: dict[str, Any]) -> RuleMatch | None:
    """The first rule, in order, whose conditions all hold for the event."""
    view = event_view(envelope)
    for index, rule in enumerate(rules):
        if rule.matches(view):
            return RuleMatch(index, rule)
    return None


def check_unique_names(rules: Sequence[Rule]) -> None:
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ValueError(f"rules: name {rule.name!r} used twice (names must be unique)")
        seen.add(rule.name)
