"""The registry and delivery-ledger store: a small interface, one file per backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ringrelay.models import DeliveryOutcome, EventRecord, PushKind, Registration


@dataclass(slots=True)
class Claim:
    """What `claim_deliveries` decided for each target device of an event."""

    to_send: list[Registration] = field(default_factory=list)  # claimed by this caller: push now
    settled: list[DeliveryOutcome] = field(default_factory=list)  # done earlier: never push again
    busy: list[DeliveryOutcome] = field(default_factory=list)  # in flight under another live claim
    attempts: dict[tuple[str, str], int] = field(
        default_factory=dict
    )  # earlier attempts per device


@dataclass(frozen=True, slots=True)
class RemovedRegistration:
    """Audit record of a registration the service removed because a provider said it is dead."""

    identity: str
    device_id: str
    platform: str
    token_fingerprint: str
    reason: str
    removed_at: float


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A backend's credential; only the SHA-256 of its secret part is stored."""

    key_id: str
    name: str
    secret_hash: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    registrations: int
    events: int
    deliveries: int


class Store(Protocol):
    """Persistence for registrations, the per-(event, device) delivery ledger and event records.

    Every method is a coroutine so that network databases fit behind the same interface.
    """

    description: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    # registry
    async def upsert_registration(self, reg: Registration) -> tuple[bool, int]:
        """Insert or refresh; returns (created, registrations of the same token displaced)."""
        ...

    async def list_registrations(self, identity: str, now: float) -> list[Registration]: ...
    async def delete_registration(self, identity: str, device_id: str) -> bool: ...
    async def delete_identity(self, identity: str) -> int: ...
    async def push_targets(self, identity: str, kind: PushKind, now: float) -> list[Registration]:
        """Live registrations of `identity` for pushes of `kind`."""
        ...

    async def prune_registration(
        self, reg: Registration, reason: str, now: float, unless_updated_after: float | None = None
    ) -> bool:
        """Remove `reg` because its provider declared the token dead, and keep an audit record.

        Nothing happens if the row no longer holds that token, or was refreshed after
        `unless_updated_after` (APNs' 410 timestamp: the app re-registered since).
        """
        ...

    async def removed_registrations(self, identity: str) -> list[RemovedRegistration]: ...

    # API keys
    async def create_api_key(self, key: ApiKey) -> None: ...
    async def get_api_key(self, key_id: str) -> ApiKey | None: ...
    async def list_api_keys(self) -> list[ApiKey]: ...
    async def revoke_api_key(self, key_id: str, now: float) -> bool: ...
    async def active_api_keys(self) -> int: ...

    async def bulk_insert_registrations(self, regs: list[Registration]) -> None:
        """Seeding for benchmarks; replaces rows with the same key."""
        ...

    async def upsert_registrations(self, regs: list[Registration]) -> list[bool]:
        """`upsert_registration` for a batch, in one transaction (imports): per registration,
        whether it was new. Keys and (platform, token) pairs must be unique within the batch."""
        ...

    async def registrations_after(
        self, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[Registration]:
        """Up to `limit` live registrations in (identity, device_id) order, after `after`: the
        pages of an export."""
        ...

    # ledger
    async def claim_callee(
        self, event: EventRecord, identity: str, kind: PushKind, now: float, lease_until: float
    ) -> tuple[list[Registration], Claim]:
        """`push_targets` then `claim_deliveries` for them, in one round trip where the backend
        can; with no targets nothing is written."""
        ...

    async def claim_deliveries(
        self, event: EventRecord, targets: list[Registration], now: float, lease_until: float
    ) -> Claim:
        """Atomically record the event and claim every target not yet settled nor leased."""
        ...

    async def settle_deliveries(
        self, event: EventRecord, outcomes: list[DeliveryOutcome], now: float
    ) -> None:
        """Record per-device outcomes and the event's status; releases the claims."""
        ...

    async def record_event(self, event: EventRecord, now: float) -> None:
        """Record an event that needs no push (rejected, expired, ignored, no devices)."""
        ...

    async def events_for_call(self, correlation_id: str) -> list[EventRecord]: ...
    async def purge(self, now: float, ledger_retention_seconds: float) -> PurgeCounts: ...


def open_store(database_url: str) -> Store:
    if database_url.startswith("sqlite:///"):
        from ringrelay.store.sqlite import SQLiteStore

        return SQLiteStore(database_url.removeprefix("sqlite:///"))
    if database_url.startswith(("postgresql://", "postgres://")):
        from ringrelay.store.postgres import PostgresStore

        return PostgresStore(database_url)
    raise ValueError(f"unsupported database URL scheme: {database_url.split(':', 1)[0]}")
