"""Native registry API under /v1, plus per-call delivery records and the sandbox outbox."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ringrelay.config import MAX_TTL_SECONDS, MIN_TTL_SECONDS
from ringrelay.models import Platform, PushKind, Registration
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


class DeviceOut(BaseModel):
    identity: str
    device_id: str
    platform: Platform
    push_kind: PushKind
    app_id: str | None
    token: str = Field(description="Fingerprint of the token; the token itself is never listed.")
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
    try:
        reg = build_registration(
            identity,
            device_id,
            body.platform,
            body.token,
            body.push_kind,
            body.app_id,
            body.ttl_seconds or relay.settings.default_ttl_seconds,
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
