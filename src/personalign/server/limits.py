"""Request limits: a body size limit and a body read deadline as plain ASGI middleware (declared
and chunked bodies alike), and the JSON values no endpoint can take (:func:`json_problem`)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from starlette.exceptions import HTTPException

from personalign.server.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTP exceptions through to the 413 handler."""


class BodyTimeout(HTTPException):
    """Raised when the body has not arrived in full by the deadline (a slow or stalled client)."""


class BodyLimit:
    """Answer 413 when a body is declared or turns out to be larger than ``max_bytes``, and 408
    when it has not arrived in full ``timeout_s`` seconds after the request started.

    The deadline only covers the body: once it is complete, ``receive`` waits as long as the
    response needs (a stream listens on it for the client's disconnect).
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(408, self.late) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
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
        except BodyTimeout:
            if not started:
                await self._reject(send, 408, self.late, "request_timeout")

    @property
    def message(self) -> str:
        return (
            f"the request body is larger than the limit of {self.max_bytes} bytes. Fix: send less per request"
        )

    @property
    def late(self) -> str:
        return f"the request body did not arrive in full within {self.timeout_s:g} s. Fix: send the whole body at once"

    async def _reject(
        self, send: Any, status: int = 413, message: str | None = None, code: str = "request_too_large"
    ) -> None:
        body = json.dumps(error_body(status, message or self.message, code)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _unpaired_surrogate(text: str) -> bool:
    # A JSON "\\ud800" escape parses to a lone surrogate, which cannot be encoded as UTF-8.
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_problem(payload: Any) -> tuple[str, str] | None:
    """The first value in a parsed JSON body that no endpoint can take, as ``(field, problem)``.

    Strings (keys included) must be encodable as UTF-8 (no unpaired UTF-16 surrogate),
    integers must fit in a float, and numbers must be finite (``NaN``, ``Infinity``: not JSON,
    and a profile storing one would no longer be valid JSON). ``field`` is the value's path (``messages[0].content``);
    walked with a stack, so deep nesting cannot overflow the interpreter's stack.
    """
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _unpaired_surrogate(value):
                return where or "body", "contains an unpaired UTF-16 surrogate (not valid Unicode text)"
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                return where or "body", "is an integer too large for a number"
        elif isinstance(value, float) and not math.isfinite(value):
            return (
                where or "body",
                f"is {value!r}, which JSON does not allow (Python's parser accepts NaN and Infinity)",
            )
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                path = f"{where}.{key}" if where else str(key)
                if _unpaired_surrogate(key):
                    return (
                        (where or "body"),
                        f"has a key with an unpaired UTF-16 surrogate ({key.encode('utf-8', 'backslashreplace').decode()})",
                    )
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None
