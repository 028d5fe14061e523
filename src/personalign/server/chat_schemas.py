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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from personalign.server.bodies import Number, RequestBody
from personalign.server.stops import MAX_STOP_CHARS, MAX_STOPS

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
    context_turn: Literal["last", "first"] | None = Field(
        default=None,
        description="Where memories and shots go: 'last' (default) for the latest user turn; 'first' for the "
        "conversation's first user turn, the same for the whole conversation (cache-friendly)",
    )
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
            "context_turn",
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
