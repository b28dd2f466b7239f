"""Log output: plain text, or one JSON object per line (`RINGRELAY_LOG_FORMAT=json`) carrying
the call's fields (`callId`, `eventId`, `deviceId`) wherever they are known.

The fields are bound per task (`bind`): each event's handling and each device's push run in
their own asyncio task, so a line logged anywhere below them carries them without every log
call naming them. Values are what the service logs already: identities and ids, never a token
or a call context (those are fingerprinted where they are logged at all).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

import orjson

_fields: ContextVar[dict[str, str] | None] = ContextVar("ringrelay_log_fields", default=None)
FIELD_NAMES = ("callId", "eventId", "deviceId")


# Only the JSON formatter writes the fields: until one is made, binding is skipped (twice per
# event on the hot path, for lines that would not show them).
_binding = False


def bind(**fields: str | None) -> None:
    """Add fields to every line logged from this task (and the tasks it starts) on."""
    if not _binding:
        return
    # On the hot path twice per event: no comprehension unless a value is missing.
    given: dict[str, str] = (
        {k: v for k, v in fields.items() if v is not None} if None in fields.values() else fields  # type: ignore[assignment]
    )
    current = _fields.get()
    _fields.set({**current, **given} if current else given)


def bound() -> dict[str, str]:
    return dict(_fields.get() or {})


class JsonFormatter(logging.Formatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        global _binding
        _binding = True

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_fields.get() or {})
        for name in FIELD_NAMES:  # given per call: logger.info(..., extra={"callId": ...})
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str, fmt: str) -> None:
    """The root handler, for ringrelay's loggers and uvicorn's (which propagate to it)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
