"""Decode-time steering math: TD(lambda) value targets, VAS guidance, logit mixing, MODPO loss.

Pure tensor functions; shapes in the docstrings. The papers: VAS (Han et al. 2024,
arXiv 2405.06639), MOD / multi-objective logit mixing (Shi et al. 2024, arXiv 2406.18853),
MODPO (Zhou et al. 2024, arXiv 2310.03708).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def td_lambda_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> torch.Tensor:
    """TD(lambda) targets ``R_t = A_t + V_t`` with GAE advantages, as VAS trains its values.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last valid step is 0) and
    ``A_t = sum_k (gamma * lam)^k delta_{t+k}``. With ``lam = 1`` and ``gamma = 1`` the target
    is the Monte-Carlo return (the sum of rewards from ``t`` on); with ``lam = 0`` it is the
    one-step target ``r_t + gamma * V_{t+1}``.

    Args:
        rewards: ``(batch, T)`` reward received after step ``t`` (VAS: the score on the last token).
        values: ``(batch, T)`` current value estimates ``V_t`` (treated as constants).
        mask: ``(batch, T)`` 1 on valid steps; each row's valid steps are a prefix.
    Returns:
        ``(batch, T)`` targets, 0 on masked steps.
    """
    mask = mask.to(values.dtype)
    values = values.detach() * mask
    rewards = rewards * mask
    steps = values.shape[1]
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)  # (B, T)
    deltas = (rewards + gamma * next_values - values) * mask  # (B, T)
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])  # (B,)
    for t in reversed(range(steps)):
        running = deltas[:, t] + gamma * lam * running * mask[:, t]
        advantages[:, t] = running
    return (advantages + values) * mask


def centred_topk(scores: torch.Tensor, values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` token ids of ``scores`` and ``values`` there, centred over those ``k``.

    Args:
        scores: ``(batch, vocab)`` base logits.
        values: ``(batch, vocab)`` or ``(batch, k)`` ``Q(s, a)`` (a ``(batch, k)`` tensor is
            taken to be already gathered at the top-k ids).
    Returns:
        ``ids`` ``(batch, k)`` and ``Q - mean_k Q`` ``(batch, k)``.
    """
    ids = scores.topk(min(top_k, scores.shape[-1]), dim=-1).indices  # (B, k)
    q = values if values.shape[-1] == ids.shape[-1] else values.gather(-1, ids)  # (B, k)
    return ids, q - q.mean(dim=-1, keepdim=True)


def vas_logits(
    scores: torch.Tensor, ids: torch.Tensor, centred_q: torch.Tensor, beta: torch.Tensor | float
) -> torch.Tensor:
    """VAS guidance: ``l'(a) = l(a) + beta * (Q(s, a) - mean_topk Q)`` on the top-k, others unchanged.

    Args:
        scores: ``(batch, vocab)`` base logits.
        ids: ``(batch, k)`` top-k token ids.
        centred_q: ``(batch, k)`` centred values, or ``(batch, k, n)`` for ``n`` objectives.
        beta: a float, ``(batch,)``, or ``(batch, n)`` per objective (summed over objectives).
    Returns:
        ``(batch, vocab)`` guided logits (a new tensor).
    """
    if centred_q.dim() == 2:
        centred_q = centred_q.unsqueeze(-1)  # (B, k, 1)
    beta_t = torch.as_tensor(beta, dtype=centred_q.dtype, device=centred_q.device)
    if beta_t.dim() == 0:
        beta_t = beta_t.expand(centred_q.shape[0], centred_q.shape[-1])
    elif beta_t.dim() == 1:
        beta_t = beta_t.unsqueeze(-1).expand(-1, centred_q.shape[-1])  # (B, n)
    bonus = (centred_q * beta_t.unsqueeze(1)).sum(dim=-1)  # (B, k)
    return scores.scatter_add(-1, ids, bonus.to(scores.dtype))


def mix_logprobs(
    base_logits: torch.Tensor, objective_logits: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Multi-objective logit mixing: ``log pi_base + sum_k w_k (log pi_k - log pi_base)``.

    Args:
        base_logits: ``(batch, vocab)`` logits of the base (or the user's own) policy.
        objective_logits: ``(batch, n, vocab)`` logits of the ``n`` objective policies.
        weights: ``(batch, n)`` mixing weights (any real numbers; 0 leaves the base unchanged).
    Returns:
        ``(batch, vocab)`` unnormalised mixed log-probabilities; with all weights 0 this is
        ``log_softmax(base_logits)`` exactly. Tokens that are ``-inf`` in any input stay ``-inf``.
    """
    base = F.log_softmax(base_logits.float(), dim=-1)  # (B, V)
    objectives = F.log_softmax(objective_logits.float(), dim=-1)  # (B, n, V)
    # A token some processor banned (-inf, e.g. end-of-turn under min_new_tokens) stays banned
    # instead of becoming -inf - -inf = nan.
    banned = torch.isneginf(base) | torch.isneginf(objectives).any(dim=1)  # (B, V)
    mixed = base + (weights.float().unsqueeze(-1) * (objectives - base.unsqueeze(1)).nan_to_num(0.0)).sum(
        dim=1
    )
    return mixed.masked_fill(banned, -float("inf"))


def modpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    margin_chosen: torch.Tensor,
    margin_rejected: torch.Tensor,
    objective_weight: float,
    margin_weights: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """MODPO loss on pairs labelled by objective ``k``, other objectives as a margin.

    ``rho(y) = (beta * (log pi(y) - log pi_ref(y)) - w_{-k} . r_{-k}(y)) / w_k`` and
    ``L = -log sigma(rho(y_w) - rho(y_l))``. With ``w_{-k} = 0`` and ``w_k = 1`` it is DPO.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(batch,)`` summed log-probs.
        margin_chosen, margin_rejected: ``(batch, m)`` the other objectives' rewards.
        objective_weight: ``w_k > 0``.
        margin_weights: ``(m,)`` the weights ``w_{-k}``.
    Returns:
        ``(batch,)`` per-pair losses.
    """
    logratio = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (B,)
    margin = (margin_chosen - margin_rejected) @ margin_weights.to(margin_chosen.dtype)  # (B,)
    return -F.logsigmoid((logratio - margin) / objective_weight)
