"""The zero-training baseline: a user's direction is the mean feature difference of their shots.

d_u = sum_i w_i (phi(x_i, y_c,i) - phi(x_i, y_r,i)) / sum_i w_i,   r_u(x, y) = tau * d_u^T phi(x, y) / ||d_u||

Nothing is learned from other users (``fit`` only records that it was called), so it measures
how much the features alone carry. ``tau`` (``scale``) only sets how sharp ``prob`` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from personalign.errors import ValidationError
from personalign.preference.base import (
    Featurizer,
    Population,
    UserState,
    as_population,
    check_comparisons,
    check_state,
    check_tensor_shapes,
    load_artefact,
    save_artefact,
)
from personalign.types import Comparison


@dataclass(frozen=True)
class MeanDiffConfig:
    """``scale``: the inverse temperature tau of ``prob``."""

    scale: float = 10.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValidationError("meandiff.scale", "must be > 0", "use e.g. 10", self.scale)


class MeanDiff:
    """User direction = mean feature difference of their comparisons."""

    name = "meandiff"

    def __init__(self, featurizer: Featurizer, config: MeanDiffConfig | None = None) -> None:
        self.featurizer = featurizer
        self.config = config or MeanDiffConfig()

    def fit(self, population: Population, seed: int = 0) -> MeanDiff:
        """Nothing to learn; the population is validated and otherwise ignored."""
        as_population(population)
        return self

    def prior(self) -> UserState:
        return UserState(self.name, np.zeros(self.featurizer.dim, np.float32))

    def infer(self, comparisons: Sequence[Comparison]) -> UserState:
        items = check_comparisons(comparisons)
        chosen, rejected = self.featurizer.pair_features(items)  # (n, D) each
        weight = np.array([c.weight for c in items], dtype=np.float32)[:, None]
        direction = ((chosen - rejected) * weight).sum(axis=0) / weight.sum()
        return UserState(self.name, direction, n_comparisons=len(items))

    def reward(self, prompts: Sequence[str], responses: Sequence[str], state: UserState) -> np.ndarray:
        """``(n,)`` rewards ``tau * cos-scaled d_u^T phi``; all zero for the prior."""
        check_state(state, self.name, self.featurizer.dim)
        norm = float(np.linalg.norm(state.vector))
        phi = self.featurizer.features(prompts, responses)  # (n, D)
        if norm == 0.0:
            return np.zeros(len(responses), np.float32)
        return (self.config.scale * phi @ (state.vector / norm)).astype(np.float32)

    def prob(self, prompt: str, a: str, b: str, state: UserState) -> float:
        r = self.reward([prompt, prompt], [a, b], state)
        return float(1.0 / (1.0 + np.exp(-(float(r[0]) - float(r[1])))))

    def save(self, directory: str | Path) -> Path:
        scale = np.array([self.config.scale], np.float32)
        return save_artefact(directory, self.name, self.featurizer, asdict(self.config), {"scale": scale})

    @classmethod
    def load(cls, directory: str | Path, featurizer: Featurizer) -> MeanDiff:
        config, tensors = load_artefact(directory, cls.name, featurizer)
        check_tensor_shapes(tensors, {"scale": (1,)}, cls.name)
        return cls(featurizer, MeanDiffConfig(**config))
