"""The registry and delivery-ledger store: a small interface, one file per backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ringrelay.models import DeliveryOutcome, EventRecord, PushKind, Registration
from ringrelay.routing.numbers import NumberAssignment

# The record that says a call stopped ringing (events/stop_ringing.py), read on every IncomingCall.
CALL_STOPPED = "ringrelay.CallStopped"
# How far back an end event's serverCallId is looked up (through the recent events, not an index
# of its own: see SQLiteStore.correlation_for_server_call). Covers any call that can still ring.
SERVER_CALL_LOOKBACK_SECONDS = 3600.0

# Schema step shared by both stores (plain SQL both dialects run): APNs tokens are stored in lower
# case from now on (registry.normalise_token); older rows may hold one phone's token in two cases,
# for two identities. Keep the newest registration of each token, as a new registration would
# have, then lower-case what is left.
APNS_TOKENS_TO_LOWER_CASE = """
DELETE FROM registrations WHERE platform = 'apns' AND (identity, device_id) IN (
    SELECT identity, device_id FROM (
        SELECT identity, device_id, row_number() OVER (
            PARTITION BY lower(token) ORDER BY updated_at DESC, identity DESC, device_id DESC
        ) AS newest_first
        FROM registrations WHERE platform = 'apns'
    ) AS ranked WHERE newest_first > 1
);
UPDATE registrations SET token = lower(token) WHERE platform = 'apns' AND token <> lower(token);
"""


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


class StoreInUse(Exception):
    """Another process already serves from this store and the backend allows only one (SQLite)."""


class StoreNotWritable(Exception):
    """A write failed for a reason of the storage, not of the data: the disk is full, the file
    is read-only, an I/O error. Answered 503 (retry later), and reported by /readyz."""


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    registrations: int
    events: int
    deliveries: int


@dataclass(slots=True)
class CallAction:
    """A redirect or reject of one call leg (correlationId, callee), claimed in the ledger like a
    push so that a redelivery or another instance does not do it twice."""

    correlation_id: str
    callee: str  # data.to of the IncomingCall that asked for it
    event_id: str
    kind: str  # "redirect" | "reject"
    target: str  # redirect: raw id of the new callee; reject: the reason
    status: str  # a DeliveryStatus value: in_flight, accepted, rejected, config_error, ...
    reason: str = ""
    attempts: int = 0
    request_id: str = ""  # Repeatability-Request-ID, the same on every attempt
    first_sent: float = 0.0  # Repeatability-First-Sent
    updated_at: float = 0.0


@dataclass(slots=True)
class ActionClaim:
    """What `claim_call_action` decided."""

    claimed: bool  # True: this caller does the action now
    action: CallAction | None  # ours (claimed) or the one recorded before
    limit_reached: bool = False  # the call was already redirected max_redirects times


class Store(Protocol):
    """Persistence for registrations, the per-(event, device) delivery ledger and event records.

    Every method is a coroutine so that network databases fit behind the same interface.
    """

    description: str

    def reserve(self) -> None:
        """Take what a serving process must hold alone (SQLite: the file's instance lock), or
        raise StoreInUse. `open` does it too; `ringrelay serve` calls it first so that a second
        server stops before binding its port. Admin commands (keys, db) never do."""
        ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Raises if the store is unreachable, StoreNotWritable if writes fail."""
        ...

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
    async def recent_removals(self, limit: int) -> list[RemovedRegistration]:
        """The newest removals of any identity (the dashboard's list)."""
        ...

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

    # muted chat threads (`until` None: until unmuted)
    async def mute_thread(
        self, identity: str, thread_id: str, until: float | None, now: float
    ) -> None: ...
    async def unmute_thread(self, identity: str, thread_id: str) -> bool: ...
    async def muted_threads(self, identity: str, now: float) -> list[tuple[str, float | None]]:
        """(thread id, until) of the identity's mutes still in force."""
        ...

    async def is_thread_muted(self, identity: str, thread_id: str, now: float) -> bool: ...

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

    # call routing
    async def claim_call_action(
        self, action: CallAction, now: float, lease_until: float, max_redirects: int
    ) -> ActionClaim:
        """Atomically claim the action for (correlation_id, callee) unless it is settled, or in
        flight under a live lease; a redirect is refused once the call has `max_redirects`
        redirects on other legs that the service did not refuse (done, in flight, unanswered)."""
        ...

    async def settle_call_action(self, action: CallAction, now: float) -> None: ...
    async def call_actions(self, correlation_id: str) -> list[CallAction]: ...

    # number assignment
    async def put_number(self, assignment: NumberAssignment) -> bool:
        """Insert or replace; True when the number was not assigned before."""
        ...

    async def get_number(self, e164: str) -> NumberAssignment | None: ...
    async def list_numbers(self) -> list[NumberAssignment]: ...
    async def delete_number(self, e164: str) -> bool: ...
    async def call_stops(self, correlation_id: str) -> list[EventRecord]:
        """The call's `ringrelay.CallStopped` records, without deliveries: one indexed read, on
        every IncomingCall."""
        ...

    async def correlation_for_server_call(self, server_call_id: str) -> str | None:
        """The correlationId of the ring recorded with this `serverCallId`, if any."""
        ...

    async def registration_counts(self, now: float) -> dict[tuple[str, str], int]:
        """Live registrations per (platform, push kind), for the metrics gauge."""
        ...

    async def recent_events(self, limit: int, recipient: str | None = None) -> list[EventRecord]:
        """The newest events (by last update), with their deliveries; only `recipient`'s when
        given. For operators (doctor --identity, the dashboard), not the hot path."""
        ...

    async def purge(self, now: float, ledger_retention_seconds: float) -> PurgeCounts: ...


def open_store(database_url: str, *, serving: bool = True) -> Store:
    """The store for `database_url`. `serving`: this process delivers pushes (it claims
    deliveries): SQLite then locks the file to this process, PostgreSQL registers the instance
    and keeps its heartbeat. Admin commands pass False."""
    if database_url.startswith("sqlite:///"):
        from ringrelay.store.sqlite import SQLiteStore

        return SQLiteStore(database_url.removeprefix("sqlite:///"), single_instance=serving)
    if database_url.startswith(("postgresql://", "postgres://")):
        from ringrelay.store.postgres import PostgresStore

        return PostgresStore(database_url, heartbeat=serving)
    raise ValueError(f"unsupported database URL scheme: {database_url.split(':', 1)[0]}")
