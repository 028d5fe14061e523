"""Metadata filters on memory search and listing, checked and translated to a Chroma ``where``.

A filter is a mapping of field to condition; several fields must all hold (AND):

    {"category": "diet"}                          equality
    {"priority": {"gte": 2}}                      one operator: eq, ne, gt, gte, lt, lte, in, nin
    {"category": {"in": ["diet", "health"]}, "created_at": {"gt": 1.7e9}}

Fields are the memory's own ``metadata`` keys, plus ``created_at``. Operators may be written
with or without Chroma's ``$``. A field that none of the user's memories carries is an error
(a typo would otherwise match nothing, silently), and so is an unknown operator or a value of
the wrong type; nothing is searched then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from personalign.errors import ValidationError

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
ALWAYS_FILTERABLE = ("created_at",)
MAX_IN_VALUES = 256
_FIX = 'pass {"field": value} or {"field": {"gte": 2}}; operators: ' + ", ".join(OPERATORS)


def _check_value(value: Any, where: str, numeric: bool) -> Any:
    if isinstance(value, bool) and numeric:
        raise ValidationError(where, "must be a number for a comparison operator", _FIX, value)
    if numeric and not isinstance(value, int | float):
        raise ValidationError(where, "must be a number for a comparison operator", _FIX, value)
    if not isinstance(value, str | int | float | bool):
        raise ValidationError(where, "must be a str, int, float or bool", _FIX, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(where, "must be finite", _FIX, value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ValidationError(
            where, "does not fit in 64 bits", "compare with a number in the signed 64-bit range", value
        )
    return value


def _kind(value: Any) -> str:
    """Chroma's type of a filter value: ints and floats are both numbers to it."""
    return "bool" if isinstance(value, bool) else "str" if isinstance(value, str) else "number"


def _condition(field: str, condition: Any) -> dict[str, Any]:
    """One field's condition as a Chroma clause ``{field: {"$op": value}}``."""
    where = f"filters.{field}"
    if not isinstance(condition, Mapping):
        return {field: {"$eq": _check_value(condition, where, numeric=False)}}
    if len(condition) != 1:
        raise ValidationError(
            where,
            f"has {len(condition)} operators",
            "give one operator per field (several fields are ANDed)",
            dict(condition),
        )
    [(op, value)] = condition.items()
    name = op[1:] if isinstance(op, str) and op.startswith("$") else op
    if name not in OPERATORS:
        raise ValidationError(f"{where}.{op}", "is not a filter operator", _FIX, op)
    if name in ("in", "nin"):
        if (
            isinstance(value, str)
            or not isinstance(value, list | tuple)
            or not value
            or len(value) > MAX_IN_VALUES
        ):
            raise ValidationError(
                f"{where}.{op}",
                f"must be a non-empty list of at most {MAX_IN_VALUES} values",
                'pass e.g. {"in": ["a", "b"]}',
                value,
            )
        items = [_check_value(v, f"{where}.{op}[{i}]", numeric=False) for i, v in enumerate(value)]
        kinds = {_kind(v) for v in items}
        if len(kinds) > 1:  # Chroma refuses a mixed list (a raw ValueError from inside it otherwise)
            raise ValidationError(
                f"{where}.{op}",
                f"mixes value types ({', '.join(sorted(kinds))})",
                "list values of one type: all strings, all numbers or all booleans",
                value,
            )
        return {field: {f"${name}": items}}
    return {
        field: {f"${name}": _check_value(value, f"{where}.{op}", numeric=name in ("gt", "gte", "lt", "lte"))}
    }


def check_filters(filters: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The filter's clauses (one per field, in order), or ``ValidationError`` naming the bad part.

    Field names are checked against the user's memories by :func:`check_fields`.
    """
    if filters is None:
        return []
    if not isinstance(filters, Mapping):
        raise ValidationError("filters", "must be a mapping of field to condition", _FIX, filters)
    clauses = []
    for field, condition in filters.items():
        if not isinstance(field, str) or not field or field.startswith("$"):
            raise ValidationError(
                f"filters.{field}",
                "is not a field name",
                "name a metadata key of the memories, or created_at",
                field,
            )
        clauses.append(_condition(field, condition))
    return clauses


def check_fields(filters: Mapping[str, Any] | None, known: Iterable[str]) -> None:
    """Every filtered field is ``created_at`` or a metadata key some memory of the user carries."""
    allowed = set(known) | set(ALWAYS_FILTERABLE)
    for field in filters or {}:
        if field not in allowed:
            shown = sorted(allowed)[:20]
            raise ValidationError(
                f"filters.{field}",
                "is not a field of any of this user's memories",
                f"filter on one of {shown}",
                field,
            )


def combine(clauses: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Chroma's ``where`` for all ``clauses`` (``$and`` needs two or more)."""
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
