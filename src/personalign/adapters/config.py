"""How a per-user LoRA adapter is trained (:class:`LoraTrainConfig`): no torch needed, so the HTTP
request schema and the CLI can state it (the training itself is :mod:`personalign.adapters.lora`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class LoraTrainConfig(BaseModel):
    """How a user's adapter is trained. Defaults suit 4-64 comparisons on a small model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="the modules that get LoRA weights, e.g. ['q_proj', 'v_proj']",
    )
    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    simpo_gamma: float = Field(default=0.5, ge=0.0)
    learning_rate: float = Field(default=5e-4, gt=0, le=1.0)
    epochs: int = Field(default=8, ge=1, le=1000)
    batch_size: int = Field(default=4, ge=1, le=256)
    holdout_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    min_holdout_pairs: int = Field(
        default=4, ge=1, description="hold out only when the user has at least this many pairs"
    )
    patience: int = Field(default=2, ge=1)
    max_length: int = Field(default=512, ge=8)
    seed: int = 0
    progress: bool = False
