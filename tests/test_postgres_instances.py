"""Several ringrelay processes sharing one PostgreSQL: the same delivery posted to two of them at
once rings each device exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id
from tests.test_cli import RINGRELAY, clean_env, free_port, serve, wait_healthy
from tests.test_store_contract import PG_URL, _drop_schema, _postgres_store

ROUNDS = 100


@contextlib.asynccontextmanager
async def pg_instances(
    tmp_path, count: int = 2, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[list[str], list[subprocess.Popen[str]], str]]:
    """`count` `ringrelay serve` processes sharing a fresh PostgreSQL schema."""
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)  # creates the schema, or skips/fails as the suite says
    url = f"{PG_URL}?search_path={schema}"
    procs, urls = [], []
    for _ in range(count):
        port = free_port()
        proc = serve(
            port,
            tmp_path,
            clean_env()
            | {"RINGRELAY_DATABASE_URL": url, "RINGRELAY_LOG_LEVEL": "WARNING"}
            | (env or {}),
            log=tmp_path / f"ringrelay-{port}.log",
        )
        procs.append(proc)
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for u, p in zip(urls, procs, strict=True):
            wait_healthy(u, p)
        yield urls, procs, url
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()  # its open connections must not hold the schema's locks
                p.wait(timeout=5)
        await _drop_schema(schema)


@pytest.fixture
async def two_instances(tmp_path):
    async with pg_instances(tmp_path) as (urls, procs, _):
        yield urls, procs


async def test_db_upgrade_command(tmp_path) -> None:
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)
    try:
        out = subprocess.run(
            [*RINGRELAY, "db", "upgrade"],
            env=clean_env() | {"RINGRELAY_DATABASE_URL": f"{PG_URL}?search_path={schema}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "schema up to date: PostgreSQL" in out.stdout
        assert "postgres@" not in out.stdout  # no credentials printed
    finally:
        await _drop_schema(schema)


async def test_same_delivery_to_two_instances_rings_once(two_instances) -> None:
    urls, _ = two_instances
    callee = acs_id("shared")
    devices = ["phone", "tablet", "watchless-ipad"]
    async with aiohttp.ClientSession() as http:
        for i, device in enumerate(devices):
            async with http.put(
                f"{urls[i % 2]}/v1/identities/{callee}/devices/{device}",
                json={"platform": "apns", "token": f"{i + 1:02x}" * 32},
            ) as resp:
                assert resp.status == 201

        async def post(url: str, body: bytes) -> tuple[int, dict]:
            async with http.post(
                f"{url}/api/events", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                return resp.status, await resp.json()

        statuses: dict[int, int] = {}
        for _ in range(ROUNDS):
            event = incoming_call_event(callee)
            body = json.dumps([event]).encode()
            answers = await asyncio.gather(post(urls[0], body), post(urls[1], body))
            for status, _ in answers:
                statuses[status] = statuses.get(status, 0) + 1
            # An instance that saw the other's claim in flight answers 503: Event Grid retries,
            # and the retry finds every device settled.
            if any(status == 503 for status, _ in answers):
                retry_status, retry = await post(urls[0], body)
                assert retry_status == 200, retry
            pushed = 0
            for url in urls:
                async with http.get(
                    f"{url}/v1/sandbox/pushes",
                    params={"call_id": event["data"]["correlationId"], "limit": "1000"},
                ) as resp:
                    pushed += len((await resp.json())["pushes"])
            assert pushed == len(devices)
        assert sum(statuses.values()) == 2 * ROUNDS
    print(f"\n{ROUNDS} rounds, answers: {statuses}")


async def test_killed_database_connections_are_replaced(two_instances) -> None:
    """pg_terminate_backend on every pooled connection: the pool notices the closed sockets and
    reconnects; a request that meets a broken connection would get 503, never a 4xx."""
    import asyncpg

    urls, _ = two_instances
    callee = acs_id("outage")
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{urls[0]}/v1/identities/{callee}/devices/phone",
            json={"platform": "fcm", "token": "fcm:outage"},
        ) as resp:
            assert resp.status == 201
        admin = await asyncpg.connect(PG_URL)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = ''"
        )
        await admin.close()
        assert killed >= 1
        answers = []
        for _ in range(6):
            event = incoming_call_event(callee)
            async with http.post(f"{urls[0]}/api/events", json=[event]) as resp:
                answers.append(resp.status)
        print(f"\nanswers after the connections were killed: {answers}")
        assert set(answers) <= {200, 503}  # never a 4xx: Event Grid must retry
        assert answers[-1] == 200  # recovered by itself
        async with http.get(f"{urls[0]}/readyz") as resp:
            assert resp.status == 200


async def test_instance_killed_mid_batch_then_retried_elsewhere(
    tmp_path, fake_nh, nh_settings
) -> None:
    """SIGKILL an instance while a batch is being pushed (the hub is slow), then redeliver to the
    other instance: every device is pushed; a device is pushed twice only if its push was in
    flight at the kill (counted)."""
    import os
    import signal
    import time

    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)
    env = clean_env() | {
        "RINGRELAY_DATABASE_URL": f"{PG_URL}?search_path={schema}",
        "RINGRELAY_NH_CONNECTION_STRING": nh_settings["nh_connection_string"],
        "RINGRELAY_NH_HUB_NAME": nh_settings["nh_hub_name"],
        "RINGRELAY_NH_CA_FILE": str(nh_settings["nh_ca_file"]),
        "RINGRELAY_WEBHOOK_DEADLINE_SECONDS": "2",  # claims lease for 2 + 5 s
        "RINGRELAY_LOG_LEVEL": "WARNING",
    }
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(serve(port, tmp_path, env))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for u, p in zip(urls, procs, strict=True):
            wait_healthy(u, p)
        async with aiohttp.ClientSession() as http:
            callees = [acs_id(f"kill{i}") for i in range(10)]
            for i, callee in enumerate(callees):
                async with http.put(
                    f"{urls[0]}/v1/identities/{callee}/devices/phone",
                    json={"platform": "fcm", "token": f"fcm:kill-{i}"},
                ) as resp:
                    assert resp.status == 201
            batch = [incoming_call_event(c) for c in callees]
            fake_nh.respond(201, times=5, delay=1.5)  # half the pushes hang at the hub
            post = asyncio.ensure_future(http.post(f"{urls[0]}/api/events", json=batch))
            await asyncio.sleep(0.7)  # the fast half is accepted, the slow half in flight
            answered = {p["handle"] for p in fake_nh.pushes if p["status"] == 201}
            os.kill(procs[0].pid, signal.SIGKILL)
            with pytest.raises(aiohttp.ClientError):
                await post
            await asyncio.sleep(1.0)  # let the hub finish the pushes already sent
            delivered_before = {p["handle"] for p in fake_nh.pushes if p["status"] == 201}

            deadline = time.monotonic() + 20
            while True:  # Event Grid retries; until the dead claims' lease ends: 503
                async with http.post(f"{urls[1]}/api/events", json=batch) as resp:
                    if resp.status == 200:
                        break
                    assert resp.status == 503
                assert time.monotonic() < deadline
                await asyncio.sleep(1.0)

        handles = [p["handle"] for p in fake_nh.pushes if p["status"] == 201]
        assert set(handles) == {f"fcm:kill-{i}" for i in range(10)}  # nobody missed
        twice = [h for h in set(handles) if handles.count(h) > 1]
        # Only a push that was in flight at the kill (already at the hub, never recorded) may
        # repeat; the ones recorded as accepted before the kill never do.
        assert answered and not set(twice) & answered  # recorded before the kill: never again
        assert len(twice) <= len(callees) - len(answered)
        print(
            f"\nkilled mid-batch: {len(answered)} answered by the hub before the kill, "
            f"{len(delivered_before)} at the hub after it, {len(twice)} pushed twice "
            f"(all of them in flight at the kill)"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        await _drop_schema(schema)


async def test_dead_instance_claims_free_for_event_grid_first_retry(
    tmp_path, fake_nh, nh_settings
) -> None:
    """SIGKILL an instance while its pushes hang at the hub, then redeliver to the other about
    10 s later, as Event Grid's first retry comes: the dead instance's claims are free (its
    heartbeat stopped), so the retry pushes every device and answers 200, well before the
    claims' lease (webhook deadline 20 s + 5 s) would end."""
    import os
    import signal
    import time

    env = {
        "RINGRELAY_NH_CONNECTION_STRING": nh_settings["nh_connection_string"],
        "RINGRELAY_NH_HUB_NAME": nh_settings["nh_hub_name"],
        "RINGRELAY_NH_CA_FILE": str(nh_settings["nh_ca_file"]),
    }
    async with pg_instances(tmp_path, env=env) as (urls, procs, _):
        callees = [acs_id(f"dead{i}") for i in range(2)]
        handles = [f"fcm:dead-{c}-{d}" for c in range(2) for d in range(2)]
        async with aiohttp.ClientSession() as http:
            for handle in handles:
                _, c, d = handle.rsplit("-", 2)
                async with http.put(
                    f"{urls[0]}/v1/identities/{callees[int(c)]}/devices/d{d}",
                    json={"platform": "fcm", "token": handle},
                ) as resp:
                    assert resp.status == 201
            # The hub hangs on the first instance's pushes and finally fails them (no phone
            # rings); the retry's pushes are accepted at once.
            fake_nh.respond(500, times=len(handles), delay=14)
            batch = [incoming_call_event(c) for c in callees]
            post = asyncio.ensure_future(http.post(f"{urls[0]}/api/events", json=batch))
            deadline = time.monotonic() + 10
            while fake_nh.script:  # every push is at the hub, claimed, unanswered
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            os.kill(procs[0].pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(aiohttp.ClientError):
                await post
            await asyncio.sleep(10 - (time.monotonic() - killed_at))  # Event Grid's first retry
            async with http.post(f"{urls[1]}/api/events", json=batch) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
            for report in answer["events"]:
                assert {d["status"] for d in report["deliveries"]} == {"accepted"}
            await asyncio.sleep(max(0.0, 14.5 - (time.monotonic() - killed_at)))
        accepted = [p["handle"] for p in fake_nh.pushes if p["status"] == 201]
        assert sorted(accepted) == sorted(handles)  # every device rang, once
