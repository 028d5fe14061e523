"""Bootstrap intervals shared by the generation harnesses (the Wilson interval is in :mod:`.adapters`).

Both functions are pure: arrays in, numbers out, seeded, no IO.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[str] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` ``(n,)``.

    Without ``groups`` the values are resampled with replacement (for paired differences
    ``d_i = a_i - b_i`` this is the paired bootstrap of ``mean(a) - mean(b)``). With
    ``groups`` (one label per value, e.g. the user) whole groups are resampled, and each
    resample's mean is ``sum of its values / number of its values`` (cluster bootstrap), which
    is the honest interval when a group's values are correlated.
    """
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.ndim != 1 or x.size == 0:
        raise ValidationError(
            "values", "must be a non-empty 1-d sequence", "pass one number per item", x.shape
        )
    if not 0.0 < level < 1.0:
        raise ValidationError("level", "must be in (0, 1)", "use e.g. 0.95", level)
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, x.size, size=(n_resamples, x.size))  # (B, n)
        means = x[idx].mean(axis=1)  # (B,)
    else:
        if len(groups) != x.size:
            raise ValidationError(
                "groups", f"has {len(groups)} labels for {x.size} values", "pass one label per value"
            )
        labels = sorted(set(groups))
        where = {g: i for i, g in enumerate(labels)}
        code = np.array([where[g] for g in groups])
        sums = np.bincount(code, weights=x, minlength=len(labels))  # (G,)
        counts = np.bincount(code, minlength=len(labels)).astype(np.float64)  # (G,)
        idx = rng.integers(0, len(labels), size=(n_resamples, len(labels)))  # (B, G)
        means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)  # (B,)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def win_rate(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, int]:
    """``(wins, n)``: how often ``a_i > b_i``, a tie counted half."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValidationError("b", f"has shape {y.shape}, not {x.shape}", "pass paired scores")
    return float((x > y).sum() + 0.5 * (x == y).sum()), int(x.size)


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """``(figure, axes)`` as ``pyplot.subplots`` gives them, without pyplot: the figure is not
    registered with pyplot and the caller's backend (a notebook's, say) is left as it is.
    ``figsize`` goes to the figure, the rest (``squeeze``, ``gridspec_kw``, ...) to ``subplots``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out and write a matplotlib figure (creating the folder); the path written."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
