"""On-policy synthetic comparisons: the generator's own answers, labelled by synthetic users.

A chat app collects comparisons between *its model's* answers. The templated population
(:class:`~personalign.eval.populations.SyntheticPopulation`) compares template texts, which a
reward fitted on them ranks well but the generator's answers only weakly. Here the same
synthetic users (same hidden weights, same attribute functions, same Bradley-Terry labels)
compare answers the generator itself sampled (the data: :mod:`personalign.eval.onpolicy_pool`,
re-exported here):

- :func:`answer_pool`: ``n_per_prompt`` plain samples of the generator per prompt (no user, no
  steering; temperature 0.8 by default), cached on disk per model, prompts and settings, since
  they do not depend on the user.
- :func:`onpolicy_population`: every user answers random pairs of pooled answers to the given
  prompts; the result has the templated population's shape (``shots`` then ``held_out``).
- :func:`run_ranking`: for each embedder and each kind of fitting data (templated, on-policy),
  fitted on the split's training users only: accuracy on the test users' templated held-out
  comparisons, on-policy ranking accuracy (every pair of pooled answers to held-out-topic
  prompts, ordered by the user's hidden reward), and best-of-N selection: the answer the user's
  inferred reward picks from N samples against the generic greedy answer, judged by the hidden
  reward, beside the same pick made with another user's state and with the hidden reward itself.
- The ceilings of that pick (evaluation only, never used for guidance): the pick with no user
  (the embedder's prior state), the hidden-reward oracle's own margin (its pick against another
  user's hidden-reward pick), and the Bayes pick (:func:`bayes_weights`): the posterior mean of
  the user's weights given the same enrolment shots under the population's own generative model
  and the judge's attribute functions, which bounds what any reward inferred from those shots
  can pick.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.adapters import wilson
from personalign.eval.onpolicy_pool import (
    PoolConfig,
    active_shots,
    answer_pool,
    greedy_answers,
    onpolicy_comparisons,
    onpolicy_population,
)
from personalign.eval.populations import EvalUser, SyntheticPopulation
from personalign.types import Comparison

__all__ = [
    "DATA_KINDS",
    "PoolConfig",
    "RankingConfig",
    "active_shots",
    "answer_pool",
    "bayes_weights",
    "best_of_n",
    "fit_split_embedder",
    "fit_user_heads",
    "format_ranking",
    "format_summary",
    "greedy_answers",
    "onpolicy_comparisons",
    "onpolicy_population",
    "run_ranking",
    "train_heads_on_pool",
]


# --- the ranking report -------------------------------------------------------------------------

DATA_KINDS = (
    "templated",
    "onpolicy",
    "both",
)  # what embedders are fitted on ("both": test users enrol on-policy)


@dataclass
class RankingConfig:
    embedders: list[str] = field(default_factory=lambda: ["pal", "bt", "meandiff", "vpl"])
    data: list[str] = field(default_factory=lambda: ["templated", "onpolicy"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    shots: int = 4
    users: int = 16
    prompts_per_user: int = 3
    best_of: int = 8
    enrol: list[str] = field(
        default_factory=lambda: ["random"]
    )  # "random": the split's on-policy shots; "active": chosen by information gain
    features: tuple[str, ...] = ("response", "prompt_x_response", "log_length")
    pool: PoolConfig = field(default_factory=PoolConfig)


def _pairwise_accuracy(hidden: np.ndarray, inferred: np.ndarray) -> tuple[int, int]:
    """Pairs ordered the same way by both score vectors ``(n,)`` (hidden ties skipped): (agree, n)."""
    i, j = np.triu_indices(len(hidden), k=1)
    keep = hidden[i] != hidden[j]
    same = np.sign(hidden[i] - hidden[j]) == np.sign(inferred[i] - inferred[j])
    return int((same & keep).sum()), int(keep.sum())


def best_of_n(
    population: SyntheticPopulation,
    user: str,
    prompt: str,
    candidates: Sequence[str],
    scores: np.ndarray,
    generic: str,
) -> float:
    """1 / 0.5 / 0: does the candidate with the highest ``scores`` beat ``generic`` under ``user``'s hidden reward?"""
    pick = candidates[int(np.argmax(scores))]
    mine, theirs = population.true_reward(user, [pick, generic])
    return 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0


def bayes_weights(
    population: SyntheticPopulation, shots: Sequence[Comparison], samples: int = 20_000, seed: int = 0
) -> np.ndarray:
    """``(len(ATTRIBUTES),)`` posterior mean of a user's hidden weights given their ``shots``.

    An evaluation ceiling, not a method: it knows what no embedder may use, the population's
    generative model (type centroids, per-user noise, rationality) and the judge's attribute
    functions. Self-normalised importance sampling from that prior, weighted by the
    Bradley-Terry likelihood of the shots. Picking by it is the best any reward inferred from
    these shots can do in expectation, which is how far a better embedder could go.
    """
    cfg = population.config
    rng = np.random.default_rng(seed)
    types = rng.integers(0, cfg.n_types, size=samples)
    weights = population.type_centroids[types] + cfg.user_noise * rng.standard_normal(
        (samples, population.type_centroids.shape[1])
    )  # (S, k) draws from the population's prior
    log_lik = np.zeros(samples)
    for c in shots:
        diff = population.attributes([c.chosen])[0] - population.attributes([c.rejected])[0]  # (k,)
        log_lik += c.weight * -np.logaddexp(0.0, -cfg.rationality * (weights @ diff))
    posterior = np.exp(log_lik - log_lik.max())
    return (posterior / posterior.sum()) @ weights


def run_ranking(
    generator: Any, encoder: Any, config: RankingConfig, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The reward side on the generator's own answers, per embedder, fitting data and seed."""
    from personalign.eval.generate import decoys, generation_split, plan_prompts
    from personalign.preference import EMBEDDER_CLASSES
    from personalign.preference.base import Featurizer, FeaturizerConfig

    unknown = [e for e in config.embedders if e not in EMBEDDER_CLASSES]
    if unknown:
        raise ValidationError(
            "embedders", f"{unknown} are not embedders", f"use some of {sorted(EMBEDDER_CLASSES)}", unknown
        )
    bad = [d for d in config.data if d not in DATA_KINDS]
    if bad:
        raise ValidationError(
            "data", f"{bad} are not kinds of fitting data", f"use some of {list(DATA_KINDS)}", bad
        )
    population = SyntheticPopulation()
    pool = answer_pool(generator, population.prompts, config.pool, progress=progress is not None)
    generic = greedy_answers(generator, population.prompts, config.pool.max_new_tokens)
    featurizer = Featurizer(
        encoder, FeaturizerConfig(parts=config.features), generator if "hidden" in config.features else None
    )
    result: dict[str, Any] = {"config": {**asdict(config), "features": list(config.features)}, "rows": []}
    for seed in config.seeds:
        templated = generation_split(seed=seed, shots=config.shots)
        everyone = population.population(
            shots=8, held_out=16, seed=seed
        )  # the templated comparisons generation_split draws from
        held = {u.user: u.held_out for u in everyone.users}
        for data in config.data:
            split = generation_split(
                seed=seed, shots=config.shots, pool=None if data == "templated" else pool
            )
            if data == "both":  # fitted on both kinds; test users enrol on-policy
                split = replace(split, train={u: [*templated.train[u], *cs] for u, cs in split.train.items()})
            test = split.test[: config.users]
            pairs = plan_prompts(test, split.prompts, config.prompts_per_user, seed)
            other = decoys(test)
            for method in config.embedders:
                started = time.perf_counter()
                embedder = EMBEDDER_CLASSES[method](featurizer).fit(split.train, seed=seed)
                fit_seconds = time.perf_counter() - started
                for enrol in config.enrol:
                    if enrol == "active" and data == "templated":
                        continue
                    if enrol == "active":
                        rng = np.random.default_rng(seed)
                        train_prompts = [p for p in population.prompts if p not in set(split.prompts)]
                        shots = {
                            u.user: active_shots(
                                embedder, population, u.user, pool, train_prompts, config.shots, rng
                            )
                            for u in test
                        }
                    else:
                        shots = {u.user: u.shots for u in test}
                    row = _rank_row(
                        population,
                        embedder,
                        test,
                        shots,
                        pairs,
                        other,
                        held,
                        pool,
                        generic,
                        split.prompts,
                        config.best_of,
                    )
                    row = {
                        "seed": seed,
                        "data": data,
                        "embedder": method,
                        "enrol": enrol,
                        **row,
                        "fit_seconds": fit_seconds,
                    }
                    result["rows"].append(row)
                    if progress is not None:
                        progress(format_ranking({"rows": [row]}).splitlines()[-1])
    result["summary"] = _summarise(result["rows"])
    return result


def _rank_row(
    population: SyntheticPopulation,
    embedder: Any,
    test: Sequence[EvalUser],
    shots: dict[str, list[Comparison]],
    pairs: Sequence[tuple[EvalUser, str]],
    other: dict[str, EvalUser],
    held: dict[str, list[Comparison]],
    pool: dict[str, list[str]],
    generic: dict[str, str],
    prompts: Sequence[str],
    best_of: int,
) -> dict[str, Any]:
    """One embedder's numbers for test users enrolled on ``shots``."""
    states = {u.user: embedder.infer(shots[u.user]) for u in test}
    bayes = {u.user: bayes_weights(population, shots[u.user]) for u in test}
    nobody = embedder.prior()
    agree = total = 0
    for u in test:
        for p in prompts:
            a, n = _pairwise_accuracy(
                population.true_reward(u.user, pool[p]),
                embedder.reward([p] * len(pool[p]), pool[p], states[u.user]),
            )
            agree, total = agree + a, total + n
    templ = [
        embedder.prob(c.prompt_text, c.chosen, c.rejected, states[u.user]) > 0.5
        for u in test
        for c in held.get(u.user, [])
    ]
    own, shuffled, oracle, oracle_other, no_user, bayes_own, bayes_other = [], [], [], [], [], [], []
    for u, p in pairs:
        candidates = pool[p][:best_of]
        scored = [p] * len(candidates)
        attributes = population.attributes(candidates)  # (n, k), for the ceilings only
        decoy = other[u.user].user

        def judged(
            scores: np.ndarray, user: str = u.user, prompt: str = p, cands: list[str] = candidates
        ) -> float:
            return best_of_n(population, user, prompt, cands, scores, generic[prompt])

        oracle_other.append(judged(population.true_reward(decoy, candidates)))
        no_user.append(judged(embedder.reward(scored, candidates, nobody)))
        bayes_own.append(judged(attributes @ bayes[u.user]))
        bayes_other.append(judged(attributes @ bayes[decoy]))
        own.append(
            best_of_n(
                population,
                u.user,
                p,
                candidates,
                embedder.reward(scored, candidates, states[u.user]),
                generic[p],
            )
        )
        shuffled.append(
            best_of_n(
                population,
                u.user,
                p,
                candidates,
                embedder.reward(scored, candidates, states[other[u.user].user]),
                generic[p],
            )
        )
        oracle.append(
            best_of_n(
                population, u.user, p, candidates, population.true_reward(u.user, candidates), generic[p]
            )
        )
    return {
        "templated_accuracy": float(np.mean(templ)) if templ else None,
        "onpolicy_accuracy": agree / max(total, 1),
        "onpolicy_pairs": total,
        "best_of_n_win": float(np.mean(own)),
        "best_of_n_win_ci": list(wilson(float(sum(own)), len(own))),
        "best_of_n_shuffled": float(np.mean(shuffled)),
        "best_of_n_oracle": float(np.mean(oracle)),
        "best_of_n_margin": float(np.mean(own) - np.mean(shuffled)),
        "best_of_n_no_user": float(np.mean(no_user)),
        "oracle_margin": float(np.mean(oracle) - np.mean(oracle_other)),
        "best_of_n_bayes": float(np.mean(bayes_own)),
        "bayes_margin": float(np.mean(bayes_own) - np.mean(bayes_other)),
        "n": len(own),
    }


def _summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows averaged over seeds, per (data, embedder)."""
    keys = list(dict.fromkeys((r["data"], r["embedder"], r["enrol"]) for r in rows))
    out = []
    for data, method, enrol in keys:
        group = [r for r in rows if (r["data"], r["embedder"], r["enrol"]) == (data, method, enrol)]
        mean = {
            k: float(np.mean([r[k] for r in group if r[k] is not None]))
            for k in (
                "templated_accuracy",
                "onpolicy_accuracy",
                "best_of_n_win",
                "best_of_n_shuffled",
                "best_of_n_oracle",
                "best_of_n_margin",
                "best_of_n_no_user",
                "oracle_margin",
                "best_of_n_bayes",
                "bayes_margin",
            )
        }
        out.append(
            {
                "data": data,
                "embedder": method,
                "enrol": enrol,
                "seeds": [r["seed"] for r in group],
                "n": sum(r["n"] for r in group),
                **mean,
            }
        )
    return out


def format_ranking(result: dict[str, Any]) -> str:
    lines = [
        "| fitted on | embedder | enrolled | seed | templated acc | on-policy acc | best-of-N win | another user's pick | margin | no-user pick | Bayes pick | Bayes margin | oracle pick | oracle margin |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        templ = "-" if r["templated_accuracy"] is None else f"{r['templated_accuracy']:.3f}"
        lines.append(
            f"| {r['data']} | {r['embedder']} | {r['enrol']} | {r['seed']} | {templ} | {r['onpolicy_accuracy']:.3f} | {_ceilings(r)}"
        )
    return "\n".join(lines)


def _ceilings(r: dict[str, Any]) -> str:
    """The best-of-N cells of a row or summary: the pick, its control, and the ceilings."""
    return (
        f"{r['best_of_n_win']:.3f} | {r['best_of_n_shuffled']:.3f} | {r['best_of_n_margin']:+.3f} | "
        f"{r['best_of_n_no_user']:.3f} | {r['best_of_n_bayes']:.3f} | {r['bayes_margin']:+.3f} | "
        f"{r['best_of_n_oracle']:.3f} | {r['oracle_margin']:+.3f} |"
    )


def format_summary(result: dict[str, Any]) -> str:
    lines = [
        "| fitted on | embedder | enrolled | n | templated acc | on-policy acc | best-of-N win | another user's pick | margin | no-user pick | Bayes pick | Bayes margin | oracle pick | oracle margin |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r['data']} | {r['embedder']} | {r['enrol']} | {r['n']} | {r['templated_accuracy']:.3f} | {r['onpolicy_accuracy']:.3f} | {_ceilings(r)}"
        )
    return "\n".join(lines)


def fit_split_embedder(
    generator: Any,
    encoder: Any,
    seed: int = 0,
    shots: int = 4,
    comparisons: str = "onpolicy",
    method: str = "pal",
    features: Sequence[str] | None = None,
) -> Any:
    """An embedder fitted on the training users of :func:`~personalign.eval.generate.generation_split`
    (seed ``seed``) only: what ``eval generate`` guides by. ``comparisons``: ``templated``,
    ``onpolicy``, or ``both`` (each training user's templated and on-policy comparisons, as the
    shipped PAL is fitted; the best on-policy ranking in ``eval onpolicy``)."""
    from personalign.eval.generate import generation_split
    from personalign.preference import EMBEDDER_CLASSES
    from personalign.preference.base import DEFAULT_PARTS, Featurizer, FeaturizerConfig

    parts = tuple(features or DEFAULT_PARTS)
    if comparisons not in DATA_KINDS:
        raise ValidationError(
            "comparisons", f"is {comparisons!r}", f"use one of {list(DATA_KINDS)}", comparisons
        )
    pool = answer_pool(generator, SyntheticPopulation().prompts) if comparisons != "templated" else None
    split = generation_split(seed=seed, shots=shots, pool=pool)
    if comparisons == "both":
        templated = generation_split(seed=seed, shots=shots)
        split = replace(split, train={u: [*templated.train[u], *cs] for u, cs in split.train.items()})
    featurizer = Featurizer(encoder, FeaturizerConfig(parts=parts), generator if "hidden" in parts else None)
    return EMBEDDER_CLASSES[method](featurizer).fit(split.train, seed=seed)


def train_heads_on_pool(
    generator: Any,
    embedder: Any,
    pool_config: PoolConfig | None = None,
    config: Any = None,
    provenance: dict[str, Any] | None = None,
) -> Any:
    """User-vas heads for ``embedder`` (:func:`~personalign.steering.uservas.train_user_heads`) on the
    generator's pooled answers to the synthetic training topics' prompts, never the evaluation topics."""
    from personalign.eval.generate import generation_split
    from personalign.steering.uservas import samples_from_pool, train_user_heads

    held_out = set(generation_split().prompts)
    pool = answer_pool(generator, SyntheticPopulation().prompts, pool_config, progress=True)
    samples = samples_from_pool(generator, {p: a for p, a in pool.items() if p not in held_out})
    return train_user_heads(
        generator,
        samples,
        embedder,
        config,
        provenance={"data": "synthetic prompts, training topics only", **(provenance or {})},
    )


def fit_user_heads(generator: Any, embedder: Any, epochs: int = 12) -> Path:
    """:func:`train_heads_on_pool` cached under ``$PERSONALIGN_CACHE/user_vas/<generator>-<embedder fingerprint>``."""
    from personalign.models import cache_root
    from personalign.steering.uservas import CONFIG_FILE, UserVasConfig, embedder_fingerprint
    from personalign.training.loop import LoopConfig

    folder = (
        cache_root()
        / "user_vas"
        / f"{generator.model_id.replace('/', '_').replace(':', '_')}-{embedder_fingerprint(embedder).replace(':', '-')}-e{epochs}"
    )
    if not (folder / CONFIG_FILE).is_file():
        config = UserVasConfig(
            loop=LoopConfig(epochs=epochs, learning_rate=2e-3, batch_size=16, name="user-vas")
        )
        train_heads_on_pool(generator, embedder, config=config).save(folder)
    return folder
