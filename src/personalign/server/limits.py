"""A request-body size limit as plain ASGI middleware (declared and chunked bodies alike)."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

from personalign.server.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTP exceptions through to the 413 handler."""


class BodyLimit:
    """Answer 413 when a body is declared or turns out to be larger than ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False  # the HTTP server rejects a malformed length itself
            if too_large:
                await self._reject(send)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(413, self.message)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    @property
    def message(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes} bytes. Fix: send less per request"

    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(413, self.message, "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
