"""The non-personalised Bradley-Terry baseline: one population reward, linear in the features.

r(x, y) = w^T (phi(x, y) - m) / s, with m the population's feature mean and s its overall
scale (:func:`feature_stats`), and w fitted by L2-regularised maximum likelihood (L-BFGS) on every comparison of
every fit user. Every user gets the same reward; ``infer`` only counts the comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from personalign.errors import ValidationError
from personalign.functional.preference import bradley_terry_loss
from personalign.preference.base import (
    Featurizer,
    Population,
    UserState,
    check_comparisons,
    check_state,
    check_tensor_shapes,
    feature_stats,
    load_artefact,
    population_arrays,
    population_item_keys,
    save_artefact,
)
from personalign.preference.items import ItemEffects
from personalign.types import Comparison


@dataclass(frozen=True)
class BradleyTerryConfig:
    """``l2``: weight of ||w||^2 in the loss; ``max_iter``: L-BFGS iterations; ``item_effects``:
    also learn an offset per (prompt, response) seen in fitting, penalised by ``item_l2``
    (:mod:`personalign.preference.items`)."""

    l2: float = 1e-1
    max_iter: int = 200
    item_effects: bool = False
    item_l2: float = 1.0

    def __post_init__(self) -> None:
        if not self.l2 >= 0:
            raise ValidationError("bt.l2", "must be >= 0", "use e.g. 0.1", self.l2)
        if self.max_iter < 1:
            raise ValidationError("bt.max_iter", "must be >= 1", "use e.g. 200", self.max_iter)


def fit_linear_bt(
    diff: torch.Tensor, weight: torch.Tensor, l2: float, max_iter: int, init: torch.Tensor | None = None
) -> torch.Tensor:
    """Maximum-likelihood linear Bradley-Terry weights by full-batch L-BFGS.

    Args:
        diff: ``(N, D)`` feature differences phi(chosen) - phi(rejected).
        weight: ``(N,)`` pair weights.
        l2: weight of ||w||^2.
        max_iter: L-BFGS iterations.

    Returns:
        ``(D,)`` weights minimising BT_NLL(diff @ w) + l2 * ||w||^2.
    """
    w = (torch.zeros(diff.shape[1]) if init is None else init.clone()).requires_grad_(True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    zeros = torch.zeros(diff.shape[0])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = bradley_terry_loss(diff @ w, zeros, weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


class BradleyTerry:
    """One reward for everybody (the baseline personalised methods must beat)."""

    name = "bt"

    def __init__(self, featurizer: Featurizer, config: BradleyTerryConfig | None = None) -> None:
        self.featurizer = featurizer
        self.config = config or BradleyTerryConfig()
        dim = featurizer.dim
        self.weight = torch.zeros(dim)
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)
        self.items = ItemEffects.empty()
        self.fitted = False

    def fit(self, population: Population, seed: int = 0) -> BradleyTerry:
        """Fit ``w`` on every comparison of every user (deterministic; ``seed`` is unused)."""
        arrays = population_arrays(self.featurizer, population)
        mean, std = feature_stats(arrays)
        self.mean, self.std = torch.from_numpy(mean), torch.from_numpy(std)
        diff = (torch.from_numpy(arrays.chosen) - torch.from_numpy(arrays.rejected)) / self.std  # (N, D)
        self.weight = fit_linear_bt(
            diff, torch.from_numpy(arrays.weight), self.config.l2, self.config.max_iter
        )
        if self.config.item_effects:
            keys_c, keys_r = population_item_keys(population)
            self.items = ItemEffects.fit(
                keys_c, keys_r, (diff @ self.weight).numpy(), arrays.weight, self.config.item_l2
            )
        self.fitted = True
        return self

    def prior(self) -> UserState:
        return UserState(self.name, np.zeros(0, np.float32))

    def infer(self, comparisons: Sequence[Comparison]) -> UserState:
        items = check_comparisons(comparisons)
        return UserState(self.name, np.zeros(0, np.float32), n_comparisons=len(items))

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValidationError("bt", "is not fitted", "call fit(population) or load(dir) first")

    def reward(self, prompts: Sequence[str], responses: Sequence[str], state: UserState) -> np.ndarray:
        """``(n,)`` population rewards (the state is checked but does not change them)."""
        self._check_fitted()
        check_state(state, self.name, 0)
        phi = torch.from_numpy(self.featurizer.features(prompts, responses))  # (n, D)
        return (((phi - self.mean) / self.std) @ self.weight).numpy() + self.items.offsets(prompts, responses)

    def prob(self, prompt: str, a: str, b: str, state: UserState) -> float:
        r = self.reward([prompt, prompt], [a, b], state)
        return float(torch.sigmoid(torch.tensor(r[0] - r[1])))

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        tensors = {"weight": self.weight, "mean": self.mean, "std": self.std, **self.items.tensors()}
        return save_artefact(directory, self.name, self.featurizer, asdict(self.config), tensors)

    @classmethod
    def load(cls, directory: str | Path, featurizer: Featurizer) -> BradleyTerry:
        config, tensors = load_artefact(directory, cls.name, featurizer)
        dim = featurizer.dim
        check_tensor_shapes(tensors, {"weight": (dim,), "mean": (dim,), "std": (dim,)}, cls.name)
        model = cls(featurizer, BradleyTerryConfig(**config))
        model.weight, model.mean, model.std = tensors["weight"], tensors["mean"], tensors["std"]
        model.items = ItemEffects.from_tensors(tensors)
        model.fitted = True
        return model
