"""Held-out pairwise accuracy for :mod:`personalign.eval.enroll`: a user's predictions on their
held-out comparisons, per shot count, the per-type oracle, result rows and their pooled summary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from personalign.eval.adapters import wilson
from personalign.eval.population_base import EvalPopulation, EvalUser
from personalign.preference.base import PreferenceEmbedder, UserState
from personalign.preference.bt import BradleyTerry
from personalign.preference.featurizer import Featurizer

# --- scoring -------------------------------------------------------------------------------------


def _score(rewards_chosen: np.ndarray, rewards_rejected: np.ndarray) -> float:
    """Correct predictions, a tie counted half."""
    diff = np.asarray(rewards_chosen, np.float64) - np.asarray(rewards_rejected, np.float64)
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum())


def held_out_correct(embedder: PreferenceEmbedder, user: EvalUser, state: UserState) -> tuple[float, int]:
    """``(correct, n)`` of ``state``'s predictions on the user's held-out comparisons (one batched reward call)."""
    held = user.held_out
    prompts = [c.prompt_text for c in held]
    rewards = embedder.reward(prompts + prompts, [c.chosen for c in held] + [c.rejected for c in held], state)
    return _score(rewards[: len(held)], rewards[len(held) :]), len(held)


def evaluate_embedder(
    embedder: PreferenceEmbedder, test: EvalPopulation, shots: Sequence[int]
) -> dict[int, tuple[float, int, int]]:
    """``{n: (correct, pairs, users)}`` when each test user is enrolled from their first ``n`` shots.

    A user whose enrolment pool is shorter than ``n`` (P-SOUPS histories lose duplicates) is
    enrolled from all of it, so every test user counts at every shot count.
    """
    out: dict[int, tuple[float, int, int]] = {}
    for n in shots:
        correct, total, users = 0.0, 0, 0
        for user in test.users:
            if not user.shots or not user.held_out:
                continue
            c, m = held_out_correct(embedder, user, embedder.infer(user.shots[:n]))
            correct, total, users = correct + c, total + m, users + 1
        out[n] = (correct, total, users)
    return out


def evaluate_oracle(
    featurizer: Featurizer, fit: EvalPopulation, test: EvalPopulation, shots: Sequence[int], seed: int
) -> dict[int, tuple[float, int, int]] | None:
    """A BT reward per hidden type, fitted on that type's fit users; ``None`` without types."""
    if any(u.group is None for u in fit.users) or any(u.group is None for u in test.users):
        return None
    models: dict[str, BradleyTerry] = {}
    for group in sorted({u.group for u in fit.users if u.group is not None}):
        members = {u.user: u.comparisons for u in fit.users if u.group == group and u.comparisons}
        if members:
            models[group] = BradleyTerry(featurizer).fit(members, seed=seed)
    correct, total, users = 0.0, 0, 0
    for user in test.users:
        model = models.get(str(user.group))
        if model is None or not user.held_out:
            continue
        c, m = held_out_correct(model, user, model.prior())
        correct, total, users = correct + c, total + m, users + 1
    # The oracle is not enrolled: the same number at every shot count.
    return {n: (correct, total, users) for n in shots}


def record(
    source: str, method: str, shots: int, seed: int, correct: float, n: int, users: int, seconds: float
) -> dict[str, Any]:
    """One result row (the same fields as :mod:`personalign.eval.adapters` rows, plus ``data`` and ``users``)."""
    low, high = wilson(int(round(correct)), n) if n else (math.nan, math.nan)
    return {
        "data": source,
        "method": method,
        "shots": shots,
        "seed": seed,
        "correct": correct,
        "n": n,
        "users": users,
        "accuracy": correct / n if n else math.nan,
        "ci95": [low, high],
        "seconds": seconds,
    }


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pool seeds per (data, method, shots): pooled accuracy with a Wilson interval, per-seed mean and sd."""
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["data"], r["method"], r["shots"]), []).append(r)
    rows = []
    for (source, method, shots), rs in sorted(groups.items()):
        correct = sum(r["correct"] for r in rs)
        n = sum(r["n"] for r in rs)
        accs = [r["accuracy"] for r in rs if r["n"]]
        low, high = wilson(int(round(correct)), n) if n else (math.nan, math.nan)
        rows.append(
            {
                "data": source,
                "method": method,
                "shots": shots,
                "seeds": len(rs),
                "correct": correct,
                "n": n,
                "accuracy": correct / n if n else math.nan,
                "ci95": [low, high],
                "seed_mean": float(np.mean(accs)) if accs else math.nan,
                "seed_sd": float(np.std(accs)) if len(accs) > 1 else 0.0,
            }
        )
    return rows
