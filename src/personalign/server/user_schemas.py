"""Bodies of the user endpoints: comparisons (enrol, edit), the adapter job, next question, profile, forget."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from personalign.adapters.config import LoraTrainConfig
from personalign.server.bodies import RequestBody


class EnrollRequest(BaseModel):
    """``POST /v1/users/{id}/comparisons``: TRL-format comparisons, all stored or none."""

    model_config = ConfigDict(extra="forbid")

    comparisons: list[dict[str, Any]] = Field(min_length=1)
    adapter: bool = Field(
        default=False,
        description="also queue a training of the user's LoRA adapter on all their comparisons (the reply's job)",
    )


ComparisonIndex = Annotated[StrictInt, Field(ge=0)]
# A JSON object's keys are text: a comparison index written in decimal, no sign, no leading zero.
IndexKey = Annotated[StrictStr, Field(pattern=r"^(0|[1-9][0-9]{0,8})$")]


class EditComparisonsRequest(RequestBody):
    """``PATCH /v1/users/{id}/comparisons``: remove and/or replace stored comparisons by index (the order
    ``GET /v1/users/{id}`` lists them in). Every index and comparison is checked first: all edits apply or none."""

    model_config = ConfigDict(extra="forbid")

    remove: list[ComparisonIndex] = Field(
        default_factory=list, description="indices of the comparisons to delete"
    )
    replace: dict[IndexKey, dict[str, Any]] = Field(
        default_factory=dict,
        description='index (as text) -> the comparison that replaces it, in any TRL layout: {"1": {"prompt": ...}}',
    )

    @model_validator(mode="before")
    @classmethod
    def _integral_indices(cls, data: Any) -> Any:
        """``remove``'s ``2.0`` is the integer 2 (JSON Schema's ``integer`` includes it); ``"2"`` and ``true`` stay refused."""
        if isinstance(data, dict) and isinstance(data.get("remove"), list):
            data = {
                **data,
                "remove": [
                    int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v
                    for v in data["remove"]
                ],
            }
        return data


class EditComparisonsResponse(BaseModel):
    user: str
    removed: int
    replaced: int
    comparisons: int = Field(description="how many comparisons the user has now")
    version: int
    default_steer: dict[str, float]


class TrainAdapterRequest(BaseModel):
    """``POST /v1/users/{id}/adapter``: train the user's LoRA adapter on their stored comparisons."""

    model_config = ConfigDict(extra="forbid")

    config: LoraTrainConfig | None = Field(
        default=None, description="LoRA training settings (rank, epochs, loss, ...); omitted: the defaults"
    )


class JobResponse(BaseModel):
    """A background job: ``queued``, ``running``, then ``succeeded`` (with ``result``) or ``failed`` (``error``)."""

    id: str
    object: Literal["job"] = "job"
    kind: str
    user: str
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class EnrollResponse(BaseModel):
    user: str
    added: int
    comparisons: int
    version: int
    default_steer: dict[str, float]
    job: JobResponse | None = None


class Candidate(BaseModel):
    """One question a user could be asked: which of ``a`` and ``b`` they prefer for ``prompt``."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[StrictStr, Field(json_schema_extra={"pattern": r"\S"})]
    a: Annotated[StrictStr, Field(json_schema_extra={"pattern": r"\S"})]
    b: Annotated[StrictStr, Field(json_schema_extra={"pattern": r"\S"})]


class NextQuestionRequest(RequestBody):
    """``POST /v1/users/{id}/next-question``: candidates to rank (a user not enrolled yet is ranked under the prior)."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[Candidate] = Field(min_length=1, max_length=512)
    top_k: StrictInt | None = Field(default=None, ge=1)


class RankedQuestion(BaseModel):
    prompt: str
    a: str
    b: str
    gain: float = Field(description="Expected information gain about the user, in nats (at most ln 2).")
    p_a: float = Field(description="Current probability that the user prefers a.")
    index: int = Field(description="Position of this candidate in the request.")


class NextQuestionResponse(BaseModel):
    user: str
    embedder: str
    questions: list[RankedQuestion]


class ProfileResponse(BaseModel):
    id: str
    object: Literal["user"] = "user"
    comparisons: list[dict[str, Any]]
    n_comparisons: int
    n_memories: int
    settings: dict[str, Any]
    default_steer: dict[str, float]
    created_at: float
    updated_at: float
    version: int


class ForgetResponse(BaseModel):
    id: str
    deleted: bool
    memories_deleted: int
    profile_deleted: bool
