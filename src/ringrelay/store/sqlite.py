"""SQLite store: the embedded default for one instance.

Queries run directly on the event-loop thread: with WAL and synchronous=NORMAL a commit writes the
WAL without fsync and takes tens of microseconds, less than a hop to a worker thread would cost.
Ledger writes of concurrent deliveries are group-committed (one transaction per turn of the
event loop), which took the webhook from ~1,300 to ~N events/s on the benchmark.

Only one serving process may use the file (store/instance_lock.py enforces it); several
instances need PostgreSQL. That is what lets claims live in memory: a claim guards against a
concurrent duplicate in this process, and a process that restarts after a crash holds the lock,
so every claim its predecessor had is dead: it takes them over at once (it never knew them). So
persisting a claim before the push (one more commit per event) would buy nothing here. The
outcome is written once, after the push.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from ringrelay.store.instance_lock import InstanceLock

SCHEMA_VERSION = 6
# How long a call's stop is kept in memory for the IncomingCalls that arrive after it: far past
# a ring window (an IncomingCall older than that is expired anyway).
STOPS_KEPT_SECONDS = 600.0
GROUP_COMMIT_WAIT = 0.002  # seconds
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes
# The registrations of the identities called lately, kept in memory (see push_targets): at most
# this many identities (~0.5 KB per device), the oldest read forgotten first.
TARGETS_CACHED = 50_000
# How often a serving process asks SQLite whether another connection (an admin command sharing
# the file: `ringrelay import`, ...) committed changes, which empties that cache. Asking on every
# call cost ~4 us of the ~10 us the cache saves; so a registration written by another process
# reaches a cached callee's calls within this many seconds.
EXTERNAL_WRITES_CHECKED_EVERY = 0.05  # seconds

SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (
    identity    TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    platform    TEXT NOT NULL,
    token       TEXT NOT NULL,
    push_kind   TEXT NOT NULL,
    app_id      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    chat_format TEXT NOT NULL DEFAULT 'notification',
    chat_key    TEXT,
    PRIMARY KEY (identity, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS registrations_token ON registrations (platform, token);
CREATE INDEX IF NOT EXISTS registrations_expiry ON registrations (expires_at);

CREATE TABLE IF NOT EXISTS events (
    event_id       TEXT PRIMARY KEY,
    event_type     TEXT NOT NULL,
    status         TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    correlation_id TEXT,
    recipient      TEXT,
    received_at    REAL NOT NULL,
    updated_at     REAL NOT NULL,
    caller         TEXT,
    server_call_id TEXT,
    expires_at     REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id);

CREATE INDEX IF NOT EXISTS events_updated ON events (updated_at);

CREATE TABLE IF NOT EXISTS deliveries (
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
    lease_until       REAL,
    updated_at        REAL NOT NULL,
    PRIMARY KEY (event_id, identity, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_updated ON deliveries (updated_at);

CREATE TABLE IF NOT EXISTS removed_registrations (
    identity          TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    platform          TEXT NOT NULL,
    token_fingerprint TEXT NOT NULL,
    reason            TEXT NOT NULL,
    removed_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS removed_registrations_identity
    ON removed_registrations (identity, removed_at);

CREATE TABLE IF NOT EXISTS muted_threads (
    identity   TEXT NOT NULL,
    thread_id  TEXT NOT NULL,
    until      REAL,
    muted_at   REAL NOT NULL,
    PRIMARY KEY (identity, thread_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
) WITHOUT ROWID;

-- /readyz writes and deletes a row here while writes are failing, to see whether they work again.
CREATE TABLE IF NOT EXISTS store_probe (
    id     INTEGER PRIMARY KEY,
    filler BLOB NOT NULL
);
"""

# Call routing (routing/): part of SCHEMA, and upgrade 5 of an existing file.
ROUTING_TABLES = """
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
    first_sent     REAL NOT NULL,
    lease_until    REAL,
    updated_at     REAL NOT NULL,
    PRIMARY KEY (correlation_id, callee)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS call_actions_updated ON call_actions (updated_at);
CREATE TABLE IF NOT EXISTS numbers (
    e164       TEXT PRIMARY KEY,
    target     TEXT NOT NULL,
    label      TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
"""

SCHEMA += ROUTING_TABLES

# Upgrades of an existing file, by the version they bring it to (SCHEMA is the current shape).
UPGRADES: dict[int, str] = {
    2: APNS_TOKENS_TO_LOWER_CASE,
    # Ring lifecycle: what a stop push needs of its ring (the call context is never stored).
    3: "ALTER TABLE events ADD COLUMN caller TEXT; "
    "ALTER TABLE events ADD COLUMN server_call_id TEXT; "
    "ALTER TABLE events ADD COLUMN expires_at REAL;",
    # store_probe (the write /readyz tries while writes are failing): made by SCHEMA itself
    # (CREATE TABLE IF NOT EXISTS) when the file is opened.
    4: "",
    # Call routing: redirect/reject claims per call leg, and PSTN number assignment.
    5: ROUTING_TABLES,
    # 6: chat pushes: a registration's chat format and sealed chat key (muted_threads is new:
    # SCHEMA creates it).
    6: "ALTER TABLE registrations ADD COLUMN chat_format TEXT NOT NULL DEFAULT 'notification'; "
    "ALTER TABLE registrations ADD COLUMN chat_key TEXT;",
}


_ACTION_COLUMNS = (
    "correlation_id, callee, event_id, kind, target, status, reason, attempts, request_id, "
    "first_sent, updated_at"
)


def _call_action(row: tuple[Any, ...]) -> CallAction:
    return CallAction(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        str(row[3]),
        str(row[4]),
        str(row[5]),
        str(row[6]),
        int(row[7]),
        str(row[8]),
        float(row[9]),
        float(row[10]),
    )


def _number(row: tuple[Any, ...]) -> NumberAssignment:
    return NumberAssignment(str(row[0]), str(row[1]), str(row[2]), float(row[3]), float(row[4]))


_REG_COLUMNS = (
    "identity, device_id, platform, token, push_kind, app_id, created_at, updated_at, expires_at, "
    "chat_format, chat_key"
)
_REG_PLACEHOLDERS = ", ".join("?" * len(_REG_COLUMNS.split(",")))


# Text -> enum member by a dict look-up: calling an Enum class runs its Python-level __call__
# (three per registration read, every push). A value not in them falls back to the call, which
# raises as before.
_PLATFORMS: dict[Any, Platform] = {m.value: m for m in Platform}
_PUSH_KINDS: dict[Any, PushKind] = {m.value: m for m in PushKind}
_CHAT_FORMATS: dict[Any, ChatFormat] = {m.value: m for m in ChatFormat}


def _registration(row: tuple[Any, ...]) -> Registration:
    identity, device_id, platform, token, kind, app_id, created, updated, expires = row[:9]
    chat_format, chat_key = row[9], row[10]
    return Registration(
        identity=str(identity),
        device_id=str(device_id),
        platform=_PLATFORMS.get(platform) or Platform(platform),
        token=str(token),
        push_kind=_PUSH_KINDS.get(kind) or PushKind(kind),
        app_id=None if app_id is None else str(app_id),
        created_at=float(created),
        updated_at=float(updated),
        expires_at=float(expires),
        chat_format=_CHAT_FORMATS.get(chat_format) or ChatFormat(chat_format),
        chat_key=None if chat_key is None else str(chat_key),
    )


def _reg_values(reg: Registration, created_at: float | None = None) -> tuple[Any, ...]:
    return (
        reg.identity,
        reg.device_id,
        reg.platform.value,
        reg.token,
        reg.push_kind.value,
        reg.app_id,
        reg.created_at if created_at is None else created_at,
        reg.updated_at,
        reg.expires_at,
        reg.chat_format.value,
        reg.chat_key,
    )


def _outcome(row: tuple[Any, ...]) -> DeliveryOutcome:
    identity, device_id, platform, fp, status, reason, attempts, provider, ref = row
    return DeliveryOutcome(
        identity=str(identity),
        device_id=str(device_id),
        platform=Platform(platform),
        status=DeliveryStatus(status),
        reason=str(reason),
        attempts=int(attempts),
        provider=str(provider),
        provider_ref=None if ref is None else str(ref),
        token_fingerprint=str(fp),
    )


# Failures of the storage, not of the statement: the disk is full, the file or its folder is
# read-only, an I/O error (sqlite.org/rescode.html). A retry later may work; the data was fine.
_STORAGE_ERRORS = {
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
}
PROBE_BYTES = 4096  # about a page: a probe that can grow the file by that much


def storage_failure(exc: BaseException) -> str | None:
    """SQLite's own words for a storage failure ("database or disk is full"), else None."""
    if isinstance(exc, sqlite3.Error) and (exc.sqlite_errorcode & 0xFF) in _STORAGE_ERRORS:
        return str(exc)
    return None


def lower_thread_priority() -> None:
    """Make the calling thread yield the core to the event loop whenever both want it: at nice
    19 a thread weighs 1/68 of one at nice 0 (the kernel's sched_prio_to_weight table). On Linux
    the nice value is per thread (setpriority(2), "BUGS"); elsewhere the call would name a
    process, so it is left alone there. Threads created later by this one inherit it."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class _Checkpointer:
    """Checkpoints the WAL from connections of its own, off the event loop.

    A PASSIVE checkpoint never waits, so it cannot block the service; but under steady writes it
    never finishes either (frames committed while it copies are left behind), and SQLite only
    rewinds the WAL after a finished one ("checkpoint starvation", sqlite.org/wal.html). The WAL
    then grows without bound: 192 MB after 10,000 events in one benchmark, and extending the file
    made the kernel zero every new page, 11 % of the relay's CPU. So when a pass leaves frames
    behind, the store holds its group commits (they queue in memory; reads and pushes go on)
    while a second pass copies the few frames written meanwhile, and the next commit rewinds the
    WAL to its start.

    Two threads, because the passes want opposite priorities. The first pass copies most of the
    WAL and may take its time: it runs at nice 19, in the event loop's idle moments (at nice 0,
    sharing the loop's core, the scheduler split the core with it and each pass held pushes back
    for 10-25 ms). The second pass holds the commits, so it must finish at once: at nice 19 on a
    busy core it was starved for 100-170 ms while webhook answers waited, and the load generator
    opened ever more connections. It runs on a thread at the loop's own priority."""

    def __init__(
        self,
        path: str,
        hold_writes: Callable[[], contextlib.AbstractContextManager[bool]],
        interval: float,
    ) -> None:
        self.path = path
        self.hold_writes = hold_writes
        self.interval = interval
        self._stopped = threading.Event()
        self._last_wal: tuple[int, int] = (0, 0)  # (frames in the WAL, frames copied)
        self._finish_requests: queue.Queue[bool] = queue.Queue()
        self._finished = threading.Semaphore(0)
        # Both created here, on the loop's thread: a thread inherits its creator's nice value.
        self._copier = threading.Thread(
            target=self._copy, name="ringrelay-sqlite-checkpoint", daemon=True
        )
        self._finisher = threading.Thread(
            target=self._finish, name="ringrelay-sqlite-checkpoint-finish", daemon=True
        )

    def start(self) -> None:
        self._finisher.start()
        self._copier.start()

    def _copy(self) -> None:
        lower_thread_priority()
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while not self._stopped.wait(self.interval):
                with contextlib.suppress(sqlite3.Error):
                    # The pass reports the WAL as it was when it began: "all copied" does not
                    # mean that no frame was committed meanwhile, so the held pass runs whenever
                    # the WAL has changed.
                    wal = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1:]
                    if wal[0] != 0 and wal != self._last_wal:
                        self._finish_requests.put(True)
                        self._finished.acquire()
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            db.close()
            self._finish_requests.put(False)

    def _finish(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while self._finish_requests.get():
                try:
                    with self.hold_writes() as held:
                        if held:
                            self._last_wal = db.execute(
                                "PRAGMA wal_checkpoint(PASSIVE)"
                            ).fetchone()[1:]
                except sqlite3.Error:
                    pass
                finally:
                    self._finished.release()
        finally:
            db.close()

    def stop(self) -> None:
        self._stopped.set()
        self._copier.join(timeout=10)
        self._finisher.join(timeout=10)


class SQLiteStore:
    # Every 0.25 s rather than 1 s: each pass copies less, so it takes the core from the event
    # loop in shorter slices (see bench/README, "SQLite's WAL under steady load").
    def __init__(
        self, path: str, checkpoint_interval: float = 0.25, *, single_instance: bool = True
    ) -> None:
        self.path = path
        # A serving process locks the file to itself; admin commands share it.
        self._lock = InstanceLock(path) if single_instance and path != ":memory:" else None
        self.checkpoint_interval = checkpoint_interval
        self.description = f"SQLite ({Path(path).resolve()})" if path != ":memory:" else "SQLite"
        self._db: sqlite3.Connection | None = None
        # In-flight claims: (event id, identity, device id) -> lease end.
        self._claims: dict[tuple[str, str, str], float] = {}
        # The calls that stopped ringing lately, by correlation id: read on every IncomingCall,
        # so from memory (one process owns the file, so its own writes are all there is; the
        # recent ones are loaded at open). A query here cost ~4 % of the relay's CPU per call.
        self._stops: dict[str, dict[str, EventRecord]] = {}
        # Every registration (any kind, expired included) of the identities called lately, read
        # on every push: a query and its Registration objects per call were ~5 % of the relay's
        # instructions per IncomingCall. This process makes every change to them itself, and
        # forgets an identity when it does; another connection's changes empty the lot
        # (PRAGMA data_version, checked every EXTERNAL_WRITES_CHECKED_EVERY).
        self._targets: OrderedDict[str, list[Registration]] = OrderedDict()
        self._data_version: int | None = None
        self._external_checked_at = 0.0
        self._pending: list[tuple[Callable[[sqlite3.Connection], None], asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._writes_held = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkpointer: _Checkpointer | None = None
        # Why the last write failed, when it was the storage's fault; None once one succeeds.
        self.write_failure: str | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at its start (BEGIN IMMEDIATE) so reads inside it are
        not invalidated by another writer. A failure of the storage (disk full, read-only, I/O)
        raises StoreNotWritable with SQLite's reason, and is remembered for /readyz."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # On a full disk or an I/O error SQLite may have rolled back already
                # (sqlite.org/lang_transaction.html, "Response To Errors Within A Transaction"):
                # a ROLLBACK then fails with "cannot rollback" and would hide the cause.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            reason = storage_failure(exc)
            if reason is None:
                raise
            self.write_failure = reason
            raise StoreNotWritable(f"{self.path}: {reason}") from exc
        self.write_failure = None

    async def _group_write(self, job: Callable[[sqlite3.Connection], None]) -> None:
        """Run `job` in a transaction shared with the other jobs submitted in the same turn of
        the event loop: one COMMIT for many concurrent deliveries. A failing job does not undo
        its neighbours (the batch is then replayed one job per transaction)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # A short wait gathers the writes of concurrent deliveries into one commit (the
            # commit, not the rows, is what costs). It delays the webhook's answer, never a
            # push. At 2,200 events/s, 2 ms took the relay's CPU per event from ~400 to ~340 us
            # against 0.5 ms (5 ms: ~325 us), which leaves the core room to absorb a stall.
            asyncio.get_running_loop().call_later(GROUP_COMMIT_WAIT, self._flush)
        await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._writes_held:
            return  # the checkpointer is finishing a pass; its release() flushes these
        jobs, self._pending = self._pending, []
        try:
            with self._write() as db:
                for job, _ in jobs:
                    job(db)
        except Exception:
            if len(jobs) > 1:
                # Rare: a job failed and took the batch with it; give each its own transaction
                # so that one bad write does not lose its neighbours'.
                for job, future in jobs:
                    self._pending = [(job, future)]
                    self._flush()
                return
            results: list[BaseException | None] = [sys.exc_info()[1]]
        else:
            results = [None] * len(jobs)
        for (_, future), error in zip(jobs, results, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    @contextlib.contextmanager
    def _hold_writes(self, timeout: float = 1.0) -> Iterator[bool]:
        """Called from the checkpointer thread: keeps the event loop's group commits queued
        while the block runs. Yields whether the hold took effect within `timeout` (a busy or
        closing loop may not get to it)."""
        loop = self._loop
        if loop is None:
            yield False
            return
        held = threading.Event()

        def hold() -> None:
            self._writes_held = True
            held.set()

        def release() -> None:
            self._writes_held = False
            if self._pending and not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)

        try:
            loop.call_soon_threadsafe(hold)
        except RuntimeError:  # the loop is closed
            yield False
            return
        try:
            yield held.wait(timeout)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(release)

    def reserve(self) -> None:
        if self._lock is not None:
            self._lock.acquire()

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.reserve()
        try:
            self._connect()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _connect(self) -> None:
        self._targets.clear()  # another process may have written while this one was closed
        self._data_version = None
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=2000")
        # The registry is read on every call: keep its pages in memory (64 MiB page cache and
        # memory-mapped reads) rather than SQLite's 2 MiB default.
        db.execute("PRAGMA cache_size=-65536")
        db.execute("PRAGMA mmap_size=268435456")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this ringrelay "
                f"({SCHEMA_VERSION}); upgrade ringrelay"
            )
        # Steps from one version to the next, for files made by an older ringrelay, each in its
        # own transaction, before the current shape (a new file gets SCHEMA and needs none).
        for step in range(version + 1, SCHEMA_VERSION + 1) if version else ():
            db.executescript(f"BEGIN; {UPGRADES[step]} PRAGMA user_version={step}; COMMIT;")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self.path != ":memory:":
            # Checkpoints copy the WAL into the database and fsync it: on a slow disk that
            # takes long enough to stall every request if it runs inside a commit on the event
            # loop (the default). A thread with its own connection does it instead.
            db.execute("PRAGMA wal_autocheckpoint=0")
            # After a burst, a rewound WAL is cut back to this size instead of keeping its peak.
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._checkpointer = _Checkpointer(
                self.path, self._hold_writes, self.checkpoint_interval
            )
            self._checkpointer.start()
        self._db = db
        for stop in self._events(  # through events_updated: no scan of a large table
            "updated_at > ? AND event_type = ?", time.time() - STOPS_KEPT_SECONDS, CALL_STOPPED
        ):
            self._remember_stop(stop)

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.release()

    async def ping(self) -> None:
        self.db.execute("SELECT 1").fetchone()
        if self.write_failure is not None:
            # Writes have been failing: try one that needs about a page of new space, so that
            # a store that can take writes again is ready again without waiting for traffic.
            with self._write() as db:
                db.execute("INSERT INTO store_probe (filler) VALUES (zeroblob(?))", (PROBE_BYTES,))
                db.execute("DELETE FROM store_probe")

    # --- registry ---------------------------------------------------------------------------

    async def upsert_registration(self, reg: Registration) -> tuple[bool, int]:
        with self._write() as db:
            self._targets.pop(reg.identity, None)
            # A token belongs to one install: when a phone switches user, the old identity must
            # stop ringing it, so every other registration holding this token is dropped.
            displaced = db.execute(
                "DELETE FROM registrations WHERE platform = ? AND token = ? "
                "AND NOT (identity = ? AND device_id = ?)",
                (reg.platform.value, reg.token, reg.identity, reg.device_id),
            ).rowcount
            if displaced:  # from identities this statement does not name
                self._targets.clear()
            existing = db.execute(
                "SELECT created_at FROM registrations WHERE identity = ? AND device_id = ?",
                (reg.identity, reg.device_id),
            ).fetchone()
            created_at = reg.created_at if existing is None else existing[0]
            db.execute(
                f"INSERT OR REPLACE INTO registrations ({_REG_COLUMNS}) "
                f"VALUES ({_REG_PLACEHOLDERS})",
                _reg_values(reg, created_at),
            )
        return existing is None, displaced

    async def prune_registration(
        self, reg: Registration, reason: str, now: float, unless_updated_after: float | None = None
    ) -> bool:
        with self._write() as db:
            self._targets.pop(reg.identity, None)
            removed = db.execute(
                "DELETE FROM registrations WHERE identity = ? AND device_id = ? AND token = ? "
                "AND (? IS NULL OR updated_at <= ?)",
                (
                    reg.identity,
                    reg.device_id,
                    reg.token,
                    unless_updated_after,
                    unless_updated_after,
                ),
            ).rowcount
            if removed:
                db.execute(
                    "INSERT INTO removed_registrations (identity, device_id, platform, "
                    "token_fingerprint, reason, removed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        reg.identity,
                        reg.device_id,
                        reg.platform.value,
                        fingerprint(reg.token),
                        reason,
                        now,
                    ),
                )
        return removed > 0

    async def removed_registrations(self, identity: str) -> list[RemovedRegistration]:
        rows = self.db.execute(
            "SELECT identity, device_id, platform, token_fingerprint, reason, removed_at "
            "FROM removed_registrations WHERE identity = ? ORDER BY removed_at DESC",
            (identity,),
        ).fetchall()
        return [
            RemovedRegistration(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]))
            for r in rows
        ]

    async def recent_removals(self, limit: int) -> list[RemovedRegistration]:
        rows = self.db.execute(
            "SELECT identity, device_id, platform, token_fingerprint, reason, removed_at "
            "FROM removed_registrations ORDER BY removed_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            RemovedRegistration(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]))
            for r in rows
        ]

    # --- API keys ---------------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey) -> None:
        with self._write() as db:
            self._insert_api_key(db, key)

    @staticmethod
    def _insert_api_key(db: sqlite3.Connection, key: ApiKey) -> None:
        db.execute(
            "INSERT INTO api_keys (key_id, name, secret_hash, scopes, created_at, revoked_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                key.key_id,
                key.name,
                key.secret_hash,
                " ".join(key.scopes),
                key.created_at,
                key.revoked_at,
            ),
        )

    @staticmethod
    def _api_key(row: tuple[Any, ...]) -> ApiKey:
        return ApiKey(
            str(row[0]),
            str(row[1]),
            str(row[2]),
            tuple(str(row[3]).split()),
            float(row[4]),
            None if row[5] is None else float(row[5]),
        )

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        row = self.db.execute(
            "SELECT key_id, name, secret_hash, scopes, created_at, revoked_at FROM api_keys "
            "WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        return None if row is None else self._api_key(row)

    async def list_api_keys(self) -> list[ApiKey]:
        rows = self.db.execute(
            "SELECT key_id, name, secret_hash, scopes, created_at, revoked_at FROM api_keys "
            "ORDER BY created_at"
        ).fetchall()
        return [self._api_key(r) for r in rows]

    async def revoke_api_key(self, key_id: str, now: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
        return cur.rowcount > 0

    async def active_api_keys(self) -> int:
        row = self.db.execute("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()
        return int(row[0])

    async def bulk_insert_registrations(self, regs: list[Registration]) -> None:
        with self._write() as db:
            self._targets.clear()
            db.executemany(
                f"INSERT OR REPLACE INTO registrations ({_REG_COLUMNS}) "
                f"VALUES ({_REG_PLACEHOLDERS})",
                (_reg_values(r) for r in regs),
            )

    async def upsert_registrations(self, regs: list[Registration]) -> list[bool]:
        created: list[bool] = []
        with self._write() as db:
            self._targets.clear()  # tokens may move from identities not in `regs`
            for reg in regs:  # the same statements as upsert_registration, one transaction
                db.execute(
                    "DELETE FROM registrations WHERE platform = ? AND token = ? "
                    "AND NOT (identity = ? AND device_id = ?)",
                    (reg.platform.value, reg.token, reg.identity, reg.device_id),
                )
                existing = db.execute(
                    "SELECT created_at FROM registrations WHERE identity = ? AND device_id = ?",
                    (reg.identity, reg.device_id),
                ).fetchone()
                db.execute(
                    f"INSERT OR REPLACE INTO registrations ({_REG_COLUMNS}) "
                    f"VALUES ({_REG_PLACEHOLDERS})",
                    _reg_values(reg, None if existing is None else existing[0]),
                )
                created.append(existing is None)
        return created

    async def registrations_after(
        self, after: tuple[str, str] | None, limit: int, now: float
    ) -> list[Registration]:
        identity, device_id = after if after is not None else ("", "")
        rows = self.db.execute(
            f"SELECT {_REG_COLUMNS} FROM registrations WHERE (identity, device_id) > (?, ?) "
            "AND expires_at > ? ORDER BY identity, device_id LIMIT ?",
            (identity, device_id, now, limit),
        ).fetchall()
        return [_registration(r) for r in rows]

    async def list_registrations(self, identity: str, now: float) -> list[Registration]:
        rows = self.db.execute(
            f"SELECT {_REG_COLUMNS} FROM registrations WHERE identity = ? AND expires_at > ? "
            "ORDER BY device_id",
            (identity, now),
        ).fetchall()
        return [_registration(r) for r in rows]

    async def delete_registration(self, identity: str, device_id: str) -> bool:
        with self._write() as db:
            self._targets.pop(identity, None)
            cur = db.execute(
                "DELETE FROM registrations WHERE identity = ? AND device_id = ?",
                (identity, device_id),
            )
        return cur.rowcount > 0

    async def delete_identity(self, identity: str) -> int:
        with self._write() as db:
            self._targets.pop(identity, None)
            return db.execute("DELETE FROM registrations WHERE identity = ?", (identity,)).rowcount

    async def push_targets(self, identity: str, kind: PushKind, now: float) -> list[Registration]:
        # The cached Registration objects are shared by every push of the identity: nothing
        # changes a Registration after it is built (models.Registration).
        if not 0.0 <= now - self._external_checked_at < EXTERNAL_WRITES_CHECKED_EVERY:
            self._check_external_writes(now)
        regs = self._targets.get(identity)
        if regs is None:
            regs = self._cache_targets(identity)
        return [r for r in regs if r.push_kind is kind and r.expires_at > now]

    def _cache_targets(self, identity: str) -> list[Registration]:
        regs = [
            _registration(r)
            for r in self.db.execute(
                f"SELECT {_REG_COLUMNS} FROM registrations WHERE identity = ?", (identity,)
            )
        ]
        table = self._targets
        table[identity] = regs
        if len(table) > TARGETS_CACHED:
            table.popitem(last=False)
        return regs

    def _check_external_writes(self, now: float) -> None:
        """sqlite.org/pragma.html#pragma_data_version: the value changes when another
        connection commits; this connection's own commits (and checkpoints) leave it."""
        self._external_checked_at = now
        (version,) = self.db.execute("PRAGMA data_version").fetchone()
        if version != self._data_version:
            self._data_version = version
            self._targets.clear()

    # --- muted chat threads -----------------------------------------------------------------

    async def mute_thread(
        self, identity: str, thread_id: str, until: float | None, now: float
    ) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO muted_threads (identity, thread_id, until, muted_at) "
                "VALUES (?, ?, ?, ?)",
                (identity, thread_id, until, now),
            )

    async def unmute_thread(self, identity: str, thread_id: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM muted_threads WHERE identity = ? AND thread_id = ?",
                (identity, thread_id),
            )
        return cur.rowcount > 0

    async def muted_threads(self, identity: str, now: float) -> list[tuple[str, float | None]]:
        rows = self.db.execute(
            "SELECT thread_id, until FROM muted_threads WHERE identity = ? "
            "AND (until IS NULL OR until > ?) ORDER BY thread_id",
            (identity, now),
        ).fetchall()
        return [(str(r[0]), None if r[1] is None else float(r[1])) for r in rows]

    async def is_thread_muted(self, identity: str, thread_id: str, now: float) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM muted_threads WHERE identity = ? AND thread_id = ? "
            "AND (until IS NULL OR until > ?)",
            (identity, thread_id, now),
        ).fetchone()
        return row is not None

    # --- ledger -----------------------------------------------------------------------------

    def _remember_stop(self, stop: EventRecord) -> None:
        if len(self._stops) > 10_000:  # bounded: a stop only matters while its call could ring
            cutoff = time.time() - STOPS_KEPT_SECONDS
            self._stops = {
                call: kept
                for call, stops in self._stops.items()
                if (kept := {k: v for k, v in stops.items() if v.received_at > cutoff})
            }
        if stop.correlation_id is not None:
            self._stops.setdefault(stop.correlation_id, {}).setdefault(stop.event_id, stop)

    def _upsert_event(self, event: EventRecord, now: float) -> None:
        if event.event_type == CALL_STOPPED:
            self._remember_stop(replace(event, received_at=event.received_at or now))
        self.db.execute(
            "INSERT INTO events (event_id, event_type, status, reason, correlation_id, recipient, "
            "received_at, updated_at, caller, server_call_id, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (event_id) DO UPDATE SET status = excluded.status, "
            "reason = excluded.reason, updated_at = excluded.updated_at",
            (
                event.event_id,
                event.event_type,
                event.status,  # StrEnums bind as their text, without Enum's .value descriptor
                event.reason,
                event.correlation_id,
                event.recipient,
                event.received_at or now,
                now,
                event.caller,
                event.server_call_id,
                event.expires_at,
            ),
        )

    async def claim_callee(
        self, event: EventRecord, identity: str, kind: PushKind, now: float, lease_until: float
    ) -> tuple[list[Registration], Claim]:
        targets = await self.push_targets(identity, kind, now)
        if not targets:
            return targets, Claim()
        return targets, await self.claim_deliveries(event, targets, now, lease_until)

    async def claim_deliveries(
        self, event: EventRecord, targets: list[Registration], now: float, lease_until: float
    ) -> Claim:
        # One process owns the file, so claims live in memory and are written together with
        # the outcome (see the module docstring): a read here, one group-committed write later.
        claim = Claim()
        existing = {
            (str(row[0]), str(row[1])): row
            for row in self.db.execute(
                "SELECT identity, device_id, platform, token_fingerprint, status, reason, "
                "attempts, provider, provider_ref FROM deliveries WHERE event_id = ?",
                (event.event_id,),
            )
        }
        for reg in targets:
            key = (reg.identity, reg.device_id)
            row = existing.get(key)
            if row is not None and DeliveryStatus(row[4]).settled:
                claim.settled.append(_outcome(row))
                continue
            lease = self._claims.get((event.event_id, *key))
            if lease is not None and lease > now:
                claim.busy.append(
                    DeliveryOutcome(
                        reg.identity,
                        reg.device_id,
                        reg.platform,
                        DeliveryStatus.IN_FLIGHT,
                        token_fingerprint=fingerprint(reg.token),
                    )
                )
                continue
            if row is not None:
                claim.attempts[key] = int(row[6])
            self._claims[(event.event_id, *key)] = lease_until
            claim.to_send.append(reg)
        return claim

    async def settle_deliveries(
        self, event: EventRecord, outcomes: list[DeliveryOutcome], now: float
    ) -> None:
        rows = [
            (
                event.event_id,
                o.identity,
                o.device_id,
                o.platform,
                o.token_fingerprint,
                o.status,
                o.reason,
                o.attempts,
                o.provider,
                o.provider_ref,
                now,
            )
            for o in outcomes
        ]

        def write(db: sqlite3.Connection) -> None:
            self._upsert_event(event, now)
            db.executemany(
                "INSERT INTO deliveries (event_id, identity, device_id, platform, "
                "token_fingerprint, status, reason, attempts, provider, provider_ref, "
                "lease_until, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?) "
                "ON CONFLICT (event_id, identity, device_id) DO UPDATE SET "
                "status = excluded.status, reason = excluded.reason, "
                "attempts = excluded.attempts, provider = excluded.provider, "
                "provider_ref = excluded.provider_ref, lease_until = NULL, "
                "updated_at = excluded.updated_at",
                rows,
            )

        try:
            await self._group_write(write)
        finally:
            for o in outcomes:
                self._claims.pop((event.event_id, o.identity, o.device_id), None)

    async def record_event(self, event: EventRecord, now: float) -> None:
        await self._group_write(lambda db: self._upsert_event(event, now))

    def _events(self, where: str, *args: object, order: str = "received_at") -> list[EventRecord]:
        return [
            EventRecord(
                event_id=str(r[0]),
                event_type=str(r[1]),
                status=EventStatus(r[2]),
                reason=str(r[3]),
                correlation_id=None if r[4] is None else str(r[4]),
                recipient=None if r[5] is None else str(r[5]),
                received_at=float(r[6]),
                caller=None if r[7] is None else str(r[7]),
                server_call_id=None if r[8] is None else str(r[8]),
                expires_at=None if r[9] is None else float(r[9]),
            )
            for r in self.db.execute(
                "SELECT event_id, event_type, status, reason, correlation_id, recipient, "
                f"received_at, caller, server_call_id, expires_at FROM events WHERE {where} "
                f"ORDER BY {order}",
                args,
            )
        ]

    def _with_deliveries(self, events: list[EventRecord]) -> list[EventRecord]:
        for ev in events:
            ev.deliveries = [
                _outcome(r)
                for r in self.db.execute(
                    "SELECT identity, device_id, platform, token_fingerprint, status, reason, "
                    "attempts, provider, provider_ref FROM deliveries WHERE event_id = ? "
                    "ORDER BY identity, device_id",
                    (ev.event_id,),
                )
            ]
        return events

    async def call_stops(self, correlation_id: str) -> list[EventRecord]:
        return list(self._stops.get(correlation_id, {}).values())

    async def correlation_for_server_call(self, server_call_id: str) -> str | None:
        # Through the recent events (events_updated), not an index of its own: an index on a
        # random 64-character key cost the group commit of every IncomingCall (relay_bench:
        # ~25 % more relay CPU per call), for a look-up only end events without a
        # correlationId need. An hour covers any call that could still be ringing.
        row = self.db.execute(
            "SELECT correlation_id FROM events WHERE updated_at > ? AND server_call_id = ? LIMIT 1",
            (time.time() - SERVER_CALL_LOOKBACK_SECONDS, server_call_id),
        ).fetchone()
        return None if row is None else str(row[0])

    async def events_for_call(self, correlation_id: str) -> list[EventRecord]:
        return self._with_deliveries(self._events("correlation_id = ?", correlation_id))

    # --- call routing -----------------------------------------------------------------------

    async def claim_call_action(
        self, action: CallAction, now: float, lease_until: float, max_redirects: int
    ) -> ActionClaim:
        # Written at once (not group-committed): another request must see the claim before the
        # redirect's follow-up IncomingCall arrives, and a redirect is one per call, not per push.
        with self._write() as db:
            row = db.execute(
                f"SELECT {_ACTION_COLUMNS}, lease_until FROM call_actions "
                "WHERE correlation_id = ? AND callee = ?",
                (action.correlation_id, action.callee),
            ).fetchone()
            if row is not None:
                existing = _call_action(row)
                settled = DeliveryStatus(existing.status).settled
                if settled or (row[11] is not None and float(row[11]) > now):
                    return ActionClaim(False, existing)
                action.attempts = existing.attempts
                action.request_id = existing.request_id
                action.first_sent = existing.first_sent
            if action.kind == "redirect":
                (others,) = db.execute(
                    "SELECT count(*) FROM call_actions WHERE correlation_id = ? AND callee != ? "
                    "AND kind = 'redirect' AND status NOT IN ('rejected', 'config_error')",
                    (action.correlation_id, action.callee),
                ).fetchone()
                if int(others) >= max_redirects:
                    return ActionClaim(False, None, limit_reached=True)
            action.status = DeliveryStatus.IN_FLIGHT.value
            action.updated_at = now
            db.execute(
                f"INSERT OR REPLACE INTO call_actions ({_ACTION_COLUMNS}, lease_until) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
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
                ),
            )
        return ActionClaim(True, action)

    async def settle_call_action(self, action: CallAction, now: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE call_actions SET status = ?, reason = ?, attempts = ?, lease_until = NULL, "
                "updated_at = ? WHERE correlation_id = ? AND callee = ?",
                (
                    action.status,
                    action.reason,
                    action.attempts,
                    now,
                    action.correlation_id,
                    action.callee,
                ),
            )

    async def call_actions(self, correlation_id: str) -> list[CallAction]:
        rows = self.db.execute(
            f"SELECT {_ACTION_COLUMNS} FROM call_actions WHERE correlation_id = ? "
            "ORDER BY first_sent",
            (correlation_id,),
        ).fetchall()
        return [_call_action(r) for r in rows]

    # --- number assignment ------------------------------------------------------------------

    async def put_number(self, assignment: NumberAssignment) -> bool:
        with self._write() as db:
            existed = db.execute(
                "SELECT 1 FROM numbers WHERE e164 = ?", (assignment.e164,)
            ).fetchone()
            db.execute(
                "INSERT INTO numbers (e164, target, label, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (e164) DO UPDATE SET "
                "target = excluded.target, label = excluded.label, "
                "updated_at = excluded.updated_at",
                (
                    assignment.e164,
                    assignment.target,
                    assignment.label,
                    assignment.created_at,
                    assignment.updated_at,
                ),
            )
        return existed is None

    async def get_number(self, e164: str) -> NumberAssignment | None:
        row = self.db.execute(
            "SELECT e164, target, label, created_at, updated_at FROM numbers WHERE e164 = ?",
            (e164,),
        ).fetchone()
        return None if row is None else _number(row)

    async def list_numbers(self) -> list[NumberAssignment]:
        rows = self.db.execute(
            "SELECT e164, target, label, created_at, updated_at FROM numbers ORDER BY e164"
        ).fetchall()
        return [_number(r) for r in rows]

    async def delete_number(self, e164: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM numbers WHERE e164 = ?", (e164,)).rowcount > 0

    async def registration_counts(self, now: float) -> dict[tuple[str, str], int]:
        rows = self.db.execute(
            "SELECT platform, push_kind, COUNT(*) FROM registrations WHERE expires_at > ? "
            "GROUP BY platform, push_kind",
            (now,),
        ).fetchall()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    async def recent_events(self, limit: int, recipient: str | None = None) -> list[EventRecord]:
        where, args = ("recipient = ?", (recipient, limit)) if recipient else ("1", (limit,))
        return self._with_deliveries(self._events(where, *args, order="updated_at DESC LIMIT ?"))

    async def purge(self, now: float, ledger_retention_seconds: float) -> PurgeCounts:
        cutoff = now - ledger_retention_seconds
        with self._write() as db:
            # The memory of push targets stays: this deletes only registrations that have
            # expired, which push_targets filters out of it anyway (emptying it every minute
            # made each callee's next call read its rows again).
            regs = db.execute("DELETE FROM registrations WHERE expires_at <= ?", (now,)).rowcount
            deliveries = db.execute(
                "DELETE FROM deliveries WHERE updated_at < ?", (cutoff,)
            ).rowcount
            events = db.execute("DELETE FROM events WHERE updated_at < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM removed_registrations WHERE removed_at < ?", (cutoff,))
            db.execute("DELETE FROM call_actions WHERE updated_at < ?", (cutoff,))
            db.execute("DELETE FROM muted_threads WHERE until IS NOT NULL AND until <= ?", (now,))
        return PurgeCounts(registrations=regs, events=events, deliveries=deliveries)
