"""The fake APNs's lean HTTP/2 server (the benchmark's, `FakeAPNs(framing="lean")`) over TLS on
loopback, driven by the relay's HTTP/2 client (pyreqwest): that it applies Apple's checks,
answers with bodies, keeps the client's flow control moving past its 64 KB window, holds an
answer's body until the client's window admits it, answers PING, and that a GOAWAY or a dropped
connection loses no push."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ringrelay.fakes.apns import FakeAPNs, write_signing_key
from ringrelay.fakes.tls import make_test_certificates
from ringrelay.providers.http2 import Header, Http2ConnectionLost, Http2Pool

TEAM, KEY_ID, BUNDLE = "TEAM123456", "KEYLEAN001", "com.contoso.calling"


@pytest.fixture
async def lean(tmp_path: Path) -> AsyncIterator[tuple[FakeAPNs, Callable[..., Http2Pool], str]]:
    key_file = tmp_path / "AuthKey.p8"
    fake = FakeAPNs(framing="lean")
    fake.add_key(TEAM, KEY_ID, write_signing_key(key_file), {BUNDLE})
    await fake.start("127.0.0.1", 0, str(tmp_path / "tls"))
    certs = make_test_certificates(str(tmp_path / "tls"))
    private = load_pem_private_key(key_file.read_bytes(), None)
    token = jwt.encode(
        {"iss": TEAM, "iat": int(time.time())}, private, "ES256", headers={"kid": KEY_ID}
    )
    pools: list[Http2Pool] = []

    def pool(**kw: Any) -> Http2Pool:
        pools.append(Http2Pool(fake.base_url, certs.ca_file, **kw))
        return pools[-1]

    yield fake, pool, token
    for p in pools:
        await p.close()
    await fake.stop()


async def send(
    pool: Http2Pool,
    token: str,
    body: bytes,
    *,
    device: str = "ab" * 32,
    topic: str = BUNDLE + ".voip",
    time_limit: float = 5.0,
) -> Any:
    headers: list[Header] = [
        ("apns-topic", topic, False),
        ("apns-push-type", "voip", False),
        ("apns-id", str(uuid.uuid4()), True),
        ("authorization", "bearer " + token, True),
    ]
    return await pool.request("POST", "/3/device/" + device, headers, body, time_limit)


def body(call_id: str, size: int = 200) -> bytes:
    doc = {"data": {"callId": call_id}, "pad": ""}
    doc["pad"] = "x" * (size - len(orjson.dumps(doc)))
    return orjson.dumps(doc)


async def test_pushes_are_judged_recorded_and_answered(lean) -> None:
    fake, pool, token = lean
    p = pool()
    ok = await send(p, token, body("call-1"))
    assert ok.status == 200 and ok.body == b""
    assert [c for c, _ in fake.receipts] == ["call-1"]

    # Apple's checks run unchanged: an answer with a JSON body (a DATA frame after HEADERS).
    wrong_topic = await send(p, token, body("call-2"), topic="com.other.app.voip")
    assert wrong_topic.status == 400
    assert orjson.loads(wrong_topic.body) == {"reason": "TopicDisallowed"}
    assert wrong_topic.headers["content-type"] == "application/json"

    fake.respond(410, "Unregistered", timestamp_ms=1_700_000_000_000)
    gone = await send(p, token, body("call-3"))
    assert gone.status == 410
    assert orjson.loads(gone.body) == {"reason": "Unregistered", "timestamp": 1_700_000_000_000}
    assert [c for c, _ in fake.receipts] == ["call-1"]


async def test_flow_control_keeps_moving_past_the_first_window(lean) -> None:
    """300 pushes of 5,000 bytes on one connection: 1.5 MB against a 64 KB connection window,
    which only the server's WINDOW_UPDATEs reopen."""
    fake, pool, token = lean
    p = pool(max_connections=1, streams_per_connection=100)
    answers = await asyncio.gather(
        *(send(p, token, body(f"call-{n}", 5000), time_limit=10.0) for n in range(300))
    )
    assert [a.status for a in answers] == [200] * 300
    assert sorted(c for c, _ in fake.receipts) == sorted(f"call-{n}" for n in range(300))
    assert fake.connections_opened == 1


async def test_ping_is_answered(lean) -> None:
    """The client PINGs an idle connection and drops it when the PING goes unanswered: the
    connection is still the first one after several PING intervals of idleness."""
    fake, pool, token = lean
    p = pool(ping_interval=0.1, ping_timeout=0.3)
    await send(p, token, body("call-1"))
    await asyncio.sleep(1.0)
    assert (await send(p, token, body("call-2"))).status == 200
    assert fake.connections_opened == 1 and fake.pings_received >= 3


@pytest.mark.parametrize("how", ["goaway", "drop"])
async def test_a_push_in_flight_survives_goaway_or_a_dropped_connection(lean, how: str) -> None:
    fake, pool, token = lean
    p = pool()
    await send(p, token, body("call-0"))
    fake.respond(200, "", delay=0.5)  # held by the fake while the connection goes away
    pending = asyncio.ensure_future(send(p, token, body("call-1")))
    await asyncio.sleep(0.2)
    await (fake.goaway() if how == "goaway" else fake.drop_connections())
    if how == "goaway":
        # GOAWAY names the in-flight stream as processed: its answer still comes back on the
        # connection, which closes only after it.
        assert (await pending).status == 200
    else:
        with pytest.raises(Http2ConnectionLost, match="failed or lost"):
            await pending
    again = await send(p, token, body("call-2"))
    assert again.status == 200
    assert fake.connections_opened == 2


async def test_an_answer_body_waits_for_the_clients_window(lean, tmp_path: Path) -> None:
    """A client that opens only 10 bytes of window gets the answer's headers at once and its
    JSON body only after a WINDOW_UPDATE (RFC 9113 §6.9): driven with h2's client side."""
    import ssl

    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    fake, _, token = lean
    ctx = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
    ctx.set_alpn_protocols(["h2"])
    port = int(fake.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "127.0.0.1"),
        (":path", "/3/device/" + "ab" * 32),
        ("apns-topic", "com.other.app.voip"),  # answered 400 TopicDisallowed, with a body
        ("apns-push-type", "voip"),
        ("authorization", "bearer " + token),
    ]
    client.send_headers(1, headers)
    client.send_data(1, body("call-1"), end_stream=True)
    writer.write(client.data_to_send())

    async def events_until(kind: type, seconds: float = 2.0) -> list[Any]:
        seen: list[Any] = []
        async with asyncio.timeout(seconds):
            while not any(isinstance(e, kind) for e in seen):
                seen += client.receive_data(await reader.read(65536))
                writer.write(client.data_to_send())
        return seen

    try:
        first = await events_until(h2.events.ResponseReceived)
        assert (
            dict(next(e for e in first if isinstance(e, h2.events.ResponseReceived)).headers)[
                b":status"
            ]
            == b"400"
        )
        assert not any(isinstance(e, h2.events.DataReceived) for e in first)
        with pytest.raises(TimeoutError):
            await events_until(h2.events.DataReceived, 0.3)  # held: 10 bytes of window
        client.increment_flow_control_window(1000, stream_id=1)
        writer.write(client.data_to_send())
        later = await events_until(h2.events.StreamEnded)
        data = b"".join(e.data for e in later if isinstance(e, h2.events.DataReceived))
        assert orjson.loads(data) == {"reason": "TopicDisallowed"}
    finally:
        writer.close()
