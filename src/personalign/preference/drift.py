"""A user state that follows drift: recency-weighted comparisons and a change detector.

Recency weighting: the comparison with ``age`` newer comparisons after it gets weight
``0.5 ** (age / half_life)`` (times its own ``weight``): with ``half_life=8`` the 8th newest
counts half, the 16th a quarter. The half-life is in comparisons, not seconds, so a user who
labels rarely is not forgotten by the clock. Embedders that ignore weights at inference (VPL's
set encoder) are unaffected by it.

Change detector (a predictive surprise test): for each candidate change point ``t`` leaving
``m = n - t`` recent comparisons (``min_recent <= m <= max_recent``, ``t >= min_history``), the
state inferred from the comparisons before ``t`` predicts the recent ones. Under "no change",
with ``p_i`` the predicted probability of what the user chose, the log-likelihood
``L = sum_i log p_i`` has mean ``sum_i H_i`` (``H_i = p_i log p_i + (1 - p_i) log(1 - p_i)``)
and variance ``sum_i p_i (1 - p_i) logit(p_i)^2``; ``z = (L - mean) / sqrt(variance)``. If the
most surprising candidate has ``z < -threshold`` and (``confirm``) the recent comparisons agree
with each other better than with the old state (each one, left out in turn, is predicted better
by the state inferred from the other recent ones than by the state from before ``t``: noisy
choices are surprising but do not agree with each other), the change is accepted. The state is
then inferred with recency half-life ``on_change_half_life`` over all comparisons, or, with
``None``, from the comparisons since ``t`` only. Nothing changes for a user whose recent
choices fit their history.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.types import Comparison


@dataclass(frozen=True)
class DriftConfig:
    """How a user's state follows change.

    ``half_life``: recency half-life in comparisons (``None``: every comparison counts the same).
    ``detect``: run the change detector; ``threshold`` its z-score and ``confirm`` its agreement
    check (see the module docstring); ``min_recent``/``max_recent``: the sizes of the recent segment
    it tests; ``min_history``: comparisons needed before a change point; ``on_change_half_life``:
    the recency half-life applied once a change is found (``None``: restart from the change).
    """

    half_life: float | None = None
    detect: bool = True
    threshold: float = 2.0
    confirm: bool = True
    min_recent: int = 2
    max_recent: int = 8
    min_history: int = 4
    on_change_half_life: float | None = 2.0

    def __post_init__(self) -> None:
        for name in ("half_life", "on_change_half_life"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not value > 0
                or not math.isfinite(value)
            ):
                raise ValidationError(
                    f"drift.{name}",
                    "must be a positive number of comparisons, or None",
                    "use e.g. 16 (or None)",
                    value,
                )
        if not self.threshold > 0:
            raise ValidationError("drift.threshold", "must be > 0", "use e.g. threshold=3.0", self.threshold)
        for name in ("min_recent", "max_recent", "min_history"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(
                    f"drift.{name}", "must be a positive integer", "use e.g. 2, 8 and 4", value
                )
        if self.max_recent < self.min_recent:
            raise ValidationError(
                "drift.max_recent",
                f"is below min_recent ({self.min_recent})",
                "use max_recent >= min_recent",
                self.max_recent,
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STATIC = DriftConfig(half_life=None, detect=False)
DEFAULT_DRIFT = STATIC  # what Personalizer uses; see docs/memory.md for the measurements behind it


def recency_weights(n: int, half_life: float | None) -> np.ndarray:
    """``(n,)`` weights, oldest first: ``0.5 ** ((n - 1 - i) / half_life)``; all 1 without a half-life."""
    if half_life is None:
        return np.ones(n, np.float64)
    age = np.arange(n - 1, -1, -1, dtype=np.float64)  # (n,) newer comparisons after each
    return 0.5 ** (age / half_life)


def surprise_z(p_chosen: np.ndarray) -> float:
    """z-score of the log-likelihood of outcomes predicted with ``(m,)`` probabilities of what was chosen.

    ``(sum log p - sum H) / sqrt(sum p (1 - p) logit(p)^2)``, ``H = p log p + (1 - p) log(1 - p)``;
    very negative when the choices were unlikely under the prediction. 0 when the predictions
    carry no information (all 0.5).
    """
    p = np.clip(np.asarray(p_chosen, np.float64), 1e-6, 1 - 1e-6)  # (m,)
    observed = np.log(p).sum()
    expected = (p * np.log(p) + (1 - p) * np.log(1 - p)).sum()
    variance = (p * (1 - p) * np.log(p / (1 - p)) ** 2).sum()
    if variance < 1e-12:
        return 0.0
    return float((observed - expected) / math.sqrt(variance))


def weighted(comparisons: Sequence[Comparison], half_life: float | None) -> list[Comparison]:
    """The comparisons with their weights multiplied by :func:`recency_weights`."""
    if half_life is None:
        return list(comparisons)
    factors = recency_weights(len(comparisons), half_life)
    return [
        c.model_copy(update={"weight": float(c.weight * f)})
        for c, f in zip(comparisons, factors, strict=True)
    ]


def chosen_probabilities(embedder: Any, comparisons: Sequence[Comparison], state: Any) -> np.ndarray:
    """``(m,)`` the state's probability of each comparison's chosen response (one batched reward call)."""
    prompts = [c.prompt_text for c in comparisons]
    rewards = np.asarray(
        embedder.reward(
            prompts + prompts, [c.chosen for c in comparisons] + [c.rejected for c in comparisons], state
        ),
        np.float64,
    )
    m = len(comparisons)
    margin = np.clip(rewards[:m] - rewards[m:], -50.0, 50.0)  # (m,)
    return 1.0 / (1.0 + np.exp(-margin))


def agreement(embedder: Any, recent: Sequence[Comparison], before: Any) -> float:
    """Mean over the recent comparisons of ``log p(c_i | state from the other recent ones) - log p(c_i | before)``:
    positive when the recent choices predict each other better than the old state predicts them."""
    gains = []
    for i in range(len(recent)):
        others = [c for j, c in enumerate(recent) if j != i]
        p_new = chosen_probabilities(embedder, recent[i : i + 1], embedder.infer(others))[0]
        p_old = chosen_probabilities(embedder, recent[i : i + 1], before)[0]
        gains.append(math.log(max(p_new, 1e-9)) - math.log(max(p_old, 1e-9)))
    return float(np.mean(gains))


def change_point(
    embedder: Any, comparisons: Sequence[Comparison], config: DriftConfig
) -> tuple[int | None, float]:
    """``(t, z)``: the first comparison of the new regime and its surprise, or ``(None, z)`` when none is found."""
    n = len(comparisons)
    best_t, best_z, best_state = None, 0.0, None
    for m in range(config.min_recent, config.max_recent + 1):
        t = n - m
        if t < config.min_history:
            break
        before = embedder.infer(weighted(comparisons[:t], config.half_life))
        z = surprise_z(chosen_probabilities(embedder, comparisons[t:], before))
        if z < best_z:
            best_t, best_z, best_state = t, z, before
    if best_t is None or best_z >= -config.threshold:
        return None, best_z
    if config.confirm and agreement(embedder, comparisons[best_t:], best_state) <= 0.0:
        return None, best_z
    return best_t, best_z


def infer_state(embedder: Any, comparisons: Sequence[Comparison], config: DriftConfig = STATIC) -> Any:
    """The user's state from their comparisons (oldest first) under ``config``.

    With a detected change the state comes from the comparisons since it; the state's
    ``extra["drift"]`` records the change point (``change_at``), its ``z`` and the settings.
    """
    items = list(comparisons)
    if not config.detect and config.half_life is None:
        return embedder.infer(items)
    start, z = change_point(embedder, items, config) if config.detect else (None, 0.0)
    if start is None:
        state = embedder.infer(weighted(items, config.half_life))
    elif config.on_change_half_life is None:
        state = embedder.infer(weighted(items[start:], config.half_life))
    else:
        state = embedder.infer(weighted(items, config.on_change_half_life))
    note = {"change_at": start, "z": round(z, 4), **config.to_dict()}
    return dataclasses.replace(state, extra={**state.extra, "drift": note})
