"""Prometheus metrics, exposed at /metrics: what an on-call engineer reads on one screen.

Names and labels per Prometheus' naming practices (base units, `_total` counters, `_seconds`);
every label's values come from a bounded set (transports, configured apps, platforms, status
and reason codes from fixed tables): never an identity, a token or a string from the wire.
"""

from __future__ import annotations

import bisect
import platform as _platform
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ringrelay import __version__

# Event -> first accepted push: most land in tens of milliseconds; a ring lasts 45 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 45)
ATTEMPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# Provider reasons that may become a label value; anything else is folded into a class.
_APNS_REASONS = frozenset(
    {
        "BadDeviceToken", "Unregistered", "ExpiredToken", "DeviceTokenNotForTopic",
        "TopicDisallowed", "BadTopic", "MissingTopic", "InvalidProviderToken",
        "MissingProviderToken", "ExpiredProviderToken", "Forbidden", "BadCertificate",
        "BadCertificateEnvironment", "BadEnvironmentKeyIdInToken", "BadEnvironmentKeyInToken",
        "UnrelatedKeyIdInToken", "IdleTimeout", "TooManyRequests",
        "TooManyProviderTokenUpdates", "InternalServerError", "ServiceUnavailable", "Shutdown",
        "PayloadTooLarge", "BadPayload", "InvalidPushType",
    }
)  # fmt: skip
_FCM_CODES = frozenset(
    {
        "UNREGISTERED", "INVALID_ARGUMENT", "SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR",
        "APNS_AUTH_ERROR", "QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL", "UNAUTHENTICATED",
        "PERMISSION_DENIED", "NOT_FOUND", "RESOURCE_EXHAUSTED",
    }
)  # fmt: skip


def reason_label(reason: str, http_status: int | None) -> str:
    """A bounded label for a push result's reason: the provider's code where it is one of the
    documented ones, else the HTTP status, else a class of local failure."""
    if not reason and (http_status is None or http_status < 300):
        return "ok"
    words = reason.replace(":", " ").split()
    for word in words[:4]:
        if word in _APNS_REASONS or word in _FCM_CODES:
            return word
    if http_status is not None and 100 <= http_status <= 599:
        return f"http_{http_status}"
    low = reason.lower()
    for key in ("timeout", "overloaded", "oauth", "connection", "payload", "transport"):
        if key in low:
            return key
    return "other"


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: over every bound (+Inf)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # le: bound >= amount
        self.sum += amount


class _LoopMetric(Collector):
    """A labelled metric of the hot path, updated from the event loop's thread only and exposed
    through prometheus_client's custom-collector interface. prometheus_client's own Counter and
    Histogram take a lock and build a key on every update: the hot path's eight updates per
    IncomingCall cost ~4 % of its instructions (bench/hotpath_instructions.py), these a fraction
    of that. No `_created` samples (Prometheus does not need them)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str] | tuple[str, ...] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, given {values}")
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Any:
        raise NotImplementedError


class LoopCounter(_LoopMetric):
    def _new_child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1.0) -> None:  # an unlabelled counter
        self.labels().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric([str(v) for v in values], child.value)
        yield family


class LoopHistogram(_LoopMetric):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str] | tuple[str, ...] = (),
        buckets: tuple[float, ...] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        go_format: Callable[[float], str] = floatToGoString  # as prometheus_client writes `le`
        self._le = [go_format(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            cumulative, running = [], 0
            for le, count in zip(self._le, list(child.counts), strict=True):
                running += count
                cumulative.append((le, running))
            family.add_metric([str(v) for v in values], cumulative, child.sum)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        info = Gauge(
            "ringrelay_build_info",
            "Always 1: the running version",
            ["version", "python"],
            registry=r,
        )
        info.labels(__version__, _platform.python_version()).set(1)
        self.deliveries = LoopCounter(
            "ringrelay_webhook_deliveries",
            "Event Grid deliveries received, by HTTP status answered",
            ["status"],
            registry=r,
        )
        self.shed = LoopCounter(
            "ringrelay_webhook_shed",
            "Deliveries answered 503 at once because webhook_max_concurrent were in progress",
            registry=r,
        )
        self.events = LoopCounter(
            "ringrelay_events",
            "Events received, by type and outcome",
            ["type", "status"],
            registry=r,
        )
        self.pushes = LoopCounter(
            "ringrelay_push_attempts",
            "Push attempts, by transport, platform, result and reason",
            ["provider", "platform", "result", "reason"],
            registry=r,
        )
        self.push_seconds = LoopHistogram(
            "ringrelay_push_attempt_seconds",
            "Duration of one push attempt to a provider",
            ["provider"],
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.retries = LoopCounter(
            "ringrelay_push_retries",
            "Push attempts after a device's first, by transport",
            ["provider"],
            registry=r,
        )
        self.outcomes = LoopCounter(
            "ringrelay_push_outcomes",
            "Final per-device outcome of an event's push (expired: the ring ended first)",
            ["provider", "platform", "status"],
            registry=r,
        )
        self.event_to_push = LoopHistogram(
            "ringrelay_event_to_first_push_seconds",
            "From the event (its eventTime, or its receipt here) to its first accepted push",
            ["since"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registrations = Counter(
            "ringrelay_registration_changes",
            "Registry writes, by operation",
            ["op"],
            registry=r,
        )
        self.pruned = Counter(
            "ringrelay_registrations_pruned",
            "Registrations removed because the provider declared the token dead, by reason",
            ["provider", "reason"],
            registry=r,
        )
        # Set from a periodic count (see `refresh_registration_counts`), not per scrape.
        self.registrations_live = Gauge(
            "ringrelay_registrations",
            "Live registrations, by platform and push kind (counted every 30 s)",
            ["platform", "kind"],
            registry=r,
        )
        self._relay_collector = _RelayCollector()
        r.register(self._relay_collector)
        self._attempt_children: dict[tuple[str, ...], tuple[_Count, _Buckets]] = {}
        self._outcome_children: dict[tuple[str, ...], _Count] = {}
        self._event_children: dict[tuple[str, ...], _Count] = {}
        self._delivery_children: dict[int, _Count] = {}
        self._since_event = self.event_to_push.labels("event_time")
        self._since_receipt = self.event_to_push.labels("receipt")
        self._counted: set[tuple[str, str]] = set()
        self.registrations_counted_at = -1e9

    # The hot path's updates below touch the children's fields directly, one dict look-up
    # each: a call per `labels()`, `inc()` and `observe()` had cost ~2 % of an IncomingCall.
    # Label values may be the models' StrEnums (hashed and written as their text).

    def push_attempt(
        self,
        provider: str,
        platform: str,
        result: str,
        seconds: float,
        reason: str = "ok",
        retry: bool = False,
    ) -> None:
        key = (provider, platform, result, reason)
        pair = self._attempt_children.get(key)
        if pair is None:
            pair = self._attempt_children[key] = (
                self.pushes.labels(*key),
                self.push_seconds.labels(provider),
            )
        count, buckets = pair
        count.value += 1
        buckets.counts[bisect.bisect_left(buckets.bounds, seconds)] += 1
        buckets.sum += seconds
        if retry:
            self.retries.labels(provider).inc()

    def push_outcome(self, provider: str, platform: str, status: str) -> None:
        key = (provider or "none", platform, status)
        child = self._outcome_children.get(key)
        if child is None:
            child = self._outcome_children[key] = self.outcomes.labels(*key)
        child.value += 1

    def first_push(self, event_time: float | None, received_at: float, accepted_at: float) -> None:
        if event_time is not None:
            self._since_event.observe(max(0.0, accepted_at - event_time))
        self._since_receipt.observe(max(0.0, accepted_at - received_at))

    def event(self, event_type: str, status: str) -> None:
        key = (event_type, status)
        child = self._event_children.get(key)
        if child is None:
            child = self._event_children[key] = self.events.labels(*key)
        child.value += 1

    def delivery(self, status: int) -> None:
        """A webhook delivery answered with HTTP `status`."""
        child = self._delivery_children.get(status)
        if child is None:
            child = self._delivery_children[status] = self.deliveries.labels(str(status))
        child.value += 1

    def watch(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Gauges read at scrape time from the running service (in-flight pushes, credential
        ages): `source` yields metric families."""
        self._relay_collector.sources.append(source)

    def set_registration_counts(self, counts: dict[tuple[str, str], int]) -> None:
        # A pair that went to zero reads 0, not its last count.
        for key in self._counted - counts.keys():
            self.registrations_live.labels(*key).set(0)
        for (platform, kind), n in counts.items():
            self.registrations_live.labels(platform, kind).set(n)
        self._counted |= counts.keys()


class _RelayCollector(Collector):
    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source()


def provider_gauges(providers: list[Any], limits: dict[int, Any]) -> Callable[[], list[Metric]]:
    """In-flight pushes against each transport's limit, and each credential's health."""

    def collect() -> list[Metric]:
        in_flight = GaugeMetricFamily(
            "ringrelay_push_in_flight", "Pushes under way now", labels=["provider", "app"]
        )
        limit = GaugeMetricFamily(
            "ringrelay_push_in_flight_limit",
            "Pushes allowed at once; past it a push fails fast as overloaded",
            labels=["provider", "app"],
        )
        apns_age = GaugeMetricFamily(
            "ringrelay_apns_provider_token_age_seconds",
            "Age of the APNs provider token in use (Apple refuses one older than an hour)",
            labels=["app"],
        )
        fcm_expiry = GaugeMetricFamily(
            "ringrelay_fcm_access_token_expiry_timestamp_seconds",
            "When the FCM OAuth access token in use expires (unix time; 0: none yet)",
            labels=["app"],
        )
        sas_expiry = GaugeMetricFamily(
            "ringrelay_notificationhubs_sas_expiry_timestamp_seconds",
            "When the Notification Hubs SAS token in use expires (unix time; 0: none yet)",
            labels=[],
        )
        now = time.time()
        for p in providers:
            app = str(getattr(p, "app_id", "") or "")
            counter = limits.get(id(p))
            if counter is not None:
                in_flight.add_metric([p.name, app], counter.count)
                limit.add_metric([p.name, app], counter.limit)
            if p.name == "apns":
                issued = float(getattr(p.token, "_issued_at", 0.0))
                if issued:
                    apns_age.add_metric([app], now - issued)
            elif p.name == "fcm":
                fcm_expiry.add_metric([app], float(getattr(p.token, "_expires_at", 0.0)))
            elif p.name == "notificationhubs":
                sas_expiry.add_metric([], float(getattr(p.sas, "_expiry", 0.0)))
        return [in_flight, limit, apns_age, fcm_expiry, sas_expiry]

    return collect
