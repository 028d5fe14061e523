"""Schemas for everything a caller hands to personalign, and the JSONL preference format.

The preference format is TRL's (``prompt``, ``chosen``, ``rejected``; plain text or chat
messages) plus a ``user`` column, and optional ``weight`` and ``created_at``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personalign.errors import ValidationError

USER_ID_MAX_LEN = 128
_USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")

Role = Literal["system", "user", "assistant"]


def validate_user_id(user_id: Any, field: str = "user") -> str:
    """Return ``user_id`` if it is a safe id, else raise :class:`ValidationError`.

    Safe ids are 1-128 characters of letters, digits and ``_ . @ + -``, start with a letter
    or digit, and contain no ``..``: they never act as paths.
    """
    fix = (
        f"use 1-{USER_ID_MAX_LEN} characters from letters, digits and '_.@+-', "
        "starting with a letter or digit (hash other ids first)"
    )
    if not isinstance(user_id, str):
        raise ValidationError(field, "must be a string", fix, user_id)
    if not user_id or len(user_id) > USER_ID_MAX_LEN:
        raise ValidationError(field, f"must be 1-{USER_ID_MAX_LEN} characters long", fix, user_id)
    if not _USER_ID_RE.fullmatch(user_id) or ".." in user_id:  # fullmatch: "$" would accept a trailing newline
        raise ValidationError(field, "contains characters that are not allowed", fix, user_id)
    return user_id


class ChatMessage(BaseModel):
    """One chat turn, as in the OpenAI and transformers chat formats."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str


def _non_blank(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} must not be empty or whitespace")
    return value


def messages_text(messages: Sequence[ChatMessage]) -> str:
    """The text of the last user turn, else every turn joined: what a conversation 'asks'."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return "\n".join(m.content for m in messages)


class Comparison(BaseModel):
    """One labelled preference: for ``prompt`` the user prefers ``chosen`` over ``rejected``.

    ``prompt`` is text or a list of chat messages (TRL's conversational format);
    ``chosen``/``rejected`` are response texts (a single assistant message in TRL's
    conversational format is read as its text by :func:`read_preferences`).
    ``weight`` scales the pair in losses (default 1). ``created_at`` is a UNIX time,
    stamped at enrolment when absent; it breaks relevance ties by recency.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | list[ChatMessage]
    chosen: str
    rejected: str
    weight: float = Field(default=1.0, gt=0.0)
    created_at: float | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | list[ChatMessage]) -> str | list[ChatMessage]:
        if isinstance(value, str):
            return _non_blank(value, "prompt")
        if not value:
            raise ValueError("prompt must have at least one message")
        if not any(m.content.strip() for m in value):
            raise ValueError("prompt messages must not all be empty")
        return value

    @field_validator("chosen", "rejected")
    @classmethod
    def _response_not_empty(cls, value: str, info: pydantic.ValidationInfo) -> str:
        return _non_blank(value, info.field_name or "response")

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("weight must be a finite number")
        return value

    @model_validator(mode="after")
    def _chosen_differs(self) -> Comparison:
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError("chosen and rejected must differ")
        return self

    @property
    def prompt_text(self) -> str:
        """The prompt as one text (the last user turn for chat prompts)."""
        return self.prompt if isinstance(self.prompt, str) else messages_text(self.prompt)

    def stamped(self, when: float | None = None) -> Comparison:
        """This comparison with ``created_at`` set (kept if already set)."""
        if self.created_at is not None:
            return self
        return self.model_copy(update={"created_at": time.time() if when is None else when})


class UserProfile(BaseModel):
    """Everything stored about a user besides memories: the evidence and the settings."""

    model_config = ConfigDict(extra="forbid")

    user_id: str
    comparisons: list[Comparison] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    version: int = 0

    @field_validator("user_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return validate_user_id(value, "user_id")


# Tags pydantic puts in an error's location for the members of ``Comparison.prompt``'s union.
_MESSAGES_TAG = "list[ChatMessage]"
_UNION_TAGS = {"str", _MESSAGES_TAG}


def _error_field(prefix: str, loc: tuple[Any, ...]) -> str:
    field = prefix
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else f".{part}"
    return field


def _fix_for(error: dict[str, Any], in_message: bool = False) -> str:
    loc = error.get("loc", ())
    kind = error.get("type", "")
    if kind == "missing":
        return "add the missing field"
    if kind == "extra_forbidden":
        if in_message or _MESSAGES_TAG in loc:
            return "remove this field (allowed in a chat message: role, content)"
        return "remove this field (allowed: prompt, chosen, rejected, weight, created_at)"
    if "weight" in loc:
        return "use a finite weight greater than 0"
    if "role" in loc:
        return "use one of 'system', 'user', 'assistant'"
    return "give a non-empty text (and make chosen differ from rejected)"


def convert_pydantic_error(prefix: str, err: pydantic.ValidationError) -> ValidationError:
    """Turn pydantic's error into ours, naming the first bad field and the fix.

    A value that matches no member of a union (``prompt: str | list[ChatMessage]``) yields one
    error per member; the most specific one (deepest location) is reported, without pydantic's
    union-member tags in the field path.
    """
    errors = err.errors()
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # max keeps the first of equals
    message = first.get("msg", "invalid").removeprefix("Value error, ")
    loc = tuple(part for part in first.get("loc", ()) if part not in _UNION_TAGS)
    return ValidationError(
        _error_field(prefix, loc), message, _fix_for(first, err.title == "ChatMessage"), first.get("input")
    )


def parse_comparisons(items: Iterable[Comparison | dict[str, Any]], field: str = "comparisons") -> list[Comparison]:
    """Validate every item (all before any is used); raise on the first bad one with its index."""
    parsed: list[Comparison] = []
    for index, item in enumerate(items):
        if isinstance(item, Comparison):
            parsed.append(item)
            continue
        if not isinstance(item, dict):
            raise ValidationError(
                f"{field}[{index}]", "must be a Comparison or a dict", "pass Comparison(prompt=..., chosen=..., rejected=...)", item
            )
        try:
            parsed.append(Comparison.model_validate(item))
        except pydantic.ValidationError as err:
            raise convert_pydantic_error(f"{field}[{index}]", err) from None
    if not parsed:
        raise ValidationError(field, "is empty", "pass at least one comparison")
    return parsed


def parse_messages(items: Iterable[ChatMessage | dict[str, Any]], field: str = "messages") -> list[ChatMessage]:
    """Validate a chat conversation: non-empty, roles known, ending with a user turn."""
    messages: list[ChatMessage] = []
    for index, item in enumerate(items):
        if isinstance(item, ChatMessage):
            messages.append(item)
            continue
        try:
            messages.append(ChatMessage.model_validate(item))
        except pydantic.ValidationError as err:
            raise convert_pydantic_error(f"{field}[{index}]", err) from None
    if not messages:
        raise ValidationError(field, "is empty", 'pass at least one message, e.g. [{"role": "user", "content": "..."}]')
    if messages[-1].role != "user":
        raise ValidationError(
            f"{field}[{len(messages) - 1}].role", "the last message must be from the user", "end with a user turn", messages[-1].role
        )
    return messages


# --- the JSONL preference format -------------------------------------------------------------


def _response_from_trl(value: Any, field: str) -> Any:
    """TRL's conversational rows hold ``chosen`` as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
            return value[0].get("content")
        raise ValidationError(field, "conversational responses must be one assistant message", "use a plain text or one assistant message", value)
    return value


def read_preferences(path: str | Path) -> list[tuple[str | None, Comparison]]:
    """Read a JSONL file in TRL's preference format with an optional ``user`` column.

    Returns ``(user, comparison)`` pairs; ``user`` is ``None`` where the column is absent.
    The whole file is validated before anything is returned.
    """
    rows: list[tuple[str | None, Comparison]] = []
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValidationError("data", f"{str(path)!r} {what}", "give the path of a JSONL file of comparisons (prompt, chosen, rejected, optional user)", str(path))
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValidationError(where, f"is not valid JSON ({err.msg})", "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValidationError(where, "is not a JSON object", "write one JSON object per line", row)
            user = row.pop("user", None)
            if user is not None:
                validate_user_id(user, f"{where}.user")
            for key in ("chosen", "rejected"):
                if key in row:
                    row[key] = _response_from_trl(row[key], f"{where}.{key}")
            try:
                rows.append((user, Comparison.model_validate(row)))
            except pydantic.ValidationError as err:
                raise convert_pydantic_error(where, err) from None
    return rows


def write_preferences(path: str | Path, rows: Iterable[tuple[str | None, Comparison]]) -> int:
    """Write ``(user, comparison)`` pairs as JSONL (TRL format plus ``user``); returns the row count."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for user, comparison in rows:
            record = comparison.model_dump(mode="json", exclude_none=True)
            if record.get("weight") == 1.0:
                record.pop("weight")
            if user is not None:
                record = {"user": user, **record}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
