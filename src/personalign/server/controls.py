"""OpenAI's decoding fields of a chat, as ``respond_batch`` options, and what they add to a choice.

``temperature`` omitted is OpenAI's 1.0 (the server's ``default_temperature``), so an unseeded
request samples; send ``temperature: 0`` for greedy, reproducible replies, or a ``seed``, which
gives each choice its own ``torch.Generator`` (the same reply whatever shares the batch, up to
floating-point differences from padding). ``logit_bias``, ``presence_penalty``,
``frequency_penalty``, ``logprobs``/``top_logprobs``, ``response_format`` and forced tool calls
run in :class:`personalign.steering.decoding.RowDecoder`, one row at a time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from personalign.server.errors import ApiError
from personalign.server.schemas import ChatCompletionRequest, ChoiceLogprobs
from personalign.server.tools import ToolPlan, parse_auto, parse_forced, plan_tools, with_prompt

# A logit_bias key: a token id as a string, as OpenAI's (the schema states this pattern).
TOKEN_ID = re.compile(r" *-?[0-9]{1,12} *")


def decoding_options(
    body: ChatCompletionRequest, default_temperature: float
) -> tuple[dict[str, Any], ToolPlan | None]:
    """The ``respond_batch`` options for OpenAI's decoding fields, and the tools' plan (checked; 400s name the field)."""
    options: dict[str, Any] = {
        "temperature": float(default_temperature if body.temperature is None else body.temperature)
    }
    if body.logit_bias:
        bias = {}
        for key, value in body.logit_bias.items():
            if not TOKEN_ID.fullmatch(key):  # int() would also take "--5"'s cousins: "٣", "1_0", " +5"
                raise ApiError(
                    400,
                    f'logit_bias key {key[:32]!r} is not a token id. Fix: use token ids as strings, e.g. {{"50256": -100}}',
                    "invalid_value",
                    "logit_bias",
                )
            bias[int(key)] = float(value)
        options["logit_bias"] = bias
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(
            400,
            "top_logprobs needs logprobs=true. Fix: send logprobs=true, or leave top_logprobs out",
            "invalid_value",
            "top_logprobs",
        )
    if body.logprobs:
        options["top_logprobs"] = body.top_logprobs or 0
    tools = plan_tools(body.tools, body.tool_choice)
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if tools is not None and tools.forced:
            raise ApiError(
                400,
                "response_format and a forced tool call cannot both constrain the reply. Fix: send one of them",
                "invalid_value",
                "response_format",
            )
        if fmt.type == "json_object":
            options["grammar"] = {"json_object": True}
        else:
            if fmt.json_schema is None or not fmt.json_schema.schema_:
                raise ApiError(
                    400,
                    'response_format json_schema needs a schema. Fix: send {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                    "invalid_value",
                    "response_format.json_schema",
                )
            options["grammar"] = {"json_schema": fmt.json_schema.schema_}
    if tools is not None and tools.grammar is not None:
        options["grammar"] = tools.grammar
    return options, tools


def tool_messages(messages: list[dict[str, str]], tools: ToolPlan | None) -> list[dict[str, str]]:
    return messages if tools is None or tools.prompt is None else with_prompt(messages, tools.prompt)


def tool_calls(
    text: str, finish: str, tools: ToolPlan | None
) -> tuple[str | None, list[dict[str, Any]] | None, str]:
    """A choice's ``content``, ``tool_calls`` and ``finish_reason`` for its reply text."""
    if tools is None:
        return text, None, finish
    if tools.forced:
        call = parse_forced(text) if finish == "stop" else None
        return (None, [call], "tool_calls") if call is not None else (text, None, finish)
    content, calls = parse_auto(text, tools.names)
    return (content, calls, "tool_calls") if calls else (text, None, finish)


def logprobs_out(result: Any, kept_tokens: int, tokenizer: Any) -> ChoiceLogprobs:
    """OpenAI's ``choice.logprobs`` for a reply's first ``kept_tokens`` tokens (end-of-turn tokens left out)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "backslashreplace"))}

    content = [
        {**entry(item.token, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}
        for item in (result.logprobs or [])[:kept_tokens]
        if item.token not in special
    ]
    return ChoiceLogprobs.model_validate({"content": content})


def seeds(seed: int | None, rows: int) -> Sequence[int | None]:
    """Each choice's seed: the request's for the first, distinct derived ones for the others."""
    from personalign.steering.decoding import derived_seed

    return [None if seed is None else derived_seed(seed, i) for i in range(rows)]
