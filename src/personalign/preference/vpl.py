"""VPL: a Gaussian user latent inferred from a set of comparisons (Poddar et al., NeurIPS 2024).

Encoder q(z | C): each comparison (y_c, y_r) of the context set C becomes a code
MLP([phi(y_c) - phi(y_r), phi(y_c), phi(y_r)]) (the paper feeds the pair; the difference,
which carries the label, is given explicitly so the small encoder need not learn it); one single-head self-attention layer mixes the codes, a masked mean
pools them, and linear heads give mu and log sigma^2 (``(L,)`` each).

Decoder r(x, y, z) on the features and z. ``decoder="bilinear"`` (default):
r = w^T h + z^T V h with h = phi (or an MLP of phi when ``decoder_hidden > 0``): z picks a
linear reward on top of a shared one, which trains reliably on CPU in seconds. ``"mlp"`` is the
paper's MLP([phi, z]).

Training maximises the ELBO: Bradley-Terry log-likelihood of *target* pairs (not in the
context) under z ~ q(z | C), minus the KL to N(0, I) weighted by ``kl_weight`` times a cyclical
cosine annealing factor. Each step samples users, a context of 1..``max_context`` of their
comparisons, and up to ``max_targets`` other comparisons as targets.
Deviations from the LLM code: no clamp of mu, no L2-normalisation of z; log sigma^2 is clamped
to [``logvar_min``, ``logvar_max``].

At evaluation z = mu. The posterior variance drives :meth:`VPL.information_gain` (active
querying).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from personalign.errors import ValidationError
from personalign.functional.preference import (
    expected_information_gain,
    kl_anneal_weight,
    reparameterize,
    vpl_elbo_loss,
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
    save_artefact,
    seeded,
)
from personalign.types import Comparison

DECODERS = ("bilinear", "mlp")


@dataclass(frozen=True)
class VPLConfig:
    """Sizes and optimisation settings (defaults train in seconds on a CPU)."""

    latent_dim: int = 8
    hidden_dim: int = 64
    decoder: str = "bilinear"
    decoder_hidden: int = 0
    min_context: int = 1
    max_context: int = 8
    max_targets: int = 8
    steps: int = 1500
    batch_users: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    kl_weight: float = 1e-2
    kl_anneal_period: int = 1000
    kl_anneal_baseline: float = 0.1
    logvar_min: float = -6.0
    logvar_max: float = 2.0
    info_gain_samples: int = 128

    def __post_init__(self) -> None:
        for name in (
            "latent_dim",
            "hidden_dim",
            "min_context",
            "max_context",
            "max_targets",
            "steps",
            "batch_users",
            "info_gain_samples",
        ):
            if getattr(self, name) < 1:
                raise ValidationError(
                    f"vpl.{name}", "must be >= 1", "use a positive integer", getattr(self, name)
                )
        if self.decoder not in DECODERS:
            raise ValidationError("vpl.decoder", f"must be one of {DECODERS}", "use 'bilinear'", self.decoder)
        if self.decoder_hidden < 0:
            raise ValidationError(
                "vpl.decoder_hidden",
                "must be >= 0",
                "use 0 for a decoder linear in the features",
                self.decoder_hidden,
            )
        if self.min_context > self.max_context:
            raise ValidationError(
                "vpl.min_context",
                f"is above max_context={self.max_context}",
                "lower min_context",
                self.min_context,
            )
        if not self.lr > 0 or not self.weight_decay >= 0 or not self.kl_weight >= 0:
            raise ValidationError(
                "vpl.lr",
                "lr must be > 0, weight_decay and kl_weight >= 0",
                "use lr=1e-3, weight_decay=1e-3, kl_weight=1e-2",
            )
        if not 0 <= self.kl_anneal_baseline <= 1:
            raise ValidationError(
                "vpl.kl_anneal_baseline", "must be in [0, 1]", "use 0.1", self.kl_anneal_baseline
            )
        if not self.logvar_min < self.logvar_max:
            raise ValidationError(
                "vpl.logvar_min", "must be below logvar_max", "use -6 and 2", self.logvar_min
            )


class PairSetEncoder(nn.Module):
    """q(z | C): pair codes, one self-attention layer, masked mean pool, Gaussian heads."""

    def __init__(self, feature_dim: int, config: VPLConfig) -> None:
        super().__init__()
        h, latent = config.hidden_dim, config.latent_dim
        self.pair = nn.Sequential(
            nn.Linear(3 * feature_dim, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2)
        )
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.mu, self.logvar = nn.Linear(h, latent), nn.Linear(h, latent)
        self.logvar_range = (config.logvar_min, config.logvar_max)

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, C, D)`` standardised features and ``(U, C)`` bool mask -> mu, logvar ``(U, L)``."""
        codes = self.pair(torch.cat([chosen - rejected, chosen, rejected], dim=-1))  # (U, C, H)
        scores = self.query(codes) @ self.key(codes).transpose(1, 2) / math.sqrt(codes.shape[-1])  # (U, C, C)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        attended = torch.softmax(scores, dim=-1) @ self.value(codes)  # (U, C, H)
        m = mask.unsqueeze(-1).to(attended.dtype)  # (U, C, 1)
        pooled = (attended * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (U, H)
        return self.mu(pooled), self.logvar(pooled).clamp(*self.logvar_range)


class RewardDecoder(nn.Module):
    """r(phi, z) for broadcastable ``(..., D)`` features and ``(..., L)`` latents -> ``(...)``."""

    def __init__(self, feature_dim: int, config: VPLConfig) -> None:
        super().__init__()
        self.kind = config.decoder
        latent = config.latent_dim
        if self.kind == "bilinear":
            hd = config.decoder_hidden
            self.body = nn.Sequential(nn.Linear(feature_dim, hd), nn.LeakyReLU(0.2)) if hd else nn.Identity()
            width = hd or feature_dim
            self.base = nn.Linear(width, 1)
            self.inter = nn.Linear(width, latent, bias=False)
            nn.init.normal_(self.inter.weight, std=width**-0.5)
        else:
            h = config.hidden_dim
            self.mlp = nn.Sequential(
                nn.Linear(feature_dim + latent, h),
                nn.LeakyReLU(0.2),
                nn.Linear(h, h),
                nn.LeakyReLU(0.2),
                nn.Linear(h, 1),
            )

    def forward(self, phi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "bilinear":
            h = self.body(phi)  # (..., H)
            return self.base(h).squeeze(-1) + (self.inter(h) * z).sum(dim=-1)
        shape = torch.broadcast_shapes(phi.shape[:-1], z.shape[:-1])
        joint = torch.cat([phi.expand(*shape, phi.shape[-1]), z.expand(*shape, z.shape[-1])], dim=-1)
        return self.mlp(joint).squeeze(-1)


class VPLModel(nn.Module):
    """Feature standardisation, the set encoder and the reward decoder."""

    def __init__(self, feature_dim: int, config: VPLConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.encoder = PairSetEncoder(feature_dim, config)
        self.decoder = RewardDecoder(feature_dim, config)

    def standardise(self, phi: torch.Tensor) -> torch.Tensor:
        return (phi - self.mean) / self.std

    def posterior(
        self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(U, C, D)`` features -> mu, logvar ``(U, L)``."""
        return self.encoder(self.standardise(chosen), self.standardise(rejected), mask)

    def reward(self, phi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Raw ``(..., D)`` features and ``(..., L)`` latents -> ``(...)`` rewards."""
        return self.decoder(self.standardise(phi), z)


def _sample_batch(
    rows: list[np.ndarray], users: np.ndarray, config: VPLConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Context indices ``(U, C)`` with mask, and flat target rows with their owner in the batch."""
    contexts, targets, owners = [], [], []
    for slot, u in enumerate(users):
        perm = rng.permutation(rows[u])
        hi = min(config.max_context, len(perm) - 1)
        lo = min(config.min_context, hi)
        c = int(rng.integers(lo, hi + 1))
        contexts.append(perm[:c])
        tgt = perm[c : c + config.max_targets]
        targets.append(tgt)
        owners.append(np.full(len(tgt), slot))
    width = max(len(c) for c in contexts)
    index = np.zeros((len(users), width), dtype=np.int64)
    mask = np.zeros((len(users), width), dtype=bool)
    for slot, c in enumerate(contexts):
        index[slot, : len(c)] = c
        mask[slot, : len(c)] = True
    return index, mask, np.concatenate(targets), np.concatenate(owners)


class VPL:
    """Variational preference learning over frozen features."""

    name = "vpl"

    def __init__(self, featurizer: Featurizer, config: VPLConfig | None = None) -> None:
        self.featurizer = featurizer
        self.config = config or VPLConfig()
        self.model = VPLModel(featurizer.dim, self.config)
        self.fitted = False

    def fit(self, population: Population, seed: int = 0) -> VPL:
        """Maximise the ELBO over the population's users (users with at least 2 comparisons train)."""
        cfg = self.config
        arrays = population_arrays(self.featurizer, population)
        rows = arrays.rows_of()
        eligible = np.array([u for u, r in enumerate(rows) if len(r) >= 2])
        if len(eligible) == 0:
            raise ValidationError(
                "population",
                "has no user with at least 2 comparisons",
                "VPL learns from a context and a target per user; give users 2 or more",
            )
        mean, std = feature_stats(arrays)
        chosen, rejected = torch.from_numpy(arrays.chosen), torch.from_numpy(arrays.rejected)
        weight = torch.from_numpy(arrays.weight)
        rng = np.random.default_rng(seed)
        with seeded(seed):
            model = VPLModel(self.featurizer.dim, cfg)
            model.mean.copy_(torch.from_numpy(mean))
            model.std.copy_(torch.from_numpy(std))
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
            for step in range(cfg.steps):
                batch = rng.choice(eligible, size=min(cfg.batch_users, len(eligible)), replace=False)
                index, mask, target, owner = _sample_batch(rows, batch, cfg, rng)
                index_t, target_t = torch.from_numpy(index), torch.from_numpy(target)
                mu, logvar = model.posterior(
                    chosen[index_t], rejected[index_t], torch.from_numpy(mask)
                )  # (U, L)
                z = reparameterize(mu, logvar)[torch.from_numpy(owner)]  # (T, L)
                r_c = model.reward(chosen[target_t], z)  # (T,)
                r_r = model.reward(rejected[target_t], z)  # (T,)
                beta = cfg.kl_weight * kl_anneal_weight(step, cfg.kl_anneal_period, cfg.kl_anneal_baseline)
                loss, _, _ = vpl_elbo_loss(r_c, r_r, mu, logvar, beta, weight[target_t])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        self.model = model.eval()
        self.fitted = True
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValidationError("vpl", "is not fitted", "call fit(population) or load(dir) first")

    def prior(self) -> UserState:
        """The prior N(0, I): the state of a user with no comparisons."""
        latent = self.config.latent_dim
        return UserState(self.name, np.zeros(latent, np.float32), np.ones(latent, np.float32))

    def infer(self, comparisons: Sequence[Comparison]) -> UserState:
        """The Gaussian posterior q(z | C) over all the user's comparisons."""
        self._check_fitted()
        items = check_comparisons(comparisons)
        chosen, rejected = self.featurizer.pair_features(items)  # (n, D) each
        mask = torch.ones(1, len(items), dtype=torch.bool)
        with torch.no_grad():
            mu, logvar = self.model.posterior(
                torch.from_numpy(chosen)[None], torch.from_numpy(rejected)[None], mask
            )
        return UserState(self.name, mu[0].numpy(), logvar[0].exp().numpy(), n_comparisons=len(items))

    def reward(self, prompts: Sequence[str], responses: Sequence[str], state: UserState) -> np.ndarray:
        """``(n,)`` rewards r(x, y, z = mu)."""
        self._check_fitted()
        check_state(state, self.name, self.config.latent_dim)
        phi = torch.from_numpy(self.featurizer.features(prompts, responses))  # (n, D)
        with torch.no_grad():
            return self.model.reward(phi, torch.from_numpy(state.vector)[None]).numpy()

    def prob(self, prompt: str, a: str, b: str, state: UserState) -> float:
        r = self.reward([prompt, prompt], [a, b], state)
        return float(torch.sigmoid(torch.tensor(float(r[0]) - float(r[1]))))

    def information_gain(
        self,
        prompts: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        state: UserState,
        n_samples: int | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """``(B,)`` expected information gain (nats) about z of asking "a or b?" for each candidate.

        Monte Carlo over ``n_samples`` draws z ~ N(mu, diag(variance)) of ``state`` (the prior
        for a new user): I(y; z) = H[E_z p(a > b | z)] - E_z H[p(a > b | z)].
        """
        self._check_fitted()
        check_state(state, self.name, self.config.latent_dim)
        check_candidate_arrays(prompts, a, b)
        assert state.variance is not None  # VPL states always carry one
        samples = n_samples or self.config.info_gain_samples
        phi_a = torch.from_numpy(self.featurizer.features(prompts, a))  # (B, D)
        phi_b = torch.from_numpy(self.featurizer.features(prompts, b))  # (B, D)
        mu = torch.from_numpy(state.vector)[None]  # (1, L)
        logvar = torch.from_numpy(state.variance).log()[None]  # (1, L)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            z = reparameterize(mu, logvar, samples, generator)  # (S, 1, L)
            margins = self.model.reward(phi_a[None], z) - self.model.reward(phi_b[None], z)  # (S, B)
            return expected_information_gain(margins).numpy()

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        return save_artefact(
            directory, self.name, self.featurizer, asdict(self.config), self.model.state_dict()
        )

    @classmethod
    def load(cls, directory: str | Path, featurizer: Featurizer) -> VPL:
        config, tensors = load_artefact(directory, cls.name, featurizer)
        vpl = cls(featurizer, VPLConfig(**config))
        expected = {k: tuple(v.shape) for k, v in vpl.model.state_dict().items()}
        check_tensor_shapes(tensors, expected, cls.name)
        vpl.model.load_state_dict(tensors)
        vpl.model.eval()
        vpl.fitted = True
        return vpl
