"""The benchmarks' Python-made copies of wrk's deliveries (`bench/relay_bench.py`,
`WrkShapedBodies`): `hotpath_instructions.py --wrk-shaped` counts instructions on them, to
compare with the CPU that `hotpath_pairs.py` and `together.py` measure on wrk's."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import orjson

from ringrelay.events.ingest import INCOMING_CALL, parse_delivery
from ringrelay.payloads import call_push_from_incoming_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from relay_bench import WrkShapedBodies, wrk_script


def test_wrk_shaped_bodies_are_the_deliveries_wrk_posts() -> None:
    make = WrkShapedBodies(identities=50)
    bodies = make(200) + make(5)  # a second slice goes on counting
    calls = [call for call, _ in bodies]
    assert len(set(calls)) == len(calls) == 205
    assert calls[-1] == f"w{make.run}-0-205"  # wrk's "w<run>-<thread>-<counter>"
    server_call_ids = set()
    callees = set()
    for call, body in bodies:
        [event] = parse_delivery(body, "application/json")
        assert not event.error and event.type == INCOMING_CALL
        assert event.id == call
        # wrk's os.date("!%Y-%m-%dT%H:%M:%SZ"): whole seconds, just now
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", orjson.loads(body)[0]["eventTime"])
        assert event.time is not None and abs(event.time - time.time()) < 5
        push = call_push_from_incoming_call(event.data)
        assert push.call_id == call
        assert re.fullmatch(r"8:acs:bench_\d+", push.recipient_id)
        assert 0 <= int(push.recipient_id.rsplit("_", 1)[1]) < 50
        callees.add(push.recipient_id)
        server_call_ids.add(event.data["serverCallId"])
    assert len(callees) > 30  # random callees, as math.random in the script
    assert len(server_call_ids) == 1  # the script's template: one serverCallId for all


def test_wrk_script_fills_the_same_places() -> None:
    make = WrkShapedBodies(identities=10)
    script = wrk_script(10, make.run)
    kinds = ", ".join(f'"{k}"' for k in make.kinds)
    assert f"local kinds = {{{kinds}}}" in script
    assert script.count("[==[") == len(make.parts)
