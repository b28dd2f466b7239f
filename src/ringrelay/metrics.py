"""Prometheus metrics, exposed at /metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "ringrelay_webhook_deliveries",
            "Event Grid deliveries received, by HTTP status answered",
            ["status"],
            registry=self.registry,
        )
        self.shed = Counter(
            "ringrelay_webhook_shed",
            "Deliveries answered 503 at once because webhook_max_concurrent were in progress",
            registry=self.registry,
        )
        self.events = Counter(
            "ringrelay_events",
            "Events received, by type and outcome",
            ["type", "status"],
            registry=self.registry,
        )
        self.pushes = Counter(
            "ringrelay_push_attempts",
            "Push attempts, by provider, platform and result",
            ["provider", "platform", "result"],
            registry=self.registry,
        )
        self.push_seconds = Histogram(
            "ringrelay_push_attempt_seconds",
            "Duration of one push attempt to a provider",
            ["provider"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.registrations = Counter(
            "ringrelay_registration_changes",
            "Registry writes, by operation",
            ["op"],
            registry=self.registry,
        )
        # Label children looked up once: labels() takes a lock and builds a key on every call.
        self._attempts: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._events: dict[tuple[str, str], Any] = {}

    def push_attempt(self, provider: str, platform: str, result: str, seconds: float) -> None:
        key = (provider, platform, result)
        children = self._attempts.get(key)
        if children is None:
            children = (
                self.pushes.labels(provider, platform, result),
                self.push_seconds.labels(provider),
            )
            self._attempts[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def event(self, event_type: str, status: str) -> None:
        key = (event_type, status)
        child = self._events.get(key)
        if child is None:
            child = self._events[key] = self.events.labels(event_type, status)
        child.inc()
