"""PostgreSQL store: for several instances sharing one database.

Claims are made in the database, atomically: `INSERT … ON CONFLICT DO UPDATE … WHERE` takes a
(event, device) row only if it is new, transient, or in flight under an expired lease, and
`RETURNING` says which rows this caller got. Two instances claiming the same device at the same
moment serialise on the row; the second sees the first's live lease and gets nothing.

A claim names its instance (`deliveries.claimed_by`), and every serving instance renews its row
in `instances` each HEARTBEAT_INTERVAL seconds from a connection of its own. A claim is taken
over when its lease has ended OR its instance's heartbeat is older than HEARTBEAT_STALE: after a
kill -9, Event Grid's first retry (about 10 s later) finds the dead instance's devices free and
pushes them, instead of waiting out the lease (webhook deadline + 5 s). The heartbeat is stamped
and compared with the database's clock, so the instances' clocks need not agree.

Migrations: a short list of versioned SQL steps below, applied at start-up (and by
`ringrelay db upgrade`) under an advisory lock so that instances starting together do not race.
A migration framework (Alembic) would bring SQLAlchemy for a handful of tables whose queries are
written by hand for asyncpg; the list is the smaller thing to own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import asyncpg

from ringrelay.models import (
    ChatFormat,
    DeliveryOutcome,
    DeliveryStatus,
    EventRecord,
    EventStatus,
    Platform,
    PushKind,
    Registration,
)
from ringrelay.redact import fingerprint
from ringrelay.routing.numbers import NumberAssignment
from ringrelay.store import (
    APNS_TOKENS_TO_LOWER_CASE,
    CALL_STOPPED,
    SERVER_CALL_LOOKBACK_SECONDS,
    ActionClaim,
    ApiKey,
    CallAction,
    Claim,
    PurgeCounts,
    RemovedRegistration,
    StoreNotWritable,
)
from ringrelay.store.coalesce import Coalescer

MIGRATION_LOCK = 0x72696E67  # "ring": pg_advisory_lock key for schema changes
PURGE_LOCK = 0x70757267  # "purg": one instance purges at a time

# An instance renews its heartbeat every second; one silent for 5 s is taken for dead and its
# in-flight claims are free. 5 s spares a live instance whose renewal is late (a slow statement,
# a busy loop) and is well inside Event Grid's first retry, about 10 s after a failed delivery.
HEARTBEAT_INTERVAL = 1.0  # seconds
HEARTBEAT_STALE = 5.0  # seconds
INSTANCE_RETENTION = 86_400.0  # rows of instances silent this long are purged

log = logging.getLogger("ringrelay.store")

# The database cannot take writes, whatever the statement: disk full (53100), a read-only
# transaction (25006: a standby after a failover, or default_transaction_read_only), an I/O
# error (58030). Retrying later may work; the data was fine.
_STORAGE_ERRORS = (
    asyncpg.DiskFullError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.PostgresIOError,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _writes(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A write: a failure of the storage becomes StoreNotWritable (answered 503) and is
    remembered on the store for /readyz until a write succeeds."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        store = args[0]
        assert isinstance(store, PostgresStore)
        try:
            result = await method(*args, **kwargs)
        except _STORAGE_ERRORS as exc:
            store.write_failure = f"{type(exc).__name__}: {exc}"
            raise StoreNotWritable(f"PostgreSQL: {exc}") from exc
        store.write_failure = None
        return result

    return wrapper


MIGRATIONS: list[str] = [
    # 1: registry, ledger, audit, API keys
    """
    CREATE TABLE registrations (
        identity    TEXT NOT NULL,
        device_id   TEXT NOT NULL,
        platform    TEXT NOT NULL,
        token       TEXT NOT NULL,
        push_kind   TEXT NOT NULL,
        app_id      TEXT,
        created_at  DOUBLE PRECISION NOT NULL,
        updated_at  DOUBLE PRECISION NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (identity, device_id)
    );
    CREATE INDEX registrations_token ON registrations (platform, token);
    CREATE INDEX registrations_expiry ON registrations (expires_at);
    CREATE TABLE events (
        event_id       TEXT PRIMARY KEY,
        event_type     TEXT NOT NULL,
        status         TEXT NOT NULL,
        reason         TEXT NOT NULL DEFAULT '',
        correlation_id TEXT,
        recipient      TEXT,
        received_at    DOUBLE PRECISION NOT NULL,
        updated_at     DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX events_correlation ON events (correlation_id);
    CREATE INDEX events_updated ON events (updated_at);
    CREATE TABLE deliveries (
        event_id          TEXT NOT NULL,
        identity          TEXT NOT NULL,
        device_id         TEXT NOT NULL,
        platform          TEXT NOT NULL,
        token_fingerprint TEXT NOT NULL,
        status            TEXT NOT NULL,
        reason            TEXT NOT NULL DEFAULT '',
        attempts          INTEGER NOT NULL DEFAULT 0,
        provider          TEXT NOT NULL DEFAULT '',
        provider_ref      TEXT,
        lease_until       DOUBLE PRECISION,
        updated_at        DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (event_id, identity, device_id)
    );
    CREATE INDEX deliveries_updated ON deliveries (updated_at);
    CREATE TABLE removed_registrations (
        identity          TEXT NOT NULL,
        device_id         TEXT NOT NULL,
        platform          TEXT NOT NULL,
        token_fingerprint TEXT NOT NULL,
        reason            TEXT NOT NULL,
        removed_at        DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX removed_registrations_identity ON removed_registrations (identity, removed_at);
    CREATE TABLE api_keys (
        key_id      TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes      TEXT NOT NULL,
        created_at  DOUBLE PRECISION NOT NULL,
        revoked_at  DOUBLE PRECISION
    );
    """,
    # 2: one spelling per APNs token (lower case)
    APNS_TOKENS_TO_LOWER_CASE,
    # 3: ring lifecycle: what a stop push needs of its ring (the call context is never stored)
    """
    ALTER TABLE events ADD COLUMN caller TEXT, ADD COLUMN server_call_id TEXT,
        ADD COLUMN expires_at DOUBLE PRECISION;
    """,
    # 4: instance heartbeats, and claims naming their instance (a dead one's claims are free
    # before their lease ends). Rows claimed before this have claimed_by NULL: lease only.
    """
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        started_at  DOUBLE PRECISION NOT NULL,
        last_seen   DOUBLE PRECISION NOT NULL
    );
    ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;
    """,
    # 5: call routing: redirect/reject claims per call leg, and PSTN number assignment
    # (self-contained: creates only its own tables; renumber freely on merge)
    """
    CREATE TABLE IF NOT EXISTS call_actions (
        correlation_id TEXT NOT NULL,
        callee         TEXT NOT NULL,
        event_id       TEXT NOT NULL,
        kind           TEXT NOT NULL,
        target         TEXT NOT NULL,
        status         TEXT NOT NULL,
        reason         TEXT NOT NULL DEFAULT '',
        attempts       INTEGER NOT NULL DEFAULT 0,
        request_id     TEXT NOT NULL,
        first_sent     DOUBLE PRECISION NOT NULL,
        lease_until    DOUBLE PRECISION,
        updated_at     DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (correlation_id, callee)
    );
    CREATE INDEX IF NOT EXISTS call_actions_updated ON call_actions (updated_at);
    CREATE TABLE IF NOT EXISTS numbers (
        e164       TEXT PRIMARY KEY,
        target     TEXT NOT NULL,
        label      TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 6: chat pushes: a registration's chat format and sealed chat key; per-identity muted
    # threads.
    """
    ALTER TABLE registrations
        ADD COLUMN chat_format TEXT NOT NULL DEFAULT 'notification',
        ADD COLUMN chat_key TEXT;
    CREATE TABLE muted_threads (
        identity   TEXT NOT NULL,
        thread_id  TEXT NOT NULL,
        until      DOUBLE PRECISION,
        muted_at   DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (identity, thread_id)
    );
    """,
]


CALL_LOCK = 0x63616C6C  # "call": with the correlation id's hash, one claimer per call at a time
_ACTION_COLUMNS = (
    "correlation_id, callee, event_id, kind, target, status, reason, attempts, request_id, "
    "first_sent, updated_at"
)


def _call_action(row: Any) -> CallAction:
    return CallAction(*[row[i] for i in range(11)])


def _number(row: Any) -> NumberAssignment:
    return NumberAssignment(row[0], row[1], row[2], row[3], row[4])


_DB_NOW = "extract(epoch from clock_timestamp())::float8"


def _claimable(stale_param: str) -> str:
    """A row is free to claim when it is new, transient, or in flight under a claim that is
    dead: its lease ended, or its instance's heartbeat is older than `stale_param` seconds. For
    the DO UPDATE WHERE of the claim statements, where `excluded` is the new claim."""
    return (
        "deliveries.status = 'transient' OR (deliveries.status = 'in_flight' AND ("
        "deliveries.lease_until <= excluded.updated_at OR (deliveries.claimed_by IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = deliveries.claimed_by "
        f"AND i.last_seen > {_DB_NOW} - {stale_param}::float8))))"
    )


_REG_COLUMNS = (
    "identity, device_id, platform, token, push_kind, app_id, created_at, updated_at, expires_at, "
    "chat_format, chat_key"
)
_REG_COUNT = len(_REG_COLUMNS.split(","))
_REG_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, _REG_COUNT + 1))
# Columns a re-registration replaces (all but the key and created_at).
_REG_UPDATE = ", ".join(
    f"{c} = excluded.{c}"
    for c in (c.strip() for c in _REG_COLUMNS.split(","))
    if c not in ("identity", "device_id", "created_at")
)
_OUTCOME_COLUMNS = (
    "identity, device_id, platform, token_fingerprint, status, reason, attempts, provider, "
    "provider_ref"
)


def _registration(row: Any) -> Registration:
    return Registration(
        identity=row[0],
        device_id=row[1],
        platform=Platform(row[2]),
        token=row[3],
        push_kind=PushKind(row[4]),
        app_id=row[5],
        created_at=row[6],
        updated_at=row[7],
        expires_at=row[8],
        chat_format=ChatFormat(row[9]),
        chat_key=row[10],
    )


def _outcome(row: Any) -> DeliveryOutcome:
    return DeliveryOutcome(
        identity=row[0],
        device_id=row[1],
        platform=Platform(row[2]),
        status=DeliveryStatus(row[4]),
        reason=row[5],
        attempts=row[6],
        provider=row[7],
        provider_ref=row[8],
        token_fingerprint=row[3],
    )


def _api_key(row: Any) -> ApiKey:
    return ApiKey(row[0], row[1], row[2], tuple(row[3].split()), row[4], row[5])


@dataclass(frozen=True, slots=True)
class _ClaimRequest:
    event: EventRecord
    identity: str
    kind: PushKind
    now: float
    lease_until: float


@dataclass(frozen=True, slots=True)
class _SettleRequest:
    event: EventRecord
    outcomes: list[DeliveryOutcome]
    now: float


def _event_columns(events: list[tuple[EventRecord, float]]) -> list[list[Any]]:
    """The events table's columns as arrays, for `unnest`."""
    return [
        [e.event_id for e, _ in events],
        [e.event_type for e, _ in events],
        [e.status.value for e, _ in events],
        [e.reason for e, _ in events],
        [e.correlation_id for e, _ in events],
        [e.recipient for e, _ in events],
        [e.received_at or now for e, now in events],
        [now for _, now in events],
    ]


def _call_columns(events: list[EventRecord]) -> list[list[Any]]:
    """The events table's call columns (added by migration 3), passed after the others."""
    return [
        [e.caller for e in events],
        [e.server_call_id for e in events],
        [e.expires_at for e in events],
    ]


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply pending migrations; returns the schema version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {current} is newer than this ringrelay "
                f"({len(MIGRATIONS)}); upgrade ringrelay"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        return len(MIGRATIONS)


async def _release_connection(conn: asyncpg.Connection) -> None:
    """What to undo when a connection goes back to the pool. asyncpg's default runs
    `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every release: one more round
    trip per query, 8.5 % of the relay's CPU under load (py-spy). ringrelay leaves no session
    state (transaction-level advisory locks only, no LISTEN, no SET), so only a transaction
    abandoned by a cancelled request needs undoing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PostgresStore:
    def __init__(
        self, dsn: str, *, min_size: int = 2, max_size: int = 20, heartbeat: bool = True
    ) -> None:
        self.dsn = dsn
        # This process's name in `instances` and on its claims. Without a heartbeat (admin
        # commands) claims carry no instance and end only with their lease.
        self.instance_id = uuid.uuid4().hex
        self._heartbeat = heartbeat
        self.heartbeat_stale = HEARTBEAT_STALE  # seconds of silence after which it is dead
        self._claimant: str | None = self.instance_id if heartbeat else None
        self._beating: asyncio.Task[None] | None = None
        self._beat_conn: asyncpg.Connection | None = None
        # Why the last write failed, when it was the database's fault; None once one succeeds
        # (the heartbeat, a write every second, counts).
        self.write_failure: str | None = None
        host = dsn.split("@", 1)[-1].split("?", 1)[0]  # never the password
        self.description = f"PostgreSQL ({host})"
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self.server_settings: dict[str, str] = {}
        # Claims and settles of concurrent events share statements (group commit): per event,
        # two round trips and two commits cost ~600 µs of PostgreSQL CPU at the peak.
        self.claims: Coalescer[_ClaimRequest, list[Any]] = Coalescer(
            self._claim_batch, key=lambda r: r.event.event_id
        )
        self.settles: Coalescer[_SettleRequest, None] = Coalescer(
            self._settle_batch, key=lambda r: r.event.event_id
        )

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings={**self._default_settings(), **self.server_settings},
            command_timeout=10,
            reset=_release_connection,
        )
        async with self.pool.acquire() as conn:
            await migrate(conn)
        if self._heartbeat:
            # Registered before the first claim: a claim whose instance has no row is dead.
            await self._beat()
            self._beating = asyncio.create_task(self._heartbeat_loop())

    def reserve(self) -> None:
        pass  # several instances share a database: nothing to hold alone

    _HEARTBEAT = (
        "INSERT INTO instances (instance_id, host, pid, started_at, last_seen) "
        f"VALUES ($1, $2, $3, {_DB_NOW}, {_DB_NOW}) "
        "ON CONFLICT (instance_id) DO UPDATE SET last_seen = excluded.last_seen"
    )

    async def _beat(self) -> None:
        # A connection of its own: a pool exhausted by a burst must not delay the heartbeat
        # past HEARTBEAT_STALE (the other instances would take over live claims).
        if self._beat_conn is None or self._beat_conn.is_closed():
            self._beat_conn = await asyncpg.connect(
                self.dsn, server_settings=self.server_settings or None, timeout=HEARTBEAT_STALE
            )
        await self._beat_conn.execute(
            self._HEARTBEAT,
            self.instance_id,
            socket.gethostname(),
            os.getpid(),
            timeout=HEARTBEAT_STALE,
        )

    async def _heartbeat_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self._beat()
                self.write_failure = None
            except _STORAGE_ERRORS as exc:
                self.write_failure = f"{type(exc).__name__}: {exc}"
                if not failing:
                    log.warning("instance heartbeat not written: %s", exc)
                failing = True
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self._beat_conn is not None:
                    self._beat_conn.terminate()
                    self._beat_conn = None
                if not failing:  # once per outage, not every second
                    log.warning("instance heartbeat failed (%s); retrying", type(exc).__name__)
                failing = True
            else:
                if failing:
                    log.info("instance heartbeat renewed")
                failing = False

    # Every statement of ringrelay's finds its rows through an index, whatever the tables' size.
    # Left to itself, PostgreSQL cached a generic plan for the settle while `deliveries` was
    # nearly empty (hash join over a sequential scan) and kept it as the table grew: 17.5 M rows
    # read in a 10 s run (pg_stat_user_tables). Planning each execution afresh fixed that but
    # cost about half of the statements' time (EXPLAIN ANALYZE: planning 0.39 + 0.16 ms against
    # execution 0.45 + 0.15 ms per batch of 8). With these, one generic plan per statement is
    # index lookups in nested loops: PostgreSQL CPU per event -35 %, peak +20 % (alternating
    # runs). A statement with no index to use still scans; the URL's query may override each.
    _PLANNER_SETTINGS = {
        "plan_cache_mode": "force_generic_plan",
        "enable_seqscan": "off",
        "enable_hashjoin": "off",
        "enable_mergejoin": "off",
    }

    def _default_settings(self) -> dict[str, str]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.dsn).query)
        return {k: v for k, v in self._PLANNER_SETTINGS.items() if k not in query}

    async def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
            self._beating = None
        if self._pool is not None:
            await self.claims.drain()
            await self.settles.drain()
            if self._heartbeat:
                # Gone for good: whatever this instance still holds is free at once.
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await self._pool.execute(
                        "DELETE FROM instances WHERE instance_id = $1", self.instance_id
                    )
            await self._pool.close()
            self._pool = None
        if self._beat_conn is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self._beat_conn.close(timeout=5)
            self._beat_conn = None

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")
        if self.write_failure is not None:
            raise StoreNotWritable(self.write_failure)

    # --- registry ---------------------------------------------------------------------------

    @_writes
    async def upsert_registration(self, reg: Registration) -> tuple[bool, int]:
        async with self.pool.acquire() as conn, conn.transaction():
            displaced = await conn.fetchval(
                "WITH d AS (DELETE FROM registrations WHERE platform = $1 AND token = $2 "
                "AND NOT (identity = $3 AND device_id = $4) RETURNING 1) SELECT count(*) FROM d",
                reg.platform.value,
                reg.token,
                reg.identity,
                reg.device_id,
            )
            inserted = await conn.fetchval(
                f"INSERT INTO registrations ({_REG_COLUMNS}) VALUES ({_REG_PLACEHOLDERS}) "
                f"ON CONFLICT (identity, device_id) DO UPDATE SET {_REG_UPDATE} "
                "RETURNING (xmax = 0)",
                *self._reg_values(reg),
            )
        return bool(inserted), int(displaced)

    @staticmethod
    def _reg_values(reg: Registration) -> tuple[Any, ...]:
        return (
            reg.identity,
            reg.device_id,
            reg.platform.value,
            reg.token,
            reg.push_kind.value,
            reg.app_id,
            reg.created_at,
            reg.updated_at,
            reg.expires_at,
            reg.chat_format.value,
            reg.chat_key,
        )

    @_writes
    async def bulk_insert_registrations(self, regs: list[Registration]) -> None:
        async with self.pool.acquire() as conn:
            await conn.executemany(
                f"INSERT INTO registrations ({_REG_COLUMNS}) VALUES ({_REG_PLACEHOLDERS}) "
                f"ON CONFLICT (identity, device_id) DO UPDATE SET {_REG_UPDATE}",
                [self._reg_values(r) for r in regs],
            )

    async def upsert_registrations(self, regs: list[Registration]) -> list[bool]:
        if not regs:
            return []
        columns = list(zip(*(self._reg_values(r) for r in regs), strict=True))
        async with self.pool.acquire() as conn, conn.transaction():
            # As upsert_registration, for the whole batch: other holders of each token go first.
            await conn.execute(
                "DELETE FROM registrations r USING unnest($1::text[], $2::text[], $3::text[], "
                "$4::text[]) AS n(identity, device_id, platform, token) "
                "WHERE r.platform = n.platform AND r.token = n.token "
                "AND NOT (r.identity = n.identity AND r.device_id = n.device_id)",
                *columns[:4],
            )
            rows = await conn.fetch(
                f"INSERT INTO registrations ({_REG_COLUMNS}) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
                "$5::text[], $6::text[], $7::float8[], $8::float8[], $9::float8[], "
                "$10::text[], $11::text[]) "
                f"ON CONFLICT (identity, device_id) DO UPDATE SET {_REG_UPDATE} "
                "RETURNING identity, device_id, (xmax = 0) AS created",
                *columns,
            )
        created = {(r["identity"], r["device_id"]): bool(r["created"]) for r in rows}
        return [created[(r.identity, r.device_id)] for r in regs]

    async def registrations_after(
        self, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[Registration]:
        identity, device_id = after if after is not None else ("", "")
        rows = await self.pool.fetch(
            f"SELECT {_REG_COLUMNS} FROM registrations WHERE (identity, device_id) > ($1, $2) "
            "AND expires_at > $3 ORDER BY identity, device_id LIMIT $4",
            identity,
            device_id,
            now,
            limit,
        )
        return [_registration(r) for r in rows]

    async def list_registrations(self, identity: str, now: float) -> list[Registration]:
        rows = await self.pool.fetch(
            f"SELECT {_REG_COLUMNS} FROM registrations WHERE identity = $1 AND expires_at > $2 "
            "ORDER BY device_id",
            identity,
            now,
        )
        return [_registration(r) for r in rows]

    @_writes
    async def delete_registration(self, identity: str, device_id: str) -> bool:
        status = await self.pool.execute(
            "DELETE FROM registrations WHERE identity = $1 AND device_id = $2", identity, device_id
        )
        return bool(status != "DELETE 0")

    @_writes
    async def delete_identity(self, identity: str) -> int:
        status = await self.pool.execute("DELETE FROM registrations WHERE identity = $1", identity)
        return int(status.split()[-1])

    async def push_targets(self, identity: str, kind: PushKind, now: float) -> list[Registration]:
        rows = await self.pool.fetch(
            f"SELECT {_REG_COLUMNS} FROM registrations "
            "WHERE identity = $1 AND push_kind = $2 AND expires_at > $3",
            identity,
            kind.value,
            now,
        )
        return [_registration(r) for r in rows]

    @_writes
    async def prune_registration(
        self, reg: Registration, reason: str, now: float, unless_updated_after: float | None = None
    ) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "DELETE FROM registrations WHERE identity = $1 AND device_id = $2 AND token = $3 "
                "AND ($4::double precision IS NULL OR updated_at <= $4)",
                reg.identity,
                reg.device_id,
                reg.token,
                unless_updated_after,
            )
            removed = bool(status != "DELETE 0")
            if removed:
                await conn.execute(
                    "INSERT INTO removed_registrations (identity, device_id, platform, "
                    "token_fingerprint, reason, removed_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    reg.identity,
                    reg.device_id,
                    reg.platform.value,
                    fingerprint(reg.token),
                    reason,
                    now,
                )
        return removed

    async def removed_registrations(self, identity: str) -> list[RemovedRegistration]:
        rows = await self.pool.fetch(
            "SELECT identity, device_id, platform, token_fingerprint, reason, removed_at "
            "FROM removed_registrations WHERE identity = $1 ORDER BY removed_at DESC",
            identity,
        )
        return [RemovedRegistration(*r) for r in rows]

    async def recent_removals(self, limit: int) -> list[RemovedRegistration]:
        rows = await self.pool.fetch(
            "SELECT identity, device_id, platform, token_fingerprint, reason, removed_at "
            "FROM removed_registrations ORDER BY removed_at DESC LIMIT $1",
            limit,
        )
        return [RemovedRegistration(*r) for r in rows]

    # --- API keys ---------------------------------------------------------------------------

    @_writes
    async def create_api_key(self, key: ApiKey) -> None:
        await self.pool.execute(
            "INSERT INTO api_keys (key_id, name, secret_hash, scopes, created_at, revoked_at) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            key.key_id,
            key.name,
            key.secret_hash,
            " ".join(key.scopes),
            key.created_at,
            key.revoked_at,
        )

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow(
            "SELECT key_id, name, secret_hash, scopes, created_at, revoked_at FROM api_keys "
            "WHERE key_id = $1",
            key_id,
        )
        return None if row is None else _api_key(row)

    async def list_api_keys(self) -> list[ApiKey]:
        rows = await self.pool.fetch(
            "SELECT key_id, name, secret_hash, scopes, created_at, revoked_at FROM api_keys "
            "ORDER BY created_at"
        )
        return [_api_key(r) for r in rows]

    @_writes
    async def revoke_api_key(self, key_id: str, now: float) -> bool:
        status = await self.pool.execute(
            "UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
            now,
            key_id,
        )
        return bool(status != "UPDATE 0")

    async def active_api_keys(self) -> int:
        return int(
            await self.pool.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        )

    # --- muted chat threads -----------------------------------------------------------------

    @_writes
    async def mute_thread(
        self, identity: str, thread_id: str, until: float | None, now: float
    ) -> None:
        await self.pool.execute(
            "INSERT INTO muted_threads (identity, thread_id, until, muted_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (identity, thread_id) DO UPDATE SET "
            "until = excluded.until, muted_at = excluded.muted_at",
            identity,
            thread_id,
            until,
            now,
        )

    @_writes
    async def unmute_thread(self, identity: str, thread_id: str) -> bool:
        status = await self.pool.execute(
            "DELETE FROM muted_threads WHERE identity = $1 AND thread_id = $2", identity, thread_id
        )
        return bool(status != "DELETE 0")

    async def muted_threads(self, identity: str, now: float) -> list[tuple[str, float | None]]:
        rows = await self.pool.fetch(
            "SELECT thread_id, until FROM muted_threads WHERE identity = $1 "
            "AND (until IS NULL OR until > $2) ORDER BY thread_id",
            identity,
            now,
        )
        return [(r[0], r[1]) for r in rows]

    async def is_thread_muted(self, identity: str, thread_id: str, now: float) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM muted_threads WHERE identity = $1 "
                "AND thread_id = $2 AND (until IS NULL OR until > $3))",
                identity,
                thread_id,
                now,
            )
        )

    # --- ledger -----------------------------------------------------------------------------

    # The event's row is written by a CTE in the same statement as the deliveries: one round
    # trip and one commit per step. (Separate statements in a transaction cost ~2.7 ms of relay
    # CPU per event in asyncpg round trips; measured 339 events/s against ~1,000 on SQLite.)
    _UPSERT_EVENT = (
        "INSERT INTO events (event_id, event_type, status, reason, correlation_id, "
        "recipient, received_at, updated_at, caller, server_call_id, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $16, $17, $18) "
        "ON CONFLICT (event_id) DO UPDATE SET status = excluded.status, "
        "reason = excluded.reason, updated_at = excluded.updated_at"
    )

    @staticmethod
    def _event_values(event: EventRecord, now: float) -> tuple[Any, ...]:
        return (
            event.event_id,
            event.event_type,
            event.status.value,
            event.reason,
            event.correlation_id,
            event.recipient,
            event.received_at or now,
            now,
        )

    @_writes
    async def claim_callee(
        self, event: EventRecord, identity: str, kind: PushKind, now: float, lease_until: float
    ) -> tuple[list[Registration], Claim]:
        rows = await self.claims.submit(_ClaimRequest(event, identity, kind, now, lease_until))
        targets = [_registration(r[1:]) for r in rows]
        claim = Claim()
        for target, row in zip(targets, rows, strict=True):
            attempts, claimed = row[1 + _REG_COUNT], row[2 + _REG_COUNT]
            if claimed:
                claim.to_send.append(target)
                if attempts:
                    claim.attempts[(target.identity, target.device_id)] = int(attempts)
        if len(claim.to_send) < len(targets):
            await self._read_others(event.event_id, targets, claim)
        return targets, claim

    # Several events' claims in one statement: each callee's live registrations (t), the event
    # rows of callees that have one (ev; else the caller records the event), and the claims of
    # devices neither settled nor under a live lease (ins). The lookup was a round trip of its own
    # (~12 % of the relay's CPU per call, py-spy). The token's fingerprint is written with the
    # outcome (the token is only known here).
    _CLAIM_BATCH = (
        "WITH req AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
        "$5::text[], $6::text[], $7::float8[], $8::float8[], $9::float8[], $10::text[], "
        "$11::text[], $14::text[], $15::text[], $16::float8[]) AS req(event_id, event_type, "
        "status, reason, correlation_id, recipient, received_at, now, lease_until, identity, "
        "kind, caller, server_call_id, expires_at)), "
        "t AS (SELECT req.event_id AS ev_id, req.now AS claim_now, req.lease_until AS lease, "
        + ", ".join(f"r.{c.strip()}" for c in _REG_COLUMNS.split(","))
        + " FROM req JOIN registrations r ON r.identity = req.identity "
        "AND r.push_kind = req.kind AND r.expires_at > req.now), "
        "ev AS (INSERT INTO events (event_id, event_type, status, reason, correlation_id, "
        "recipient, received_at, updated_at, caller, server_call_id, expires_at) "
        "SELECT req.event_id, req.event_type, req.status, req.reason, req.correlation_id, "
        "req.recipient, req.received_at, req.now, req.caller, req.server_call_id, "
        "req.expires_at FROM req "
        "WHERE EXISTS (SELECT 1 FROM t WHERE t.ev_id = req.event_id) "
        "ON CONFLICT (event_id) DO UPDATE SET status = excluded.status, "
        "reason = excluded.reason, updated_at = excluded.updated_at RETURNING 1), "
        "ins AS (INSERT INTO deliveries (event_id, identity, device_id, platform, "
        "token_fingerprint, status, attempts, lease_until, updated_at, claimed_by) "
        "SELECT t.ev_id, t.identity, t.device_id, t.platform, '', 'in_flight', 0, t.lease, "
        "t.claim_now, $12::text FROM t "
        "ON CONFLICT (event_id, identity, device_id) DO UPDATE SET "
        "status = 'in_flight', lease_until = excluded.lease_until, "
        "updated_at = excluded.updated_at, claimed_by = excluded.claimed_by "
        f"WHERE {_claimable('$13')} "
        "RETURNING event_id, identity, device_id, attempts) "
        "SELECT t.ev_id, "
        + ", ".join(f"t.{c.strip()}" for c in _REG_COLUMNS.split(","))
        + ", ins.attempts, ins.identity IS NOT NULL FROM t LEFT JOIN ins "
        "ON ins.event_id = t.ev_id AND ins.identity = t.identity AND ins.device_id = t.device_id"
    )

    async def _claim_batch(self, requests: list[_ClaimRequest]) -> list[list[Any]]:
        rows = await self.pool.fetch(
            self._CLAIM_BATCH,
            *_event_columns([(r.event, r.now) for r in requests]),
            [r.lease_until for r in requests],
            [r.identity for r in requests],
            [r.kind.value for r in requests],
            self._claimant,
            self.heartbeat_stale,
            *_call_columns([r.event for r in requests]),
        )
        by_event: dict[str, list[Any]] = {r.event.event_id: [] for r in requests}
        for row in rows:
            by_event[row[0]].append(row)
        return [by_event[r.event.event_id] for r in requests]

    async def _read_others(self, event_id: str, targets: list[Registration], claim: Claim) -> None:
        """Devices seen before (a redelivery, or another instance has them): who holds what."""
        wanted = {(r.identity, r.device_id) for r in targets}
        got = {(r.identity, r.device_id) for r in claim.to_send}
        rows = await self.pool.fetch(
            f"SELECT {_OUTCOME_COLUMNS} FROM deliveries WHERE event_id = $1", event_id
        )
        for row in rows:
            key = (row[0], row[1])
            if key not in wanted or key in got:
                continue
            outcome = _outcome(row)
            (claim.settled if outcome.status.settled else claim.busy).append(outcome)

    @_writes
    async def claim_deliveries(
        self, event: EventRecord, targets: list[Registration], now: float, lease_until: float
    ) -> Claim:
        claim = Claim()
        if not targets:
            return claim
        by_key = {(r.identity, r.device_id): r for r in targets}
        # One statement, so atomic: the event row and the claims of every device not settled
        # nor leased by a live claim (ON CONFLICT serialises two instances claiming at once).
        taken = await self.pool.fetch(
            f"WITH ev AS ({self._UPSERT_EVENT} RETURNING 1) "
            "INSERT INTO deliveries (event_id, identity, device_id, platform, "
            "token_fingerprint, status, attempts, lease_until, updated_at, claimed_by) "
            "SELECT $1, t.identity, t.device_id, t.platform, t.fp, 'in_flight', 0, $9, $8, "
            "$14::text FROM unnest($10::text[], $11::text[], $12::text[], $13::text[]) "
            "AS t(identity, device_id, platform, fp) "
            "ON CONFLICT (event_id, identity, device_id) DO UPDATE SET "
            "status = 'in_flight', lease_until = excluded.lease_until, "
            "updated_at = excluded.updated_at, claimed_by = excluded.claimed_by "
            f"WHERE {_claimable('$15')} "
            "RETURNING identity, device_id, attempts",
            *self._event_values(event, now),
            lease_until,
            [r.identity for r in targets],
            [r.device_id for r in targets],
            [r.platform.value for r in targets],
            [fingerprint(r.token) for r in targets],
            self._claimant,
            self.heartbeat_stale,
            event.caller,
            event.server_call_id,
            event.expires_at,
        )
        for row in taken:
            key = (row[0], row[1])
            claim.to_send.append(by_key[key])
            if row[2]:
                claim.attempts[key] = int(row[2])
        if len(claim.to_send) < len(targets):
            await self._read_others(event.event_id, targets, claim)
        return claim

    @_writes
    async def settle_deliveries(
        self, event: EventRecord, outcomes: list[DeliveryOutcome], now: float
    ) -> None:
        await self.settles.submit(_SettleRequest(event, outcomes, now))

    # Several events' outcomes and statuses in one statement (one commit).
    _SETTLE_BATCH = (
        "WITH ev AS (INSERT INTO events (event_id, event_type, status, reason, correlation_id, "
        "recipient, received_at, updated_at, caller, server_call_id, expires_at) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::text[], $7::float8[], $8::float8[], $19::text[], $20::text[], $21::float8[]) "
        "ON CONFLICT (event_id) DO UPDATE SET status = excluded.status, "
        "reason = excluded.reason, updated_at = excluded.updated_at RETURNING 1) "
        "UPDATE deliveries AS d SET status = o.status, reason = o.reason, "
        "attempts = o.attempts, provider = o.provider, provider_ref = o.ref, "
        "token_fingerprint = o.fp, lease_until = NULL, updated_at = o.now "
        "FROM unnest($9::text[], $10::text[], $11::text[], $12::text[], $13::text[], "
        "$14::int[], $15::text[], $16::text[], $17::text[], $18::float8[]) "
        "AS o(event_id, identity, device_id, status, reason, attempts, provider, ref, fp, now) "
        "WHERE d.event_id = o.event_id AND d.identity = o.identity "
        "AND d.device_id = o.device_id"
    )

    async def _settle_batch(self, requests: list[_SettleRequest]) -> list[None]:
        rows = [(r.event.event_id, r.now, o) for r in requests for o in r.outcomes]
        await self.pool.execute(
            self._SETTLE_BATCH,
            *_event_columns([(r.event, r.now) for r in requests]),
            [event_id for event_id, _, _ in rows],
            [o.identity for _, _, o in rows],
            [o.device_id for _, _, o in rows],
            [o.status.value for _, _, o in rows],
            [o.reason for _, _, o in rows],
            [o.attempts for _, _, o in rows],
            [o.provider for _, _, o in rows],
            [o.provider_ref for _, _, o in rows],
            [o.token_fingerprint for _, _, o in rows],
            [now for _, now, _ in rows],
            *_call_columns([r.event for r in requests]),
        )
        return [None] * len(requests)

    @_writes
    async def record_event(self, event: EventRecord, now: float) -> None:
        await self.settles.submit(_SettleRequest(event, [], now))

    _EVENT_COLUMNS = (
        "event_id, event_type, status, reason, correlation_id, recipient, received_at, "
        "caller, server_call_id, expires_at"
    )

    @staticmethod
    def _event(r: Any) -> EventRecord:
        return EventRecord(
            r[0], r[1], EventStatus(r[2]), r[3], r[4], r[5], r[6], [], r[7], r[8], r[9]
        )

    async def call_stops(self, correlation_id: str) -> list[EventRecord]:
        rows = await self.pool.fetch(
            f"SELECT {self._EVENT_COLUMNS} FROM events WHERE correlation_id = $1 "
            "AND event_type = $2 ORDER BY received_at",
            correlation_id,
            CALL_STOPPED,
        )
        return [self._event(r) for r in rows]

    async def correlation_for_server_call(self, server_call_id: str) -> str | None:
        # Through the recent events (events_updated), not an index of its own: see SQLite's.
        value = await self.pool.fetchval(
            "SELECT correlation_id FROM events WHERE updated_at > $1 AND server_call_id = $2 "
            "LIMIT 1",
            time.time() - SERVER_CALL_LOOKBACK_SECONDS,
            server_call_id,
        )
        return None if value is None else str(value)

    async def events_for_call(self, correlation_id: str) -> list[EventRecord]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {self._EVENT_COLUMNS} FROM events WHERE correlation_id = $1 "
                "ORDER BY received_at",
                correlation_id,
            )
            events = [self._event(r) for r in rows]
            for ev in events:
                ev.deliveries = [
                    _outcome(r)
                    for r in await conn.fetch(
                        f"SELECT {_OUTCOME_COLUMNS} FROM deliveries WHERE event_id = $1 "
                        "ORDER BY identity, device_id",
                        ev.event_id,
                    )
                ]
        return events

    # --- call routing -----------------------------------------------------------------------

    @_writes
    async def claim_call_action(
        self, action: CallAction, now: float, lease_until: float, max_redirects: int
    ) -> ActionClaim:
        async with self.pool.acquire() as conn, conn.transaction():
            # Instances claiming legs of the same call serialise here, so the redirect count
            # and the claim are decided together.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", CALL_LOCK, action.correlation_id
            )
            row = await conn.fetchrow(
                f"SELECT {_ACTION_COLUMNS}, lease_until FROM call_actions "
                "WHERE correlation_id = $1 AND callee = $2",
                action.correlation_id,
                action.callee,
            )
            if row is not None:
                existing = _call_action(row)
                settled = DeliveryStatus(existing.status).settled
                if settled or (row[11] is not None and row[11] > now):
                    return ActionClaim(False, existing)
                action.attempts = existing.attempts
                action.request_id = existing.request_id
                action.first_sent = existing.first_sent
            if action.kind == "redirect":
                others = await conn.fetchval(
                    "SELECT count(*) FROM call_actions WHERE correlation_id = $1 AND callee != $2 "
                    "AND kind = 'redirect' AND status NOT IN ('rejected', 'config_error')",
                    action.correlation_id,
                    action.callee,
                )
                if int(others) >= max_redirects:
                    return ActionClaim(False, None, limit_reached=True)
            action.status = DeliveryStatus.IN_FLIGHT.value
            action.updated_at = now
            await conn.execute(
                f"INSERT INTO call_actions ({_ACTION_COLUMNS}, lease_until) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
                "ON CONFLICT (correlation_id, callee) DO UPDATE SET event_id = excluded.event_id, "
                "kind = excluded.kind, target = excluded.target, status = excluded.status, "
                "reason = excluded.reason, lease_until = excluded.lease_until, "
                "updated_at = excluded.updated_at",
                action.correlation_id,
                action.callee,
                action.event_id,
                action.kind,
                action.target,
                action.status,
                action.reason,
                action.attempts,
                action.request_id,
                action.first_sent,
                now,
                lease_until,
            )
        return ActionClaim(True, action)

    @_writes
    async def settle_call_action(self, action: CallAction, now: float) -> None:
        await self.pool.execute(
            "UPDATE call_actions SET status = $1, reason = $2, attempts = $3, lease_until = NULL, "
            "updated_at = $4 WHERE correlation_id = $5 AND callee = $6",
            action.status,
            action.reason,
            action.attempts,
            now,
            action.correlation_id,
            action.callee,
        )

    async def call_actions(self, correlation_id: str) -> list[CallAction]:
        rows = await self.pool.fetch(
            f"SELECT {_ACTION_COLUMNS} FROM call_actions WHERE correlation_id = $1 "
            "ORDER BY first_sent",
            correlation_id,
        )
        return [_call_action(r) for r in rows]

    # --- number assignment ------------------------------------------------------------------

    @_writes
    async def put_number(self, assignment: NumberAssignment) -> bool:
        created = await self.pool.fetchval(
            "INSERT INTO numbers (e164, target, label, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (e164) DO UPDATE SET "
            "target = excluded.target, label = excluded.label, updated_at = excluded.updated_at "
            "RETURNING (xmax = 0)",
            assignment.e164,
            assignment.target,
            assignment.label,
            assignment.created_at,
            assignment.updated_at,
        )
        return bool(created)

    async def get_number(self, e164: str) -> NumberAssignment | None:
        row = await self.pool.fetchrow(
            "SELECT e164, target, label, created_at, updated_at FROM numbers WHERE e164 = $1", e164
        )
        return None if row is None else _number(row)

    async def list_numbers(self) -> list[NumberAssignment]:
        rows = await self.pool.fetch(
            "SELECT e164, target, label, created_at, updated_at FROM numbers ORDER BY e164"
        )
        return [_number(r) for r in rows]

    @_writes
    async def delete_number(self, e164: str) -> bool:
        status = await self.pool.execute("DELETE FROM numbers WHERE e164 = $1", e164)
        return bool(status != "DELETE 0")

    async def registration_counts(self, now: float) -> dict[tuple[str, str], int]:
        rows = await self.pool.fetch(
            "SELECT platform, push_kind, COUNT(*) FROM registrations WHERE expires_at > $1 "
            "GROUP BY platform, push_kind",
            now,
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def recent_events(self, limit: int, recipient: str | None = None) -> list[EventRecord]:
        async with self.pool.acquire() as conn:
            # Newest first through events_updated; the recipient is a filter on that walk (an
            # operator's look-up, rare enough not to earn an index on the hot table).
            rows = await conn.fetch(
                "SELECT event_id, event_type, status, reason, correlation_id, recipient, "
                "received_at FROM events WHERE ($1::text IS NULL OR recipient = $1) "
                "ORDER BY updated_at DESC LIMIT $2",
                recipient,
                limit,
            )
            events = [
                EventRecord(r[0], r[1], EventStatus(r[2]), r[3], r[4], r[5], r[6]) for r in rows
            ]
            for ev in events:
                ev.deliveries = [
                    _outcome(r)
                    for r in await conn.fetch(
                        f"SELECT {_OUTCOME_COLUMNS} FROM deliveries WHERE event_id = $1 "
                        "ORDER BY identity, device_id",
                        ev.event_id,
                    )
                ]
        return events

    @_writes
    async def purge(self, now: float, ledger_retention_seconds: float) -> PurgeCounts:
        cutoff = now - ledger_retention_seconds
        async with self.pool.acquire() as conn, conn.transaction():
            # Whichever instance gets the lock purges; the others skip this round. The lock is
            # per schema: advisory locks are database-wide, and deployments (or test runs) in
            # other schemas of the same database must not skip this one's purge.
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))", PURGE_LOCK
            ):
                return PurgeCounts(0, 0, 0)
            regs = await conn.execute("DELETE FROM registrations WHERE expires_at <= $1", now)
            deliveries = await conn.execute("DELETE FROM deliveries WHERE updated_at < $1", cutoff)
            events = await conn.execute("DELETE FROM events WHERE updated_at < $1", cutoff)
            await conn.execute("DELETE FROM removed_registrations WHERE removed_at < $1", cutoff)
            await conn.execute(
                "DELETE FROM muted_threads WHERE until IS NOT NULL AND until <= $1", now
            )
            await conn.execute(
                f"DELETE FROM instances WHERE last_seen < {_DB_NOW} - $1", INSTANCE_RETENTION
            )
            await conn.execute("DELETE FROM call_actions WHERE updated_at < $1", cutoff)
        return PurgeCounts(
            registrations=int(regs.split()[-1]),
            events=int(events.split()[-1]),
            deliveries=int(deliveries.split()[-1]),
        )
