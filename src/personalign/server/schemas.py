"""Request and response bodies: OpenAI's chat schema plus personalign's user endpoints.

Chat requests accept OpenAI's fields and personalign's extra fields (what the ``openai``
client sends with ``extra_body``): ``steer``, ``memory``, ``shots``, ``n_shots``,
``n_memories``, ``memory_threshold``, ``repetition_penalty``, ``fspo``, ``pplug``, ``describe``,
``rerank``, ``rerank_temperature``. Unknown fields are accepted and logged (as vLLM does), but
OpenAI options we cannot honour (the deprecated ``functions``/``function_call``) are refused
rather than silently ignored. ``logit_bias``, the penalties, ``logprobs``, ``response_format``
and ``tools`` are decoded per row (:class:`personalign.steering.decoding.RowDecoder`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from personalign.adapters.config import LoraTrainConfig
from personalign.memory.lifecycle import KEY_PATTERN
from personalign.server.stops import MAX_STOP_CHARS, MAX_STOPS

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


StopText = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    arguments: StrictStr


class ToolCall(BaseModel):
    """A function call the assistant made (OpenAI's ``tool_calls`` item)."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


# The cross-field rules of ``Message._complete``, stated in the schema.
MESSAGE_RULES = {
    "allOf": [
        {
            "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
            "then": {
                "required": ["tool_call_id"],
                "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
            },
        },
        {
            "if": {
                "properties": {
                    "role": {"const": "assistant"},
                    "tool_calls": {"type": "array", "minItems": 1},
                },
                "required": ["role", "tool_calls"],
            },
            "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        },
    ]
}


class Message(BaseModel):
    """A chat turn. ``developer`` is read as ``system``; content may be a list of text parts.

    An assistant turn's ``tool_calls`` are written into its text as ``<tool_call>{...}</tool_call>``
    and a ``tool`` turn becomes a user turn quoting the result (see :mod:`personalign.server.tools`).
    """

    model_config = ConfigDict(extra="ignore", json_schema_extra=MESSAGE_RULES)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _complete(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def as_sdk(self) -> dict[str, str]:
        from personalign.server.tools import call_text

        text = (
            ""
            if self.content is None
            else self.content
            if isinstance(self.content, str)
            else "".join(p.text for p in self.content)
        )
        if self.role == "tool":
            return {
                "role": "user",
                "content": f"Result of tool call {self.tool_call_id or ''}: {text}".replace(
                    "call : ", "call: "
                ),
            }
        if self.tool_calls:
            text = "\n".join(
                [text, *(call_text(c.function.name, c.function.arguments) for c in self.tool_calls)]
            ).strip()
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


# OpenAI options that change the answer and that this server cannot honour: refused unless at their no-op value.
UNSUPPORTED = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr = Field(default="response", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


# OpenAI options with no effect on the reply that are accepted and ignored.
IGNORED = {
    "metadata",
    "store",
    "service_tier",
    "modalities",
    "prediction",
    "reasoning_effort",
    "user_agent",
    "prompt_cache_key",
}


# The cross-field rules ``decoding_options`` and ``plan_tools`` check, stated in the schema.
CHAT_RULES = [
    {  # top_logprobs only with logprobs=true
        "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
    },
    {  # a tool_choice other than none/auto needs tools
        "if": {
            "properties": {"tool_choice": {"not": {"enum": ["none", "auto", None]}}},
            "required": ["tool_choice"],
        },
        "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]},
    },
    {  # json_schema needs its schema
        "if": {
            "properties": {
                "response_format": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]}
            },
            "required": ["response_format"],
        },
        "then": {
            "properties": {
                "response_format": {
                    "properties": {
                        "json_schema": {
                            "type": "object",
                            "properties": {"schema": {"type": "object", "minProperties": 1}},
                            "required": ["schema"],
                        }
                    },
                    "required": ["json_schema"],
                }
            }
        },
    },
]


class ChatCompletionRequest(RequestBody):
    """``POST /v1/chat/completions``. ``user`` (else ``safety_identifier``, the ``X-Personalign-User``
    header or ``metadata.user_id``) selects the profile; omit them all for a generic answer."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"allOf": CHAT_RULES},
    )

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    user: StrictStr | None = Field(
        default=None, description="The user to personalise for: 1-256 characters, no control characters"
    )
    safety_identifier: StrictStr | None = Field(
        default=None, description="OpenAI's successor to `user`; used as the user when `user` is absent"
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(
        default=None,
        ge=0,
        le=2,
        description="Omitted: the server's default_temperature (1.0, as OpenAI); 0 is greedy",
    )
    top_p: Number | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    n: StrictInt | None = Field(
        default=None, ge=1, description="How many choices (at most the server's cap, 8 by default)"
    )
    stop: (
        StopText
        | Annotated[list[Annotated[StopText, Field(min_length=1)]], Field(max_length=MAX_STOPS)]
        | None
    ) = Field(
        default=None,
        description="Up to 4 strings; the reply ends before the first of them (not included), finish_reason 'stop'. \"\" and [] are no stop",
    )
    logit_bias: (
        Annotated[
            dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]],
            Field(json_schema_extra={"propertyNames": {"pattern": r"^ *-?[0-9]{1,12} *$"}}),
        ]
        | None
    ) = Field(
        default=None,
        max_length=1024,
        description="Token id (as a string) -> -100..100 added to its logit at every step",
    )
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    logprobs: StrictBool | None = Field(
        default=None, description="Return each output token's log-probability (not with stream)"
    )
    top_logprobs: StrictInt | None = Field(
        default=None, ge=0, le=20, description="With logprobs: this many most likely alternatives per token"
    )
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = Field(
        default=None, description="Accepted; at most one call is made per choice"
    )
    # personalign's extra body fields
    # Any form parse_steering reads: {"verbosity": -0.5}, {"weights"|"direction": {...}, "method": ...},
    # {"angle": 30, "objectives": [a, b]}; checked by parse_steering so errors match the Python API.
    steer: dict[str, Any] | None = Field(
        default=None,
        description='Steering: {"verbosity": -0.5} (weights), {"weights": {...}, "method": "auto"}, '
        '{"direction": {...}} (normalised to a unit vector) or {"angle": 30, "objectives": ["verbosity", "structure"]}; '
        "{} turns steering off, null uses the user's default.",
    )
    memory: StrictBool | None = None
    shots: StrictBool | None = None
    # The SDK's bounds (GenerationParams, ConditioningParams), stated here and checked there, so that the
    # errors name the field as the Python API does.
    n_shots: StrictInt | None = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 64})
    n_memories: StrictInt | None = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 100})
    memory_threshold: Number | None = Field(default=None, json_schema_extra={"minimum": -1, "maximum": 1})
    repetition_penalty: Number | None = Field(default=None, json_schema_extra={"minimum": 0.01, "maximum": 5})
    fspo: StrictBool | None = None
    pplug: StrictBool | None = None
    describe: StrictBool | None = None
    rerank: StrictInt | None = Field(
        default=None,
        description="Personal reranking: sample this many candidates (2-16; 0 or 1: off) and answer with the one the user's inferred reward scores highest",
        json_schema_extra={"minimum": 0, "maximum": 16},
    )
    rerank_temperature: Number | None = Field(
        default=None,
        description="Sampling temperature of the rerank candidates when the request is greedy (default 0.8)",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": 5},
    )

    def options(self) -> dict[str, Any]:
        """The SDK options this request sets (``max_new_tokens`` is filled in by the app)."""
        names = (
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "memory",
            "shots",
            "n_shots",
            "n_memories",
            "memory_threshold",
            "repetition_penalty",
            "fspo",
            "pplug",
            "describe",
            "rerank",
            "rerank_temperature",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Personalisation(BaseModel):
    """What conditioned a reply (an extra field; the ``openai`` client keeps it in ``model_extra``)."""

    user: str | None = Field(description="The user id as the request gave it (null: no user named)")
    user_source: str | None = Field(
        default=None,
        description="Where the id came from: user, safety_identifier, X-Personalign-User or metadata.user_id",
    )
    user_known: bool = Field(
        default=False,
        description="Whether the user's profile conditioned the reply (false: the generic answer)",
    )
    memories: list[str]
    shots: int
    steer: dict[str, float]
    note: str | None = Field(
        default=None, description="Why nothing personal was applied, when a named user was not known"
    )
    personalization: dict[str, Any] | None = Field(
        default=None,
        description='Decode-time guidance that ran for the (first) choice: {"method": "user-rerank", "candidates", "scores", "picked", "embedder", '
        '"temperature"}, or {"method": null, "requested", "reason"} when it was asked for and could not run; null when none was asked for',
    )
    personalization_by_choice: list[dict[str, Any] | None] | None = Field(
        default=None, description="With n > 1: each choice's personalization, in choice order"
    )
    max_tokens_clamped: dict[str, int] | None = Field(
        default=None,
        description='{"requested": ..., "applied": ...} when max_tokens was over the server\'s cap and was lowered to it',
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    personalign: Personalisation


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "personalign"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- user endpoints ----------------------------------------------------------------------------


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail
