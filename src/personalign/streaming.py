"""Streaming replies out of a batched ``generate``: one :class:`TokenStream` per streamed row.

``generate`` hands every new token of every row to one :class:`BatchStreamer`; it detokenises
each streamed row incrementally and puts text pieces on that row's :class:`TokenStream`. A
row's stream finishes as soon as that row is done (its end-of-sequence token or its own
``max_new_tokens``), not when the longest row in the batch is. A consumer that goes away
calls :meth:`TokenStream.cancel`; :class:`CancelledRows` then marks the row finished, and
``generate`` returns early once every row is finished or cancelled.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria


def strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Yield ``pieces`` so that their concatenation is the stripped text: leading whitespace is
    dropped and trailing whitespace is held back until more text follows it."""
    pending = ""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body) :]
        if body:
            yield body


class TokenStream:
    """The text pieces of one reply as they are generated, then its final result.

    Iterating yields pieces whose concatenation equals the final reply text; iteration ends
    when the reply is complete and raises if generation failed. ``result`` holds the
    ``ChatResult`` once done. Thread-safe: the generating thread writes, one consumer reads.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = False

    def put(self, piece: str) -> None:
        if piece:
            self._queue.put(("piece", piece))

    def finish(self, result: Any) -> None:
        if not self.done:
            self.result, self.done = result, True
            self._queue.put(("end", None))

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.error, self.done = error, True
            self._queue.put(("error", error))

    def cancel(self) -> None:
        """Stop generating this row (the consumer has gone)."""
        self.cancelled = True

    def _raw(self) -> Iterator[str]:
        while True:
            kind, value = self._queue.get()
            if kind == "piece":
                yield value
            elif kind == "end":
                return
            else:
                raise value

    def __iter__(self) -> Iterator[str]:
        return strip_stream(self._raw())


class BatchStreamer:
    """A ``generate`` streamer for a whole batch: routes each row's tokens to its stream.

    ``limits[i]``: row i's own ``max_new_tokens``; ``stops``: end-of-sequence ids;
    ``finalize(i, tokens)`` builds row i's result from its new tokens (EOS included).
    """

    def __init__(
        self,
        tokenizer: Any,
        streams: Sequence[TokenStream | None],
        limits: Sequence[int],
        stops: set[int],
        finalize: Callable[[int, list[int]], Any],
    ) -> None:
        self.tokenizer = tokenizer
        self.streams = list(streams)
        self.limits = list(limits)
        self.stops = stops
        self.finalize = finalize
        self.tokens: list[list[int]] = [[] for _ in self.streams]
        self.emitted = [""] * len(self.streams)
        self.closed = [s is None for s in self.streams]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt ids
            self._prompt_seen = True
            return
        step = value.reshape(len(self.streams), -1)
        for i, stream in enumerate(self.streams):
            if self.closed[i] or stream is None:
                continue
            if stream.cancelled:
                self.closed[i] = True
                continue
            for token in step[i].tolist():
                self.tokens[i].append(token)
                finished = token in self.stops or len(self.tokens[i]) >= self.limits[i]
                self._emit(i, final=finished)
                if finished:
                    self.closed[i] = True
                    stream.finish(self.finalize(i, self.tokens[i]))
                    break

    def _emit(self, i: int, final: bool) -> None:
        visible = [t for t in self.tokens[i] if t not in self.stops]
        text = self.tokenizer.decode(visible, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        piece, self.emitted[i] = text[len(self.emitted[i]) :], text
        self.streams[i].put(piece)

    def end(self) -> None:
        """Called by ``generate`` when it stops; rows still open are finished by the caller."""


class CancelledRows(StoppingCriteria):
    """A ``StoppingCriteria``: rows whose stream was cancelled count as finished."""

    def __init__(self, streams: Sequence[TokenStream | None]) -> None:
        super().__init__()
        self.streams = list(streams)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([s is not None and s.cancelled for s in self.streams], device=input_ids.device)
