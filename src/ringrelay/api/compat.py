"""Routes of Microsoft's sample registrar (ACSCallingNativeDeviceTokenRegistrar.cs), so that apps
written against it switch to ringrelay by changing only the base URL. Same paths, bodies, platform
names and status codes (201 / 200 / 404 / 400); answers are the sample's plain-text messages."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from ringrelay.models import Platform, PushKind
from ringrelay.providers.notificationhubs import FORMATS as NOTIFICATION_HUBS_FORMATS
from ringrelay.redact import fingerprint
from ringrelay.registry import RegistrationError, build_registration
from ringrelay.relay import Relay

router = APIRouter(prefix="/api", tags=["sample-compatible registry"])

# The sample's Platform enum names -> ours. `android` means FCM v1: the legacy FCM API is gone.
SAMPLE_PLATFORMS: dict[str, Platform] = {
    "apple": Platform.APNS,
    "android": Platform.FCM,
    "fcmv1": Platform.FCM,
    "gcm": Platform.GCM,
    "windows": Platform.WNS,
    "adm": Platform.ADM,
    "baidu": Platform.BAIDU,
}
# The sample stores Notification Hubs format names as platforms: list them the same way.
SAMPLE_NAMES: dict[Platform, str] = NOTIFICATION_HUBS_FORMATS


def _text(status: int, message: str) -> Response:
    # The sample answers with a bare string under this content type.
    return Response(message, status_code=status, media_type="text/json; charset=utf-8")


@router.post(
    "/add_device_token",
    status_code=201,
    summary="Add or refresh device tokens (Microsoft sample format)",
    responses={201: {"description": "Stored"}, 400: {"description": "Bad input, nothing stored"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "example": {
                        "acsMri": "8:acs:<resource>_<user>",
                        "deviceInfos": [
                            {"deviceUUID": "<uuid>", "deviceToken": "<token>", "platform": "apple"}
                        ],
                    }
                }
            },
        }
    },
)
async def add_device_token(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    try:
        body: Any = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _text(400, "Could not parse body to ACSUserRegistrationInfo")
    if not isinstance(body, dict):
        return _text(400, "Could not parse body to ACSUserRegistrationInfo")
    mri = body.get("acsMri")
    infos = body.get("deviceInfos")
    if not isinstance(mri, str) or not mri:
        return _text(400, "acsMri: missing")
    if not isinstance(infos, list) or not infos:
        return _text(400, "deviceInfos: the device tokens list is empty")
    await relay.guard.authorize_identity(request, mri)
    now = time.time()
    regs = []
    for i, info in enumerate(infos):
        where = f"deviceInfos[{i}]"
        if not isinstance(info, dict):
            return _text(400, f"{where}: not an object")
        platform_name = info.get("platform")
        platform = (
            SAMPLE_PLATFORMS.get(platform_name.lower()) if isinstance(platform_name, str) else None
        )
        if platform is None:
            return _text(400, f"{where}.platform: expected one of {', '.join(SAMPLE_PLATFORMS)}")
        uuid_, token = info.get("deviceUUID"), info.get("deviceToken")
        if not isinstance(uuid_, str) or not isinstance(token, str):
            return _text(400, f"{where}: deviceUUID and deviceToken must be strings")
        problem = relay.router.registration_error(platform, None)
        if problem is not None:
            # The sample's body has no app id: with several apps, use the /v1 API.
            return _text(400, f"{where}.platform: {problem[1]}")
        try:
            regs.append(
                build_registration(
                    mri,
                    uuid_,
                    platform,
                    token,
                    PushKind.VOIP,
                    None,
                    relay.settings.default_ttl_seconds,
                    now,
                )
            )
        except RegistrationError as exc:
            names = {
                "identity": "acsMri",
                "device_id": f"{where}.deviceUUID",
                "token": f"{where}.deviceToken",
            }
            return _text(400, f"{names.get(exc.field, exc.field)}: {exc.message}")
    for reg in regs:  # all validated first: a bad entry stores nothing
        await relay.store.upsert_registration(reg)
    relay.metrics.registrations.labels("create").inc(len(regs))
    return _text(201, "Successfully created the entry for the user")


@router.get(
    "/get_device_registrations",
    summary="List an identity's devices (Microsoft sample format)",
    responses={404: {"description": "No registration"}, 400: {"description": "acsMri missing"}},
)
async def get_device_registrations(request: Request, acsMri: str | None = None) -> Response:
    relay: Relay = request.app.state.relay
    if not acsMri:
        return _text(400, "Could not find acsMri field in the url query")
    principal = await relay.guard.authorize_identity(request, acsMri)
    # The full token goes only to its owner, authenticated as that identity; everyone else (an
    # anonymous caller when authentication is off, a backend's key) sees a fingerprint, as the
    # native listing shows to all.
    full_tokens = principal.identity == acsMri
    regs = await relay.store.list_registrations(acsMri, time.time())
    if not regs:
        return _text(404, "No user registration info found")
    doc = {
        "acsMri": acsMri,
        "deviceInfos": [
            {
                "deviceUUID": r.device_id,
                "deviceToken": r.token if full_tokens else fingerprint(r.token),
                "platform": SAMPLE_NAMES[r.platform],
            }
            for r in regs
        ],
    }
    return Response(orjson.dumps(doc), status_code=200, media_type="application/json")


@router.delete(
    "/delete_device_registration",
    summary="Delete one device (Microsoft sample format)",
    responses={404: {"description": "No such device"}, 400: {"description": "Parameters missing"}},
)
async def delete_device_registration(
    request: Request,
    acsMri: str | None = None,
    deviceUUID: str | None = None,
) -> Response:
    relay: Relay = request.app.state.relay
    if not acsMri or not deviceUUID:
        return _text(400, "Could not find deviceUUID or mri field in the url query")
    await relay.guard.authorize_identity(request, acsMri)
    if not await relay.store.delete_registration(acsMri, deviceUUID):
        return _text(404, "Could not find the deviceUUID for the mri")
    relay.metrics.registrations.labels("delete").inc()
    return _text(200, "Removed the deviceUUID")
