"""The store's operator queries (doctor --identity, /metrics, the dashboard) on both backends."""

from __future__ import annotations

from ringrelay.models import DeliveryStatus, EventRecord, EventStatus, PushKind
from ringrelay.store import Store
from tests.test_store_contract import NOW, outcome, reg, store  # noqa: F401 - the fixture


def _event(event_id: str, recipient: str, call: str | None) -> EventRecord:
    return EventRecord(
        event_id, "Microsoft.Communication.IncomingCall", EventStatus.PENDING, "", call,
        recipient, NOW,
    )  # fmt: skip


async def test_recent_events_newest_first_with_deliveries(store: Store) -> None:  # noqa: F811
    a, b = reg("8:acs:r_a"), reg("8:acs:r_b", token="cd" * 32)
    for n, (r, status) in enumerate(((a, DeliveryStatus.ACCEPTED), (b, DeliveryStatus.REJECTED))):
        ev = _event(f"ev-{'ab'[n]}", r.identity, f"call-{'ab'[n]}")
        await store.claim_deliveries(ev, [r], NOW + n, lease_until=NOW + 30)
        await store.settle_deliveries(ev, [outcome(r, status)], NOW + 1 + n)
    no_devices = _event("ev-c", a.identity, "call-c")
    no_devices.status = EventStatus.NO_DEVICES
    await store.record_event(no_devices, NOW + 3)

    newest = await store.recent_events(10)
    assert [e.event_id for e in newest] == ["ev-c", "ev-b", "ev-a"]
    assert [d.status for d in newest[1].deliveries] == [DeliveryStatus.REJECTED]
    assert [e.event_id for e in await store.recent_events(1)] == ["ev-c"]
    mine = await store.recent_events(10, recipient=a.identity)
    assert [e.event_id for e in mine] == ["ev-c", "ev-a"]
    assert mine[1].deliveries[0].device_id == "d1" and mine[1].correlation_id == "call-a"


async def test_registration_counts_by_platform_and_kind(store: Store) -> None:  # noqa: F811
    await store.upsert_registration(reg(device="d1"))
    await store.upsert_registration(reg(device="d2", token="cd" * 32))
    await store.upsert_registration(reg(device="d3", token="ef" * 32, push_kind=PushKind.ALERT))
    await store.upsert_registration(reg(device="old", token="0a" * 32, expires_at=NOW - 1))
    assert await store.registration_counts(NOW) == {("apns", "voip"): 2, ("apns", "alert"): 1}


async def test_recent_removals_across_identities(store: Store) -> None:  # noqa: F811
    a, b = reg("8:acs:r_a"), reg("8:acs:r_b", token="cd" * 32)
    for r in (a, b):
        await store.upsert_registration(r)
    assert await store.prune_registration(a, "apns: APNs 400 BadDeviceToken", NOW + 1)
    assert await store.prune_registration(b, "fcm: FCM 404 UNREGISTERED", NOW + 2)
    removed = await store.recent_removals(10)
    assert [(r.identity, r.reason) for r in removed] == [
        ("8:acs:r_b", "fcm: FCM 404 UNREGISTERED"),
        ("8:acs:r_a", "apns: APNs 400 BadDeviceToken"),
    ]
    assert len(await store.recent_removals(1)) == 1
