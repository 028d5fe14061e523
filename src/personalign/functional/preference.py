"""Preference math: Bradley-Terry, the VPL ELBO, PAL mixtures, information gain.

Pure tensor-in, tensor-out functions with no state and no IO. Shapes use ``B`` for pairs or
items, ``U`` for users, ``L`` for the latent size, ``K`` for PAL prototypes, ``S`` for Monte
Carlo samples and ``R`` for a reference set.

References:
    Bradley & Terry (1952), p(a > b) = sigma(r_a - r_b).
    VPL: Poddar et al. 2024, "Personalizing RLHF with Variational Preference Learning".
    PAL: Chen et al. 2025, "PAL: Sample-Efficient Personalized Reward Modeling and Pluralistic Alignment".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)


def bradley_terry_log_likelihood(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> torch.Tensor:
    """log p(chosen > rejected) = log sigma(r_c - r_r), elementwise.

    Args:
        chosen_rewards: ``(B,)`` rewards of the preferred responses (any shape, broadcast).
        rejected_rewards: ``(B,)`` rewards of the dispreferred responses.

    Returns:
        ``(B,)`` log-probabilities (<= 0), computed with ``logsigmoid`` for stability.
    """
    return F.logsigmoid(chosen_rewards - rejected_rewards)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean negative log-likelihood of the Bradley-Terry model.

    loss = - sum_i w_i log sigma(r_c,i - r_r,i) / sum_i w_i

    Args:
        chosen_rewards: ``(B,)``.
        rejected_rewards: ``(B,)``.
        weights: ``(B,)`` non-negative pair weights (``Comparison.weight``); ``None`` means all 1.

    Returns:
        ``()`` scalar loss.
    """
    nll = -bradley_terry_log_likelihood(chosen_rewards, rejected_rewards)  # (B,)
    if weights is None:
        return nll.mean()
    return (weights * nll).sum() / weights.sum().clamp_min(torch.finfo(nll.dtype).tiny)


def bradley_terry_prob(reward_a: torch.Tensor, reward_b: torch.Tensor) -> torch.Tensor:
    """p(a > b) = sigma(r_a - r_b), elementwise; ``(B,)`` in, ``(B,)`` out."""
    return torch.sigmoid(reward_a - reward_b)


def gaussian_kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ), summed over the latent dimensions.

    KL = 1/2 sum_d (mu_d^2 + sigma_d^2 - 1 - log sigma_d^2)

    Args:
        mu: ``(U, L)`` posterior means.
        logvar: ``(U, L)`` posterior log-variances.

    Returns:
        ``(U,)`` KL per user, in nats.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) (the reparameterisation trick).

    Args:
        mu: ``(U, L)``.
        logvar: ``(U, L)``.
        n_samples: ``None`` for one sample of shape ``(U, L)``; ``S`` for ``(S, U, L)``.
        generator: optional torch generator for reproducible noise.

    Returns:
        ``(U, L)`` or ``(S, U, L)`` samples, differentiable in ``mu`` and ``logvar``.
    """
    shape = mu.shape if n_samples is None else (n_samples, *mu.shape)
    eps = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + (0.5 * logvar).exp() * eps


def kl_anneal_weight(step: int, period: int, baseline: float = 0.1) -> float:
    """Cyclical cosine KL annealing (VPL: a 1e4-step cycle with baseline 0.1).

    Within each cycle of ``period`` steps the weight rises from ``baseline`` to 1 along half a
    cosine: ``w(t) = baseline + (1 - baseline) * (1 - cos(pi * t)) / 2`` with ``t`` the position
    in the cycle, in ``[0, 1)``.
    """
    if period <= 0:
        return 1.0
    t = (step % period) / period
    return baseline + (1.0 - baseline) * (1.0 - math.cos(math.pi * t)) / 2.0


def vpl_elbo_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative VPL ELBO: Bradley-Terry NLL of target pairs plus the weighted KL.

    loss = BT_NLL(r(y_c, z), r(y_r, z)) + kl_weight * mean_u KL(q(z|C_u) || N(0, I)),

    where the rewards were computed with ``z`` drawn from each pair's user posterior
    (:func:`reparameterize`), and ``kl_weight`` is the base weight times the annealing factor.

    Args:
        chosen_rewards: ``(B,)`` r(y_c, z) for the target pairs.
        rejected_rewards: ``(B,)`` r(y_r, z).
        mu: ``(U, L)`` posterior means of the users in the batch.
        logvar: ``(U, L)`` posterior log-variances.
        kl_weight: scalar weight of the KL term (already annealed).
        weights: optional ``(B,)`` pair weights.

    Returns:
        ``(loss, nll, kl)``, three ``()`` scalars; ``loss = nll + kl_weight * kl``.
    """
    nll = bradley_terry_loss(chosen_rewards, rejected_rewards, weights)
    kl = gaussian_kl_to_standard_normal(mu, logvar).mean()
    return nll + kl_weight * kl, nll, kl


def pal_mixture_scores(prototype_rewards: torch.Tensor, mixture_logits: torch.Tensor) -> torch.Tensor:
    """PAL: a user's reward is the softmax mixture of K prototype rewards.

    s(x, y) = sum_k softmax(W_u)_k * r_k(x, y)

    With dot-product prototypes ``r_k = tau * <f(x, y), p_k>`` this equals scoring against the
    user's ideal point ``a_u = sum_k softmax(W_u)_k p_k``.

    Args:
        prototype_rewards: ``(B, K)`` reward of each item under each prototype.
        mixture_logits: ``(K,)`` one user's logits W_u, or ``(B, K)`` per item.

    Returns:
        ``(B,)`` mixed scores.
    """
    weights = torch.softmax(mixture_logits, dim=-1)  # (K,) or (B, K)
    return (prototype_rewards * weights).sum(dim=-1)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log p - (1 - p) log(1 - p) in nats, elementwise, with H(0) = H(1) = 0."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1.0 - p, 1.0 - p))


def expected_information_gain(margin_samples: torch.Tensor) -> torch.Tensor:
    """Mutual information between a comparison's binary answer and the user latent z.

    For a candidate (a, b) and posterior samples z_s ~ q(z | C), with p_s = sigma(r(a, z_s) -
    r(b, z_s)):

        I(y; z | C) = H[ mean_s p_s ] - mean_s H[p_s]        (BALD; Houlsby et al. 2011)

    It is 0 when every sample agrees and at most log 2 nats.

    Args:
        margin_samples: ``(S, B)`` reward margins r(a, z_s) - r(b, z_s) for B candidates.

    Returns:
        ``(B,)`` expected information gain in nats.
    """
    p = torch.sigmoid(margin_samples)  # (S, B)
    gain = binary_entropy(p.mean(dim=0)) - binary_entropy(p).mean(dim=0)
    return gain.clamp_min(0.0)


def expected_win_probability(rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
    """VPL's reward scaling: the probability of beating a random reference response.

    r~(y) = mean_j sigma(r(y) - r(y'_j)), bounded in (0, 1) and comparable across users
    (Bradley-Terry rewards are identified only up to a per-user offset).

    Args:
        rewards: ``(B,)`` rewards to scale.
        reference_rewards: ``(R,)`` rewards of the reference set under the same user.

    Returns:
        ``(B,)`` expected win probabilities.
    """
    return torch.sigmoid(rewards[:, None] - reference_rewards[None, :]).mean(dim=1)
