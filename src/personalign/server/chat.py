"""The chat endpoint's answers: choices from ``ChatResult``s, cut at ``stop``, whole or as server-sent events.

A chat with ``n`` choices is ``n`` rows of one ``respond_batch`` call, or, when the request is
greedy and nothing samples, one row answered ``n`` times (greedy decoding gives ``n`` equal
rows anyway). ``stop`` is applied to each choice's text (:mod:`personalign.server.stops`); a
row whose text reaches a stop string stops generating (:class:`EarlyStop` for whole replies,
the stream itself for streamed ones).
A stream sends its choices one after the other, each with its ``index``; all of them were
generated together, so the later ones are already waiting when the first ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from personalign.errors import PersonalignError, UnknownUserError
from personalign.server import errors
from personalign.server.asyncstream import AsyncTokenStream
from personalign.server.controls import logprobs_out, tool_calls
from personalign.server.errors import ApiError
from personalign.server.schemas import ChatMessageOut, Choice, Personalisation
from personalign.server.stops import MAX_STOP_CHARS, MAX_STOPS, StopScanner, cut
from personalign.server.tools import ToolPlan
from personalign.streaming import TokenStream

log = logging.getLogger("personalign.server")

CountTokens = Callable[[str], int]


def parse_stop(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings (``None``, ``""`` and ``[]``: none), checked as OpenAI does, plus a length cap."""
    if stop is None or stop == "":
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise ApiError(
            400,
            f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed. Fix: send fewer",
            "invalid_value",
            "stop",
        )
    for index, text in enumerate(stops):
        where = "stop" if isinstance(stop, str) else f"stop[{index}]"
        if not text:
            raise ApiError(
                400, f"{where} is empty. Fix: leave it out or send a non-empty string", "invalid_value", where
            )
        if len(text) > MAX_STOP_CHARS:
            raise ApiError(
                400,
                f"{where} has {len(text)} characters; at most {MAX_STOP_CHARS}. Fix: send a shorter stop string",
                "invalid_value",
                where,
            )
    return stops


class EarlyStop(TokenStream):
    """The stream of a row answered whole: nobody reads it, but once the reply's text reaches a
    stop string the row is cancelled, so generating ends there instead of at ``max_tokens``.

    The text scanned is the reply as it will be returned (stripped, as
    :func:`personalign.streaming.strip_stream` gives it), so the cut falls where :func:`cut` puts it in the final text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        super().__init__()
        self.scanner = StopScanner(stops)
        self._started = False
        self._pending = ""  # trailing whitespace, scanned once more text follows it

    def put(self, piece: str) -> None:
        if self.scanner.stopped:
            return
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return
            self._started = True
        text = self._pending + piece
        body = text.rstrip()
        self._pending = text[len(body) :]
        if body:
            self.scanner.feed(body)
        if self.scanner.stopped:
            self.cancel()


@dataclass(frozen=True)
class Answer:
    """One choice: its text (cut at a stop string), finish reason and completion tokens."""

    text: str
    finish: str
    completion_tokens: int


def answer(result: Any, max_new_tokens: int, stops: Sequence[str], count_tokens: CountTokens) -> Answer:
    """A ``ChatResult`` as a choice. A reply cut at a stop string counts the tokens of the text kept."""
    text, stopped = cut(result.text, stops)
    if stopped:
        return Answer(text, "stop", count_tokens(text))
    return Answer(
        text, "length" if result.completion_tokens >= max_new_tokens else "stop", result.completion_tokens
    )


def choices(
    answers: Sequence[Answer],
    results: Sequence[Any] = (),
    tools: ToolPlan | None = None,
    logprob_tokenizer: Any = None,
) -> list[Choice]:
    """The choices of a whole reply: text or tool calls (:func:`tool_calls`), and logprobs when a tokenizer is given."""
    out = []
    for i, a in enumerate(answers):
        content, calls, finish = tool_calls(a.text, a.finish, tools)
        logprobs = (
            logprobs_out(results[i], a.completion_tokens, logprob_tokenizer)
            if logprob_tokenizer is not None
            else None
        )
        out.append(
            Choice(
                index=i,
                message=ChatMessageOut(content=content, tool_calls=calls),
                finish_reason=finish,
                logprobs=logprobs,
            )
        )  # type: ignore[arg-type]
    return out


def usage(results: Sequence[Any], answers: Sequence[Answer]) -> dict[str, int]:
    """OpenAI's counts: the prompt once, the completion tokens of every choice."""
    prompt, completion = results[0].prompt_tokens, sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class StreamPlan:
    """What a streamed chat sends: ``n`` choices from ``streams`` (one stream answers all ``n`` when it is the only one)."""

    streams: list[AsyncTokenStream]
    n: int
    stops: list[str]
    max_new_tokens: int
    include_usage: bool
    count_tokens: CountTokens
    personalisation: Callable[[Sequence[Any]], Personalisation]
    keepalive_s: float = 15.0
    tools: ToolPlan | None = None  # with tools in play each reply is held back whole: it may be a call
    logprob_tokenizer: Any = (
        None  # set when the request asked for logprobs: they go with each choice's finish chunk
    )


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it


async def sse(plan: StreamPlan, completion_id: str, created: int, model: str) -> AsyncIterator[str]:
    """OpenAI ``chat.completion.chunk`` events for a stream, ending in ``data: [DONE]``.

    Each choice gets a role chunk, its text and a finish chunk; the last finish chunk carries
    the ``personalign`` object. With ``include_usage`` a last chunk with empty ``choices``
    carries the token counts. With ``logprobs``, each choice's finish chunk carries the
    log-probabilities of all its tokens (clients join the ``content`` lists of the chunks). While
    no text arrives for ``keepalive_s`` (queued behind other batches), a ``: keep-alive`` comment is sent. If the client disconnects, the response task
    is cancelled, and with it every row of the stream. With tools, a choice's reply is sent
    whole when it is complete: as ``tool_calls`` deltas (finish ``tool_calls``) or as text.
    """

    def event(
        index: int | None,
        delta: dict[str, str] | None,
        finish: str | None = None,
        extra: dict[str, Any] | None = None,
        logprobs: Any = None,
    ) -> str:
        chunk: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        chunk["choices"] = (
            []
            if delta is None
            else [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
        )
        chunk.update(extra or {})
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    results: list[Any] = []
    answers: list[Answer] = []
    try:
        for index in range(plan.n):
            yield event(index, {"role": "assistant", "content": ""})
            if index < len(plan.streams):
                scanner = StopScanner(plan.stops)
                try:
                    async for piece in _cut_stream(plan.streams[index], scanner, plan.keepalive_s):
                        if piece is None:
                            yield KEEPALIVE
                        elif plan.tools is None:
                            yield event(index, {"content": piece})
                except Exception as err:
                    for line in _error_events(err, completion_id):
                        yield line
                    return
                result = plan.streams[index].result
                if scanner.stopped:
                    text = scanner.text[: scanner.shown]
                    kept = Answer(text, "stop", plan.count_tokens(text))
                else:
                    kept = answer(result, plan.max_new_tokens, (), plan.count_tokens)
            else:  # greedy: the one row's reply again
                result, kept = results[0], answers[0]
                if kept.text and plan.tools is None:
                    yield event(index, {"content": kept.text})
            finish = kept.finish
            if plan.tools is not None:
                content, calls, finish = tool_calls(kept.text, kept.finish, plan.tools)
                if calls:
                    yield event(index, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})  # type: ignore[dict-item]
                elif content:
                    yield event(index, {"content": content})
            results.append(result)
            answers.append(kept)
            last = index == plan.n - 1
            extra = {"personalign": plan.personalisation(results).model_dump()} if last else None
            logprobs = (
                logprobs_out(result, kept.completion_tokens, plan.logprob_tokenizer).model_dump()
                if plan.logprob_tokenizer is not None
                else None
            )
            yield event(index, {}, finish, extra, logprobs)
        if plan.include_usage:
            yield event(None, None, extra={"usage": usage(results, answers)})
        yield "data: [DONE]\n\n"
    finally:
        for stream in plan.streams:
            stream.cancel()  # a no-op once the row is done; stops generating for a client that left


async def _cut_stream(
    stream: AsyncTokenStream, scanner: StopScanner, keepalive_s: float
) -> AsyncIterator[str | None]:
    """The stream's pieces up to its first stop string (``None``: a keep-alive is due); then its row is cancelled and its result awaited."""
    async for piece in stream.pieces(keepalive_s):
        if piece is None:
            yield None
            continue
        shown = scanner.feed(piece)
        if shown:
            yield shown
        if scanner.stopped:
            stream.cancel()  # generating further is wasted; the row ends with its batch's next step
            async for rest in stream.pieces(
                keepalive_s
            ):  # wait for the result (memories, shots, steering) the finish chunk reports
                if rest is None:
                    yield None
            return
    rest = scanner.flush()
    if rest:
        yield rest


def _error_events(err: Exception, completion_id: str) -> Iterator[str]:
    if isinstance(
        err, PersonalignError
    ):  # rejected when its batch was prepared (e.g. the user was forgotten meanwhile)
        status, kind = (
            (404, "not_found") if isinstance(err, UnknownUserError) else (400, "invalid_request_error")
        )
        body = errors.error_body(status, str(err), kind)
    else:
        log.exception("stream %s failed", completion_id)
        body = errors.error_body(
            500, "generation failed mid-stream (the server log has the traceback)", "internal_error"
        )
    yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
