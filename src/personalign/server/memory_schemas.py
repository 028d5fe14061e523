"""Bodies of the memory endpoints (``/v1/users/{id}/memories``), in mem0's shape with lifecycle fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from personalign.memory.lifecycle import KEY_PATTERN
from personalign.server.bodies import Number, RequestBody

MetadataValue = StrictStr | StrictInt | StrictFloat | StrictBool
# What the memory database refuses in metadata (``check_memory_write`` in the app answers it with a 400), stated in
# the schema: keys that are empty or start with '$', '#' or 'chroma:'; integers beyond the signed 64-bit range.
METADATA_RULES = {
    "propertyNames": {"minLength": 1, "pattern": "^(?!chroma:)[^$#]"},
    "additionalProperties": {
        "anyOf": [
            {"type": "string"},
            {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
            {"type": "number"},
            {"type": "boolean"},
        ]
    },
}
Metadata = Annotated[dict[str, MetadataValue], Field(json_schema_extra=METADATA_RULES)]


# The memory store's rule for a fact (``personalign.memory.chroma``), stated in the schema only: the
# store's own check answers with its message (``text: must be a non-empty string``).
FACT_RULE = {"pattern": r"\S", "maxLength": 8000}
Fact = Annotated[StrictStr, Field(json_schema_extra=FACT_RULE)]


class RememberRequest(BaseModel):
    """``POST /v1/users/{id}/memories``: one fact or a list, with optional flat metadata.

    ``key`` (one fact only): a short identifier (``home_city``); the new memory supersedes the
    user's active memory with the same key. ``on_conflict``: what happens to close unkeyed
    memories (``keep``: reported in ``conflicts``; ``supersede``). See docs/memory.md."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # a key names one memory: not with several texts
            "if": {"properties": {"text": {"type": "array", "minItems": 2}}, "required": ["text"]},
            "then": {"properties": {"key": {"type": "null"}}},
        },
    )

    text: Fact | Annotated[list[Fact], Field(json_schema_extra={"minItems": 1})]
    metadata: Metadata | None = None
    key: Annotated[StrictStr, Field(json_schema_extra={"pattern": f"^{KEY_PATTERN.pattern}$"})] | None = (
        Field(
            default=None,
            description="A short identifier (1-64 of A-Za-z0-9_.-); a newer memory with the same key supersedes this one",
        )
    )
    on_conflict: Literal["keep", "supersede"] = "keep"


class UpdateMemoryRequest(BaseModel):
    """``PUT /v1/users/{id}/memories/{memory_id}``: the new text (and metadata, replacing the old, when given)."""

    model_config = ConfigDict(extra="forbid")

    text: Fact
    metadata: Metadata | None = None


class SearchMemoriesRequest(RequestBody):
    """``POST /v1/users/{id}/memories/search``: search by meaning, narrowed by metadata ``filters``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(min_length=1, max_length=8000)
    top_k: StrictInt = Field(default=5, ge=1, le=1000)
    threshold: Number | None = Field(default=None, ge=-1, le=1)
    filters: dict[str, Any] | None = Field(
        default=None,
        description='{"field": value} or {"field": {"gte": 2}}; operators eq, ne, gt, gte, lt, lte, in, nin',
    )
    status: Literal["active", "superseded", "all"] = "active"


class MemoryConflict(BaseModel):
    id: str
    memory: str
    key: str | None = None
    score: float


class MemoryRecord(BaseModel):
    """A memory in mem0's shape, with its lifecycle fields."""

    id: str
    memory: str
    user_id: str
    created_at: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    score: float | None = None
    event: Literal["ADD", "UPDATE", "DELETE", "NONE"] | None = None
    key: str | None = None
    status: Literal["active", "superseded"] | None = None
    version: int | None = None
    valid_from: float | None = None
    valid_to: float | None = None
    updated_at: float | None = None
    source: str | None = None
    superseded_by: str | None = None
    supersedes: list[str] | None = None
    conflicts: list[MemoryConflict] | None = None
    previous_memory: str | None = None


class MemoryList(BaseModel):
    """mem0's shape: ``{"results": [...]}``."""

    results: list[MemoryRecord]


class MemoryVersion(BaseModel):
    version: int | None = Field(
        description="1 for the first text, +1 per update; null on the closing DELETE of a superseded memory"
    )
    memory: str | None
    event: Literal["ADD", "UPDATE", "DELETE"]
    valid_from: float | None = None
    valid_to: float | None = None
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    superseded_by: str | None = None


class MemoryHistory(BaseModel):
    """``GET /v1/users/{id}/memories/{memory_id}/history``: every version, oldest first."""

    id: str
    user_id: str
    key: str | None = None
    status: Literal["active", "superseded"]
    versions: list[MemoryVersion]


class DeletedMemories(BaseModel):
    user: str
    deleted: int
