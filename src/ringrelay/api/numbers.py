"""Number assignment API: which identity a PSTN number's calls are redirected to (admin scope)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ringrelay.api.registry import field_error
from ringrelay.relay import Relay
from ringrelay.routing.numbers import (
    NumberAssignment,
    NumberError,
    check_assignment_target,
    check_e164,
    redirect_loop,
)

router = APIRouter(prefix="/v1")


class NumberIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"target": "8:acs:98e4cbef-70e7-4733-8594-063c4a72d711_user", "label": "sales"}
            ]
        },
    )

    target: str = Field(
        min_length=1,
        max_length=256,
        description="Raw id the number's calls are redirected to: 8:acs:…, 8:orgid:… or +E.164.",
    )
    label: str = Field(default="", max_length=200, description="Free text, e.g. 'front desk'.")


class NumberOut(BaseModel):
    e164: str
    target: str
    label: str
    created_at: datetime
    updated_at: datetime


def _out(a: NumberAssignment) -> NumberOut:
    return NumberOut(
        e164=a.e164,
        target=a.target,
        label=a.label,
        created_at=datetime.fromtimestamp(a.created_at, UTC),
        updated_at=datetime.fromtimestamp(a.updated_at, UTC),
    )


def _number(e164: str) -> str:
    try:
        return check_e164(e164)
    except NumberError as exc:
        raise field_error("e164", "path", exc.message) from None


@router.put(
    "/numbers/{e164}",
    response_model=NumberOut,
    status_code=201,
    tags=["numbers"],
    summary="Assign a PSTN number (E.164) to the identity its calls are redirected to",
    responses={200: {"description": "Reassigned", "model": NumberOut}, 422: {}},
)
async def put_number(e164: str, body: NumberIn, request: Request, response: Response) -> NumberOut:
    relay: Relay = request.app.state.relay
    number = _number(e164)
    await relay.guard.authorize(request, "admin")
    try:
        target = check_assignment_target(body.target, number)
    except NumberError as exc:
        raise field_error(exc.field, "body", exc.message) from None
    loop = await redirect_loop(relay.store, number, target)
    if loop is not None:
        raise field_error("target", "body", f"would form a redirect loop: {loop}")
    now = time.time()
    existing = await relay.store.get_number(number)
    created_at = existing.created_at if existing else now
    created = await relay.store.put_number(
        NumberAssignment(number, target, body.label, created_at, now)
    )
    response.status_code = 201 if created else 200
    return _out(NumberAssignment(number, target, body.label, created_at, now))


@router.get(
    "/numbers/{e164}",
    response_model=NumberOut,
    tags=["numbers"],
    summary="One number's assignment",
    responses={404: {"description": "Not assigned"}},
)
async def get_number(e164: str, request: Request) -> NumberOut:
    relay: Relay = request.app.state.relay
    number = _number(e164)
    await relay.guard.authorize(request, "admin")
    found = await relay.store.get_number(number)
    if found is None:
        raise HTTPException(status_code=404, detail="number not assigned")
    return _out(found)


@router.get("/numbers", tags=["numbers"], summary="Every assigned number")
async def list_numbers(request: Request) -> dict[str, Any]:
    relay: Relay = request.app.state.relay
    await relay.guard.authorize(request, "admin")
    return {"numbers": [_out(a).model_dump(mode="json") for a in await relay.store.list_numbers()]}


@router.delete(
    "/numbers/{e164}",
    status_code=204,
    tags=["numbers"],
    summary="Remove a number's assignment (its calls are pushed to data.to again)",
    responses={404: {"description": "Not assigned"}},
)
async def delete_number(e164: str, request: Request) -> Response:
    relay: Relay = request.app.state.relay
    number = _number(e164)
    await relay.guard.authorize(request, "admin")
    if not await relay.store.delete_number(number):
        raise HTTPException(status_code=404, detail="number not assigned")
    return Response(status_code=204)
