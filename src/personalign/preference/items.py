"""Item effects: a learned reward offset for each (prompt, response) seen in the fit population.

Where many users judge the same items (POPQUORN: every comment is rated by 5-10 annotators),
how the population ranks an item is the strongest single predictor of how a new user will,
and no text encoder recovers it from the words alone. Item effects are the classical
Bradley-Terry item parameters on top of a feature model:

    r(x, y) = f(x, y) + b[(x, y)]     with b = 0 for items never seen in fitting,

fitted after ``f`` by full-batch L-BFGS on the same comparisons with ``f``'s margins held
fixed, maximising the summed log-likelihood minus ``l2 * ||b||^2`` (a Gaussian prior on each
offset worth ``l2`` comparisons, so an item seen once moves little). Items are
keyed by a 63-bit BLAKE2b hash of ``prompt + "\\0" + response``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from personalign.functional.preference import bradley_terry_loss


def item_key(prompt: str, response: str) -> int:
    """A stable signed 63-bit key of one (prompt, response) item."""
    digest = hashlib.blake2b(f"{prompt}\0{response}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def item_keys(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return np.array([item_key(p, r) for p, r in zip(prompts, responses, strict=True)], dtype=np.int64)


@dataclass
class ItemEffects:
    """Sorted item keys ``(M,)`` int64 and their reward offsets ``(M,)`` float32."""

    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls) -> ItemEffects:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """``(n,)`` offsets of ``keys`` (0 for unseen items)."""
        if len(self) == 0:
            return np.zeros(len(keys), np.float32)
        pos = np.searchsorted(self.keys, keys).clip(0, len(self) - 1)
        found = self.keys[pos] == keys
        return np.where(found, self.values[pos], 0.0).astype(np.float32)

    def offsets(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.lookup(item_keys(prompts, responses))

    @classmethod
    def fit(
        cls,
        chosen_keys: np.ndarray,
        rejected_keys: np.ndarray,
        base_margin: np.ndarray,
        weight: np.ndarray,
        l2: float,
        max_iter: int = 100,
    ) -> ItemEffects:
        """Offsets maximising sum_i w_i log sigma(m_i + b[c_i] - b[r_i]) - l2 ||b||^2 with the margins ``m`` fixed."""
        # bradley_terry_loss is a weighted mean; multiplying by sum(w) gives the weighted sum.
        keys, inverse = np.unique(np.concatenate([chosen_keys, rejected_keys]), return_inverse=True)
        n = len(chosen_keys)
        ic, ir = torch.from_numpy(inverse[:n]), torch.from_numpy(inverse[n:])
        margin = torch.as_tensor(base_margin, dtype=torch.float32)
        w = torch.as_tensor(weight, dtype=torch.float32)
        b = torch.zeros(len(keys), requires_grad=True)
        optimizer = torch.optim.LBFGS([b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
        zeros = torch.zeros(n)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            # The summed (not averaged) likelihood: ``l2`` is a prior precision in units of comparisons.
            loss = bradley_terry_loss(margin + b[ic] - b[ir], zeros, w) * w.sum() + l2 * b.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(keys.astype(np.int64), b.detach().numpy().astype(np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "item_keys": torch.from_numpy(self.keys.copy()),
            "item_values": torch.from_numpy(self.values.copy()),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ItemEffects:
        if "item_keys" not in tensors:
            return cls.empty()
        return cls(
            tensors["item_keys"].numpy().astype(np.int64), tensors["item_values"].numpy().astype(np.float32)
        )
