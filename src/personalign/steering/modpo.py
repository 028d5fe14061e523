"""MODPO recipe: one objective adapter per objective, for multi-objective logit mixing.

Setup: pairs of the frozen generator's own samples of the same prompt, labelled by objective
``k``'s scorer (the higher-scoring answer is chosen; pairs closer than ``min_gap`` objective
scales are dropped); the other objectives' standardised scores are the margin rewards. Train:
a LoRA on the generator with :func:`modpo_loss` (reference log-probs from the same weights
with the adapter disabled, computed once). Save: a plain PEFT LoRA folder plus
``mix_config.json``. Decoding mixes the adapters as extra rows of the batch
(:class:`~personalign.steering.decoding.SteeringProcessor`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ValidationError
from personalign.functional.dpo import sequence_logps
from personalign.functional.steering import modpo_loss
from personalign.steering.objectives import OBJECTIVES
from personalign.training.adapters import add_lora, save_adapter
from personalign.training.loop import LoopConfig, LoopReport, train_loop
from personalign.training.samples import Sample, right_pad

MIX_CONFIG = "mix_config.json"


class ModpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: str
    margin_objectives: list[str] = Field(
        default_factory=list, description="the other objectives, as margin rewards"
    )
    objective_weight: float = Field(default=1.0, gt=0.0, description="w_k")
    margin_weights: list[float] = Field(default_factory=list, description="w_{-k}, one per margin objective")
    beta: float = Field(default=0.1, gt=0.0)
    min_gap: float = Field(
        default=0.5, ge=0.0, description="drop pairs whose objective gap is below this many objective scales"
    )
    max_pairs: int = Field(default=128, ge=1)
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    loop: LoopConfig = Field(
        default_factory=lambda: LoopConfig(epochs=3, learning_rate=5e-4, batch_size=4, name="modpo")
    )


class Pair(BaseModel):
    chosen: int
    rejected: int
    gap: float


def objective_pairs(samples: Sequence[Sample], config: ModpoConfig) -> list[Pair]:
    """Pairs of samples of the same prompt ordered by objective ``k`` (seeded subsample)."""
    objective = OBJECTIVES[config.objective]
    by_prompt: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(s.prompt, []).append(i)
    scores = [objective.measure(s.text) for s in samples]
    pairs = []
    for idx in by_prompt.values():
        for a, b in itertools.combinations(idx, 2):
            gap = scores[a] - scores[b]
            if abs(gap) >= config.min_gap * objective.scale and abs(gap) > 0:
                pairs.append(Pair(chosen=a if gap > 0 else b, rejected=b if gap > 0 else a, gap=abs(gap)))
    random.Random(config.loop.seed).shuffle(pairs)
    return pairs[: config.max_pairs]


def _rows(
    samples: Sequence[Sample], pairs: Sequence[Pair], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows: ids, attention mask and response mask, each ``(2B, T)``."""
    order = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return right_pad([(samples[i].prompt_ids, samples[i].response_ids) for i in order], pad)


def _logps(
    model: Any, samples: Sequence[Sample], pairs: Sequence[Pair], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, attention, completion = _rows(samples, pairs, pad)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (2B, T, V)
    return sequence_logps(logits, ids.to(device), completion.to(device)).chunk(2)


def train_modpo(
    generator: Any, samples: Sequence[Sample], config: ModpoConfig, adapter_name: str | None = None
) -> tuple[Any, str, LoopReport, int]:
    """Add and train adapter ``steer_<objective>`` on ``generator``; returns (peft model, name, report, pairs)."""
    for name in [config.objective, *config.margin_objectives]:
        if name not in OBJECTIVES:
            raise ValidationError(
                "objective", f"{name!r} is not a known objective", f"use some of {sorted(OBJECTIVES)}", name
            )
    if len(config.margin_weights) != len(config.margin_objectives):
        raise ValidationError(
            "margin_weights",
            "needs one weight per margin objective",
            "give as many margin_weights as margin_objectives",
            config.margin_weights,
        )
    pairs = objective_pairs(samples, config)
    if not pairs:
        raise ValidationError(
            "samples",
            f"give no pair with a {config.objective} gap of {config.min_gap} scales",
            "sample more answers per prompt or lower min_gap",
            len(samples),
        )
    name = adapter_name or f"steer_{config.objective}"
    torch.manual_seed(config.loop.seed)
    model = add_lora(generator, name, config.rank, config.alpha, config.target_modules)
    pad = generator.tokenizer.pad_token_id
    margins = {m: [OBJECTIVES[m].measure(s.text) for s in samples] for m in config.margin_objectives}
    stats = {
        m: (sum(v) / len(v), (sum((x - sum(v) / len(v)) ** 2 for x in v) / len(v)) ** 0.5 or 1.0)
        for m, v in margins.items()
    }
    margin = torch.tensor(
        [
            [(margins[m][i] - stats[m][0]) / stats[m][1] for m in config.margin_objectives]
            for i in range(len(samples))
        ],
        dtype=torch.float32,
    ).reshape(len(samples), -1)
    margin_weights = torch.tensor(config.margin_weights, dtype=torch.float32)
    with torch.no_grad(), model.disable_adapter():
        refs = [_logps(model, samples, pairs[i : i + 8], pad) for i in range(0, len(pairs), 8)]
    ref_c, ref_r = torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs])
    for pname, p in model.named_parameters():
        p.requires_grad_(f".{name}." in pname and "lora_" in pname)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def batch_loss(idx: list[int]) -> torch.Tensor:
        chunk = [pairs[i] for i in idx]
        pc, pr = _logps(model, samples, chunk, pad)
        mc = margin[[p.chosen for p in chunk]]
        mr = margin[[p.rejected for p in chunk]]
        losses = modpo_loss(
            pc,
            pr,
            ref_c[idx].to(pc.device),
            ref_r[idx].to(pc.device),
            mc.to(pc.device),
            mr.to(pc.device),
            config.objective_weight,
            margin_weights.to(pc.device),
            config.beta,
        )
        return losses.mean()

    model.train()
    report = train_loop(params, len(pairs), batch_loss, config.loop)
    model.eval()
    for p in params.values():
        p.requires_grad_(False)
    return model, name, report, len(pairs)


def save_objective_adapter(
    model: Any,
    name: str,
    folder: Path | str,
    config: ModpoConfig,
    generator_id: str,
    report: LoopReport,
    pairs: int,
) -> Path:
    """Write the adapter as a plain PEFT folder (``adapter_config.json`` + weights) and ``mix_config.json``."""
    meta = {
        "objective": config.objective,
        "base_model": generator_id,
        "config": config.model_dump(),
        "pairs": pairs,
        "epoch_loss": report.epoch_loss,
        "data": "pairs of the frozen generator's samples on project-written prompts",
    }
    return save_adapter(model, name, folder, MIX_CONFIG, meta)
