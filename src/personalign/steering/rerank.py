"""Personal reranking: N sampled answers as rows of one batch, the user's reward picks one.

The generator's own samples already hold what each user wants (best of 8 picked by a synthetic
user's hidden reward beats the generic answer 0.875 of the time); the user's inferred reward,
fitted on on-policy comparisons, finds it. This is the decode-time path that works whatever the
model reads in its context, and it needs nothing but the preference embedder.

The facade expands a request with ``rerank=N`` into N sampled copies (one ``generate`` call,
sampling at ``rerank_temperature`` when the request itself is greedy), scores every candidate with
:meth:`~personalign.Personalizer.reward` and returns the best (:func:`pick`), with what ran in
``ChatResult.personalization`` (:func:`report`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from personalign.errors import ValidationError

METHOD = "user-rerank"
DEFAULT_TEMPERATURE = 0.8  # the temperature the on-policy pools (and the shipped reward) were fitted at


def pick(scores: Sequence[float]) -> int:
    """Index of the highest score; the first on ties (so equal candidates keep sampling order).

    A NaN score is an error: the user's state or the reward is broken, and silently picking
    around it would hide that.
    """
    if not scores:
        raise ValidationError("scores", "is empty", "score at least one candidate")
    if any(math.isnan(s) for s in scores):
        raise ValidationError(
            "scores",
            "contains NaN",
            "refresh the user's state: Personalizer.refresh_state(user)",
            list(scores),
        )
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def report(
    candidates: int, scores: Sequence[float], picked: int, embedder: str, temperature: float
) -> dict[str, Any]:
    """What ``ChatResult.personalization`` says about a reranked reply."""
    return {
        "method": METHOD,
        "candidates": candidates,
        "temperature": temperature,
        "scores": [
            round(float(s), 4) if math.isfinite(s) else None for s in scores
        ],  # None: an empty candidate
        "picked": picked,
        "embedder": embedder,
    }


def skipped(reason: str, requested: str = METHOD) -> dict[str, Any]:
    """``ChatResult.personalization`` when a guidance (reranking by default) was asked for and did not run, and why."""
    return {"method": None, "requested": requested, "reason": reason}
