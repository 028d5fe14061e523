"""DPO-family preference losses on sequence log-probabilities.

Inputs are log-probabilities of whole responses, summed over response tokens:
``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected``, each ``(batch,)``.
The implicit reward of a response is ``beta * (log pi(y|x) - log pi_ref(y|x))``.
Every loss returns ``(batch,)`` per-pair losses; :func:`reduce_pairs` applies pair weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``, shape ``(batch,)``."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023) with conservative label smoothing ``eps``.

    ``L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, ``(batch,)``.
    """
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)  # (B,)
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """IPO (Azar et al. 2023): ``L = (h - 1 / (2 beta))^2``, ``(batch,)``.

    With ``chosen_lengths``/``rejected_lengths`` (token counts, ``(batch,)``) each log-ratio is
    divided by its response length first, as TRL does; without them ``h`` is sequence-summed,
    as in the FSPO code (beta 0.01, target margin 50).
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen = chosen / chosen_lengths.clamp(min=1).to(chosen.dtype)
        rejected = rejected / rejected_lengths.clamp(min=1).to(rejected.dtype)
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin ``gamma``.

    ``m = log pi(y_w)/|y_w| - log pi(y_l)/|y_l| - gamma / beta``;
    ``L = -(1 - eps) log sigma(beta m) - eps log sigma(-beta m)``, ``(batch,)``.
    """
    chosen = policy_chosen / chosen_lengths.clamp(min=1).to(policy_chosen.dtype)
    rejected = policy_rejected / rejected_lengths.clamp(min=1).to(policy_rejected.dtype)
    m = chosen - rejected - gamma / beta  # (B,)
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta * logratio(y_w), beta * logratio(y_l))``, each ``(batch,)``."""
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def reduce_pairs(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of per-pair losses: ``sum(w_i L_i) / sum(w_i)`` (plain mean without weights)."""
    if weights is None:
        return losses.mean()
    weights = weights.to(losses.dtype)
    return (weights * losses).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of ``labels`` under ``logits`` where ``mask`` is 1.

    Args:
        logits: ``(batch, T, vocab)``, position t predicts token t+1.
        labels: ``(batch, T)`` token ids.
        mask: ``(batch, T)``, 1 on response tokens (the tokens being scored).
    Returns:
        ``(batch,)``.
    """
    logits = logits[:, :-1]  # (B, T-1, V): predictions for tokens 1..T-1
    targets = labels[:, 1:]  # (B, T-1)
    weights = mask[:, 1:].to(logits.dtype)  # (B, T-1)
    token_logps = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    )  # (B, T-1)
    return (token_logps * weights).sum(dim=-1).to(logits.dtype)
