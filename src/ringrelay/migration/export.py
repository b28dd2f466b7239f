"""`ringrelay export`: every live registration as JSON lines, read in pages (bounded memory), so
that leaving ringrelay is as easy as coming. The lines carry the full device tokens: the file is
as sensitive as the database.

Formats: `jsonl` (ringrelay's fields, one registration per line) and `sample-mongo` (one document
per identity in the shape of Microsoft's sample, `mongoimport`-able; platforms named as the sample
names them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from ringrelay.models import Registration
from ringrelay.store import Store

Format = Literal["jsonl", "sample-mongo"]
PAGE = 1000


def _iso(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def registration_json(reg: Registration) -> dict[str, Any]:
    return {
        "identity": reg.identity,
        "device_id": reg.device_id,
        "platform": reg.platform.value,
        "token": reg.token,
        "push_kind": reg.push_kind.value,
        "app_id": reg.app_id,
        "created_at": _iso(reg.created_at),
        "updated_at": _iso(reg.updated_at),
        "expires_at": _iso(reg.expires_at),
    }


async def all_registrations(
    store: Store, now: float, page: int = PAGE
) -> AsyncIterator[Registration]:
    after: tuple[str, str] | None = None
    while True:
        rows = await store.registrations_after(after, page, now)
        for reg in rows:
            yield reg
        if len(rows) < page:
            return
        after = (rows[-1].identity, rows[-1].device_id)


async def export_lines(store: Store, now: float, fmt: Format = "jsonl") -> AsyncIterator[bytes]:
    """The export, one line (with its newline) at a time."""
    if fmt == "jsonl":
        async for reg in all_registrations(store, now):
            yield orjson.dumps(registration_json(reg)) + b"\n"
        return
    from ringrelay.api.compat import SAMPLE_NAMES

    # Registrations come in identity order: one document per run of the same identity.
    identity: str | None = None
    infos: list[dict[str, str]] = []
    async for reg in all_registrations(store, now):
        if reg.identity != identity and infos:
            yield orjson.dumps({"_id": identity, "deviceInfos": infos}) + b"\n"
            infos = []
        identity = reg.identity
        infos.append(
            {
                "deviceUUID": reg.device_id,
                "deviceToken": reg.token,
                "platform": SAMPLE_NAMES[reg.platform],
            }
        )
    if infos:
        yield orjson.dumps({"_id": identity, "deviceInfos": infos}) + b"\n"
