"""The shapes every request and error body shares: strict numbers that also take ``5.0`` for integers,
and OpenAI's error body."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, StrictFloat, StrictInt, model_validator

Number = StrictInt | StrictFloat


def _is_int_field(annotation: Any) -> bool:
    """Whether a field takes integers and no floats (``StrictInt | None`` yes; ``StrictInt | StrictFloat`` no)."""
    found: set[type] = set()

    def walk(tp: Any) -> None:
        if tp in (int, float):
            found.add(tp)
        for arg in get_args(tp):
            walk(arg)

    walk(annotation)
    return found == {int}


class RequestBody(BaseModel):
    """A request body whose integer fields also take ``5.0``: JSON Schema's ``integer`` includes numbers with a
    zero fraction, which JSON clients (and schemathesis) send. Still strict otherwise: no ``"5"``, no ``true``."""

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        ints = {name for name, field in cls.model_fields.items() if _is_int_field(field.annotation)}
        return {
            k: int(v) if k in ints and isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v
            for k, v in data.items()
        }


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail
