"""VAS recipe: fit one objective's value model on samples of the frozen generator.

Setup: score every sample with the objective (standardised over the samples), put the score
on the last response token, and collect what the value model reads (the generator's last
hidden states for a ``trunk`` head; token ids for a ``gru`` model). Train: TD(lambda) targets
from the current values, refreshed every epoch (``gamma = 1``, ``lambda = 0.95`` as VAS), and
a squared error over response tokens. Save: the value-model folder.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.adapters.value import (
    GruValueModel,
    TrunkValueHead,
    ValueConfig,
    ValueModel,
    build_value_model,
)
from personalign.errors import ValidationError
from personalign.functional.steering import td_lambda_returns
from personalign.steering.objectives import OBJECTIVES
from personalign.training.loop import LoopConfig, LoopReport, train_loop
from personalign.training.samples import Sample, left_pad


class VasTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: str
    kind: Literal["trunk", "gru"] = "trunk"
    rank: int = Field(default=16, ge=1, le=512)
    hidden: int = Field(default=256, ge=8, le=4096)
    gamma: float = Field(default=1.0, gt=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    default_beta: float = 3.0
    loop: LoopConfig = Field(
        default_factory=lambda: LoopConfig(epochs=12, learning_rate=2e-3, batch_size=16, name="vas")
    )


def _padded_right(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows])  # (N, T)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (N, T)
    return ids, mask


def response_hidden_states(generator: Any, samples: Sequence[Sample], batch_size: int = 16) -> torch.Tensor:
    """The generator's last hidden state before each response token: ``(N, T, H)``, right-padded.

    Position ``t`` holds the state that predicted response token ``t`` (the prompt's last
    position for ``t = 0``), i.e. the ``h_t`` a trunk value head reads at decode time.
    """
    model, pad = generator.model, generator.tokenizer.pad_token_id
    width = max(len(s.response_ids) for s in samples)
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        rows = [s.prompt_ids + s.response_ids for s in chunk]
        ids, mask = left_pad(rows, pad)
        with torch.inference_mode():
            hidden = model(
                input_ids=ids.to(generator.device),
                attention_mask=mask.to(generator.device),
                output_hidden_states=True,
            ).hidden_states[-1]
        for row, s in enumerate(chunk):
            n = len(s.response_ids)
            h = hidden[row, ids.shape[1] - n - 1 : ids.shape[1] - 1].float().cpu()  # (n, H)
            out.append(torch.cat([h, h.new_zeros(width - n, h.shape[1])]))
    return torch.stack(out)


def objective_rewards(samples: Sequence[Sample], objective: str) -> tuple[torch.Tensor, float, float]:
    """Standardised scores ``(N,)`` and the raw mean and std they were standardised with."""
    raw = [OBJECTIVES[objective].measure(s.text) for s in samples]
    mean, std = statistics.fmean(raw), statistics.pstdev(raw) or 1.0
    return torch.tensor([(r - mean) / std for r in raw]), mean, std


def train_vas(
    generator: Any, samples: Sequence[Sample], config: VasTrainConfig
) -> tuple[ValueModel, LoopReport]:
    """Train a value model for ``config.objective`` on ``samples`` (from :func:`sample_responses`)."""
    if config.objective not in OBJECTIVES:
        raise ValidationError(
            "objective", "is not a known objective", f"use one of {sorted(OBJECTIVES)}", config.objective
        )
    if len(samples) < 2:
        raise ValidationError(
            "samples", "needs at least 2 samples", "sample more answers (n_per_prompt, prompts)", len(samples)
        )
    scores, mean, std = objective_rewards(samples, config.objective)
    return train_value_model(generator, samples, scores, config, mean, std)


def train_value_model(
    generator: Any,
    samples: Sequence[Sample],
    scores: torch.Tensor,
    config: VasTrainConfig,
    mean: float = 0.0,
    std: float = 1.0,
    provenance: dict[str, Any] | None = None,
    hidden: torch.Tensor | None = None,
) -> tuple[ValueModel, LoopReport]:
    """Train a value model whose return is ``scores`` ``(N,)`` (one per sample, on its last token).

    ``mean``/``std``: what the scores were standardised with (stored in the config). ``hidden``:
    :func:`response_hidden_states` of ``samples`` when the caller has them (several heads on the
    same samples read the same states).
    """
    if len(samples) < 2 or scores.shape != (len(samples),):
        raise ValidationError(
            "scores",
            f"must be one score per sample ({len(samples)}, at least 2)",
            "score every sample once",
            tuple(scores.shape),
        )
    base = getattr(generator.model, "get_base_model", lambda: generator.model)()
    embeddings = (
        base.get_output_embeddings().weight if config.kind == "trunk" else base.get_input_embeddings().weight
    )
    value_config = ValueConfig(
        objective=config.objective,
        kind=config.kind,
        rank=config.rank,
        hidden=config.hidden,
        base_model=generator.model_id,
        embed_dim=int(embeddings.shape[1]),
        vocab_size=int(embeddings.shape[0]),
        score_mean=mean,
        score_std=std,
        default_beta=config.default_beta,
        provenance={
            "samples": len(samples),
            "prompts": len({s.prompt for s in samples}),
            "data": "sampled from the frozen generator on project-written prompts",
            "gamma": config.gamma,
            "lam": config.lam,
            **(provenance or {}),
        },
    )
    torch.manual_seed(config.loop.seed)
    model = build_value_model(value_config, base)
    actions, mask = _padded_right(
        [s.response_ids for s in samples], generator.tokenizer.pad_token_id
    )  # (N, T)
    lengths = mask.sum(1)
    rewards = torch.zeros(mask.shape, dtype=torch.float32)
    rewards[torch.arange(len(samples)), lengths - 1] = scores.float()  # the score lands on the last token
    if isinstance(model, TrunkValueHead):
        states = hidden if hidden is not None else response_hidden_states(generator, samples)

        def q_of(idx: list[int]) -> torch.Tensor:
            return model.q_taken(states[idx], actions[idx])
    else:
        assert isinstance(model, GruValueModel)
        prompt_ids, prompt_mask = left_pad([s.prompt_ids for s in samples], generator.tokenizer.pad_token_id)

        def q_of(idx: list[int]) -> torch.Tensor:
            return model.q_taken(prompt_ids[idx], prompt_mask[idx], actions[idx])

    targets = torch.zeros_like(rewards)

    def refresh(epoch: int) -> None:
        with torch.no_grad():
            values = torch.cat(
                [q_of(list(range(s, min(s + 64, len(samples))))) for s in range(0, len(samples), 64)]
            )
            targets.copy_(td_lambda_returns(rewards, values, mask, config.gamma, config.lam))

    def batch_loss(idx: list[int]) -> torch.Tensor:
        m = mask[idx].float()
        return 0.5 * (((q_of(idx) - targets[idx]) ** 2) * m).sum() / m.sum()

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    report = train_loop(
        params,
        len(samples),
        batch_loss,
        config.loop,
        on_epoch=refresh,
        batch_weight=lambda idx: float(mask[idx].sum()),
    )  # a token mean
    model.eval()
    if isinstance(model, TrunkValueHead):
        model.freeze_keys()
    return model, report
