"""A full disk under the SQLite store, for real: a small tmpfs mounted for the test and filled up.
Registrations then answer 503 with the cause (never a 500 behind "cannot rollback"), /readyz
says the store is not writable, and both recover by themselves once there is room again."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import acs_id, apns_token

CALLEE = acs_id("disk-full")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs the right to mount: root, or CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (run as root to test a full disk): {done.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; returns it (delete it to make room)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:  # the last, partial block
                out.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def device_body(n: int) -> dict:
    return {
        "acsMri": CALLEE,
        "deviceInfos": [
            {"deviceUUID": str(uuid.uuid4()), "deviceToken": apns_token(n) * 5, "platform": "apple"}
        ],
    }


async def test_disk_full_answers_503_with_the_cause_and_readyz_says_not_writable(
    http, make_server, small_disk
) -> None:
    server = make_server(database_url=f"sqlite:///{small_disk / 'ringrelay.db'}")
    async with http.post(f"{server.url}/api/add_device_token", json=device_body(0)) as resp:
        assert resp.status == 201
    filler = fill(small_disk)

    # Small writes may still fit in space SQLite holds already (the WAL's); keep registering
    # until the storage refuses one. Every answer is 201 or 503, never a 500.
    answers: dict[int, int] = {}
    refusal = None
    for n in range(1, 2000):
        async with http.post(f"{server.url}/api/add_device_token", json=device_body(n)) as resp:
            answers[resp.status] = answers.get(resp.status, 0) + 1
            if resp.status != 201:
                refusal = (resp.status, await resp.json(), resp.headers.get("Retry-After"))
                break
    print(f"\nanswers until the disk refused a write: {answers}")
    assert refusal is not None, answers
    status, body, retry_after = refusal
    assert status == 503, body
    assert "store not writable" in body["error"] and "full" in body["error"], body
    assert "cannot rollback" not in body["error"]
    assert retry_after is not None

    async with http.get(f"{server.url}/readyz") as resp:
        ready = await resp.json()
        assert resp.status == 503, ready
        assert ready["checks"]["store"].startswith("not writable"), ready
        assert "full" in ready["checks"]["store"]

    filler.unlink()  # room again: ready again without a restart, and writes work
    async with http.get(f"{server.url}/readyz") as resp:
        assert resp.status == 200, await resp.json()
    async with http.post(f"{server.url}/api/add_device_token", json=device_body(9999)) as resp:
        assert resp.status == 201
