"""Native registry API under /v1, plus per-call delivery records and the sandbox outbox."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ringrelay.chat.message import CHAT_EVENT_PREFIX
from ringrelay.chat.sdk_format import ChatKeyError, decode_chat_key
from ringrelay.config import MAX_TTL_SECONDS, MIN_TTL_SECONDS
from ringrelay.delivery.dispatcher import outcome_json
from ringrelay.models import ChatFormat, EventRecord, Platform, PushKind, Registration
from ringrelay.redact import fingerprint
from ringrelay.registry import (
    RegistrationError,
    build_registration,
    check_device_id,
    check_identity,
)
from ringrelay.relay import Relay

router = APIRouter(prefix="/v1")


class DeviceRegistrationIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "platform": "apns",
                    "token": "a1b2c3d4" * 8,
                    "push_kind": "voip",
                    "app_id": "com.contoso.calling",
                    "ttl_seconds": 2592000,
                }
            ]
        },
    )

    platform: Platform = Field(description="Push network of the token.")
    token: str = Field(
        min_length=1,
        max_length=4096,
        description="APNs: even-length hex (PushKit token for voip). FCM: the registration token.",
    )
    push_kind: PushKind = Field(
        default=PushKind.VOIP, description="`voip` rings calls; `alert` is for notifications."
    )
    app_id: str | None = Field(
        default=None, max_length=255, description="App (bundle id / package) the token belongs to."
    )
    ttl_seconds: int | None = Field(
        default=None,
        ge=MIN_TTL_SECONDS,
        le=MAX_TTL_SECONDS,
        description="Lifetime from now; default from RINGRELAY_DEFAULT_TTL_SECONDS.",
    )
    chat_format: ChatFormat | None = Field(
        default=None,
        description="`alert` registrations: how chat messages arrive. `notification` (default): "
        "a visible alert; `sdk`: the ACS Chat SDK's encrypted push, needs `chat_key`.",
    )
    chat_key: SecretStr | None = Field(
        default=None,
        max_length=200,
        description="`sdk` format: base64 of the Chat SDK's 64-byte push key (AES key ‖ auth "
        "key). Stored sealed; never listed.",
    )


class DeviceOut(BaseModel):
    identity: str
    device_id: str
    platform: Platform
    push_kind: PushKind
    app_id: str | None
    token: str = Field(description="Fingerprint of the token; the token itself is never listed.")
    chat_format: ChatFormat | None = Field(
        default=None, description="`alert` registrations: how chat messages arrive."
    )
    chat_key_set: bool = Field(
        default=False, description="Whether a chat key is stored (the key is never listed)."
    )
    created_at: datetime
    updated_at: datetime
    expires_at: datetime


class DeviceListOut(BaseModel):
    identity: str
    devices: list[DeviceOut]


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def device_out(reg: Registration) -> DeviceOut:
    return DeviceOut(
        identity=reg.identity,
        device_id=reg.device_id,
        platform=reg.platform,
        push_kind=reg.push_kind,
        app_id=reg.app_id,
        token=fingerprint(reg.token),
        chat_format=reg.chat_format if reg.push_kind is PushKind.ALERT else None,
        chat_key_set=reg.chat_key is not None,
        created_at=_ts(reg.created_at),
        updated_at=_ts(reg.updated_at),
        expires_at=_ts(reg.expires_at),
    )


def field_error(field: str, location: str, message: str) -> HTTPException:
    return HTTPException(
        status_code=422, detail=[{"field": field, "loc": [location, field], "msg": message}]
    )


def _check_path(identity: str, device_id: str | None = None) -> None:
    try:
        check_identity(identity)
        if device_id is not None:
            check_device_id(device_id)
    except RegistrationError as exc:
        raise field_error(exc.field, "path", exc.message) from None


@router.put(
    "/identities/{identity}/devices/{device_id}",
    response_model=DeviceOut,
    status_code=201,
    tags=["registry"],
    summary="Register or refresh a device of an ACS identity",
    responses={200: {"description": "Refreshed", "model": DeviceOut}, 422: {}},
)
async def put_device(
    identity: str, device_id: str, body: DeviceRegistrationIn, request: Request, response: Response
) -> DeviceOut:
    relay: Relay = request.app.state.relay
    _check_path(identity, device_id)
    await relay.guard.authorize_identity(request, identity)
    problem = relay.router.registration_error(body.platform, body.app_id)
    if problem is not None:
        raise field_error(problem[0], "body", problem[1])
    chat_format, sealed_key = _chat_fields(relay, identity, device_id, body)
    try:
        reg = build_registration(
            identity,
            device_id,
            body.platform,
            body.token,
            body.push_kind,
            body.app_id,
            body.ttl_seconds or relay.settings.default_ttl_seconds,
            chat_format=chat_format,
            sealed_chat_key=sealed_key,
        )
    except RegistrationError as exc:
        location = "path" if exc.field in ("identity", "device_id") else "body"
        raise field_error(exc.field, location, exc.message) from None
    created, _ = await relay.store.upsert_registration(reg)
    relay.metrics.registrations.labels("create" if created else "refresh").inc()
    response.status_code = 201 if created else 200
    stored = next(
        (
            r
            for r in await relay.store.list_registrations(identity, time.time())
            if r.device_id == device_id
        ),
        reg,
    )
    return device_out(stored)


def _chat_fields(
    relay: Relay, identity: str, device_id: str, body: DeviceRegistrationIn
) -> tuple[ChatFormat, str | None]:
    """The chat format and the sealed chat key, or a 422 naming the field."""
    if body.push_kind is PushKind.VOIP:
        # Apple ends apps that get a VoIP push without reporting a call: chat never goes there.
        if body.chat_format is not None or body.chat_key is not None:
            field = "chat_format" if body.chat_format is not None else "chat_key"
            raise field_error(field, "body", "only for push_kind alert (VoIP tokens get no chat)")
        return ChatFormat.NOTIFICATION, None
    chat_format = body.chat_format or ChatFormat.NOTIFICATION
    if chat_format is not ChatFormat.SDK:
        if body.chat_key is not None:
            raise field_error("chat_key", "body", "only with chat_format sdk")
        return chat_format, None
    if body.chat_key is None:
        raise field_error("chat_key", "body", "required with chat_format sdk")
    try:
        key = decode_chat_key(body.chat_key.get_secret_value())
    except ChatKeyError as exc:
        raise field_error("chat_key", "body", str(exc)) from None
    if relay.chat_keys is None:
        raise field_error(
            "chat_key",
            "body",
            "this server stores no chat keys: RINGRELAY_CHAT_KEY_ENCRYPTION_KEY is not set",
        )
    return chat_format, relay.chat_keys.seal(key, identity, device_id)


@router.get(
    "/identities/{identity}/devices",
    response_model=DeviceListOut,
    tags=["registry"],
    summary="List an identity's live devices",
)
async def list_devices(identity: str, request: Request) -> DeviceListOut:
    relay: Relay = request.app.state.relay
    _check_path(identity)
    await relay.guard.authorize_identity(request, identity)
    regs = await relay.store.list_registrations(identity, time.time())
    return DeviceListOut(identity=identity, devices=[device_out(r) for r in regs])


@router.delete(
    "/identities/{identity}/devices/{device_id}",
    status_code=204,
    tags=["registry"],
    summary="Delete one device",
    responses={404: {"description": "No such device"}},
)
async def delete_device(identity: str, device_id: str, request: Request) -> Response:
    relay: Relay = request.app.state.relay
    _check_path(identity, device_id)
    await relay.guard.authorize_identity(request, identity)
    if not await relay.store.delete_registration(identity, device_id):
        raise HTTPException(status_code=404, detail="no such device for this identity")
    relay.metrics.registrations.labels("delete").inc()
    return Response(status_code=204)


@router.delete(
    "/identities/{identity}/devices",
    tags=["registry"],
    summary="Delete all of an identity's devices",
)
async def delete_all_devices(identity: str, request: Request) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    _check_path(identity)
    await relay.guard.authorize_identity(request, identity)
    deleted = await relay.store.delete_identity(identity)
    relay.metrics.registrations.labels("delete").inc(deleted)
    return {"identity": identity, "deleted": deleted}


@router.get(
    "/identities/{identity}/removed-devices",
    tags=["registry"],
    summary="Registrations ringrelay removed because the push provider declared the token dead",
)
async def removed_devices(identity: str, request: Request) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    _check_path(identity)
    await relay.guard.authorize_identity(request, identity)
    removed = await relay.store.removed_registrations(identity)
    return {
        "identity": identity,
        "removed": [
            {
                "device_id": r.device_id,
                "platform": r.platform,
                "token": r.token_fingerprint,
                "reason": r.reason,
                "removed_at": _ts(r.removed_at),
            }
            for r in removed
        ],
    }


THREAD_ID_RE = re.compile(r"^[A-Za-z0-9:@._\-]{1,256}$")  # e.g. 19:<hex>@thread.v2


class MuteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    until: datetime | None = Field(
        default=None, description="Muted until then (ISO 8601 with a zone); absent: until unmuted."
    )


class MuteOut(BaseModel):
    identity: str
    thread_id: str
    until: datetime | None


def _check_thread(identity: str, thread_id: str) -> None:
    _check_path(identity)
    if not THREAD_ID_RE.match(thread_id):
        raise field_error("thread_id", "path", "1-256 characters of A-Z a-z 0-9 : @ . _ -")


@router.put(
    "/identities/{identity}/muted-threads/{thread_id}",
    response_model=MuteOut,
    tags=["chat"],
    summary="Mute a chat thread for an identity: its messages are recorded, not pushed",
    responses={422: {}},
)
async def mute_thread(
    identity: str, thread_id: str, request: Request, body: MuteIn | None = None
) -> MuteOut:
    relay: Relay = request.app.state.relay
    _check_thread(identity, thread_id)
    await relay.guard.authorize_identity(request, identity)
    now = time.time()
    until = None
    if body is not None and body.until is not None:
        if body.until.tzinfo is None:
            raise field_error("until", "body", "needs a time zone (e.g. 2026-01-01T08:00:00Z)")
        until = body.until.timestamp()
        if until <= now:
            raise field_error("until", "body", "in the past")
    await relay.store.mute_thread(identity, thread_id, until, now)
    return MuteOut(
        identity=identity, thread_id=thread_id, until=None if until is None else _ts(until)
    )


@router.delete(
    "/identities/{identity}/muted-threads/{thread_id}",
    status_code=204,
    tags=["chat"],
    summary="Unmute a chat thread",
    responses={404: {"description": "The thread was not muted"}},
)
async def unmute_thread(identity: str, thread_id: str, request: Request) -> Response:
    relay: Relay = request.app.state.relay
    _check_thread(identity, thread_id)
    await relay.guard.authorize_identity(request, identity)
    if not await relay.store.unmute_thread(identity, thread_id):
        raise HTTPException(status_code=404, detail="this thread is not muted for this identity")
    return Response(status_code=204)


@router.get(
    "/identities/{identity}/muted-threads",
    tags=["chat"],
    summary="An identity's muted chat threads",
)
async def list_muted_threads(identity: str, request: Request) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    _check_path(identity)
    await relay.guard.authorize_identity(request, identity)
    muted = await relay.store.muted_threads(identity, time.time())
    return {
        "identity": identity,
        "muted": [{"thread_id": t, "until": None if u is None else _ts(u)} for t, u in muted],
    }


def _event_json(ev: EventRecord) -> dict[str, Any]:
    return {
        "id": ev.event_id,
        "type": ev.event_type,
        "status": ev.status,
        "reason": ev.reason,
        "recipient": ev.recipient,
        "received_at": _ts(ev.received_at),
        "deliveries": [outcome_json(d) for d in ev.deliveries],
    }


@router.get(
    "/messages/{message_id}",
    tags=["deliveries"],
    summary="Per-device outcome of every push for a chat message (by messageId)",
    responses={404: {"description": "No chat event recorded for this message"}},
)
async def message_deliveries(message_id: str, request: Request) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    principal = await relay.guard.authorize(request, "read")
    # Chat events are recorded with the message id where calls keep their callId.
    events = [
        ev
        for ev in await relay.store.events_for_call(message_id)
        if ev.event_type.startswith(CHAT_EVENT_PREFIX)
    ]
    if principal.identity is not None:  # a user sees only their own copies of the message
        events = [ev for ev in events if ev.recipient == principal.identity]
    if not events:
        raise HTTPException(status_code=404, detail="no chat event recorded for this messageId")
    return {"messageId": message_id, "events": [_event_json(ev) for ev in events]}


@router.get(
    "/sandbox/pushes",
    tags=["sandbox"],
    summary="Pushes the sandbox delivered, newest first",
    responses={404: {"description": "Not in sandbox mode"}},
)
async def sandbox_pushes(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    call_id: Annotated[str | None, Query(description="Only pushes of this call")] = None,
    reveal: Annotated[
        bool, Query(description="Show the call context `cp` in full (it is a credential)")
    ] = False,
) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    principal = await relay.guard.authorize(request, "read")
    if relay.sandbox is None:
        raise HTTPException(status_code=404, detail="delivery is not in sandbox mode")
    out = []
    for push in relay.sandbox.pushes:
        if call_id is not None and push["call_id"] != call_id:
            continue
        if principal.identity is not None and push["identity"] != principal.identity:
            continue
        out.append(push if reveal else _mask_cp(push))
        if len(out) >= limit:
            break
    return {"pushes": out}


def _mask_cp(push: dict[str, Any]) -> dict[str, Any]:
    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: fingerprint(v) if k == "cp" and isinstance(v, str) else mask(v)
                for k, v in node.items()
            }
        return node

    return {**push, "body": mask(push["body"])}
