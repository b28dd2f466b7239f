"""`ringrelay serve --workers N` as a user runs it: N worker processes on one port sharing
PostgreSQL, refused with SQLite, and each worker's graceful shutdown (an in-flight delivery
finishes and is recorded)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import uuid
from pathlib import Path

import aiohttp

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id, apns_token
from tests.test_cli import RINGRELAY, clean_env, free_port, serve, wait_healthy
from tests.test_store_contract import PG_URL, _drop_schema, _postgres_store

CALLEE = acs_id("workers-callee")


def test_workers_are_refused_with_sqlite(tmp_path) -> None:
    out = subprocess.run(
        [*RINGRELAY, "serve", "--workers", "2", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "SQLite" in out.stderr and "PostgreSQL" in out.stderr
    assert "RINGRELAY_DATABASE_URL" in out.stderr
    assert not (tmp_path / "ringrelay.db").exists()  # refused before anything was opened


async def test_two_workers_share_the_port_and_each_shuts_down_gracefully(
    tmp_path, fake_nh, nh_settings
) -> None:
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "workers.log"
    env = clean_env() | {
        "RINGRELAY_DATABASE_URL": f"{PG_URL}?search_path={schema}",
        "RINGRELAY_NH_CONNECTION_STRING": nh_settings["nh_connection_string"],
        "RINGRELAY_NH_HUB_NAME": nh_settings["nh_hub_name"],
        "RINGRELAY_NH_CA_FILE": str(nh_settings["nh_ca_file"]),
    }
    proc = serve(port, tmp_path, env, "--workers", "2", log=log)
    try:
        wait_healthy(url, proc, seconds=30)
        for _ in range(100):  # both workers log their start (with their pid) once ready
            pattern = r"\[(\d+)\]: ringrelay \S+: store PostgreSQL"
            started = set(re.findall(pattern, log.read_text()))
            if len(started) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(started) == 2, log.read_text()
        assert str(proc.pid) not in started  # the supervisor serves nothing itself
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert started <= set(children)

        token = apns_token(601)
        async with aiohttp.ClientSession() as http:
            async with http.put(
                f"{url}/v1/identities/{CALLEE}/devices/phone",
                json={"platform": "apns", "token": token},
            ) as resp:
                assert resp.status == 201
            fake_nh.respond(201, times=1, delay=2.0)  # the push is in flight at SIGTERM
            event = incoming_call_event(CALLEE)
            posted = asyncio.ensure_future(http.post(f"{url}/api/events", json=[event]))
            for _ in range(200):  # the fake takes its script entry when the push arrives
                if not fake_nh.script:
                    break
                await asyncio.sleep(0.05)
            assert not fake_nh.script and not fake_nh.pushes  # arrived, not answered yet
            proc.send_signal(signal.SIGTERM)
            resp = await posted
            body = await resp.json()
            assert resp.status == 200, body
            assert body["events"][0]["status"] == "delivered"
        assert await asyncio.to_thread(proc.wait, 30) == 0
        text = log.read_text()
        assert text.count("Application shutdown complete") == 2, text

        # The delivery was recorded before the worker exited.
        store = await _postgres_store(schema)
        await store.open()
        try:
            (record,) = await store.events_for_call(event["data"]["correlationId"])
            assert record.status.value == "delivered"
        finally:
            await store.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await _drop_schema(schema)
