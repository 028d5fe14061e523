"""Schemas for everything a caller hands to personalign, and the preference format.

The preference format is TRL's (``prompt``, ``chosen``, ``rejected``; plain text or chat
messages) plus a ``user`` column, and optional ``weight`` and ``created_at``. Every TRL
preference layout is read (standard or conversational, explicit or implicit prompt; see
:func:`comparison_from_row`) by :func:`parse_comparisons` (``enroll`` and HTTP),
:func:`read_preferences` (JSONL files) and :func:`from_dataset` (``datasets``); rows are written
in the explicit layout TRL's trainers take (:func:`preference_record`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from personalign.errors import ValidationError

USER_ID_MAX_LEN = 128
_USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")

Role = Literal["system", "user", "assistant"]
ExtraColumns = Literal["error", "metadata", "ignore"]

COLUMNS = ("prompt", "chosen", "rejected", "weight", "created_at", "metadata")
"""The fields of a :class:`Comparison`; a preference row adds ``user``."""
ROW_COLUMNS = ("user", *COLUMNS)


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
    if (
        not _USER_ID_RE.fullmatch(user_id) or ".." in user_id
    ):  # fullmatch: "$" would accept a trailing newline
        raise ValidationError(field, "contains characters that are not allowed", fix, user_id)
    return user_id


class ChatMessage(BaseModel):
    """One chat turn, as in the OpenAI and transformers chat formats."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, value: str) -> str:
        return _unicode(value, "content")


def _non_blank(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} must not be empty or whitespace")
    return _unicode(value, name)


def _unicode(value: str, name: str) -> str:
    """``value`` unless it holds an unpaired UTF-16 surrogate (``"\\ud800"``), which tokenizers and encoders
    reject with a bare ``TypeError``."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{name} contains an unpaired UTF-16 surrogate; pass valid Unicode text"
            ) from None
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
    ``chosen``/``rejected`` are response texts (TRL's conversational responses, one assistant
    message each, are read as their text by :func:`parse_comparisons` and the readers).
    ``weight`` scales the pair in losses (default 1). ``created_at`` is a UNIX time,
    stamped at enrolment when absent; it breaks relevance ties by recency. ``metadata`` holds
    JSON values carried along unused (a dataset's extra columns, such as ``prompt_id`` or
    ``score_chosen``); it is written back as those columns.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | list[ChatMessage]
    chosen: str
    rejected: str
    weight: float = Field(default=1.0, gt=0.0)
    created_at: float | None = None
    metadata: dict[str, JsonValue] | None = None

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

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        clash = sorted(set(value or {}) & set(ROW_COLUMNS))
        if clash:
            raise ValueError(f"metadata keys {clash} are column names of the preference format; rename them")
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
        return "remove this field, or put it under metadata (allowed: prompt, chosen, rejected, weight, created_at, metadata)"
    if "weight" in loc:
        return "use a finite weight greater than 0"
    if "role" in loc:
        return "use one of 'system', 'user', 'assistant'"
    ctx = error.get("ctx") or {}
    bounds = {
        "greater_than": ("gt", "greater than"),
        "greater_than_equal": ("ge", "at least"),
        "less_than": ("lt", "less than"),
        "less_than_equal": ("le", "at most"),
    }
    if kind in bounds and bounds[kind][0] in ctx:
        key, words = bounds[kind]
        return f"use a value {words} {ctx[key]}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "use a whole number"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return "use a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return "use true or false"
    if kind == "literal_error" and "expected" in ctx:
        return f"use one of {ctx['expected']}"
    if any(part in loc for part in ("prompt", "chosen", "rejected", "content", "text")) or kind.startswith(
        "string"
    ):
        return (
            "give a non-empty text (and make chosen differ from rejected)"
            if {"chosen", "rejected"} & set(map(str, loc))
            else "give a non-empty text"
        )
    return "fix the value as the message says"


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


def parse_comparisons(
    items: Iterable[Comparison | Mapping[str, Any]], field: str = "comparisons", extra: ExtraColumns = "error"
) -> list[Comparison]:
    """Validate every item (all before any is used); raise on the first bad one with its index.

    Dict items may be in any TRL preference layout (:func:`comparison_from_row`). Unknown keys
    are refused by default (a typo is not silently dropped); ``extra="metadata"`` keeps them
    under ``metadata`` and ``extra="ignore"`` drops them.
    """
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise ValidationError(
            field,
            "must be a list of comparisons",
            "pass [Comparison(prompt=..., chosen=..., rejected=...)] or TRL-format dicts",
            items if not isinstance(items, str) else items[:40],
        )
    parsed: list[Comparison] = []
    for index, item in enumerate(items):
        if isinstance(item, Comparison):
            parsed.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ValidationError(
                f"{field}[{index}]",
                "must be a Comparison or a dict",
                "pass Comparison(prompt=..., chosen=..., rejected=...)",
                item,
            )
        parsed.append(comparison_from_row(item, f"{field}[{index}]", extra))
    if not parsed:
        raise ValidationError(field, "is empty", "pass at least one comparison")
    return parsed


def parse_messages(
    items: Iterable[ChatMessage | dict[str, Any]], field: str = "messages"
) -> list[ChatMessage]:
    """Validate a chat conversation: non-empty, roles known, ending with a user turn."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise ValidationError(
            field,
            "must be a list of messages",
            'pass e.g. [{"role": "user", "content": "..."}]',
            items if not isinstance(items, str) else items[:40],
        )
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
        raise ValidationError(
            field, "is empty", 'pass at least one message, e.g. [{"role": "user", "content": "..."}]'
        )
    if messages[-1].role != "user":
        raise ValidationError(
            f"{field}[{len(messages) - 1}].role",
            "the last message must be from the user",
            "end with a user turn",
            messages[-1].role,
        )
    return messages


# --- TRL's preference layouts --------------------------------------------------------------

_ONE_RESPONSE_FIX = (
    "keep one assistant message in each of chosen and rejected; earlier turns belong in the prompt"
)


def _as_messages(value: Any) -> list[dict[str, Any]] | None:
    """``value`` as a list of message dicts when it is a conversation (TRL's test: a list of dicts with a role)."""
    if not isinstance(value, list) or not value:
        return None
    messages = [m.model_dump() if isinstance(m, ChatMessage) else m for m in value]
    if all(isinstance(m, Mapping) and "role" in m for m in messages):
        return [dict(m) for m in messages]
    return None


def _one_response(value: Any, field: str) -> Any:
    """A conversational response, one assistant message, as its text; anything else unchanged for validation."""
    if not isinstance(value, list):
        return value
    messages = _as_messages(value)
    if messages is None or len(messages) != 1 or messages[0].get("role") != "assistant":
        raise ValidationError(
            field, "conversational responses must be one assistant message", _ONE_RESPONSE_FIX, value
        )
    return messages[0].get("content")


def _shared_prefix(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences (messages or characters)."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    return n


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit text prompt: ``(prompt, chosen, rejected)`` from the shared leading text.

    As ``trl.extract_prompt``: the prompt is the longest common prefix of the two texts, less
    one space just before the responses start (the responses keep it).
    """
    n = _shared_prefix(chosen, rejected)
    if 0 < n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _explicit(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring a row in any TRL preference layout to an explicit prompt and one response text each.

    - conversational ``chosen``/``rejected`` (message lists): the turns both share move to the
      end of the prompt (the implicit prompt when there is none); what is left must be one
      assistant message each. A text ``prompt`` beside a conversation that holds the prompt too
      (``ultrafeedback_binarized``) must equal its last user turn and is replaced by it.
    - text ``chosen``/``rejected`` without ``prompt``: the shared leading text is the prompt.
    """
    chosen, rejected = row.get("chosen"), row.get("rejected")
    chosen_turns, rejected_turns = _as_messages(chosen), _as_messages(rejected)
    if chosen_turns is not None and rejected_turns is not None:
        n = _shared_prefix(chosen_turns, rejected_turns)
        prompt = row.get("prompt")
        prompt_turns = _as_messages(prompt)
        if prompt_turns is not None:
            row["prompt"] = prompt_turns + chosen_turns[:n]
        elif n:
            shared = chosen_turns[:n]
            asked = next((m.get("content") for m in reversed(shared) if m.get("role") == "user"), None)
            if isinstance(prompt, str) and not (isinstance(asked, str) and prompt.strip() == asked.strip()):
                raise ValidationError(
                    f"{where}.prompt",
                    "differs from the prompt turns that chosen and rejected share",
                    "drop the prompt column, or make it the conversation's last user turn",
                    prompt,
                )
            row["prompt"] = shared
        row["chosen"] = _one_response(chosen_turns[n:], f"{where}.chosen")
        row["rejected"] = _one_response(rejected_turns[n:], f"{where}.rejected")
        return row
    if "prompt" not in row and isinstance(chosen, str) and isinstance(rejected, str):
        prompt, row["chosen"], row["rejected"] = split_implicit_text(chosen, rejected)
        if not prompt.strip():
            raise ValidationError(
                f"{where}.prompt",
                "is missing, and chosen and rejected share no leading text to take it from",
                "add a prompt column (TRL's explicit layout)",
            )
        row["prompt"] = prompt
        return row
    for key in ("chosen", "rejected"):
        if key in row:
            row[key] = _one_response(row[key], f"{where}.{key}")
    return row


def comparison_from_row(
    row: Mapping[str, Any], where: str = "row", extra: ExtraColumns = "error"
) -> Comparison:
    """One :class:`Comparison` from a preference row in any of TRL's layouts; errors name ``where``.

    Layouts read (TRL's "preference" dataset type):

    ======================================  ==========================================================
    standard, explicit prompt               ``{"prompt": str, "chosen": str, "rejected": str}``
    standard, implicit prompt               ``{"chosen": str, "rejected": str}`` (shared leading text)
    conversational, explicit prompt         ``{"prompt": [msgs], "chosen": [assistant], "rejected": [assistant]}``
    conversational, implicit prompt         ``{"chosen": [msgs..., assistant], "rejected": [...]}`` (shared turns)
    ======================================  ==========================================================

    Columns other than :data:`COLUMNS` are refused (``extra="error"``), kept under ``metadata``
    (``"metadata"``, merged into a ``metadata`` column when there is one) or dropped (``"ignore"``).
    """
    row = _explicit(dict(row), where)
    extras = {key: row.pop(key) for key in list(row) if key not in COLUMNS}
    if extra == "error":
        row.update(extras)  # pydantic names the first unknown column and the fix
    elif extra == "metadata" and extras:
        base = row.get("metadata")
        if base is not None and not isinstance(base, Mapping):
            raise ValidationError(
                f"{where}.metadata", "must be an object", "use a JSON object of extra values", base
            )
        clash = sorted(set(base or {}) & set(extras))
        if clash:
            raise ValidationError(
                f"{where}.metadata",
                f"repeats the columns {clash}",
                "keep each extra value in one place",
                clash,
            )
        row["metadata"] = {**(base or {}), **extras}
    elif extra not in ("metadata", "ignore"):
        raise ValidationError("extra", "is not a known policy", "use 'error', 'metadata' or 'ignore'", extra)
    try:
        return Comparison.model_validate(row)
    except pydantic.ValidationError as err:
        raise convert_pydantic_error(where, err) from None


def preference_record(user: str | None, comparison: Comparison) -> dict[str, Any]:
    """A comparison as a TRL preference row: explicit prompt, plus ``user``, ``weight``, ``created_at``, metadata columns.

    A conversational prompt gets conversational responses (``[{"role": "assistant", ...}]``), so
    TRL's ``maybe_apply_chat_template`` and trainers take the row as it is. The default weight
    and a missing time are left out; metadata is written back as its own columns.
    """
    record: dict[str, Any] = {} if user is None else {"user": user}
    if isinstance(comparison.prompt, str):
        record.update(prompt=comparison.prompt, chosen=comparison.chosen, rejected=comparison.rejected)
    else:
        record["prompt"] = [m.model_dump() for m in comparison.prompt]
        for key in ("chosen", "rejected"):
            record[key] = [{"role": "assistant", "content": getattr(comparison, key)}]
    if comparison.weight != 1.0:
        record["weight"] = comparison.weight
    if comparison.created_at is not None:
        record["created_at"] = comparison.created_at
    record.update(comparison.metadata or {})
    return record


def _row_user(row: dict[str, Any], where: str) -> str | None:
    user = row.pop("user", None)
    if user is not None:
        validate_user_id(user, f"{where}.user")
    return user


# --- JSONL files and datasets ----------------------------------------------------------------


def read_preferences(
    path: str | Path, extra: ExtraColumns = "metadata"
) -> list[tuple[str | None, Comparison]]:
    """Read a JSONL file of preference rows (any TRL layout) with an optional ``user`` column.

    Returns ``(user, comparison)`` pairs; ``user`` is ``None`` where the column is absent.
    Columns beyond the format's are kept under ``metadata`` (``extra="ignore"`` drops them,
    ``"error"`` refuses them). The whole file is validated before anything is returned.
    """
    rows: list[tuple[str | None, Comparison]] = []
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValidationError(
            "data",
            f"{str(path)!r} {what}",
            "give the path of a JSONL file of comparisons (prompt, chosen, rejected, optional user)",
            str(path),
        )
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValidationError(
                    where, f"is not valid JSON ({err.msg})", "write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValidationError(where, "is not a JSON object", "write one JSON object per line", row)
            user = _row_user(row, where)
            rows.append((user, comparison_from_row(row, where, extra)))
    return rows


def write_preferences(path: str | Path, rows: Iterable[tuple[str | None, Comparison]]) -> int:
    """Write ``(user, comparison)`` pairs as JSONL rows (:func:`preference_record`); returns the row count."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for user, comparison in rows:
            handle.write(json.dumps(preference_record(user, comparison), ensure_ascii=False) + "\n")
            count += 1
    return count


def to_dataset(rows: Iterable[tuple[str | None, Comparison]]) -> Any:
    """A ``datasets.Dataset`` of ``(user, comparison)`` pairs, one :func:`preference_record` per row.

    Columns some rows lack (``user``, ``weight``, ``created_at``, metadata) are null there. A
    column holds one type, so text and conversational prompts cannot be mixed.
    """
    try:
        from datasets import Dataset
    except ImportError:
        raise ImportError(
            "to_dataset needs the datasets package. Fix: pip install 'personalign[datasets]'"
        ) from None
    records = [preference_record(user, comparison) for user, comparison in rows]
    kinds = {isinstance(r["prompt"], str) for r in records}
    if len(kinds) > 1:
        raise ValidationError(
            "rows",
            "mix text and conversational prompts",
            "make one dataset per layout, or give the text prompts as [{'role': 'user', 'content': ...}]",
        )
    columns = list(dict.fromkeys(key for record in records for key in record))
    return Dataset.from_list([{key: record.get(key) for key in columns} for record in records])


def _drop_null_keys(value: Any) -> Any:
    if isinstance(value, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m for m in value]
    return value


def from_dataset(
    dataset: Iterable[Mapping[str, Any]], extra: ExtraColumns = "metadata"
) -> list[tuple[str | None, Comparison]]:
    """``(user, comparison)`` pairs from a ``datasets.Dataset`` (or any rows) in any TRL preference layout.

    Null values count as absent: a dataset fills the columns a row lacks with nulls, and the keys
    a chat message lacks (Arrow gives every message of a column the same keys). Other columns
    follow ``extra`` as in :func:`read_preferences`. All rows are validated first.
    """
    pairs: list[tuple[str | None, Comparison]] = []
    for index, item in enumerate(dataset):
        where = f"dataset[{index}]"
        if not isinstance(item, Mapping):
            raise ValidationError(where, "is not a row of columns", "pass a datasets.Dataset or dicts", item)
        row = {
            key: _drop_null_keys(value) if key in ("prompt", "chosen", "rejected") else value
            for key, value in item.items()
            if value is not None
        }
        user = _row_user(row, where)
        pairs.append((user, comparison_from_row(row, where, extra)))
    return pairs
