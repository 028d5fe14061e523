"""Learned objectives: reward heads on frozen encoder features, one head per objective (ArmoRM-style).

A head is a linear Bradley-Terry reward on ``[e(response), e(prompt) * e(response)]`` (the
embedded sentence encoder, unit vectors), fitted with L2 regularisation, then calibrated by a
temperature fitted on a held-out slice of its pairs, so ``sigmoid(r(a) - r(b))`` is a
calibrated probability that ``a`` is preferred. Its training data, licence and held-out
accuracy are recorded in ``head_config.json`` beside ``head.safetensors``.

The shipped heads (``helpfulness``, ``harmlessness``) are fitted on the *original* human labels
of Anthropic HH-RLHF pairs (MIT licence), split by the HH subset the pair came from; the
GPT-3.5 relabels in the same files are research-only and are not used for them.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import (
    HeadError,  # noqa: F401 (re-exported)
    ValidationError,
)

CONFIG_FILE = "head_config.json"
WEIGHTS_FILE = "head.safetensors"


class RewardHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: str
    encoder: str = "embedded"
    dim: int = Field(ge=1)
    l2: float = Field(default=1e-2, ge=0.0)
    temperature: float = Field(default=1.0, gt=0.0)
    description: str = ""
    provenance: dict[str, Any] = Field(default_factory=dict)


def head_features(encoder: Any, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """``(N, 2 d)``: the response embedding and its product with the prompt embedding."""
    p = encoder.encode(list(prompts))
    r = encoder.encode(list(responses))
    return np.concatenate([r, p * r], axis=1).astype(np.float32)


class RewardHead:
    def __init__(self, config: RewardHeadConfig, weight: torch.Tensor) -> None:
        if weight.shape != (config.dim,):
            raise HeadError(
                f"head weight has shape {tuple(weight.shape)}, config says ({config.dim},). Fix: refit the head"
            )
        self.config = config
        self.weight = weight.float()

    def raw(self, features: np.ndarray) -> np.ndarray:
        return (torch.from_numpy(features) @ self.weight).numpy()

    def reward(self, encoder: Any, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Calibrated rewards ``(N,)``: differences are log-odds of preference."""
        return self.raw(head_features(encoder, prompts, responses)) / self.config.temperature

    def save(self, folder: Path | str) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous()}, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.model_dump(), indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> RewardHead:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = RewardHeadConfig.model_validate_json((folder / CONFIG_FILE).read_text())
            weight = load_file(str(folder / WEIGHTS_FILE))["weight"]
        except Exception as err:  # missing, truncated or malformed files
            raise HeadError(
                f"reward head at {folder} is unreadable ({type(err).__name__}: {err}). Fix: refit it with fit_head"
            ) from None
        return cls(config, weight)


def _bt_fit(diff: torch.Tensor, l2: float, steps: int = 300) -> torch.Tensor:
    """Weights ``w`` minimising ``mean softplus(-diff @ w) + l2 |w|^2`` (L-BFGS)."""
    w = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-diff @ w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _temperature(margins: torch.Tensor) -> float:
    """The ``T`` minimising held-out ``mean softplus(-margin / T)`` (grid over log T)."""
    grid = [math.exp(x / 20.0) for x in range(-120, 121)]
    losses = [float(torch.nn.functional.softplus(-margins / t).mean()) for t in grid]
    return grid[int(np.argmin(losses))]


def expected_calibration_error(p_chosen: torch.Tensor, bins: int = 10) -> float:
    """ECE of pairwise probabilities, each pair counted both ways (``p`` for the chosen answer
    winning, outcome 1; ``1 - p`` for the rejected one winning, outcome 0): the bin-size-weighted
    mean of ``|mean p - share of outcomes 1|`` over ``bins`` equal-width bins."""
    probs = torch.cat([p_chosen, 1 - p_chosen])
    outcomes = torch.cat([torch.ones_like(p_chosen), torch.zeros_like(p_chosen)])
    index = torch.clamp((probs * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if bool(mask.any()):
            total += float(mask.float().mean()) * abs(
                float(probs[mask].mean()) - float(outcomes[mask].mean())
            )
    return total


def fit_head(
    encoder: Any,
    objective: str,
    pairs: Sequence[tuple[str, str, str]],
    l2: float = 1e-2,
    holdout: float = 0.2,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> RewardHead:
    """Fit a head on ``(prompt, chosen, rejected)`` pairs; calibrate on a seeded held-out slice."""
    if len(pairs) < 10:
        raise ValidationError("pairs", "needs at least 10 pairs", "give more comparisons", len(pairs))
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(pairs) * holdout))
    held, train = order[:cut], order[cut:]
    prompts = [p for p, _, _ in pairs]
    chosen = head_features(encoder, prompts, [c for _, c, _ in pairs])
    rejected = head_features(encoder, prompts, [r for _, _, r in pairs])
    diff = torch.from_numpy(chosen - rejected)  # (N, D)
    w = _bt_fit(diff[train], l2)
    margins = diff[held] @ w
    temperature = _temperature(margins)
    accuracy = float((margins > 0).float().mean())
    ece = expected_calibration_error(torch.sigmoid(margins / temperature))
    config = RewardHeadConfig(
        objective=objective,
        encoder=getattr(encoder, "name", "embedded"),
        dim=int(diff.shape[1]),
        l2=l2,
        temperature=temperature,
        description=f"learned {objective} reward (linear head on encoder features)",
        provenance={
            **(provenance or {}),
            "pairs": len(pairs),
            "train_pairs": len(train),
            "held_out_pairs": len(held),
            "held_out_accuracy": accuracy,
            "held_out_ece": ece,
            "seed": seed,
        },
    )
    head = RewardHead(config, w)
    return head


def hh_original_pairs(root: str | Path, subset: str) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` from relabeled HH-RLHF with the *original* human label, one HH subset."""
    path = Path(root) / "relabeled_hh_rlhf" / "both" / "test.jsonl.gz"
    if not path.is_file():
        raise ValidationError(
            "root", f"has no {path.relative_to(root)}", "point it at the shared data folder", str(root)
        )
    pairs, seen = [], set()
    with gzip.open(path, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            if row["data_subset"] != subset:
                continue
            a, b = row["responses"]
            key = (row["prompt"], a, b)
            if key in seen or a.strip() == b.strip():
                continue
            seen.add(key)
            good = row["original_label"]
            pairs.append((row["prompt"], (a, b)[good].strip(), (a, b)[1 - good].strip()))
    return pairs


def shipped_heads_dir() -> Path:
    return Path(str(resources.files("personalign") / "data" / "heads"))


@lru_cache(maxsize=8)
def _loaded(folder: str) -> RewardHead:
    return RewardHead.load(folder)


@lru_cache(maxsize=1)
def _encoder() -> Any:
    from personalign.models import load_encoder

    return load_encoder()


def head_scorer(folder: Path | str) -> Any:
    """A ``(prompt, response) -> float`` scorer that loads the head and the encoder on first use."""

    def scorer(prompt: str, response: str) -> float:
        return float(_loaded(str(folder)).reward(_encoder(), [prompt], [response])[0])

    return scorer
