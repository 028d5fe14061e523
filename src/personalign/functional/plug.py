"""Persona-Plug math: input-aware attention over history items and the soft-token scale.

Pure tensor functions; shapes in the docstrings. The paper: Liu et al., "LLMs + Persona-Plug =
Personalized LLMs" (ACL 2025, arXiv 2409.11901; code github.com/rucliujn/PPlug, ``code/ModelForPer.py``).
"""

from __future__ import annotations

import torch

from personalign.functional.dpo import sequence_logps


def plug_attention(items: torch.Tensor, item_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``a_i = softmax_i(h_i . q)`` over each user's valid items (dot product, no temperature).

    Args:
        items: ``(batch, N, d)`` history item vectors ``h_i``.
        item_mask: ``(batch, N)`` bool, True on real items; padding gets ``-inf`` before the softmax.
        query: ``(batch, d)`` the (mapped) query vector ``q``.
    Returns:
        ``(batch, N)`` weights summing to 1 per row, exactly 0 on padding. A row without any
        valid item has no softmax (it would be NaN); callers reject such rows first.
    """
    scores = torch.einsum("bnd,bd->bn", items, query)  # (B, N)
    scores = scores.masked_fill(~item_mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def pool(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``P = sum_i a_i v_i``: ``values`` ``(batch, N, D)``, ``weights`` ``(batch, N)`` -> ``(batch, D)``."""
    return torch.einsum("bnd,bn->bd", values, weights)


def rescale_to_norm(vectors: torch.Tensor, norm: float, eps: float = 1e-12) -> torch.Tensor:
    """``norm * v / max(||v||_2, eps)`` per row: ``(batch, D)`` -> ``(batch, D)`` with L2 norm ``norm``.

    PPlug multiplies its user vector by a constant matched to the backbone's embedding norm
    (539.97 for FlanT5-XXL); normalising first makes the norm exact whatever the projector
    outputs, so the soft token is neither drowned out nor dominant. An exactly zero row stays 0.
    """
    return vectors * (norm / vectors.norm(dim=-1, keepdim=True).clamp_min(eps))


def response_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the masked tokens and how many there are.

    Args:
        logits: ``(batch, T, vocab)``, position t predicts token t+1.
        labels: ``(batch, T)`` token ids.
        mask: ``(batch, T)``, 1 on the tokens being scored (response tokens and the end-of-turn).
    Returns:
        ``(total_nll, n_tokens)``, two scalars; the token-mean NLL is their ratio.
    """
    total = -sequence_logps(logits, labels, mask).float().sum()
    return total, mask[:, 1:].sum().to(total.dtype)
