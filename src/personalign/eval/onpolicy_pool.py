"""The generator's own answers and the synthetic users' comparisons of them (on-policy data).

- :func:`answer_pool`: ``n_per_prompt`` plain samples of the generator per prompt (no user, no
  steering; temperature 0.8 by default), cached on disk per model, prompts and settings, since
  they do not depend on the user; :func:`greedy_answers`: the generic answers, cached likewise.
- :func:`onpolicy_population`: every user answers random pairs of pooled answers to the given
  prompts; the result has the templated population's shape (``shots`` then ``held_out``).
- :func:`active_shots`: enrolment questions chosen one at a time by expected information gain.

The ranking report built on them is :mod:`personalign.eval.onpolicy`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.populations import EvalPopulation, EvalUser, SyntheticPopulation
from personalign.types import Comparison


@dataclass(frozen=True)
class PoolConfig:
    """How the generator's answers are sampled: ``n_per_prompt`` per prompt, plain sampling."""

    n_per_prompt: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_per_prompt < 2:
            raise ValidationError(
                "pool.n_per_prompt",
                "must be at least 2 (pairs are drawn from it)",
                "use e.g. 8",
                self.n_per_prompt,
            )
        if self.max_new_tokens < 1:
            raise ValidationError(
                "pool.max_new_tokens", "must be at least 1", "use e.g. 128", self.max_new_tokens
            )
        if not self.temperature > 0:
            raise ValidationError(
                "pool.temperature", "must be > 0 (the pool is sampled)", "use e.g. 0.8", self.temperature
            )


def _cache_path(kind: str, model_id: str, prompts: Sequence[str], settings: dict[str, Any]) -> Path:
    from personalign.models import cache_root

    key = hashlib.sha256(
        json.dumps([kind, model_id, list(prompts), settings], sort_keys=True).encode()
    ).hexdigest()[:16]
    return cache_root() / "onpolicy" / f"{kind}-{key}.json"


def _cached(path: Path, make: Callable[[], dict[str, Any]], cache: bool) -> dict[str, Any]:
    if cache and path.is_file():
        return json.loads(path.read_text())
    value = make()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    return value


def answer_pool(
    generator: Any,
    prompts: Sequence[str],
    config: PoolConfig | None = None,
    cache: bool = True,
    progress: bool = False,
) -> dict[str, list[str]]:
    """``{prompt: answers}``: distinct non-empty samples of the plain generator (at most ``n_per_prompt``).

    Cached under ``$PERSONALIGN_CACHE/onpolicy`` by model id, prompts and settings.
    """
    from personalign.training.samples import sample_responses

    config = config or PoolConfig()
    prompts = list(dict.fromkeys(prompts))

    def make() -> dict[str, Any]:
        samples = sample_responses(
            generator,
            prompts,
            config.n_per_prompt,
            config.max_new_tokens,
            config.temperature,
            seed=config.seed,
            batch_size=16,
            progress=progress,
        )
        pool: dict[str, list[str]] = {p: [] for p in prompts}
        for s in samples:
            if s.text and s.text not in pool[s.prompt]:
                pool[s.prompt].append(s.text)
        return pool

    pool = _cached(_cache_path("pool", generator.model_id, prompts, asdict(config)), make, cache)
    short = [p for p, answers in pool.items() if len(answers) < 2]
    if short:
        raise ValidationError(
            "pool",
            f"has fewer than 2 distinct answers for {len(short)} prompts",
            "sample more per prompt (n_per_prompt) or at a higher temperature",
            short[:3],
        )
    return pool


def greedy_answers(
    generator: Any, prompts: Sequence[str], max_new_tokens: int = 128, cache: bool = True
) -> dict[str, str]:
    """``{prompt: the generic answer}``: plain greedy ``generate`` with no user (cached like the pool)."""
    from personalign.training.samples import sample_responses

    prompts = list(dict.fromkeys(prompts))

    def make() -> dict[str, Any]:
        return {
            s.prompt: s.text
            for s in sample_responses(generator, prompts, 1, max_new_tokens, temperature=0.0, batch_size=8)
        }

    return _cached(
        _cache_path("greedy", generator.model_id, prompts, {"max_new_tokens": max_new_tokens}), make, cache
    )


def onpolicy_comparisons(
    population: SyntheticPopulation,
    user: str,
    pool: dict[str, list[str]],
    prompts: Sequence[str],
    n: int,
    rng: np.random.Generator,
) -> list[Comparison]:
    """``n`` of ``user``'s labelled comparisons between two pooled answers to a random prompt of ``prompts``."""
    out = []
    for _ in range(n):
        prompt = prompts[int(rng.integers(len(prompts)))]
        answers = pool[prompt]
        i, j = rng.choice(len(answers), size=2, replace=False)
        out.append(population.answer(user, prompt, answers[int(i)], answers[int(j)], rng))
    return out


def onpolicy_population(
    population: SyntheticPopulation,
    pool: dict[str, list[str]],
    prompts: Sequence[str],
    shots: int = 8,
    held_out: int = 16,
    seed: int = 0,
) -> EvalPopulation:
    """Every synthetic user answers ``shots + held_out`` on-policy comparisons on ``prompts`` (seeded)."""
    missing = [p for p in prompts if p not in pool]
    if missing:
        raise ValidationError(
            "prompts",
            f"has {len(missing)} prompts with no pooled answers",
            "build the pool with answer_pool over these prompts",
            missing[:3],
        )
    rng = np.random.default_rng(1_000_003 + seed)
    users = []
    for i, user in enumerate(population.user_ids):
        answered = onpolicy_comparisons(population, user, pool, list(prompts), shots + held_out, rng)
        users.append(
            EvalUser(
                user,
                answered[:shots],
                answered[shots:],
                f"type-{population.user_types[i]}",
                population.user_weights[i].copy(),
            )
        )
    meta = {
        "source": "synthetic-onpolicy",
        "config": population.config.__dict__,
        "shots": shots,
        "held_out": held_out,
        "prompts": len(prompts),
    }
    return EvalPopulation("synthetic-onpolicy", users, meta)


def active_shots(
    embedder: Any,
    population: SyntheticPopulation,
    user: str,
    pool: dict[str, list[str]],
    prompts: Sequence[str],
    k: int,
    rng: np.random.Generator,
    candidates: int = 128,
) -> list[Comparison]:
    """``k`` on-policy comparisons chosen one at a time by expected information gain about the user
    (what ``Personalizer.next_question`` ranks), each answered by the synthetic user, the state
    re-inferred after each answer. The candidates are random pairs of pooled answers to ``prompts``."""
    shots: list[Comparison] = []
    for _ in range(k):
        state = embedder.infer(shots) if shots else embedder.prior()
        pairs = []
        for _ in range(candidates):
            prompt = prompts[int(rng.integers(len(prompts)))]
            i, j = rng.choice(len(pool[prompt]), size=2, replace=False)
            pairs.append((prompt, pool[prompt][int(i)], pool[prompt][int(j)]))
        gain = embedder.information_gain(
            [p for p, _, _ in pairs], [a for _, a, _ in pairs], [b for _, _, b in pairs], state
        )
        prompt, a, b = pairs[int(np.argmax(gain))]
        shots.append(population.answer(user, prompt, a, b, rng))
    return shots
