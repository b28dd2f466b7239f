"""One SQLite file, one serving process: a second `ringrelay serve` on the same file refuses to
start (it would push every call a second time); a restart after the first exits, however it
exits, starts and takes over the dead process's deliveries at once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess

import aiohttp

from ringrelay.simulate import incoming_call_event
from tests.conftest import acs_id
from tests.test_cli import RINGRELAY, clean_env, free_port, serve, wait_healthy


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_second_server_on_one_sqlite_file_refuses_to_start(tmp_path) -> None:
    env = clean_env() | {"RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}"}
    first_port, second_port = free_port(), free_port()
    first = serve(first_port, tmp_path, env)
    try:
        wait_healthy(f"http://127.0.0.1:{first_port}", first)
        second = serve(second_port, tmp_path, env)
        out, _ = second.communicate(timeout=30)
        assert second.returncode != 0, out
        assert "already served by another ringrelay process" in out
        assert f"pid {first.pid}" in out
        assert "PostgreSQL" in out  # the way to run several instances
        assert "Traceback" not in out
        assert not _port_open(second_port)  # it stopped before binding its port
        # The admin commands still share the file with the running server.
        keys = subprocess.run(
            [*RINGRELAY, "keys", "list"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert keys.returncode == 0, keys.stderr
    finally:
        first.terminate()
        first.wait(timeout=15)
    # A clean exit releases the file: the next server starts.
    again = serve(second_port, tmp_path, env)
    try:
        wait_healthy(f"http://127.0.0.1:{second_port}", again)
    finally:
        again.terminate()
        again.wait(timeout=15)


async def test_restart_after_kill_takes_over_the_dead_process_deliveries(
    tmp_path, fake_nh, nh_settings
) -> None:
    """kill -9 while pushes hang at the hub: the kernel drops the dead process's lock, a new
    server on the same file starts, and Event Grid's redelivery to it pushes every device at
    once (200), instead of waiting for the dead claims' lease."""
    env = clean_env() | {
        "RINGRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'restart.db'}",
        "RINGRELAY_NH_CONNECTION_STRING": nh_settings["nh_connection_string"],
        "RINGRELAY_NH_HUB_NAME": nh_settings["nh_hub_name"],
        "RINGRELAY_NH_CA_FILE": str(nh_settings["nh_ca_file"]),
        "RINGRELAY_LOG_LEVEL": "WARNING",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = serve(port, tmp_path, env)
    try:
        wait_healthy(url, first)
        callee = acs_id("restart")
        handles = [f"fcm:restart-{i}" for i in range(3)]
        async with aiohttp.ClientSession() as http:
            for i, handle in enumerate(handles):
                async with http.put(
                    f"{url}/v1/identities/{callee}/devices/d{i}",
                    json={"platform": "fcm", "token": handle},
                ) as resp:
                    assert resp.status == 201
            # The hub hangs on these pushes and finally fails them: none reaches a phone.
            fake_nh.respond(500, times=len(handles), delay=4)
            batch = [incoming_call_event(callee)]
            post = asyncio.ensure_future(http.post(f"{url}/api/events", json=batch))
            for _ in range(200):  # every push reached the hub (its scripted answer is taken)
                await asyncio.sleep(0.05)
                if not fake_nh.script:
                    break
            assert not fake_nh.script
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            try:
                await post
            except aiohttp.ClientError:
                pass

            second = serve(port, tmp_path, env)
            try:
                wait_healthy(url, second)
                async with http.post(f"{url}/api/events", json=batch) as resp:
                    answer = await resp.json()
                    assert resp.status == 200, answer
                statuses = {d["device_id"]: d["status"] for d in answer["events"][0]["deliveries"]}
                assert statuses == {f"d{i}": "accepted" for i in range(len(handles))}
            finally:
                second.terminate()
                second.wait(timeout=15)
        await asyncio.sleep(4)  # the hung pushes end (500) before the pushes are counted
        accepted = [p["handle"] for p in fake_nh.pushes if p["status"] == 201]
        assert sorted(accepted) == sorted(handles)  # each device rang once
    finally:
        if first.poll() is None:
            first.kill()
