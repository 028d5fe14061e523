"""OpenAI's ``tools`` and ``tool_choice`` for a model without a tool-calling template of its own.

The tools are described to the model in a system message (:func:`tools_prompt`), and a call is
written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen convention
most open chat templates use). How a call comes out depends on ``tool_choice``:

- ``"required"`` or a named function: the reply is decoded under a JSON schema of one call
  (:func:`call_schema`, through the same constrained decoder as ``response_format``), so it is
  always a well-formed call of an offered function with arguments that match its ``parameters``;
  the choice answers ``tool_calls`` and ``finish_reason: "tool_calls"``.
- ``"auto"`` (the default with tools): the model answers freely; a reply holding
  ``<tool_call>{...}</tool_call>`` naming an offered function is returned as that call
  (:func:`parse_auto`), any other reply as text. A weak model may never call.
- ``"none"``: the tools are not shown to the model.

Earlier turns round-trip: an assistant turn's ``tool_calls`` are rendered with :func:`call_text`
and a ``tool`` turn becomes a user turn quoting the result.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from personalign.server.errors import ApiError

_AUTO_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    """What a chat's tools do: the system text to add, the grammar of a forced call, whether replies are parsed."""

    prompt: str | None
    grammar: dict[str, Any] | None  # for "required" and named functions
    names: tuple[str, ...]
    forced: bool


def call_text(name: str, arguments: str | dict[str, Any]) -> str:
    """A call as the model is shown and asked to write it."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        args = arguments
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}</tool_call>"


def tools_prompt(tools: Sequence[Any], forced: bool) -> str:
    """The system text offering ``tools`` (OpenAI ``Tool`` models) to the model."""
    listing = "\n".join(
        json.dumps(
            {
                "name": t.function.name,
                "description": t.function.description or "",
                "parameters": t.function.parameters or {},
            }
        )
        for t in tools
    )
    how = (
        "Reply with one function call as JSON"
        if forced
        else 'To call a function, reply only with <tool_call>{"name": ..., "arguments": {...}}</tool_call>; otherwise answer normally'
    )
    return f"You can call these functions:\n{listing}\n{how}."


def call_schema(tools: Sequence[Any]) -> dict[str, Any]:
    """A JSON schema every call of one of ``tools`` matches: ``{"name": <const>, "arguments": <its parameters>}``."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def plan_tools(tools: Sequence[Any] | None, choice: Any) -> ToolPlan | None:
    """The plan for a request's ``tools`` and ``tool_choice`` (``None``: no tools in play)."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(
                400,
                "tool_choice needs tools. Fix: send tools, or leave tool_choice out",
                "invalid_value",
                "tool_choice",
            )
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(
            400, "two tools share a name. Fix: give each function a unique name", "invalid_value", "tools"
        )
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        return ToolPlan(tools_prompt(tools, forced=False), None, tuple(names), forced=False)
    if choice == "required":
        chosen = list(tools)
    else:
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise ApiError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not among tools. Fix: name one of {names}",
                "invalid_value",
                "tool_choice",
            )
    return ToolPlan(
        tools_prompt(chosen, forced=True),
        {"json_schema": call_schema(chosen)},
        tuple(t.function.name for t in chosen),
        forced=True,
    )


def with_prompt(messages: list[dict[str, str]], prompt: str) -> list[dict[str, str]]:
    """``messages`` with ``prompt`` added to the system message (one is inserted when there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}".strip()}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def new_call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_forced(text: str) -> dict[str, Any] | None:
    """The call in a reply decoded under :func:`call_schema` (``None`` when it was cut short)."""
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    return new_call(payload["name"], payload["arguments"])


def parse_auto(text: str, names: Sequence[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """A free reply's ``<tool_call>`` blocks naming offered functions, and the text left around them."""
    calls = []
    for match in _AUTO_CALL.finditer(text):
        try:
            payload = json.loads(match.group(1))
        except ValueError:
            continue
        if (
            isinstance(payload, dict)
            and payload.get("name") in names
            and isinstance(payload.get("arguments", {}), dict)
        ):
            calls.append(new_call(payload["name"], payload.get("arguments", {})))
    if not calls:
        return text, []
    rest = _AUTO_CALL.sub("", text).strip()
    return rest or None, calls
