"""Fitting a user's K weights over the bases of a :class:`~personalign.adapters.bank.LoraBank` (the
implicit-reward likelihood of DPO; see :mod:`personalign.adapters.bank`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from personalign.adapters.lora import batch_logps, collate
from personalign.errors import ValidationError
from personalign.types import Comparison


@dataclass
class BankFit:
    """A user's weights over the bank's bases and how well they explain the user's comparisons."""

    weights: np.ndarray
    accuracy: float
    log_likelihood: float
    n_comparisons: int
    method: str
    history: list[float] = field(default_factory=list)


class BankFitting:
    """The fitting half of :class:`~personalign.adapters.bank.LoraBank`, which it is mixed into: it uses
    the bank's ``generator``, ``beta``, ``prior_scale``, ``k``, ``applied`` and ``_check_weights``."""

    def _reference(self) -> Any:
        model = self.generator.model
        return model.disable_adapter() if hasattr(model, "disable_adapter") else _null()

    def _logps(self, comparisons: Sequence[Comparison], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate(self.generator.tokenizer, comparisons, max_length)
        return batch_logps(self.generator.model, batch)

    def basis_margins(
        self, comparisons: Sequence[Comparison], batch_size: int = 8, max_length: int = 512
    ) -> np.ndarray:
        """``(n, K)``: basis k's implicit-reward margin ``r_k(chosen) - r_k(rejected)`` per comparison."""
        comparisons = _check_comparisons(comparisons)
        out = np.zeros((len(comparisons), self.k), dtype=np.float64)
        eye = torch.eye(self.k)
        with torch.no_grad():
            for start in range(0, len(comparisons), batch_size):
                chunk = comparisons[start : start + batch_size]
                with self._reference():
                    rc, rr = self._logps(chunk, max_length)
                for k in range(self.k):
                    with self.applied(eye[k]):
                        pc, pr = self._logps(chunk, max_length)
                    out[start : start + len(chunk), k] = (
                        (self.beta * ((pc - rc) - (pr - rr))).double().cpu().numpy()
                    )
        return out

    def fit_margins(
        self, margins: np.ndarray, sample_weights: np.ndarray | None = None, steps: int = 200
    ) -> np.ndarray:
        """MAP weights of the linear model from precomputed :meth:`basis_margins` (Newton's method)."""
        m = np.asarray(margins, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != self.k or m.shape[0] == 0:
            raise ValidationError(
                "margins",
                f"has shape {m.shape}",
                f"pass an (n, {self.k}) array from basis_margins with n >= 1",
            )
        if not np.isfinite(m).all():
            raise ValidationError(
                "margins", "contains NaN or infinite values", "recompute them with basis_margins"
            )
        sw = np.ones(len(m)) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
        precision = 1.0 / self.prior_scale**2
        w = np.zeros(self.k)
        for _ in range(steps):
            z = m @ w
            p = 1.0 / (1.0 + np.exp(-z))
            grad = m.T @ (sw * (1.0 - p)) - precision * w  # gradient of the log posterior
            hess = -(m.T * (sw * p * (1.0 - p))) @ m - precision * np.eye(self.k)
            step = np.linalg.solve(hess, grad)
            w = w - step
            if np.abs(step).max() < 1e-10:
                break
        return w

    def fit(
        self,
        comparisons: Sequence[Comparison],
        method: str = "linear",
        steps: int = 20,
        learning_rate: float = 0.05,
        max_length: int = 512,
    ) -> BankFit:
        """Fit a user's K weights to their comparisons; the generator's weights never change."""
        comparisons = _check_comparisons(comparisons)
        if method not in ("linear", "exact"):
            raise ValidationError(
                "method",
                f"is {method!r}",
                "use 'linear' (K+1 forward passes per pair) or 'exact' (gradients into the K weights)",
            )
        margins = self.basis_margins(comparisons, max_length=max_length)
        sw = np.array([c.weight for c in comparisons], dtype=np.float64)
        w = self.fit_margins(margins, sw)
        history: list[float] = []
        if method == "exact":
            w, history = self._refine(comparisons, w, sw, steps, learning_rate, max_length)
        z = self.margins_under(
            comparisons, w, max_length
        )  # the combined adapter's own margins, whichever fit
        log_lik = float(np.sum(sw * -np.logaddexp(0.0, -z)))
        return BankFit(
            np.asarray(w, dtype=np.float32), float(np.mean(z > 0)), log_lik, len(comparisons), method, history
        )

    def margins_under(
        self, comparisons: Sequence[Comparison], weights: Any, max_length: int = 512
    ) -> np.ndarray:
        """The combined adapter's own implicit-reward margins ``(n,)`` (no linearisation)."""
        comparisons = _check_comparisons(comparisons)
        with torch.no_grad():
            with self._reference():
                rc, rr = self._logps(comparisons, max_length)
            with self.applied(weights):
                pc, pr = self._logps(comparisons, max_length)
        return (self.beta * ((pc - rc) - (pr - rr))).double().cpu().numpy()

    def _refine(
        self,
        comparisons: list[Comparison],
        w0: np.ndarray,
        sw: np.ndarray,
        steps: int,
        lr: float,
        max_length: int,
    ) -> tuple[np.ndarray, list[float]]:
        with torch.no_grad(), self._reference():
            rc, rr = self._logps(comparisons, max_length)
        w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
        weights = torch.tensor(sw, dtype=torch.float32)
        optimizer = torch.optim.Adam([w], lr=lr)
        precision = 1.0 / self.prior_scale**2
        history = []
        for _ in range(steps):
            with self.applied(w):
                pc, pr = self._logps(comparisons, max_length)
            z = self.beta * ((pc - rc) - (pr - rr))
            loss = -(weights * torch.nn.functional.logsigmoid(z)).sum() + 0.5 * precision * (w * w).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
        return w.detach().numpy().astype(np.float64), history

    def prob(self, margins: np.ndarray, weights: Any) -> np.ndarray:
        """``p(chosen preferred)`` per row of precomputed basis margins under the linear model."""
        w = self._check_weights(weights).double().numpy()
        return 1.0 / (1.0 + np.exp(-(np.asarray(margins, dtype=np.float64) @ w)))


@contextmanager
def _null() -> Iterator[None]:
    yield


def _check_comparisons(comparisons: Sequence[Comparison]) -> list[Comparison]:
    items = list(comparisons)
    if not items:
        raise ValidationError("comparisons", "is empty", "pass at least one comparison")
    for i, c in enumerate(items):
        if not isinstance(c, Comparison):
            raise ValidationError(
                f"comparisons[{i}]",
                "is not a Comparison",
                "build it with Comparison(prompt=..., chosen=..., rejected=...)",
                c,
            )
    return items
