"""The pure pieces of :mod:`personalign.eval.psoups_decode`: which users are decoded and against
which decoy, how an answer is judged against the generic one, win rates with Wilson intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.population_base import EvalUser
from personalign.preference.style import STYLE_FEATURES, style_features

OPPOSITE = {"elementary": "phd", "phd": "elementary", "friendly": "unfriendly", "unfriendly": "friendly"}


STYLE_SHOWN = (
    "words",
    "syllables_per_word",
    "long_word_share",
    "exclamations",
    "warm_words",
    "cold_words",
    "second_person",
)


def choose_users(test: Sequence[EvalUser], users: int, seed: int) -> list[tuple[EvalUser, EvalUser]]:
    """``(user, decoy)`` pairs: in a seeded order of ``test``, the first ``users // personas`` test
    users of each persona; each user's decoy is the selected user of the opposite persona with the
    same rank. Swapping every label for its opposite selects the same users and pairs."""
    personas = sorted({str(u.group) for u in test if u.group in OPPOSITE and u.shots and u.held_out})
    if not personas or any(OPPOSITE[p] not in personas for p in personas):
        raise ValidationError(
            "test",
            f"has personas {personas}",
            "use both files' personas in pairs (elementary/phd, friendly/unfriendly)",
        )
    quota = users // len(personas)
    order = np.random.default_rng(seed).permutation(len(test))
    chosen: dict[str, list[EvalUser]] = {p: [] for p in personas}
    for i in order:
        u = test[int(i)]
        if u.group in chosen and u.shots and u.held_out and len(chosen[u.group]) < quota:
            chosen[u.group].append(u)
    quota = min(len(v) for v in chosen.values())  # a persona with fewer test users bounds all
    return [(chosen[p][k], chosen[OPPOSITE[p]][k]) for p in personas for k in range(quota)]


def judged(judge_rewards: np.ndarray) -> float:
    """1 / 0.5 / 0: does the answer (``judge_rewards[0]``) beat the generic answer (``[1]``)?"""
    mine, theirs = float(judge_rewards[0]), float(judge_rewards[1])
    return 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0


def pick_by_reward(scores: Sequence[float], texts: Sequence[str]) -> int:
    """As ``Personalizer`` reranks: the highest score, an empty candidate never picked over a real one."""
    from personalign.steering.rerank import pick

    return pick([s if t.strip() else -np.inf for s, t in zip(scores, texts, strict=True)])


def style_shift(answers: Sequence[str], generics: Sequence[str]) -> dict[str, float]:
    """Mean stylometric difference answer minus generic for a few features (:data:`STYLE_SHOWN`)."""
    index = [STYLE_FEATURES.index(name) for name in STYLE_SHOWN]
    diff = np.stack(
        [style_features(a)[index] - style_features(g)[index] for a, g in zip(answers, generics, strict=True)]
    )  # (n, 7)
    return {name: round(float(v), 4) for name, v in zip(STYLE_SHOWN, diff.mean(axis=0), strict=True)}


def wilson_interval(wins: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of ``wins`` of ``n`` (ties counted half, so ``wins`` may end in .5):
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, ``p = wins / n``; for whole
    ``wins`` it equals :func:`personalign.eval.adapters.wilson`. ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = wins / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (
        float(max((centre - half) / (1 + z * z / n), 0.0)),
        float(min((centre + half) / (1 + z * z / n), 1.0)),
    )


def summarise_scores(
    scores: Sequence[float], users: Sequence[str], personas: Sequence[str]
) -> dict[str, Any]:
    """Win rate, Wilson interval, per persona and per user, from one score per judged answer."""
    wins = float(sum(scores))
    per_user: dict[str, list[float]] = {}
    per_persona: dict[str, list[float]] = {}
    for s, u, p in zip(scores, users, personas, strict=True):
        per_user.setdefault(u, []).append(s)
        per_persona.setdefault(p, []).append(s)
    return {
        "win_rate": wins / len(scores),
        "ci": list(wilson_interval(wins, len(scores))),
        "n": len(scores),
        "per_persona": {p: float(np.mean(v)) for p, v in sorted(per_persona.items())},
        "per_user": {u: float(np.mean(v)) for u, v in per_user.items()},
        "scores": list(scores),
    }
