"""Questions for active enrollment: candidate comparisons, validated before anything is computed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from personalign.errors import ValidationError


def check_text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(
            field,
            "must be a non-empty string",
            f"pass the {field} text",
            value if not isinstance(value, str) else None,
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # an unpaired surrogate: the tokenizer raises a bare TypeError on it
            raise ValidationError(
                field, "contains an unpaired UTF-16 surrogate", "pass valid Unicode text", value[:40]
            ) from None
    return value


def parse_candidates(candidates: Any) -> list[tuple[str, str, str]]:
    """``[(prompt, a, b)]`` from mappings or tuples; an empty or malformed list raises ``ValidationError``."""
    if isinstance(candidates, str | Mapping) or not isinstance(candidates, Sequence):
        raise ValidationError(
            "candidates", "must be a list", 'pass [{"prompt": ..., "a": ..., "b": ...}, ...]'
        )
    if not candidates:
        raise ValidationError(
            "candidates", "is empty", "pass at least one candidate comparison {prompt, a, b}"
        )
    rows = []
    for i, item in enumerate(candidates):
        if isinstance(item, Mapping):
            extra = set(item) - {"prompt", "a", "b"}
            if extra:
                raise ValidationError(
                    f"candidates[{i}]", f"has unknown field(s) {sorted(extra)}", "use only prompt, a and b"
                )
            values = (item.get("prompt"), item.get("a"), item.get("b"))
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
            values = tuple(item)
        else:
            raise ValidationError(
                f"candidates[{i}]",
                "is not a {prompt, a, b} mapping or a (prompt, a, b) tuple",
                'pass {"prompt": ..., "a": ..., "b": ...}',
            )
        for name, value in zip(("prompt", "a", "b"), values, strict=True):
            check_text(value, f"candidates[{i}].{name}")
        if values[1].strip() == values[2].strip():
            raise ValidationError(f"candidates[{i}]", "has a == b", "offer two different responses")
        rows.append((values[0], values[1], values[2]))
    return rows
