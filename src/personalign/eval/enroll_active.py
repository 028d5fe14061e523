"""Active querying for :mod:`personalign.eval.enroll`: accuracy after each question when questions
are chosen by expected information gain, against questions drawn at random."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from personalign.eval.adapters import wilson
from personalign.eval.enroll_scoring import held_out_correct
from personalign.eval.population_base import EvalPopulation
from personalign.eval.synthetic_users import SyntheticPopulation
from personalign.preference.base import UserState

# --- active querying ------------------------------------------------------------------------------


def information_gains(
    embedder: Any, candidates: Sequence[tuple[str, str, str]], state: UserState, seed: int
) -> np.ndarray:
    prompts, a, b = (list(x) for x in zip(*candidates, strict=True))
    return embedder.information_gain(prompts, a, b, state, seed=seed)


def active_curve(
    embedder: Any,
    synth: SyntheticPopulation,
    test: EvalPopulation,
    steps: int,
    pool: int,
    max_users: int,
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
    """Accuracy after each of ``steps`` questions, chosen by information gain vs at random.

    Each test user gets the same pool of ``pool`` unlabelled candidates in both arms, and
    answers them with the same Bradley-Terry noise (a per-user, per-candidate coin), so the
    arms differ only in which questions are asked.
    """
    users = [u for u in test.users if u.held_out][:max_users]
    curves: dict[str, list[list[float]]] = {
        "active": [[0.0, 0] for _ in range(steps)],
        "random": [[0.0, 0] for _ in range(steps)],
    }
    for ui, user in enumerate(users):
        rng = np.random.default_rng([seed, ui])
        candidates = synth.candidate_pairs(pool, rng)
        coins = rng.random(pool)

        def answer(
            i: int, _user: str = user.user, _cands: list = candidates, _coins: np.ndarray = coins
        ) -> Any:
            from personalign.types import Comparison

            prompt, a, b = _cands[i]
            first = _coins[i] < synth.prob(_user, a, b)
            return Comparison(prompt=prompt, chosen=a if first else b, rejected=b if first else a)

        random_order = rng.permutation(pool).tolist()
        for arm in ("active", "random"):
            asked: list[int] = []
            answers = []
            state = embedder.prior()
            for step in range(steps):
                if arm == "random":
                    nxt = random_order[step]
                else:
                    remaining = [i for i in range(pool) if i not in asked]
                    gains = information_gains(
                        embedder, [candidates[i] for i in remaining], state, seed=seed + step
                    )
                    nxt = remaining[int(np.argmax(gains))]
                asked.append(nxt)
                answers.append(answer(nxt))
                state = embedder.infer(answers)
                c, m = held_out_correct(embedder, user, state)
                curves[arm][step][0] += c
                curves[arm][step][1] += m
    out: dict[str, list[dict[str, Any]]] = {}
    for arm, rows in curves.items():
        out[arm] = []
        for step, (c, m) in enumerate(rows):
            low, high = wilson(int(round(c)), int(m))
            out[arm].append(
                {
                    "questions": step + 1,
                    "correct": c,
                    "n": int(m),
                    "accuracy": c / m if m else math.nan,
                    "ci95": [low, high],
                }
            )
    out["users"] = len(users)  # type: ignore[assignment]
    return out
