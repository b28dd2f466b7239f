"""/metrics over the wire: the series an on-call engineer reads, with bounded labels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringrelay import __version__
from ringrelay.fakes import tls
from ringrelay.fakes.apns import FakeAPNs, write_signing_key
from ringrelay.metrics import reason_label
from ringrelay.simulate import incoming_call_event
from tests.conftest import BackgroundLoop, acs_id, apns_token, post_events, register

TEAM, KEY, BUNDLE = "TEAM123456", "KEYAAAAAAA", "com.contoso.calling"


@pytest.fixture(scope="module")
def apns(
    background_loop: BackgroundLoop,
    certs: tls.TestCertificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeAPNs, Path]]:
    key = tmp_path_factory.mktemp("metrics-apns") / "AuthKey.p8"
    fake = FakeAPNs()
    fake.add_key(TEAM, KEY, write_signing_key(key), {BUNDLE})
    background_loop.run(fake.start("127.0.0.1", 0, str(certs.ca_file.parent)))
    yield fake, key
    background_loop.run(fake.stop())


async def scrape(http: Any, server: Any) -> dict[str, list[Any]]:
    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Any], name: str, **labels: str) -> float:
    hits = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert hits, f"no {name} {labels} in {samples}"
    return float(sum(hits))


async def test_push_metrics_tell_outcomes_retries_prunes_and_latency(
    http, make_server, apns, certs
) -> None:
    fake, key = apns
    fake.reset()
    app = {
        "bundle_id": BUNDLE, "team_id": TEAM, "key_id": KEY, "key_file": key,
        "endpoint": fake.base_url, "ca_file": certs.ca_file, "max_in_flight": 77,
    }  # fmt: skip
    server = make_server(apns=[app])
    callee = acs_id("metrics")
    good, dead, flaky = apns_token(1), apns_token(2), apns_token(3)
    for device, token in (("good", good), ("dead", dead), ("flaky", flaky)):
        await register(http, server, callee, device, token=token)
    await register(http, server, callee, "tablet", token=apns_token(4), push_kind="alert")
    fake.respond(400, "BadDeviceToken", device_token=dead)
    fake.respond(503, "ServiceUnavailable", device_token=flaky)
    status, _body = await post_events(http, server, [incoming_call_event(callee)])
    assert status == 200

    m = await scrape(http, server)
    attempts = m["ringrelay_push_attempts"]
    assert value(attempts, "ringrelay_push_attempts_total", reason="BadDeviceToken") == 1
    assert value(attempts, "ringrelay_push_attempts_total", reason="ServiceUnavailable") == 1
    assert value(attempts, "ringrelay_push_attempts_total", result="accepted", reason="ok") == 2
    assert value(m["ringrelay_push_retries"], "ringrelay_push_retries_total", provider="apns") == 1
    outcomes = m["ringrelay_push_outcomes"]
    assert value(outcomes, "ringrelay_push_outcomes_total", status="accepted") == 2
    assert value(outcomes, "ringrelay_push_outcomes_total", status="rejected") == 1
    pruned = m["ringrelay_registrations_pruned"]
    assert value(pruned, "ringrelay_registrations_pruned_total", reason="BadDeviceToken") == 1
    first = m["ringrelay_event_to_first_push_seconds"]
    assert value(first, "ringrelay_event_to_first_push_seconds_count", since="receipt") == 1
    assert value(first, "ringrelay_event_to_first_push_seconds_count", since="event_time") == 1
    limit = m["ringrelay_push_in_flight_limit"]
    assert value(limit, "ringrelay_push_in_flight_limit", provider="apns", app=BUNDLE) == 77
    assert value(m["ringrelay_push_in_flight"], "ringrelay_push_in_flight", app=BUNDLE) == 0
    age = value(
        m["ringrelay_apns_provider_token_age_seconds"],
        "ringrelay_apns_provider_token_age_seconds",
        app=BUNDLE,
    )
    assert 0 <= age < 60
    regs = m["ringrelay_registrations"]
    assert value(regs, "ringrelay_registrations", platform="apns", kind="voip") == 2  # one pruned
    assert value(regs, "ringrelay_registrations", platform="apns", kind="alert") == 1
    info = m["ringrelay_build_info"]
    assert value(info, "ringrelay_build_info", version=__version__) == 1
    # No label carries an identity or a token.
    for samples in m.values():
        for s in samples:
            for v in s.labels.values():
                assert callee not in v and good not in v and dead not in v


async def test_expired_rings_and_shed_are_counted(http, make_server) -> None:
    from datetime import UTC, datetime, timedelta

    server = make_server()
    callee = acs_id("late-metrics")
    await register(http, server, callee, "phone")
    old = incoming_call_event(callee, event_time=datetime.now(UTC) - timedelta(seconds=60))
    await post_events(http, server, [old])
    m = await scrape(http, server)
    assert (
        value(m["ringrelay_push_outcomes"], "ringrelay_push_outcomes_total", status="expired") == 1
    )
    events = m["ringrelay_events"]
    assert value(events, "ringrelay_events_total", status="expired") == 1


@pytest.mark.parametrize(
    ("reason", "status", "label"),
    [
        ("APNs 400 BadDeviceToken", 400, "BadDeviceToken"),
        ("FCM 404 UNREGISTERED: gone", 404, "UNREGISTERED"),
        ("HTTP 401: authorization failed: check the key (x)", 401, "http_401"),
        ("timeout", None, "timeout"),
        ("apns overloaded: 5 pushes in flight (limit)", None, "overloaded"),
        ("something 8:acs:user token abc", None, "other"),
        ("", 201, "ok"),
    ],
)
def test_reason_labels_are_bounded(reason: str, status: int | None, label: str) -> None:
    assert reason_label(reason, status) == label


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import json
    import re

    from ringrelay.metrics import Metrics, provider_gauges

    path = Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    metrics = Metrics()
    metrics.watch(provider_gauges([], {}))
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update({f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count"})
        names.add(f"{family.name}_info")
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bringrelay_[a-z_]+", target["expr"])
    }
    assert len(used) >= 12
    assert used <= names, used - names


def test_loop_metrics_expose_what_prometheus_clients_own_would() -> None:
    """The hot path's lock-free counters and histograms against prometheus_client's Counter and
    Histogram, an independent implementation, fed the same values: bucket edges included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from ringrelay.metrics import ATTEMPT_BUCKETS, LoopCounter, LoopHistogram

    values = [0.0, 0.001, 0.0010001, 0.0025, 0.003, 0.5, 1, 4.99, 5, 5.01, 120.0]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop_h = LoopHistogram("t_seconds", "doc", ["p"], buckets=ATTEMPT_BUCKETS, registry=ours)
    prom_h = Histogram("t_seconds", "doc", ["p"], buckets=ATTEMPT_BUCKETS, registry=theirs)
    loop_c = LoopCounter("t_things", "doc", ["a", "b"], registry=ours)
    prom_c = Counter("t_things", "doc", ["a", "b"], registry=theirs)
    for n, v in enumerate(values):
        for h in (loop_h, prom_h):
            h.labels("apns" if n % 2 else "fcm").observe(v)
        for c in (loop_c, prom_c):
            c.labels("x", str(n % 3)).inc(v)

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[Any, ...], float]]:
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours) == samples(theirs)
    with pytest.raises(ValueError):
        loop_c.labels("only one")
