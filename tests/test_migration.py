"""Moving in from Microsoft's sample (`ringrelay import sample-mongo`) and out (`ringrelay
export`), as a user runs them, against PostgreSQL and SQLite; and the two store methods they use,
on both stores."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from ringrelay.migration.jsonstream import JsonStreamError, iter_json_values
from ringrelay.models import Platform
from ringrelay.store import Store
from tests.conftest import acs_id, apns_token
from tests.test_cli import RINGRELAY, clean_env
from tests.test_store_contract import NOW, PG_URL, _drop_schema, _postgres_store, reg
from tests.test_store_contract import store as store  # the fixture: both backends

ALICE, BOB = acs_id("alice"), acs_id("bob")


# --- store methods --------------------------------------------------------------------------


async def test_upsert_registrations_says_which_are_new_and_moves_tokens(store: Store) -> None:
    await store.upsert_registration(reg(ALICE, "phone", token="aa" * 32))
    await store.upsert_registration(reg(BOB, "old-phone", token="cc" * 32))
    created = await store.upsert_registrations(
        [
            reg(ALICE, "phone", token="bb" * 32, updated_at=NOW + 5, expires_at=NOW + 9000),
            reg(ALICE, "tablet", token="cc" * 32),  # Bob's old token: the phone changed hands
        ]
    )
    assert created == [False, True]
    (phone, tablet) = await store.list_registrations(ALICE, NOW)
    assert (phone.token, phone.created_at, phone.expires_at) == ("bb" * 32, NOW, NOW + 9000)
    assert tablet.token == "cc" * 32
    assert await store.list_registrations(BOB, NOW) == []
    assert await store.upsert_registrations([]) == []


async def test_registrations_after_pages_in_key_order(store: Store) -> None:
    regs = [reg(acs_id(f"u{i % 7}"), f"d{i:03}", token=f"{i:04x}" * 16) for i in range(40)]
    regs.append(reg(acs_id("expired"), "d", token="ee" * 32, expires_at=NOW - 1))
    await store.upsert_registrations(regs)
    seen, after = [], None
    while True:
        page = await store.registrations_after(after, 6, NOW)
        seen += [(r.identity, r.device_id) for r in page]
        if len(page) < 6:
            break
        after = (page[-1].identity, page[-1].device_id)
    assert len(seen) == 40  # the expired one is not exported
    assert seen == sorted({(r.identity, r.device_id) for r in regs[:40]})


# --- the JSON stream ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_json_lines_and_arrays_stream_alike(chunk: int) -> None:
    docs = [{"_id": acs_id(f"u{i}"), "n": i * 1.5, "ok": i % 2 == 0, "x": None} for i in range(30)]
    lines = "\n".join(json.dumps(d) for d in docs) + "\n"
    array = json.dumps(docs, indent=2)
    assert list(iter_json_values(io.StringIO(lines), chunk=chunk)) == docs
    assert list(iter_json_values(io.StringIO(array), chunk=chunk)) == docs
    assert list(iter_json_values(io.StringIO("[]"), chunk=chunk)) == []


@pytest.mark.parametrize(
    ("text", "line"),
    [("[1, 2", 1), ("[1 2]", 1), ('{"a": 1}\n{"b": 2}\n{bad}\n', 3), ("[1]\nx", 1), ("[,1]", 1)],
)
def test_broken_json_names_the_line(text: str, line: int) -> None:
    with pytest.raises(JsonStreamError) as failed:
        list(iter_json_values(io.StringIO(text), chunk=2))
    assert failed.value.line == line


# --- the commands ---------------------------------------------------------------------------


def sample_doc(identity: str, *devices: tuple[str, str, str]) -> dict:
    """A document as the sample stores it (Models/ACSUserRegistrationInfo.cs) and mongoexport
    prints it: the identity as `_id`, no `acsMri`."""
    return {
        "_id": identity,
        "deviceInfos": [{"deviceUUID": d, "deviceToken": t, "platform": p} for d, t, p in devices],
    }


GOOD = [
    sample_doc(ALICE, ("iphone-1", apns_token(1), "apple"), ("pixel-1", "fcm-token_1", "android")),
    sample_doc(BOB, ("iphone-2", apns_token(2), "apple")),
    sample_doc(acs_id("carol"), ("surface", "https://wns.example/ch?x=1", "windows"))
    | {"acsMri": acs_id("carol")},
]
BAD = [
    sample_doc("not-an-acs-id", ("d", apns_token(3), "apple")),
    sample_doc(
        acs_id("dave"), ("d1", "zz-not-hex", "apple"), ("d2", apns_token(4), "windowsphone")
    ),
    sample_doc(acs_id("erin")) | {"deviceInfos": []},
    {"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "deviceInfos": []},
    "a string",
]


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RINGRELAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(params=["postgres", "sqlite"])
async def db_env(request, tmp_path):
    if request.param == "sqlite":
        yield clean_env() | {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}"}
        return
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)
    yield clean_env() | {"RINGRELAY_DATABASE_URL": f"{PG_URL}?search_path={schema}"}
    await _drop_schema(schema)


def report_counts(stdout: str) -> dict[str, int]:
    counts = {}
    assert "documents read" in stdout, stdout
    for key in ("documents read", "imported", "refreshed", "refused"):
        line = next(x for x in stdout.splitlines() if x.strip().startswith(key + ":"))
        counts[key] = int(line.split(":", 1)[1].split()[0])
    return counts


@pytest.mark.parametrize("shape", ["jsonl", "array"])
async def test_import_sample_mongo_validates_reports_and_is_idempotent(
    db_env, tmp_path, shape
) -> None:
    docs = GOOD + BAD
    file = tmp_path / f"registrar.{shape}"
    if shape == "jsonl":
        file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:
        file.write_text(json.dumps(docs, indent=1))
    out = run(["import", "sample-mongo", str(file)], db_env, tmp_path)
    assert out.returncode == 1 and out.stdout, out.stderr  # some were refused
    assert report_counts(out.stdout) == {
        "documents read": 8,
        "imported": 4,
        "refreshed": 0,
        "refused": 6,
    }
    text = out.stdout
    assert "document 4 (not-an-acs-id) deviceInfos[0]: _id: not an ACS raw identifier" in text
    assert "deviceInfos[0]: deviceToken: APNs tokens are an even-length hexadecimal" in text
    assert "deviceInfos[1]: platform: Microsoft Push Notification Service" in text
    assert "document 6 (" + acs_id("erin") + "): deviceInfos: missing or empty" in text
    assert "document 7: _id/acsMri: missing, not a string" in text
    assert "document 8: not a JSON object" in text
    for token in (apns_token(1), apns_token(2), "fcm-token_1"):
        assert token not in text + out.stderr  # the report never shows a token

    again = run(["import", "sample-mongo", str(file)], db_env, tmp_path)
    assert again.returncode == 1, again.stderr
    assert report_counts(again.stdout)["imported"] == 0
    assert report_counts(again.stdout)["refreshed"] == 4

    exported = run(["export"], db_env, tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    # Only the valid devices were stored (nothing of Dave's, though one of his was valid JSON).
    assert [(r["identity"], r["device_id"], r["platform"]) for r in rows] == sorted(
        [
            (ALICE, "iphone-1", "apns"),
            (ALICE, "pixel-1", "fcm"),
            (BOB, "iphone-2", "apns"),
            (acs_id("carol"), "surface", "wns"),
        ]
    )
    by_device = {r["device_id"]: r for r in rows}
    assert by_device["iphone-1"]["token"] == apns_token(1)  # the export carries the token
    assert by_device["iphone-1"]["push_kind"] == "voip"
    assert "device tokens in full" in exported.stderr


async def test_export_round_trips_through_the_sample_shape(db_env, tmp_path) -> None:
    file = tmp_path / "in.jsonl"
    file.write_text("".join(json.dumps(d) + "\n" for d in GOOD))
    assert run(["import", "sample-mongo", str(file)], db_env, tmp_path).returncode == 0
    out = tmp_path / "out.jsonl"
    done = run(["export", "--format", "sample-mongo", "-o", str(out)], db_env, tmp_path)
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {d["_id"] for d in docs} == {ALICE, BOB, acs_id("carol")}
    alice = next(d for d in docs if d["_id"] == ALICE)
    assert {(i["deviceUUID"], i["platform"]) for i in alice["deviceInfos"]} == {
        ("iphone-1", "apple"),
        ("pixel-1", "fcmv1"),
    }
    back = run(["import", "sample-mongo", str(out)], db_env, tmp_path)
    assert report_counts(back.stdout) == {
        "documents read": 3,
        "imported": 0,
        "refreshed": 4,
        "refused": 0,
    }


async def test_a_token_in_the_file_moves_from_its_old_owner(db_env, tmp_path) -> None:
    file = tmp_path / "in.jsonl"
    token = apns_token(77)
    file.write_text(
        json.dumps(sample_doc(ALICE, ("phone", token, "apple")))
        + "\n"
        + json.dumps(sample_doc(BOB, ("phone", token, "apple")))  # the phone changed hands
        + "\n"
    )
    out = run(["import", "sample-mongo", str(file)], db_env, tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in run(["export"], db_env, tmp_path).stdout.splitlines()]
    assert [(r["identity"], r["token"]) for r in rows] == [(BOB, token)]


async def test_broken_json_stops_with_the_line_and_keeps_what_came_before(db_env, tmp_path) -> None:
    file = tmp_path / "in.jsonl"
    file.write_text(json.dumps(GOOD[1]) + "\n" + '{"_id": "8:acs:x", "deviceInfos": [\n')
    out = run(["import", "sample-mongo", str(file), "--batch-size", "1"], db_env, tmp_path)
    assert out.returncode == 2
    assert "line 2" in out.stderr and "safe" in out.stderr
    rows = run(["export"], db_env, tmp_path).stdout.splitlines()
    assert [json.loads(x)["identity"] for x in rows] == [BOB]


def test_import_of_a_missing_file_is_refused(tmp_path) -> None:
    env = clean_env() | {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}"}
    out = run(["import", "sample-mongo", str(tmp_path / "nope.json")], env, tmp_path)
    assert out.returncode == 2
    assert "nope.json" in out.stderr


def test_platform_names_follow_the_sample() -> None:
    from ringrelay.migration.sample_mongo import _platform

    assert _platform("apple") is Platform.APNS
    assert _platform("Android") is Platform.FCM
    assert _platform("gcm") is Platform.GCM
    assert "retired" in str(_platform("windowsphone"))
    assert "none" in str(_platform("none"))


async def test_a_batch_that_fails_once_is_retried(tmp_path) -> None:
    """A dropped database connection in the middle of a long import costs a retry, not the run
    (the suite's own fault tests kill every unnamed connection to the shared server)."""
    from ringrelay.config import load_settings
    from ringrelay.migration.sample_mongo import import_documents
    from ringrelay.relay import build_router
    from ringrelay.store.sqlite import SQLiteStore

    class FlakyStore(SQLiteStore):
        failures = 1

        async def upsert_registrations(self, regs):
            if self.failures:
                self.failures -= 1
                raise ConnectionResetError("connection was closed in the middle of operation")
            return await super().upsert_registrations(regs)

    store = FlakyStore(str(tmp_path / "rr.db"))
    await store.open()
    try:
        router, _, _ = build_router(load_settings(database_url="sqlite:///unused.db"))
        report = await import_documents(GOOD, store, router, 3600, batch_size=2)
        assert (report.imported, report.refused, store.failures) == (4, 0, 0)
    finally:
        await store.close()


def test_the_progress_line_shows_when_asked(tmp_path) -> None:
    env = clean_env() | {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'rr.db'}"}
    file = tmp_path / "in.jsonl"
    file.write_text("".join(json.dumps(d) + "\n" for d in GOOD))
    out = run(["import", "sample-mongo", str(file), "--progress"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "100%" in out.stderr and "3 documents, 4 stored, 0 refused" in out.stderr
    quiet = run(["import", "sample-mongo", str(file)], env, tmp_path)  # stderr is not a terminal
    assert quiet.stderr == ""
