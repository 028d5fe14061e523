"""``POST /v1/chat/completions``: validation, batching, streaming, tools and the ``personalign`` block."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

import pydantic
from fastapi import FastAPI, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from personalign.errors import ValidationError
from personalign.personalizer import ConditioningParams, GenerationParams
from personalign.server.app import USER_HEADER, Reader, chat_user
from personalign.server.asyncstream import AsyncTokenStream
from personalign.server.chat import EarlyStop, StreamPlan, answer, choices, parse_stop, sse, usage
from personalign.server.config import Principal
from personalign.server.controls import decoding_options, seeds, tool_messages
from personalign.server.errors import ApiError
from personalign.server.schemas import (
    IGNORED,
    UNSUPPORTED,
    ChatCompletion,
    ChatCompletionRequest,
    Personalisation,
    Usage,
)
from personalign.server.tools import ToolPlan
from personalign.steering.schema import parse_steering
from personalign.types import convert_pydantic_error, parse_messages


def install(app: FastAPI, ctx: Any) -> None:
    """Add the routes (``ctx``: what ``create_app`` shares with them, see ``RouteContext``)."""
    pz, config, batcher, model_names, warn_unknown, count_tokens = (
        ctx.pz,
        ctx.config,
        ctx.batcher,
        ctx.model_names,
        ctx.warn_unknown,
        ctx.count_tokens,
    )
    # --- chat ------------------------------------------------------------------------------------

    def sdk_request(
        body: ChatCompletionRequest, who: Principal, user: str | None, source: str | None
    ) -> tuple[dict[str, Any], dict[str, int] | None, ToolPlan | None]:
        """The ``respond_batch`` request, ``{"requested", "applied"}`` when ``max_tokens`` was lowered to the cap, and the tools' plan."""
        if body.model not in model_names:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here. Fix: use {config.served_model!r} (see GET /v1/models)",
                "model_not_found",
                "model",
            )
        for name, allowed in UNSUPPORTED.items():
            value = (body.model_extra or {}).get(name)
            if value not in allowed:
                raise ApiError(
                    400,
                    f"{name}={value!r} is not supported by this server. Fix: leave it out",
                    "unsupported_parameter",
                    name,
                )
        warn_unknown(set(body.model_extra or {}) - set(UNSUPPORTED) - IGNORED)
        if (
            body.max_tokens is not None
            and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens
        ):
            raise ApiError(
                400,
                "max_tokens and max_completion_tokens disagree. Fix: send one of them",
                "invalid_value",
                "max_tokens",
            )
        if body.n is not None and body.n > config.max_choices:
            raise ApiError(
                400,
                f"n={body.n} exceeds this server's cap of {config.max_choices} choices. Fix: ask for fewer",
                "invalid_value",
                "n",
            )
        max_new = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
        clamped = None
        if max_new > config.max_tokens_cap:  # as OpenAI-compatible servers do: answer, and say so
            clamped, max_new = {"requested": max_new, "applied": config.max_tokens_cap}, config.max_tokens_cap
        options, tools = decoding_options(body, config.default_temperature)
        request: dict[str, Any] = {
            "user": None if user is None else who.store_id(user, source or "user"),
            "messages": tool_messages([m.as_sdk() for m in body.messages], tools),
            "max_new_tokens": max_new,
            **body.options(),
            **options,
        }
        if body.steer is not None:
            request["steer"] = body.steer
        return request, clamped, tools

    def prevalidate(request: dict[str, Any]) -> str | None:
        """Everything ``respond_batch`` would reject, checked before the request joins a batch.

        A user with no profile is answered generically (``request["user"]`` becomes ``None``);
        the return value says why, for the response's ``personalign.note``.
        """
        parse_messages(request["messages"])
        if "steer" in request:
            parse_steering(request["steer"])
        for model, name in ((GenerationParams, "generation"), (ConditioningParams, "conditioning")):
            values = {k: v for k, v in request.items() if k in model.model_fields}
            try:
                model.model_validate(values)
            except pydantic.ValidationError as err:
                bad = convert_pydantic_error(
                    name, err
                )  # named as the body names it: "rerank", not "conditioning.rerank"
                raise ValidationError(
                    bad.field.removeprefix(f"{name}."), bad.problem, bad.fix, bad.value
                ) from None
        if request["user"] is None or pz.is_enrolled(request["user"]):
            return None
        request["user"] = None  # nothing is read or written for this user
        return "no profile for this user (no comparisons or memories yet): the generic answer, and nothing was stored"

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        tags=["openai"],
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "A completion, or SSE chunks with stream=true",
            }
        },
    )
    async def chat_completions(
        body: ChatCompletionRequest,
        who: Reader,
        x_personalign_user: Annotated[
            str | None, Header(alias=USER_HEADER, description="The user, when the body names none")
        ] = None,
    ) -> Any:
        user, source = chat_user(body, x_personalign_user)
        request, clamped, tools = sdk_request(body, who, user, source)
        stops = parse_stop(body.stop)
        n = body.n or 1
        with batcher.arriving():
            note = await run_in_threadpool(prevalidate, request)
            # n choices are n rows of one respond_batch call; greedy with nothing sampled gives n equal rows, so one is run.
            greedy = not request.get("temperature") and request.get("rerank", 0) < 2
            rows = 1 if greedy else n
            loop = asyncio.get_running_loop()
            streams = [AsyncTokenStream(loop) for _ in range(rows)] if body.stream else []
            # Streams join batches too: their tokens are routed out of the shared generate call.
            # A whole reply with stop strings is streamed unread, to stop generating at the first one.
            quiet = (
                [EarlyStop(stops) for _ in range(rows)]
                if stops and not streams and request.get("rerank", 0) < 2
                else []
            )
            # each choice samples with its own seed (derived from the request's), whatever shares its batch
            row_requests = [
                request if s is None else {**request, "seed": s} for s in seeds(request.get("seed"), rows)
            ]
            watched = streams or quiet
            future = batcher.submit_group(
                [{**r, "stream": s} for r, s in zip(row_requests, watched, strict=True)]
                if watched
                else row_requests
            )
        for stream in streams:
            # A request its batch rejected before generating never reaches the streamer: end its stream too.
            future.add_done_callback(
                lambda f, stream=stream: stream.fail(f.exception()) if f.exception() is not None else None
            )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def personalisation(results: list[Any]) -> Personalisation:
            first = results[0]
            return Personalisation(
                user=user,
                user_source=source,
                user_known=request["user"] is not None,
                memories=first.memories,
                shots=len(first.shots),
                steer=first.steer,
                note=note,
                personalization=first.personalization,
                personalization_by_choice=[r.personalization for r in results] if len(results) > 1 else None,
                max_tokens_clamped=clamped,
            )

        max_new = request["max_new_tokens"]
        if streams:
            usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
            logprob_tokenizer = pz.generator.tokenizer if body.logprobs else None
            plan = StreamPlan(
                streams,
                n,
                stops,
                max_new,
                usage_chunk,
                count_tokens,
                personalisation,
                config.keepalive_s,
                tools,
                logprob_tokenizer,
            )
            return StreamingResponse(
                sse(plan, completion_id, now, config.served_model),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        results = await asyncio.wrap_future(future)
        results = results * n if len(results) < n else results
        answers = [answer(r, max_new, stops, count_tokens) for r in results]
        return ChatCompletion(
            id=completion_id,
            created=now,
            model=config.served_model,
            choices=choices(answers, results, tools, pz.generator.tokenizer if body.logprobs else None),
            usage=Usage(**usage(results, answers)),
            personalign=personalisation(results),
        )
