"""One behaviour, two stores: every Store method against SQLite and PostgreSQL over a real
connection. PostgreSQL tests skip (saying how to run them) when no server answers, except on
CI (CI=true), where they must run."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from ringrelay.models import (
    DeliveryOutcome,
    DeliveryStatus,
    EventRecord,
    EventStatus,
    Platform,
    PushKind,
    Registration,
)
from ringrelay.store import ApiKey, Store
from ringrelay.store.sqlite import SQLiteStore

PG_URL = os.environ.get("RINGRELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NOW = 1_800_000_000.0


async def _postgres_store(schema: str) -> Any:
    import asyncpg

    from ringrelay.store.postgres import PostgresStore

    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        message = (
            f"PostgreSQL not reachable at {PG_URL} ({type(exc).__name__}); start one (trust "
            "auth, database 'test') or point RINGRELAY_TEST_POSTGRES_URL at one to run these"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await conn.close()
    store = PostgresStore(PG_URL)
    store.server_settings = {"search_path": schema}
    return store


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        # Bounded: a lock held by a stuck process must fail the test, not hang the suite.
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', timeout=30)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(str(tmp_path / "contract.db"))
        await s.open()
        yield s
        await s.close()
        return
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    s = await _postgres_store(schema)
    await s.open()
    yield s
    await s.close()
    await _drop_schema(schema)


def reg(identity: str = "8:acs:r_a", device: str = "d1", token: str = "ab" * 32, **kw: Any):
    base = {
        "platform": Platform.APNS,
        "push_kind": PushKind.VOIP,
        "app_id": None,
        "created_at": NOW,
        "updated_at": NOW,
        "expires_at": NOW + 3600,
    }
    base.update(kw)
    return Registration(identity=identity, device_id=device, token=token, **base)


def event(event_id: str = "ev-1", status: EventStatus = EventStatus.PENDING) -> EventRecord:
    return EventRecord(
        event_id, "Microsoft.Communication.IncomingCall", status, "", "call-1", "8:acs:r_a", NOW
    )


def outcome(r: Registration, status: DeliveryStatus, attempts: int = 1) -> DeliveryOutcome:
    return DeliveryOutcome(
        r.identity, r.device_id, r.platform, status, "why", attempts, "p", "ref-1", "fp"
    )


async def test_registry_round_trip(store: Store) -> None:
    created, displaced = await store.upsert_registration(reg())
    assert (created, displaced) == (True, 0)
    created, _ = await store.upsert_registration(
        reg(updated_at=NOW + 10, expires_at=NOW + 7200, created_at=NOW + 10)
    )
    assert created is False
    (row,) = await store.list_registrations("8:acs:r_a", NOW)
    assert row.created_at == NOW and row.expires_at == NOW + 7200  # created_at kept
    await store.upsert_registration(reg(device="d2", token="cd" * 32, push_kind=PushKind.ALERT))
    await store.upsert_registration(reg(device="old", token="ef" * 32, expires_at=NOW - 1))
    assert [r.device_id for r in await store.list_registrations("8:acs:r_a", NOW)] == ["d1", "d2"]
    targets = await store.push_targets("8:acs:r_a", PushKind.VOIP, NOW)
    assert [r.device_id for r in targets] == ["d1"]
    assert await store.delete_registration("8:acs:r_a", "d2") is True
    assert await store.delete_registration("8:acs:r_a", "d2") is False
    assert await store.delete_identity("8:acs:r_a") == 2  # d1 and the expired one


async def test_a_token_moves_to_its_newest_registration(store: Store) -> None:
    await store.upsert_registration(reg())
    created, displaced = await store.upsert_registration(reg(identity="8:acs:r_b"))
    assert created and displaced == 1
    assert await store.list_registrations("8:acs:r_a", NOW) == []


async def test_push_targets_follow_every_registry_change_after_a_read(store: Store) -> None:
    """Each change made after the identity was read for a push shows in its next push's
    targets (the SQLite store keeps the identities it pushed to in memory)."""

    async def targets(identity: str = "8:acs:r_a") -> list[str]:
        return [r.device_id for r in await store.push_targets(identity, PushKind.VOIP, NOW)]

    await store.upsert_registration(reg())
    assert await targets() == ["d1"]
    await store.upsert_registration(reg(device="d2", token="cd" * 32))  # a new device
    assert await targets() == ["d1", "d2"]
    await store.upsert_registration(reg(device="d2", token="cd" * 32, push_kind=PushKind.ALERT))
    assert await targets() == ["d1"]  # d2 changed kind
    assert await store.push_targets("8:acs:r_b", PushKind.VOIP, NOW) == []
    await store.upsert_registration(reg(identity="8:acs:r_b", token="ab" * 32))  # d1's token
    assert await targets() == []  # moved to r_b
    assert await targets("8:acs:r_b") == ["d1"]
    await store.upsert_registrations([reg(device="d3", token="ef" * 32)])
    assert await targets() == ["d3"]
    await store.bulk_insert_registrations([reg(device="d4", token="12" * 32)])
    assert await targets() == ["d3", "d4"]
    assert await store.prune_registration(reg(device="d4", token="12" * 32), "Unregistered", NOW)
    assert await targets() == ["d3"]
    assert await store.delete_registration("8:acs:r_a", "d3")
    assert await targets() == []
    await store.upsert_registration(reg(device="d5", token="34" * 32, expires_at=NOW + 10))
    assert await targets() == ["d5"]
    assert await store.push_targets("8:acs:r_a", PushKind.VOIP, NOW + 10) == []  # expired
    await store.delete_identity("8:acs:r_b")
    assert await targets("8:acs:r_b") == []


async def test_claims_settle_and_retries(store: Store) -> None:
    a, b, c = (
        reg(device="a", token="a1" * 32),
        reg(device="b", token="b1" * 32),
        reg(device="c", token="c1" * 32),
    )
    first = await store.claim_deliveries(event(), [a, b, c], NOW, lease_until=NOW + 30)
    assert {r.device_id for r in first.to_send} == {"a", "b", "c"}
    # A concurrent claim while the first is in flight gets nothing to send.
    second = await store.claim_deliveries(event(), [a, b, c], NOW + 1, lease_until=NOW + 31)
    assert second.to_send == [] and {o.device_id for o in second.busy} == {"a", "b", "c"}
    await store.settle_deliveries(
        event(status=EventStatus.PENDING),
        [
            outcome(a, DeliveryStatus.ACCEPTED),
            outcome(b, DeliveryStatus.TRANSIENT, attempts=3),
            outcome(c, DeliveryStatus.REJECTED),
        ],
        NOW + 2,
    )
    retry = await store.claim_deliveries(event(), [a, b, c], NOW + 20, lease_until=NOW + 50)
    assert [r.device_id for r in retry.to_send] == ["b"]  # only the transient one
    assert retry.attempts == {("8:acs:r_a", "b"): 3}
    assert {o.device_id: o.status for o in retry.settled} == {
        "a": DeliveryStatus.ACCEPTED,
        "c": DeliveryStatus.REJECTED,
    }
    # A claim orphaned by a crash is taken over once its lease has passed.
    later = await store.claim_deliveries(event(), [b], NOW + 51, lease_until=NOW + 80)
    assert [r.device_id for r in later.to_send] == ["b"]
    await store.settle_deliveries(
        event(status=EventStatus.DELIVERED), [outcome(b, DeliveryStatus.ACCEPTED, 4)], NOW + 60
    )
    (ev,) = await store.events_for_call("call-1")
    assert ev.status is EventStatus.DELIVERED
    assert {d.device_id: (d.status, d.attempts) for d in ev.deliveries} == {
        "a": (DeliveryStatus.ACCEPTED, 1),
        "b": (DeliveryStatus.ACCEPTED, 4),
        "c": (DeliveryStatus.REJECTED, 1),
    }
    assert ev.deliveries[0].provider_ref == "ref-1"


async def test_record_event_and_purge(store: Store) -> None:
    await store.record_event(event("ev-r", EventStatus.REJECTED), NOW)
    await store.upsert_registration(reg(expires_at=NOW - 5))
    await store.upsert_registration(reg(device="live", token="12" * 32))
    assert [e.status for e in await store.events_for_call("call-1")] == [EventStatus.REJECTED]
    counts = await store.purge(NOW + 100, ledger_retention_seconds=50)
    assert counts.registrations == 1 and counts.events == 1
    assert await store.events_for_call("call-1") == []
    assert [r.device_id for r in await store.list_registrations("8:acs:r_a", NOW)] == ["live"]


async def test_prune_with_audit_trail(store: Store) -> None:
    r = reg()
    await store.upsert_registration(r)
    # Re-registered after the provider's "dead since" time: kept.
    assert await store.prune_registration(r, "Unregistered", NOW + 5, NOW - 10) is False
    assert await store.prune_registration(replace(r, token="ff" * 32), "x", NOW + 5) is False
    assert await store.prune_registration(r, "BadDeviceToken", NOW + 5, NOW + 1) is True
    (audit,) = await store.removed_registrations("8:acs:r_a")
    assert audit.reason == "BadDeviceToken" and audit.token_fingerprint.startswith("sha256:")
    assert await store.list_registrations("8:acs:r_a", NOW) == []


async def test_api_keys(store: Store) -> None:
    key = ApiKey("k1", "backend", "00" * 32, ("read", "register"), NOW)
    await store.create_api_key(key)
    assert await store.get_api_key("k1") == key
    assert await store.get_api_key("nope") is None
    assert await store.active_api_keys() == 1
    assert await store.revoke_api_key("k1", NOW + 1) is True
    assert await store.revoke_api_key("k1", NOW + 2) is False
    assert await store.active_api_keys() == 0
    assert (await store.list_api_keys())[0].revoked_at == NOW + 1


async def test_bulk_insert(store: Store) -> None:
    await store.bulk_insert_registrations(
        [reg(identity=f"8:acs:r_{i}", device="d", token=f"{i:064x}") for i in range(300)]
    )
    assert len(await store.push_targets("8:acs:r_299", PushKind.VOIP, NOW)) == 1


async def test_claim_callee_looks_up_and_claims_in_one_step(store: Store) -> None:
    a, b = reg(device="a", token="0a" * 32), reg(device="b", token="0b" * 32)
    expired = reg(device="old", token="0c" * 32, expires_at=NOW - 1)
    alert = reg(device="chat", token="0d" * 32, push_kind=PushKind.ALERT)
    for r in (a, b, expired, alert):
        await store.upsert_registration(r)

    targets, claim = await store.claim_callee(
        event("cc-1"), a.identity, PushKind.VOIP, NOW, NOW + 30
    )
    assert sorted(t.device_id for t in targets) == ["a", "b"]  # live VoIP registrations only
    assert sorted(t.device_id for t in claim.to_send) == ["a", "b"]

    # A redelivery while the first is in flight: nothing to send, both busy.
    targets, again = await store.claim_callee(
        event("cc-1"), a.identity, PushKind.VOIP, NOW + 1, NOW + 31
    )
    assert len(targets) == 2 and again.to_send == [] and len(again.busy) == 2

    # Settled (with the token's fingerprint), then redelivered: settled, never re-sent.
    done = [outcome(a, DeliveryStatus.ACCEPTED), outcome(b, DeliveryStatus.TRANSIENT)]
    await store.settle_deliveries(event("cc-1", EventStatus.PENDING), done, NOW + 2)
    _, retry = await store.claim_callee(event("cc-1"), a.identity, PushKind.VOIP, NOW + 3, NOW + 33)
    assert [r.device_id for r in retry.to_send] == ["b"]  # only the transient one
    assert [o.device_id for o in retry.settled] == ["a"]
    assert retry.settled[0].token_fingerprint == "fp"
    assert retry.attempts == {(b.identity, "b"): 1}

    # Nobody registered: no targets, nothing recorded.
    targets, none = await store.claim_callee(
        event("cc-2"), "8:acs:r_nobody", PushKind.VOIP, NOW, NOW + 30
    )
    assert targets == [] and none.to_send == []
    recorded = [e.event_id for e in await store.events_for_call("call-1")]
    assert "cc-1" in recorded and "cc-2" not in recorded


async def test_postgres_claims_are_exclusive_across_instances() -> None:
    """Two stores (two pools, as two instances) race for the same devices 50 times: every
    device is claimed exactly once each time."""
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    first = await _postgres_store(schema)
    second = await _postgres_store(schema)
    await first.open()
    await second.open()
    try:
        devices = [reg(device=f"d{i}", token=f"{i:064x}") for i in range(5)]
        for n in range(50):
            ev = event(f"race-{n}")
            claims = await asyncio.gather(
                *(
                    s.claim_deliveries(ev, devices, NOW, lease_until=NOW + 30)
                    for s in (first, second, first, second)
                )
            )
            sent = [r.device_id for c in claims for r in c.to_send]
            assert sorted(sent) == sorted(d.device_id for d in devices), n
        # The same race through the one-statement lookup + claim.
        for d in devices:
            await first.upsert_registration(d)
        for n in range(50):
            ev = event(f"race-callee-{n}")
            both = await asyncio.gather(
                *(
                    s.claim_callee(ev, devices[0].identity, PushKind.VOIP, NOW, NOW + 30)
                    for s in (first, second, first, second)
                )
            )
            sent = [r.device_id for _, c in both for r in c.to_send]
            assert sorted(sent) == sorted(d.device_id for d in devices), n
    finally:
        await first.close()
        await second.close()
        await _drop_schema(schema)


async def test_postgres_claims_of_a_silent_instance_are_free_before_their_lease() -> None:
    """An instance stops renewing its heartbeat (it died; here its heartbeat task is stopped):
    its live-leased claims stay its own while the heartbeat is fresh, and are free to another
    instance once it is older than HEARTBEAT_STALE. A store without a heartbeat (an admin
    command) claims by lease only."""
    import time

    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    dead, alive = await _postgres_store(schema), await _postgres_store(schema)
    await dead.open()
    await alive.open()
    try:
        devices = [reg(device=f"d{i}", token=f"{i:064x}") for i in range(3)]
        now = time.time()
        lease = now + 3600  # far off: only the heartbeat can free these
        ev = event("silent-1")
        assert len((await dead.claim_deliveries(ev, devices, now, lease)).to_send) == 3
        # Fresh heartbeat: the claims are the first instance's.
        assert (await alive.claim_deliveries(ev, devices, now, lease)).to_send == []
        # Its heartbeat stops (as at a kill -9); with the staleness bound shortened for the
        # test, it is soon dead, and its claims are free through both claim statements.
        dead._beating.cancel()
        alive.heartbeat_stale = 0.5
        await asyncio.sleep(1.0)
        taken = await alive.claim_deliveries(ev, devices, time.time(), lease)
        assert sorted(r.device_id for r in taken.to_send) == ["d0", "d1", "d2"]
        for d in devices:
            await alive.upsert_registration(d)
        ev2 = event("silent-2")
        _, first = await dead.claim_callee(ev2, devices[0].identity, PushKind.VOIP, now, lease)
        assert len(first.to_send) == 3
        await asyncio.sleep(1.0)
        _, second = await alive.claim_callee(
            ev2, devices[0].identity, PushKind.VOIP, time.time(), lease
        )
        assert len(second.to_send) == 3
        # Without a heartbeat (admin commands): by lease only, never taken as dead.
        from ringrelay.store.postgres import PostgresStore

        admin = PostgresStore(PG_URL, heartbeat=False)
        admin.server_settings = {"search_path": schema}
        await admin.open()
        try:
            ev3 = event("silent-3")
            assert len((await admin.claim_deliveries(ev3, devices, now, lease)).to_send) == 3
            assert (await alive.claim_deliveries(ev3, devices, time.time(), lease)).to_send == []
        finally:
            await admin.close()
    finally:
        await dead.close()
        await alive.close()
        await _drop_schema(schema)


async def test_concurrent_events_claim_and_settle_independently(store: Store) -> None:
    """Forty calls at once, one callee each (PostgreSQL writes them in shared statements): each
    event claims its own callee's devices, a second delivery of one of them racing in the same
    moment gets nothing, and every outcome lands on its own event."""
    callees = [f"8:acs:r_many_{i}" for i in range(40)]
    for i, identity in enumerate(callees):
        await store.upsert_registration(reg(identity=identity, device="d", token=f"{i:064x}"))
        await store.upsert_registration(reg(identity=identity, device="e", token=f"{i + 99:064x}"))

    def ev(i: int) -> EventRecord:
        return EventRecord(
            f"many-{i}", "t", EventStatus.PENDING, "", f"call-many-{i}", callees[i], NOW
        )

    claims = await asyncio.gather(
        *(store.claim_callee(ev(i), callees[i], PushKind.VOIP, NOW, NOW + 30) for i in range(40)),
        store.claim_callee(ev(7), callees[7], PushKind.VOIP, NOW, NOW + 30),  # duplicate
    )
    for i, (targets, claim) in enumerate(claims[:40]):
        assert {t.identity for t in targets} == {callees[i]}
        if i != 7:
            assert sorted(r.device_id for r in claim.to_send) == ["d", "e"], i
    sent_7 = [r.device_id for _, c in (claims[7], claims[40]) for r in c.to_send]
    assert sorted(sent_7) == ["d", "e"]  # one of the two deliveries got them, never both

    statuses = [EventStatus.DELIVERED, EventStatus.FAILED]
    await asyncio.gather(
        *(
            store.settle_deliveries(
                replace(ev(i), status=statuses[i % 2]),
                [
                    outcome(t, DeliveryStatus.ACCEPTED, attempts=i + 1)
                    for t in claims[i][1].to_send or claims[40][1].to_send
                ],
                NOW + 1,
            )
            for i in range(40)
        )
    )
    for i in range(40):
        (recorded,) = await store.events_for_call(f"call-many-{i}")
        assert recorded.status is statuses[i % 2], i
        assert [(d.device_id, d.attempts) for d in recorded.deliveries] == [
            ("d", i + 1),
            ("e", i + 1),
        ], i


async def test_postgres_concurrent_writes_share_statements() -> None:
    """Group commit: 30 concurrent settles go out in a few statements, not 30."""
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    store = await _postgres_store(schema)
    await store.open()
    try:
        await asyncio.gather(
            *(store.record_event(event(f"gc-{i}", EventStatus.REJECTED), NOW) for i in range(30))
        )
        assert store.settles.requests == 30
        assert store.settles.batches <= 5, store.settles.batches
        assert len(await store.events_for_call("call-1")) == 30
    finally:
        await store.close()
        await _drop_schema(schema)


async def test_postgres_ledger_statements_stay_on_indexes_as_the_table_grows() -> None:
    """The ledger's statements run on the store's own connections many times while `deliveries`
    is small, then the table grows: the settle must still find its rows through the primary key.
    (A generic plan cached while the table was small hash-joined against a sequential scan of the
    whole ledger on every settle.)"""
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    store = await _postgres_store(schema)
    await store.open()
    try:
        # SQL-level EXECUTE takes no protocol parameters: array literals of a 10-event batch.
        events = [[f"x{i}" for i in range(10)], ["t"], ["pending"], ['""'], ["c"], ["r"]]
        events += [[NOW], [NOW]]
        outcomes = [[f"x{i}" for i in range(10)], ["r"], ["d"], ["accepted"], ['""'], [1]]
        outcomes += [["p"], ["NULL"], ["fp"], [NOW]]
        calls = [["NULL"], ["NULL"], ["NULL"]]  # caller, server_call_id, expires_at
        arrays = [
            ",".join(map(str, column * (10 // len(column)))) for column in events + outcomes + calls
        ]
        execute = "EXECUTE settle(" + ", ".join(f"'{{{a}}}'" for a in arrays) + ")"
        async with store.pool.acquire() as conn:
            await conn.execute(f"PREPARE settle AS {store._SETTLE_BATCH}")
            for _ in range(8):  # past the 5 custom plans after which PostgreSQL may go generic
                await conn.execute(execute)
            await conn.execute(
                "INSERT INTO deliveries (event_id, identity, device_id, platform, "
                "token_fingerprint, status, updated_at) SELECT 'e' || g, 'r', 'd', 'apns', '', "
                "'accepted', 0 FROM generate_series(1, 50000) g"
            )
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {execute}"))
            await conn.execute("DEALLOCATE settle")
        assert "deliveries_pkey" in plan and "Seq Scan on deliveries" not in plan, plan
    finally:
        await store.close()
        await _drop_schema(schema)


def _wal_restarts(path: str) -> int:
    """The WAL header's checkpoint sequence number (bytes 12-15, big-endian), which SQLite
    increments each time it rewinds the WAL to its start (sqlite.org/fileformat2.html#walformat)."""
    with open(path + "-wal", "rb") as wal:
        return int.from_bytes(wal.read(32)[12:16], "big")


async def test_sqlite_wal_is_rewound_under_steady_writes(tmp_path: Any) -> None:
    """Under writes that never pause, a passive checkpoint never finishes and SQLite never
    rewinds the WAL, which then grows with every commit. The checkpointer holds the group
    commits for a moment so that its pass finishes, and the WAL is rewound again and again."""
    path = str(tmp_path / "wal.db")
    store = SQLiteStore(path, checkpoint_interval=0.05)
    await store.open()
    try:
        r = reg()
        stop = asyncio.get_running_loop().time() + 2.0
        written = 0

        async def writer(n: int) -> None:
            nonlocal written
            while asyncio.get_running_loop().time() < stop:
                written += 1
                ev = EventRecord(
                    f"wal-{n}-{written}", "t", EventStatus.DELIVERED, "", f"c-{written}", "x", NOW
                )
                await store.settle_deliveries(ev, [outcome(r, DeliveryStatus.ACCEPTED)], NOW)

        first = _wal_restarts(path)
        await asyncio.gather(*(writer(n) for n in range(8)))
        restarts = _wal_restarts(path) - first
        wal_size = os.path.getsize(path + "-wal")
    finally:
        await store.close()
    assert written > 1000  # the writes did overlap the checkpoints
    # 40 passes in 2 s; allow for a loaded machine, but a starved WAL would show 0 or 1.
    assert restarts >= 5, (restarts, written, wal_size)


@pytest.mark.skipif(sys.platform != "linux", reason="the nice value is per thread on Linux only")
async def test_sqlite_checkpoint_copies_at_low_priority_and_finishes_at_the_loops(
    tmp_path: Any,
) -> None:
    """The long first pass runs at nice 19 (at nice 0, sharing a core with the event loop, it
    held back pushes for 10-25 ms); the short held pass at the loop's own priority (at nice 19 it
    was starved while commits waited). bench/README, "Session 6"."""
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    store = SQLiteStore(str(tmp_path / "nice.db"))
    await store.open()
    try:
        threads = {t.name: t.native_id for t in threading.enumerate()}
        copier = threads["ringrelay-sqlite-checkpoint"]
        finisher = threads["ringrelay-sqlite-checkpoint-finish"]
        assert copier is not None and finisher is not None
        assert os.getpriority(os.PRIO_PROCESS, copier) == 19
        assert os.getpriority(os.PRIO_PROCESS, finisher) == loop_nice
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice
    finally:
        await store.close()
    names = {t.name for t in threading.enumerate()}
    assert not names & {"ringrelay-sqlite-checkpoint", "ringrelay-sqlite-checkpoint-finish"}


async def test_sqlite_file_of_schema_1_is_upgraded_in_place(tmp_path) -> None:
    """A file written by a ringrelay of schema 1 (no store_probe) opens, keeps its rows, and is
    at the current version afterwards."""
    import sqlite3

    from ringrelay.store import sqlite as sqlite_store

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SQLITE_SCHEMA_1)
    db.execute(
        "INSERT INTO registrations (identity, device_id, platform, token, push_kind, app_id, "
        "created_at, updated_at, expires_at) "  # schema 1's columns
        "VALUES ('8:acs:r_a', 'd1', 'apns', ?, 'voip', NULL, ?, ?, ?)",
        ("ab" * 32, NOW, NOW, NOW + 3600),
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert [r.device_id for r in await store.list_registrations("8:acs:r_a", NOW)] == ["d1"]
        version = store.db.execute("PRAGMA user_version").fetchone()[0]
        assert version == sqlite_store.SCHEMA_VERSION
        columns = {row[1] for row in store.db.execute("PRAGMA table_info(events)")}
        assert {"caller", "server_call_id", "expires_at"} <= columns
        store.write_failure = "pretend"  # the probe table is there: the probe write works
        await store.ping()
        assert store.write_failure is None
    finally:
        await store.close()


# The SQLite schema as ringrelay 0.1.0 wrote it (version 1), for the upgrade tests.
SQLITE_SCHEMA_1 = """
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
    updated_at     REAL NOT NULL
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

CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
) WITHOUT ROWID;
"""


async def test_sqlite_push_targets_come_from_memory_until_another_process_writes(
    tmp_path: Any,
) -> None:
    """The serving store answers a known callee without a query, and an admin command's
    write (another connection, as `ringrelay import` beside a running server) empties its
    memory within EXTERNAL_WRITES_CHECKED_EVERY."""
    from ringrelay.store import sqlite as sqlite_store

    path = str(tmp_path / "cache.db")
    serving = SQLiteStore(path)
    await serving.open()
    admin = SQLiteStore(path, single_instance=False)
    await admin.open()
    try:
        await serving.upsert_registration(reg())
        statements: list[str] = []
        serving.db.set_trace_callback(statements.append)
        for _ in range(3):
            assert len(await serving.push_targets("8:acs:r_a", PushKind.VOIP, NOW)) == 1
        assert [s for s in statements if "registrations" in s] == [statements[1]]  # one read
        await admin.upsert_registration(reg(device="d2", token="cd" * 32))
        later = NOW + 2 * sqlite_store.EXTERNAL_WRITES_CHECKED_EVERY
        got = await serving.push_targets("8:acs:r_a", PushKind.VOIP, later)
        assert [r.device_id for r in got] == ["d1", "d2"]
        # The serving store's own ledger writes and checkpoints do not empty it.
        await serving.settle_deliveries(event(), [outcome(got[0], DeliveryStatus.ACCEPTED)], NOW)
        await asyncio.sleep(3 * serving.checkpoint_interval)  # the checkpointer passes
        statements.clear()
        await serving.push_targets("8:acs:r_a", PushKind.VOIP, later + 1)
        assert not [s for s in statements if "FROM registrations" in s]
    finally:
        await admin.close()
        await serving.close()


async def test_sqlite_purge_keeps_the_registrations_in_memory(tmp_path: Any) -> None:
    """The minutely purge drops no live registration, so it must not empty the memory of the
    callees' registrations (it did: under load every purge made the next call of each of 10,000
    callees read its rows again, 15 % of callgrind's last-level misses in one window). What it
    deletes has expired, and an expired registration is never pushed from memory either."""
    store = SQLiteStore(str(tmp_path / "purge.db"))
    await store.open()
    try:
        await store.upsert_registration(reg())
        await store.upsert_registration(reg(device="d2", token="cd" * 32, expires_at=NOW + 10))
        assert len(await store.push_targets("8:acs:r_a", PushKind.VOIP, NOW)) == 2
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        counts = await store.purge(NOW + 20, 3600.0)
        assert counts.registrations == 1
        statements.clear()
        got = await store.push_targets("8:acs:r_a", PushKind.VOIP, NOW + 20)
        assert [r.device_id for r in got] == ["d1"]
        assert not [s for s in statements if "FROM registrations" in s]
    finally:
        await store.close()
