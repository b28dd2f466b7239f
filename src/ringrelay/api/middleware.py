"""ASGI middleware shared by every route: security headers, request size limits, plain 500s,
and the 422 shape that names the field."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ringrelay")


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """422 naming each bad field; never echoes the input (it may be a token)."""
    detail = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        field_path = [p for p in loc if p not in ("body", "path", "query")]
        detail.append(
            {
                "field": ".".join(field_path) or (loc[-1] if loc else "body"),
                "loc": loc,
                "msg": str(err.get("msg", "invalid")).removeprefix("Value error, "),
            }
        )
    return JSONResponse({"detail": detail}, status_code=422)


_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOC_PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
# The dashboard's pages carry their stylesheet inline and post one form to themselves; no
# script runs on them at all, so inline styles open no door to one.
_DASHBOARD_CSP = (
    b"content-security-policy",
    b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
)


API_HEADERS = [*_SECURITY_HEADERS, _CSP]
_DASHBOARD_HEADERS = [*_SECURITY_HEADERS, _DASHBOARD_CSP]


def log_disconnected(scope: Scope) -> None:
    # The client went away before its request had arrived: nothing to answer, nothing wrong on
    # our side; one line, not a traceback per aborted request.
    log.info(
        "client disconnected before its %s %s request was received; not handled",
        scope.get("method"),
        scope.get("path"),
    )


class ResponseGuard:
    """Security headers on every response, and an unhandled error becomes a logged, plain 500
    (no stack trace to the client). Pure ASGI: no per-request task or body copy. The
    interactive docs pages load scripts, so they do without the CSP."""

    def __init__(
        self, app: ASGIApp, max_request_bytes: int = 64 * 1024, body_timeout: float = 10.0
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in _DOC_PAGES:
            extra = _SECURITY_HEADERS
        elif path.startswith("/dashboard"):
            extra = _DASHBOARD_HEADERS
        else:
            extra = API_HEADERS
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        if scope["path"] != "/api/events":  # the webhook enforces its own, larger limit
            if self._declared_too_large(scope):
                await self._answer(send_with_headers, 413, b'{"error":"request body too large"}')
                return
            receive = self._limited(receive)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            log_disconnected(scope)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a clean answer; the server closes the connection
            await self._answer(send_with_headers, 500, b'{"error":"internal error"}')

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                return bool(value.isdigit() and int(value) > self.max_request_bytes)
        return False

    def _limited(self, receive: Receive) -> Receive:
        """Counts a streamed body and times it: past the limit the route sees a 413
        HTTPException, past the body timeout (from the request's start) a 408."""
        limit = self.max_request_bytes
        timeout = self.body_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete:  # after the body, receive waits for a disconnect: not timed
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    status_code=408,
                    detail=f"request body not received within {timeout:g} s "
                    "(RINGRELAY_BODY_TIMEOUT_SECONDS)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(status_code=413, detail="request body too large")
                complete = not message.get("more_body", False)
            return message

        return limited_receive
