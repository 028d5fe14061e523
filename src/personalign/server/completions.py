"""OpenAI's ``POST /v1/completions`` (raw-text continuation) and ``POST /v1/embeddings`` (the encoder).

Completions continue the prompt as raw text with the generator: no chat template, and nothing
personal (no profile, memories or steering; ``user`` is accepted and ignored). Decoding fields
are the chat's (``temperature`` omitted is the server's default, ``seed`` per row, ``stop``,
``logit_bias``, penalties) through :meth:`Personalizer.complete_batch`; ``logprobs`` (0-5) is
answered in the legacy shape. ``stream`` sends ``text_completion`` chunks, choice after choice,
as chat streams do (keep-alives, ``stop``, cancellation on disconnect). Embeddings are the sentence encoder the Personalizer already
holds (all-MiniLM-L6-v2 by default: 384 unit-norm floats), computed without the encoder's text
cache so their timing says nothing about what any tenant stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from personalign.server.asyncstream import AsyncTokenStream
from personalign.server.chat import KEEPALIVE, _cut_stream, _error_events, parse_stop
from personalign.server.config import ServerConfig
from personalign.server.controls import seeds
from personalign.server.errors import ApiError
from personalign.server.schemas import Number, RequestBody, StopText, StreamOptions, Usage
from personalign.server.stops import MAX_STOPS, StopScanner, cut

MAX_PROMPTS = 64
MAX_INPUTS = 256  # texts in one embeddings request
MAX_INPUT_CHARS = 8000


class CompletionRequest(RequestBody):
    """``POST /v1/completions``: continue ``prompt`` (a string or up to 64 strings) as raw text."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    prompt: (
        Annotated[StrictStr, Field(min_length=1)]
        | Annotated[
            list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)
        ]
    )
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="Default 16, as OpenAI")
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: StrictInt | None = Field(default=None, ge=1)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=1024
    )
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class EmbeddingRequest(RequestBody):
    """``POST /v1/embeddings``: one text or up to 256 (token-id inputs are refused: send text)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    input: (
        Annotated[StrictStr, Field(min_length=1, max_length=MAX_INPUT_CHARS)]
        | Annotated[
            list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_INPUT_CHARS)]], Field(min_length=1)
        ]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: StrictStr | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _legacy_logprobs(result: Any, tokenizer: Any, kept: int) -> dict[str, Any]:
    """The completions API's ``logprobs``: parallel lists of tokens, their logprobs, top alternatives and offsets."""
    items = [i for i in (result.logprobs or [])[:kept] if i.token not in set(tokenizer.all_special_ids or [])]
    tokens = [tokenizer.decode([i.token]) for i in items]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top = [{tokenizer.decode([t]): lp for t, lp in i.top} for i in items]
    return {
        "tokens": tokens,
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def add_routes(app: FastAPI, pz: Any, config: ServerConfig, model_names: set[str], reader: Any) -> None:
    """Register ``/v1/completions`` and ``/v1/embeddings`` on ``app`` (``reader``: the auth dependency)."""
    from personalign.server.controls import decoding_options

    embedding_names = {config.served_model, str(getattr(pz.encoder, "name", "")), "personalign-embedding"}
    app.state.embedding_names = embedding_names

    @app.post(
        "/v1/completions",
        response_model=Completion,
        tags=["openai"],
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "A completion, or SSE chunks with stream=true",
            }
        },
    )
    async def completions(body: CompletionRequest, who: Any = Depends(reader)) -> Completion:
        """Raw-text continuation of the prompt (no chat template and nothing personal)."""
        if body.model not in model_names:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here. Fix: use {config.served_model!r} (see GET /v1/models)",
                "model_not_found",
                "model",
            )
        for name, value, allowed in (("suffix", body.suffix, (None, "")),):
            if value not in allowed:
                raise ApiError(
                    400,
                    f"{name}={value!r} is not supported by /v1/completions here. Fix: leave it out",
                    "unsupported_parameter",
                    name,
                )
        if body.echo and body.logprobs is not None:
            raise ApiError(
                400,
                "echo with logprobs (the prompt's log-probabilities) is not supported. Fix: leave out echo or logprobs",
                "unsupported_parameter",
                "echo",
            )
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise ApiError(
                400,
                "best_of other than n is not supported. Fix: leave best_of out",
                "unsupported_parameter",
                "best_of",
            )
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if n * len(prompts) > config.max_choices * 8:
            raise ApiError(
                400,
                f"{len(prompts)} prompts x n={n} is over this server's {config.max_choices * 8} rows. Fix: send fewer",
                "invalid_value",
                "n",
            )
        stops = parse_stop(body.stop)
        max_new = min(body.max_tokens or 16, config.max_tokens_cap)
        options, _ = decoding_options(_as_chat(body), config.default_temperature)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) is not None:
                options[name] = float(getattr(body, name))
        if body.logprobs is not None:
            options["top_logprobs"] = body.logprobs
        if body.top_p is not None:
            options["top_p"] = body.top_p
        rows = [
            {"prompt": p, "max_new_tokens": max_new, **options, **({"seed": s} if s is not None else {})}
            for p in prompts
            for s in seeds(body.seed, n)
        ]
        if body.stream:
            await run_in_threadpool(pz.check_completions, rows)  # a bad request is a 400, not an error event
            loop = asyncio.get_running_loop()
            streams = [AsyncTokenStream(loop) for _ in rows]
            running = loop.run_in_executor(
                None, pz.complete_batch, [{**r, "stream": s} for r, s in zip(rows, streams, strict=True)]
            )
            running.add_done_callback(
                lambda f: (
                    [s.fail(f.exception()) for s in streams]
                    if not f.cancelled() and f.exception() is not None
                    else None
                )
            )
            plan = _StreamedCompletion(
                streams,
                [prompts[i // n] for i in range(len(rows))],
                stops,
                max_new,
                body,
                pz.generator.tokenizer,
                config.keepalive_s,
            )
            return StreamingResponse(
                plan.events(f"cmpl-{uuid.uuid4().hex}", int(time.time())),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        results = await run_in_threadpool(pz.complete_batch, rows)
        choices, completion = [], 0
        for index, result in enumerate(results):
            text, stopped = cut(result.text, stops)
            kept = (
                len(pz.generator.tokenizer(text, add_special_tokens=False)["input_ids"])
                if stopped
                else result.completion_tokens
            )
            finish = "stop" if stopped or result.completion_tokens < max_new else "length"
            logprobs = (
                _legacy_logprobs(result, pz.generator.tokenizer, kept) if body.logprobs is not None else None
            )
            shown = prompts[index // n] + text if body.echo else text
            choices.append(CompletionChoice(text=shown, index=index, logprobs=logprobs, finish_reason=finish))
            completion += kept
        prompt_tokens = sum(results[i * n].prompt_tokens for i in range(len(prompts)))
        usage = Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
        )
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=choices,
            usage=usage,
        )

    @app.post("/v1/embeddings", response_model=EmbeddingList, tags=["openai"])
    async def embeddings(body: EmbeddingRequest, who: Any = Depends(reader)) -> EmbeddingList:
        """The encoder's unit-norm vectors for the input texts (OpenAI's shape; ``encoding_format`` float or base64)."""
        if body.model not in embedding_names:
            raise ApiError(
                404,
                f"model {body.model!r} is not an embedding model here. Fix: use {config.served_model!r} or {pz.encoder.name!r}",
                "model_not_found",
                "model",
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MAX_INPUTS:
            raise ApiError(
                413,
                f"{len(texts)} inputs in one request; the limit is {MAX_INPUTS}. Fix: send them in parts",
                "request_too_large",
                "input",
            )
        dim = pz.encoder.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(
                400,
                f"dimensions={body.dimensions}, but this encoder gives {dim}. Fix: leave dimensions out or send {dim}",
                "invalid_value",
                "dimensions",
            )
        vectors = await run_in_threadpool(_encode, pz.encoder, texts)
        tokens = sum(
            len(ids) for ids in pz.encoder.model.tokenizer(texts, add_special_tokens=True)["input_ids"]
        )
        data = [Embedding(index=i, embedding=_format(v, body.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingList(
            data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )


class _StreamedCompletion:
    """The ``text_completion`` chunks of a streamed completion: each choice's text, then its finish chunk."""

    def __init__(
        self,
        streams: list[AsyncTokenStream],
        prompts: list[str],
        stops: list[str],
        max_new: int,
        body: CompletionRequest,
        tokenizer: Any,
        keepalive_s: float,
    ) -> None:
        self.streams, self.prompts, self.stops, self.max_new = streams, prompts, stops, max_new
        self.body, self.tokenizer, self.keepalive_s = body, tokenizer, keepalive_s

    async def events(self, completion_id: str, created: int) -> AsyncIterator[str]:
        def chunk(
            index: int | None, text: str, finish: str | None = None, logprobs: Any = None, usage: Any = None
        ) -> str:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": self.body.model,
            }
            payload["choices"] = (
                []
                if index is None
                else [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]
            )
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        prompt_tokens = completion = 0
        try:
            for index, stream in enumerate(self.streams):
                if self.body.echo:
                    yield chunk(index, self.prompts[index])
                scanner = StopScanner(self.stops)
                try:
                    async for piece in _cut_stream(stream, scanner, self.keepalive_s):
                        yield KEEPALIVE if piece is None else chunk(index, piece)
                except Exception as err:
                    for line in _error_events(err, completion_id):
                        yield line
                    return
                result = stream.result
                text = scanner.text[: scanner.shown]
                kept = (
                    len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                    if scanner.stopped
                    else result.completion_tokens
                )
                finish = "stop" if scanner.stopped or result.completion_tokens < self.max_new else "length"
                logprobs = (
                    _legacy_logprobs(result, self.tokenizer, kept) if self.body.logprobs is not None else None
                )
                yield chunk(index, "", finish, logprobs)
                completion += kept
                if index % max(1, self.body.n or 1) == 0:
                    prompt_tokens += result.prompt_tokens
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield chunk(
                    None,
                    "",
                    usage={
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion,
                        "total_tokens": prompt_tokens + completion,
                    },
                )
            yield "data: [DONE]\n\n"
        finally:
            for stream in self.streams:
                stream.cancel()


def _encode(encoder: Any, texts: list[str]) -> np.ndarray:
    """``(len(texts), dim)`` unit vectors, bypassing the encoder's shared text cache (no cross-tenant timing signal)."""
    return encoder.model.encode(
        texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    ).astype(np.float32)


def _format(vector: np.ndarray, encoding: str) -> list[float] | str:
    return (
        base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        if encoding == "base64"
        else [float(x) for x in vector]
    )


def _as_chat(body: CompletionRequest) -> Any:
    """The decoding fields of a completion request in the chat request's shape (for :func:`decoding_options`)."""
    from personalign.server.schemas import ChatCompletionRequest

    fields = {
        k: getattr(body, k)
        for k in ("temperature", "logit_bias", "presence_penalty", "frequency_penalty")
        if getattr(body, k) is not None
    }
    return ChatCompletionRequest(model=body.model, messages=[{"role": "user", "content": "-"}], **fields)
