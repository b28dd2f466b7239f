"""Rule conditions against Event Grid's advanced-filter semantics, operator by operator
(learn.microsoft.com/azure/event-grid/event-filtering; the page's examples where it gives them),
and the validation of `[[rules]]`."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ringrelay.routing.rules import OPERATORS, Condition, Rule, first_match

EVENT: dict[str, Any] = {
    "id": "e1",
    "subject": "/phoneCall/caller/4:+14255550123/recipient/4:+14255551212",
    "eventType": "Microsoft.Communication.IncomingCall",
    "data": {
        "to": {"kind": "phoneNumber", "rawId": "4:+14255551212"},
        "from": {"kind": "phoneNumber", "rawId": "4:+14255550123"},
        "counter": 5,
        "ratio": 3.5,
        "isEnabled": True,
        "key1": "Azure Data Factory",
        "tags": ["Contoso", "fabrikam"],
        "numbers": [1, 41],
        "nothing": None,
        "nested": {"deep": {"value": "x"}},
    },
}

# (operator, key, values or value, expected). "missing" = data.absent; "wrong type" = a key of
# another type than the filter's, which Event Grid ignores ("Any key values with data types that
# don't match the filter's data type are ignored").
CASES: list[tuple[str, str, Any, bool]] = [
    # NumberIn: the page's example, counter is 5 or 1
    ("NumberIn", "data.counter", [5, 1], True),
    ("NumberIn", "data.counter", [41, 0], False),
    ("NumberIn", "data.numbers", [41], True),  # array key: any value
    ("NumberIn", "data.absent", [5], False),  # missing: not matched
    ("NumberIn", "data.key1", [5], False),  # wrong type: ignored
    ("NumberNotIn", "data.counter", [41, 0], True),
    ("NumberNotIn", "data.counter", [5], False),
    ("NumberNotIn", "data.numbers", [41], False),  # one array value hits: FAIL_MATCH
    ("NumberNotIn", "data.absent", [41], True),  # missing: matched (the page's note)
    ("NumberLessThan", "data.counter", 100, True),
    ("NumberLessThan", "data.counter", 5, False),
    ("NumberLessThan", "data.absent", 100, False),
    ("NumberGreaterThan", "data.counter", 4.5, True),
    ("NumberGreaterThan", "data.counter", 5, False),
    ("NumberGreaterThan", "data.absent", 0, False),
    ("NumberLessThanOrEquals", "data.counter", 5, True),
    ("NumberLessThanOrEquals", "data.counter", 4, False),
    ("NumberLessThanOrEquals", "data.absent", 5, False),
    ("NumberGreaterThanOrEquals", "data.counter", 5, True),
    ("NumberGreaterThanOrEquals", "data.ratio", 3.6, False),
    ("NumberGreaterThanOrEquals", "data.absent", 0, False),
    ("NumberInRange", "data.ratio", [[3.14159, 999.95], [3000, 4000]], True),
    ("NumberInRange", "data.counter", [[6, 10]], False),
    ("NumberInRange", "data.counter", [[5, 5]], True),  # bounds included
    ("NumberInRange", "data.absent", [[0, 10]], False),
    ("NumberNotInRange", "data.counter", [[6, 10]], True),
    ("NumberNotInRange", "data.ratio", [[3.14159, 999.95]], False),
    ("NumberNotInRange", "data.absent", [[0, 10]], True),  # decided: as NumberNotIn
    ("BoolEquals", "data.isEnabled", True, True),
    ("BoolEquals", "data.isEnabled", False, False),
    ("BoolEquals", "data.counter", True, False),  # 5 is not a boolean
    ("BoolEquals", "data.absent", True, False),
    # StringContains: the page's example, "azure data factory" has "azure"
    ("StringContains", "data.key1", ["microsoft", "azure"], True),
    ("StringContains", "data.key1", ["AZURE DATA"], True),  # case-insensitive
    ("StringContains", "data.key1", ["aws"], False),
    ("StringContains", "data.absent", ["a"], False),
    ("StringContains", "data.counter", ["5"], False),  # a number is not a string
    ("StringNotContains", "data.key1", ["contoso", "fabrikam"], True),
    ("StringNotContains", "data.key1", ["data"], False),
    ("StringNotContains", "data.tags", ["FABRIK"], False),  # one array value contains it
    ("StringNotContains", "data.absent", ["x"], False),  # missing: not matched (the note)
    ("StringBeginsWith", "data.from.rawId", ["4:+1425", "4:+1206"], True),
    ("StringBeginsWith", "subject", ["/PHONECALL/"], True),
    ("StringBeginsWith", "data.from.rawId", ["8:acs:"], False),
    ("StringBeginsWith", "data.absent", ["x"], False),
    ("StringNotBeginsWith", "data.from.rawId", ["8:acs:"], True),
    ("StringNotBeginsWith", "data.from.rawId", ["4:+1"], False),
    ("StringNotBeginsWith", "data.absent", ["x"], False),
    ("StringEndsWith", "data.to.rawId", ["1212"], True),
    ("StringEndsWith", "data.key1", ["FACTORY"], True),
    ("StringEndsWith", "data.to.rawId", ["0000"], False),
    ("StringEndsWith", "data.absent", ["x"], False),
    ("StringNotEndsWith", "data.to.rawId", ["0000"], True),
    ("StringNotEndsWith", "data.to.rawId", ["1212"], False),
    ("StringNotEndsWith", "data.absent", ["x"], False),
    ("StringIn", "eventType", ["microsoft.communication.incomingcall"], True),
    ("StringIn", "data.tags", ["contoso"], True),
    ("StringIn", "data.key1", ["azure"], False),  # exact match, not a substring
    ("StringIn", "data.absent", ["x"], False),
    ("StringNotIn", "data.key1", ["aws", "bridge"], True),
    ("StringNotIn", "data.tags", ["FABRIKAM"], False),
    ("StringNotIn", "data.absent", ["x"], True),  # missing: matched (the note)
    ("IsNullOrUndefined", "data.absent", None, True),
    ("IsNullOrUndefined", "data.nothing", None, True),  # null
    ("IsNullOrUndefined", "data.counter", None, False),
    ("IsNotNull", "data.counter", None, True),
    ("IsNotNull", "data.nothing", None, False),
    ("IsNotNull", "data.absent", None, False),
    # dot paths: nested keys, a path through a scalar, envelope keys in any case
    ("StringIn", "data.nested.deep.value", ["X"], True),
    ("IsNullOrUndefined", "data.counter.deeper", None, True),
    ("StringIn", "Subject", ["/phonecall/caller/4:+14255550123/recipient/4:+14255551212"], True),
    ("StringIn", "ID", ["E1"], True),
]


def _condition(op: str, key: str, given: Any) -> Condition:
    doc: dict[str, Any] = {"operatorType": op, "key": key}
    if isinstance(given, list):
        doc["values"] = given
    elif given is not None:
        doc["value"] = given
    return Condition.model_validate(doc)


@pytest.mark.parametrize(("op", "key", "given", "expected"), CASES)
def test_operator(op: str, key: str, given: Any, expected: bool) -> None:
    assert _condition(op, key, given).matches(EVENT) is expected


def test_every_operator_is_covered_present_and_missing() -> None:
    for op in OPERATORS:
        keys = {key for o, key, _, _ in CASES if o == op}
        assert "data.absent" in keys, op
        assert keys - {"data.absent"}, op


def test_values_or_conditions_and() -> None:
    pstn = {"operatorType": "StringBeginsWith", "key": "data.from.rawId", "values": ["4:+1"]}
    seattle = {"operatorType": "StringEndsWith", "key": "data.to.rawId", "values": ["9999"]}
    both = Rule.model_validate({"name": "r", "action": "ignore", "conditions": [pstn, seattle]})
    assert not both.matches(EVENT)  # AND: the second fails
    seattle["values"] = ["9999", "1212"]  # OR inside one condition
    both = Rule.model_validate({"name": "r", "action": "ignore", "conditions": [pstn, seattle]})
    assert both.matches(EVENT)


def test_first_match_in_order_and_cloudevents_names() -> None:
    rules = [
        Rule(name="no", action="ignore", conditions=[_condition("StringIn", "id", ["nope"])]),
        Rule(name="a", action="ignore", conditions=[_condition("StringIn", "eventType", ["x"])]),
        Rule(name="b", action="ignore"),
    ]
    cloud = {"specversion": "1.0", "id": "1", "type": "x", "source": "/s", "data": {}}
    match = first_match(rules, cloud)
    assert match is not None and match.rule.name == "a"  # `eventType` finds a CloudEvent's type
    assert first_match(rules[:1], cloud) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"operatorType": "StringIn", "key": "data.x"}, "needs `values`"),
        ({"operatorType": "NumberIn", "key": "data.x", "values": ["5"]}, "must be numbers"),
        ({"operatorType": "NumberLessThan", "key": "data.x", "values": [1, 2]}, "one number"),
        ({"operatorType": "NumberInRange", "key": "data.x", "values": [[5, 1]]}, "low <= high"),
        ({"operatorType": "BoolEquals", "key": "data.x", "value": "true"}, "one boolean"),
        ({"operatorType": "IsNotNull", "key": "data.x", "values": ["a"]}, "takes no values"),
        ({"operatorType": "StringIn", "key": "data..x", "values": ["a"]}, "empty segment"),
        ({"operatorType": "StringIn", "key": "k", "values": ["a" * 513]}, "512 characters"),
        ({"operatorType": "StringLike", "key": "k", "values": ["a"]}, "operatorType"),
    ],
)
def test_bad_conditions_are_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Condition.model_validate(doc)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"action": "redirect"}, "target: required"),
        ({"action": "redirect", "target": "bob"}, "expected an ACS identity"),
        ({"action": "redirect", "target": "+1"}, "E.164"),
        ({"action": "reject", "target": "8:acs:x"}, "not used by action = reject"),
        ({"action": "push", "reason": "busy"}, "only for action = reject"),
        ({"action": "reject", "reason": "later"}, "reason"),
    ],
)
def test_bad_actions_are_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Rule.model_validate({"name": "r", **doc})
