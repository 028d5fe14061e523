"""Streams the event loop awaits: no worker thread is held while a stream waits for its tokens.

The generating thread puts pieces on an :class:`AsyncTokenStream` as on any
:class:`~personalign.streaming.TokenStream`; each piece is also handed to the event loop
(``call_soon_threadsafe``), where :meth:`AsyncTokenStream.pieces` awaits it. A stream waiting
behind other batches therefore costs a coroutine, not one of the server's worker threads, and
``/health`` or a memory read answer at once however many streams are open. While nothing
arrives for ``keepalive_s`` seconds, ``pieces`` yields ``None`` (the caller sends an SSE comment,
``: keep-alive``, which clients ignore and proxies take as traffic). When the client disconnects,
the response task is cancelled and the stream's row is cancelled with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from personalign.streaming import TokenStream


class AsyncTokenStream(TokenStream):
    """A :class:`TokenStream` whose consumer awaits on ``loop`` (the server's event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _notify(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def put(self, piece: str) -> None:
        if piece:
            super().put(piece)
            self._notify("piece", piece)

    def finish(self, result: Any) -> None:
        if not self.done:
            super().finish(result)
            self._notify("end", None)

    def fail(self, error: BaseException) -> None:
        if not self.done:
            super().fail(error)
            self._notify("error", error)

    async def pieces(self, keepalive_s: float) -> AsyncIterator[str | None]:
        """The reply's pieces, stripped as :func:`~personalign.streaming.strip_stream` strips them
        (leading whitespace dropped, trailing held back), and ``None`` after each ``keepalive_s`` of silence."""
        pending, started = "", False
        while True:
            try:
                kind, value = await asyncio.wait_for(self._events.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            if not started:
                value = value.lstrip()
                if not value:
                    continue
                started = True
            text = pending + value
            body = text.rstrip()
            pending = text[len(body) :]
            if body:
                yield body
