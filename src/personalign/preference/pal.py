"""PAL: K shared prototype rewards; a user is a softmax mixture of them (Chen et al., ICLR 2025).

Model (PAL-B with frozen features and dot-product scores):

    f(x, y) = A (phi(x, y) - m) / s                     shared projection, (D,) -> (d,)
    r_k(x, y) = <f(x, y), p_k>                           K prototype rewards
    r_u(x, y) = sum_k softmax(W_u)_k r_k(x, y)           = <f(x, y), a_u>, a_u = sum_k softmax(W_u)_k p_k

``fit`` learns A, the prototypes P and one W_u per fit user by Bradley-Terry maximum
likelihood (Adam, minibatches). A new user is fitted by ``infer``: only its K logits W_u,
everything else frozen, starting from the uniform mixture, with a small L2 pull towards it.
Deviation from the paper: dot product instead of a temperature-scaled cosine, so the user's
reward is exactly the mixture of the prototype rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from personalign.errors import ValidationError
from personalign.functional.preference import (
    bradley_terry_loss,
    expected_information_gain,
    pal_mixture_scores,
)
from personalign.preference.base import (
    Featurizer,
    Population,
    UserState,
    check_candidate_arrays,
    check_comparisons,
    check_state,
    check_tensor_shapes,
    feature_stats,
    load_artefact,
    population_arrays,
    population_item_keys,
    save_artefact,
    seeded,
)
from personalign.preference.bt import fit_linear_bt
from personalign.preference.items import ItemEffects
from personalign.types import Comparison


@dataclass(frozen=True)
class PALConfig:
    """Sizes and optimisation settings.

    ``n_prototypes`` K; ``pref_dim`` d of the preference space; ``epochs``, ``batch_size``,
    ``lr`` (prototypes), ``proj_lr`` (the projection; 0, the default, keeps it at its
    initialisation, which avoids overfitting a D x d matrix on a few thousand pairs), ``user_lr`` and ``user_init_std`` (the fit users'
    logits, initialised N(0, std^2) as in the paper) and ``weight_decay`` for the population
    fit; ``infer_steps`` (L-BFGS iterations), ``infer_lr`` and ``infer_l2`` for fitting one
    user's K logits.
    ``init``: ``"kmeans"`` starts the prototypes at clusters of the fit users' mean-difference
    directions (see :func:`init_from_user_directions`; ``init_logit`` is the starting logit of a
    fit user's own cluster, ``init_restarts`` the k-means restarts), ``"random"`` at random as in the paper.
    ``prior_std``: the N(0, prior_std^2) prior on a user's logits behind the Laplace posterior.
    ``item_effects``: after the fit, learn an offset per (prompt, response) seen in fitting
    (penalty ``item_l2``; see :mod:`personalign.preference.items`), shared by all users.
    """

    n_prototypes: int = 4
    pref_dim: int = 128
    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-3
    proj_lr: float = 0.0
    user_lr: float = 5e-2
    user_init_std: float = 1.0
    weight_decay: float = 1e-4
    infer_steps: int = 100
    infer_lr: float = 1.0
    infer_l2: float = 1e-3
    init: str = "kmeans"
    init_logit: float = 2.0
    init_restarts: int = 5
    prior_std: float = 2.0
    item_effects: bool = False
    item_l2: float = 1.0

    def __post_init__(self) -> None:
        for name in ("n_prototypes", "pref_dim", "epochs", "batch_size", "infer_steps", "init_restarts"):
            if getattr(self, name) < 1:
                raise ValidationError(
                    f"pal.{name}", "must be >= 1", "use a positive integer", getattr(self, name)
                )
        if self.init not in ("kmeans", "random"):
            raise ValidationError("pal.init", "must be 'kmeans' or 'random'", "use 'kmeans'", self.init)
        for name in ("lr", "user_lr", "infer_lr", "prior_std"):
            if not getattr(self, name) > 0:
                raise ValidationError(
                    f"pal.{name}", "must be > 0", "use e.g. 5e-3 (infer_lr: 1.0)", getattr(self, name)
                )
        for name in ("weight_decay", "infer_l2", "user_init_std", "proj_lr"):
            if not getattr(self, name) >= 0:
                raise ValidationError(f"pal.{name}", "must be >= 0", "use e.g. 1e-2", getattr(self, name))


class PALModel(nn.Module):
    """The shared part of PAL: feature standardisation, projection and prototypes."""

    def __init__(self, feature_dim: int, config: PALConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.proj = nn.Linear(feature_dim, config.pref_dim, bias=False)
        self.prototypes = nn.Parameter(
            torch.randn(config.n_prototypes, config.pref_dim) / config.pref_dim**0.5
        )

    def prototype_rewards(self, phi: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` features -> ``(B, K)`` rewards under each prototype."""
        f = self.proj((phi - self.mean) / self.std)  # (B, d)
        return f @ self.prototypes.T  # (B, K)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``(U, D)`` unit vectors by cosine: ``(k, D)`` unit centroids and ``(U,)`` labels.

    k-means++ seeding from torch's global generator (seed it with :func:`seeded`).
    """
    centroids = x[torch.randint(len(x), (1,))]
    while len(centroids) < k:
        dist = (1.0 - (x @ centroids.T).max(dim=1).values).clamp_min(0.0) + 1e-12  # (U,)
        centroids = torch.cat([centroids, x[torch.multinomial(dist, 1)]])
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = (x @ centroids.T).argmax(dim=1)  # (U,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]
        centroids = sums / sums.norm(dim=1, keepdim=True)
    return centroids, labels


def init_from_user_directions(
    model: PALModel,
    user_logits: nn.Parameter,
    diff: torch.Tensor,
    weight: torch.Tensor,
    user: torch.Tensor,
    cfg: PALConfig,
) -> None:
    """Start the prototypes at clusters of the fit users' mean-difference directions.

    Each fit user's direction is the weighted mean of their standardised feature differences;
    spherical k-means gives K centroids; the projection starts as the top ``pref_dim`` right
    singular vectors of the users' directions (so it spans them), the prototypes at the
    centroids in that space, and each user's logits at ``init_logit`` on its cluster. Without
    this the K prototypes collapse onto the population mean reward on small data.
    """
    n_users = user_logits.shape[0]
    sums = torch.zeros(n_users, diff.shape[1]).index_add_(0, user, diff * weight[:, None])  # (U, D)
    directions = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = None
    for _ in range(cfg.init_restarts):
        centroids, labels = spherical_kmeans(directions, cfg.n_prototypes)
        score = float((directions * centroids[labels]).sum())
        if best is None or score > best[0]:
            best = (score, centroids, labels)
    assert best is not None
    _, _, labels = best
    # Prototype k starts at the pooled mean difference of its users' comparisons.
    pooled = torch.zeros(cfg.n_prototypes, diff.shape[1]).index_add_(0, labels, sums)  # (K, D)
    counts = torch.zeros(cfg.n_prototypes).index_add_(
        0, labels, torch.zeros(n_users).index_add_(0, user, weight)
    )  # (K,)
    centroids = pooled / counts.clamp_min(1e-12)[:, None]
    rank = min(cfg.pref_dim, *directions.shape)
    _, _, vh = torch.linalg.svd(directions, full_matrices=False)  # vh (r, D)
    proj = torch.zeros(cfg.pref_dim, diff.shape[1])
    proj[:rank] = vh[:rank]
    # One scale for all prototypes: the maximum-likelihood s of sigma(s * margin) when every
    # comparison is scored by its user's cluster prototype.
    margins = (diff @ proj.T @ proj * centroids[labels[user]]).sum(dim=1, keepdim=True)  # (N, 1)
    scale = fit_linear_bt(margins, weight, l2=1e-6, max_iter=100)  # (1,)
    with torch.no_grad():
        model.proj.weight.copy_(proj)
        model.prototypes.copy_(scale * centroids @ proj.T)  # (K, d)
        user_logits.copy_(cfg.init_logit * torch.nn.functional.one_hot(labels, cfg.n_prototypes).float())


class PAL:
    """Pluralistic alignment: users are mixtures of K learned prototype rewards."""

    name = "pal"

    def __init__(self, featurizer: Featurizer, config: PALConfig | None = None) -> None:
        self.featurizer = featurizer
        self.config = config or PALConfig()
        self.model = PALModel(featurizer.dim, self.config)
        self.items = ItemEffects.empty()
        self.fitted = False

    def fit(self, population: Population, seed: int = 0) -> PAL:
        """Learn projection, prototypes and every fit user's mixture jointly."""
        cfg = self.config
        arrays = population_arrays(self.featurizer, population)
        mean, std = feature_stats(arrays)
        chosen, rejected = torch.from_numpy(arrays.chosen), torch.from_numpy(arrays.rejected)
        weight, user = torch.from_numpy(arrays.weight), torch.from_numpy(arrays.user)
        with seeded(seed):
            model = PALModel(self.featurizer.dim, cfg)
            model.mean.copy_(torch.from_numpy(mean))
            model.std.copy_(torch.from_numpy(std))
            diff = (chosen - rejected) / model.std  # (N, D)
            user_logits = nn.Parameter(cfg.user_init_std * torch.randn(len(arrays.users), cfg.n_prototypes))
            if cfg.init == "kmeans":
                init_from_user_directions(model, user_logits, diff, weight, user, cfg)
            optimizer = torch.optim.AdamW(
                [
                    {"params": [model.prototypes], "weight_decay": cfg.weight_decay},
                    {"params": model.proj.parameters(), "weight_decay": cfg.weight_decay, "lr": cfg.proj_lr},
                    {"params": [user_logits], "weight_decay": 0.0, "lr": cfg.user_lr},
                ],
                lr=cfg.lr,
            )
            n = chosen.shape[0]
            for _ in range(cfg.epochs):
                for batch in torch.randperm(n).split(cfg.batch_size):
                    logits = user_logits[user[batch]]  # (b, K)
                    r_c = pal_mixture_scores(model.prototype_rewards(chosen[batch]), logits)  # (b,)
                    r_r = pal_mixture_scores(model.prototype_rewards(rejected[batch]), logits)  # (b,)
                    loss = bradley_terry_loss(r_c, r_r, weight[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.model = model.eval()
        self.items = ItemEffects.empty()
        if cfg.item_effects:
            with torch.no_grad():
                logits = user_logits.detach()[user]  # (N, K)
                margin = pal_mixture_scores(model.prototype_rewards(chosen), logits) - pal_mixture_scores(
                    model.prototype_rewards(rejected), logits
                )
            keys_c, keys_r = population_item_keys(population)
            self.items = ItemEffects.fit(keys_c, keys_r, margin.numpy(), arrays.weight, cfg.item_l2)
        self.fitted = True
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValidationError("pal", "is not fitted", "call fit(population) or load(dir) first")

    def prior(self) -> UserState:
        """The uniform mixture (all logits 0), with the prior variance ``prior_std**2``."""
        k = self.config.n_prototypes
        return UserState(self.name, np.zeros(k, np.float32), np.full(k, self.config.prior_std**2, np.float32))

    def infer(self, comparisons: Sequence[Comparison]) -> UserState:
        """Fit only this user's K mixture logits on their comparisons (deterministic)."""
        self._check_fitted()
        items = check_comparisons(comparisons)
        chosen, rejected = self.featurizer.pair_features(items)
        weight = torch.tensor([c.weight for c in items])
        prompts = [c.prompt_text for c in items]
        offset = torch.from_numpy(
            self.items.offsets(prompts, [c.chosen for c in items])
            - self.items.offsets(prompts, [c.rejected for c in items])
        )  # (n,)
        with torch.no_grad():
            rc = self.model.prototype_rewards(torch.from_numpy(chosen))  # (n, K)
            rr = self.model.prototype_rewards(torch.from_numpy(rejected))  # (n, K)
        logits = torch.zeros(self.config.n_prototypes, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [logits], lr=self.config.infer_lr, max_iter=self.config.infer_steps, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = bradley_terry_loss(
                pal_mixture_scores(rc, logits) + offset, pal_mixture_scores(rr, logits), weight
            )
            loss = loss + self.config.infer_l2 * logits.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        mode = logits.detach()
        variance = self._laplace_variance(rc, rr, weight, mode, offset)
        mixture = torch.softmax(mode, dim=0)
        return UserState(
            self.name,
            mode.numpy(),
            variance,
            n_comparisons=len(items),
            extra={"mixture": [float(w) for w in mixture]},
        )

    def _laplace_variance(
        self,
        rc: torch.Tensor,
        rr: torch.Tensor,
        weight: torch.Tensor,
        mode: torch.Tensor,
        offset: torch.Tensor,
    ) -> np.ndarray:
        """Diagonal of the Laplace posterior covariance of the K logits at ``mode``.

        The Hessian of the summed Bradley-Terry negative log-likelihood plus the prior
        N(0, prior_std^2 I); inverted as a K x K matrix, its diagonal kept.
        """

        def nll(z: torch.Tensor) -> torch.Tensor:
            margin = pal_mixture_scores(rc, z) - pal_mixture_scores(rr, z) + offset
            return -(weight * torch.nn.functional.logsigmoid(margin)).sum()

        hessian = torch.autograd.functional.hessian(nll, mode)  # (K, K)
        precision = hessian.double() + torch.eye(len(mode), dtype=torch.float64) / self.config.prior_std**2
        eigvals, eigvecs = torch.linalg.eigh((precision + precision.T) / 2)
        covariance = eigvecs @ torch.diag(1.0 / eigvals.clamp_min(1.0 / self.config.prior_std**2)) @ eigvecs.T
        return covariance.diagonal().clamp(1e-6, self.config.prior_std**2).float().numpy()

    def reward(self, prompts: Sequence[str], responses: Sequence[str], state: UserState) -> np.ndarray:
        """``(n,)`` rewards of the user's mixture."""
        self._check_fitted()
        check_state(state, self.name, self.config.n_prototypes)
        phi = torch.from_numpy(self.featurizer.features(prompts, responses))
        with torch.no_grad():
            scores = pal_mixture_scores(
                self.model.prototype_rewards(phi), torch.from_numpy(state.vector)
            ).numpy()
        return scores + self.items.offsets(prompts, responses)

    def prob(self, prompt: str, a: str, b: str, state: UserState) -> float:
        r = self.reward([prompt, prompt], [a, b], state)
        return float(torch.sigmoid(torch.tensor(float(r[0]) - float(r[1]))))

    def information_gain(
        self,
        prompts: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        state: UserState,
        n_samples: int = 256,
        seed: int = 0,
    ) -> np.ndarray:
        """``(B,)`` expected information gain (nats) about the user's mixture of asking "a or b?".

        Monte Carlo over logits drawn from the state's Laplace posterior N(vector, diag(variance)):
        I(y; w) = H[E_w p(a > b | w)] - E_w H[p(a > b | w)].
        """
        self._check_fitted()
        check_state(state, self.name, self.config.n_prototypes)
        check_candidate_arrays(prompts, a, b)
        variance = (
            state.variance
            if state.variance is not None
            else np.full(state.dim, self.config.prior_std**2, np.float32)
        )
        phi_a = torch.from_numpy(self.featurizer.features(prompts, a))  # (B, D)
        phi_b = torch.from_numpy(self.featurizer.features(prompts, b))  # (B, D)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            noise = torch.randn(n_samples, state.dim, generator=generator)  # (S, K)
            logits = (
                torch.from_numpy(state.vector)[None] + noise * torch.from_numpy(variance).sqrt()[None]
            )  # (S, K)
            mix = torch.softmax(logits, dim=-1)  # (S, K)
            proto = self.model.prototype_rewards(phi_a) - self.model.prototype_rewards(phi_b)  # (B, K)
            offset = torch.from_numpy(self.items.offsets(prompts, a) - self.items.offsets(prompts, b))  # (B,)
            margins = mix @ proto.T + offset[None]  # (S, B)
            return expected_information_gain(margins).numpy()

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        return save_artefact(
            directory,
            self.name,
            self.featurizer,
            asdict(self.config),
            {**self.model.state_dict(), **self.items.tensors()},
        )

    @classmethod
    def load(cls, directory: str | Path, featurizer: Featurizer) -> PAL:
        config, tensors = load_artefact(directory, cls.name, featurizer)
        pal = cls(featurizer, PALConfig(**config))
        expected = {k: tuple(v.shape) for k, v in pal.model.state_dict().items()}
        check_tensor_shapes(tensors, expected, cls.name)
        pal.items = ItemEffects.from_tensors(tensors)
        pal.model.load_state_dict({k: v for k, v in tensors.items() if k in expected})
        pal.model.eval()
        pal.fitted = True
        return pal
