"""What a chat request and its reply are: the decoding settings (``GenerationParams``), the
conditioners that apply (``ConditioningParams``), a validated request ready to generate
(``Prepared``) and the reply with what conditioned it (``ChatResult``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from personalign.conditioning.fspo import (
    Conditioning,
    Shot,
)
from personalign.steering import rerank as rerank_method
from personalign.steering.decoding import (
    RowControls,
    TokenLogprob,
)
from personalign.types import (
    convert_pydantic_error,
)


class GenerationParams(BaseModel):
    """Decoding settings. ``temperature=0`` is greedy decoding (deterministic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    min_new_tokens: int = Field(
        default=0, ge=0, le=8192, description="suppress end-of-turn before this many tokens (benchmarks)"
    )
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # transformers divides positive logits by it: a penalty near 0 (5e-324 is 0 in float32) makes them infinite
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=5.0)
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        le=2**64 - 1,
        description="this request's own sampling seed (torch.Generator's range)",
    )
    # OpenAI's per-row controls, applied by steering.decoding.RowDecoder
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, description="token id -> value added to its logit"
    )
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="record each token's log-probability and this many alternatives (None: none)",
    )
    grammar: dict[str, Any] | None = Field(
        default=None, description='constrained decoding: {"json_object": true} or {"json_schema": {...}}'
    )

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one ``generate`` call (each row samples on its own, see ``RowDecoder``)."""
        return ("decode", self.repetition_penalty, self.min_new_tokens)

    def row_controls(self, grammar: Any = None) -> RowControls:
        """This request's row in a :class:`~personalign.steering.decoding.RowDecoder` (``grammar``: the compiled one)."""
        return RowControls(
            self.temperature,
            self.top_p,
            self.seed,
            self.logit_bias,
            self.presence_penalty,
            self.frequency_penalty,
            self.top_logprobs,
            grammar,
        )

    def generate_kwargs(self, pad_token_id: int | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.min_new_tokens, self.max_new_tokens)
        return kwargs


class ConditioningParams(BaseModel):
    """Which conditioners apply to a request, and how much of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: bool = True
    shots: bool = True
    context_turn: Literal["last", "first"] = Field(
        default="last",
        description="where memories and shots go: 'last' retrieves them for the latest user turn and writes them into it; 'first' retrieves them for the conversation's first user turn and writes them there, so they stay the same for the whole conversation and each turn's prompt begins with the previous turn's (the prompt cache then reuses it)",
    )
    n_memories: int = Field(default=5, ge=0, le=100)
    n_shots: int = Field(default=4, ge=0, le=64)
    memory_threshold: float | None = Field(default=0.2, ge=-1.0, le=1.0)
    adapter: bool = True
    fspo: bool = Field(
        default=True,
        description="apply the FSPO meta-trained adapter to requests with shots (when one is installed and the user's own adapter is not used)",
    )
    pplug: bool = Field(
        default=True,
        description="prepend the user's Persona-Plug soft token (when a projector is installed for this generator and the user has history)",
    )
    describe: bool = Field(
        default=False,
        description="FSPO user-description step: a one-line description of the user, written by the generator from their comparisons, goes into the system prompt",
    )
    rerank: int = Field(
        default=0,
        ge=0,
        le=16,
        description="personal reranking: sample this many candidates as rows of one batch and return the one the user's inferred reward scores highest (0 or 1: off; a user with no comparisons gets the plain answer)",
    )
    user_vas: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="user-conditioned value heads: guidance strength beta (0: off; None: on at the heads' default strength when heads are installed and the user has comparisons)",
    )
    rerank_temperature: float = Field(
        default=rerank_method.DEFAULT_TEMPERATURE,
        gt=0.0,
        le=5.0,
        description="sampling temperature of the rerank candidates when the request itself is greedy",
    )


@dataclass(frozen=True)
class Prepared:
    """A validated request: its conditioning, decoding settings, steering and prompt tokens."""

    user: str | None
    conditioning: Conditioning
    params: GenerationParams
    steer: dict[str, float]
    input_ids: list[int]
    adapter_user: str | None = None
    steer_method: str = "auto"
    fspo: bool = False  # the row runs the FSPO adapter
    description: str | None = None
    plug: Any = None  # the Persona-Plug soft token, (model_dim,)
    query: str = ""  # the user's last message: the prompt the reward scores candidates for
    rerank: int = 0  # candidates to sample and rerank by the user's reward (0: off)
    rerank_temperature: float = rerank_method.DEFAULT_TEMPERATURE
    personalization: dict[str, Any] | None = None  # what guidance runs, or why a requested one cannot
    guide: list[float] | None = None  # user-vas: per-head strengths beta * pi_u


@dataclass(frozen=True)
class ChatResult:
    """A reply and what conditioned it."""

    text: str
    user: str | None
    memories: list[str]
    shots: list[Shot]
    steer: dict[str, float]
    prompt_tokens: int
    completion_tokens: int
    description: str | None = None  # the user description, when the request asked for it
    personalization: dict[str, Any] | None = (
        None  # decode-time guidance that ran (e.g. user-rerank: candidates, scores, pick)
    )
    logprobs: list[TokenLogprob] | None = (
        None  # per completion token, when the request asked for top_logprobs
    )


def validated(model: type[BaseModel], values: Mapping[str, Any], field: str) -> Any:
    """``model`` built from ``values``; a pydantic error becomes a ``ValidationError`` under ``field``."""
    try:
        return model.model_validate(dict(values))
    except pydantic.ValidationError as err:
        raise convert_pydantic_error(field, err) from None
