"""Personalised-generation win rates on a synthetic population with known rewards.

Setup: the synthetic population (:class:`~personalign.eval.populations.SyntheticPopulation`)
is split by user (seeded); the last ``held_out_topics`` topics' prompts are the evaluation
prompts, and nothing on them is used for training or enrolment. Training users' comparisons
(the rest) are what ``personalign train fspo|pplug --data synthetic`` learns from. Each test
user is enrolled with ``shots`` of their own comparisons.

Every personalised request also carries the user's stored steering default (the verbosity
weight inferred from their comparisons at enrolment), as ``chat`` does, unless
``user_steering=False``; the ``-shuffled`` controls carry the other user's.

Judge: the test user's hidden reward. For each (user, prompt) the personalised answer of a
method is compared with the generic answer (plain ``generate``, no user) to the same prompt:
a win if its reward is higher, half a win on a tie. The win rate per method is over all
(user, prompt) pairs, with a Wilson interval, and per user.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.adapters import wilson
from personalign.eval.populations import ATTRIBUTES, PHRASINGS, EvalUser, SyntheticConfig, SyntheticPopulation
from personalign.eval.stats import save_figure
from personalign.types import Comparison


@dataclass(frozen=True)
class GenerationSplit:
    """Training users' comparisons, test users with their enrolment shots, evaluation prompts."""

    population: SyntheticPopulation
    train: dict[str, list[Comparison]]
    test: list[EvalUser]  # .shots: the enrolment comparisons (none on an evaluation prompt)
    prompts: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def generation_split(
    seed: int = 0,
    shots: int = 4,
    test_fraction: float = 0.2,
    held_out_topics: int = 5,
    config: SyntheticConfig | None = None,
) -> GenerationSplit:
    """The seeded split by user and by topic that training and evaluation share."""
    population = SyntheticPopulation(config)
    per_topic = PHRASINGS  # prompts are topic-major: every topic's phrasings in a row
    if not 0 < held_out_topics * per_topic < len(population.prompts):
        raise ValidationError("held_out_topics", f"must leave training prompts among {len(population.prompts) // per_topic} topics", "use e.g. 5", held_out_topics)
    prompts = population.prompts[-held_out_topics * per_topic :]
    banned = set(prompts)
    everyone = population.population(shots=8, held_out=16, seed=seed)
    fit, test = everyone.split(test_fraction, seed, exclude="none")
    train = {u.user: [c for c in u.comparisons if c.prompt_text not in banned] for u in fit.users}
    enrolled = []
    for u in test.users:
        own = [c for c in u.comparisons if c.prompt_text not in banned]
        if len(own) >= shots:
            enrolled.append(EvalUser(u.user, own[:shots], [], u.group, u.weights))
    meta = {"seed": seed, "shots": shots, "test_fraction": test_fraction, "held_out_topics": held_out_topics, "train_users": len(train), "test_users": len(enrolled), "prompts": prompts}
    return GenerationSplit(population, train, enrolled, prompts, meta)


# --- the harness ------------------------------------------------------------------------------

GENERIC = "generic"
METHODS = ("generic", "memory", "memory-shuffled", "fspo-prompt", "fspo-describe", "fspo-trained", "fspo-shuffled", "pplug", "all")
# Chat options per method; every conditioner is named so "off" is explicit.
_OFF = {"memory": False, "shots": False, "fspo": False}
METHOD_OPTIONS: dict[str, dict[str, bool]] = {
    "memory": {**_OFF, "memory": True},
    "memory-shuffled": {**_OFF, "memory": True},  # another user's memories: the control
    "fspo-prompt": {**_OFF, "shots": True},
    "fspo-describe": {**_OFF, "shots": True, "describe": True},  # the user-description step, base model
    "fspo-trained": {**_OFF, "shots": True, "fspo": True},
    "fspo-shuffled": {**_OFF, "shots": True, "fspo": True},  # another user's shots: the control
    "pplug": {**_OFF, "pplug": True},
    "all": {"memory": True, "shots": True, "fspo": True, "pplug": True},
}
NEEDS_FSPO = ("fspo-trained", "fspo-shuffled", "all")
NEEDS_PPLUG = ("pplug", "all")


@dataclass
class GenerateConfig:
    methods: list[str] = field(default_factory=lambda: ["memory", "fspo-prompt", "fspo-trained", "fspo-shuffled", "pplug", "all"])
    users: int = 16
    prompts_per_user: int = 4
    shots: int = 4
    seed: int = 0
    max_new_tokens: int = 128
    batch_size: int = 8
    user_steering: bool = True  # as chat does by default: the user's inferred verbosity steering rides along


def memory_items(user: EvalUser) -> list[str]:
    """What a synthetic user's memory holds: the answers they preferred while enrolling."""
    return [f"An answer I liked to '{c.prompt_text}': {c.chosen}" for c in user.shots]


def _decoys(users: Sequence[EvalUser]) -> dict[str, EvalUser]:
    """For each user, another test user of a different type (the shuffled-shots control)."""
    out = {}
    for i, u in enumerate(users):
        others = [v for v in users[i + 1 :] + users[:i] if v.group != u.group] or [v for v in users if v.user != u.user]
        out[u.user] = others[0]
    return out


def _plan_requests(split: GenerationSplit, config: GenerateConfig) -> list[tuple[EvalUser, str]]:
    rng = np.random.default_rng(config.seed)
    users = split.test[: config.users]
    pairs = []
    for u in users:
        for j in rng.choice(len(split.prompts), size=min(config.prompts_per_user, len(split.prompts)), replace=False):
            pairs.append((u, split.prompts[int(j)]))
    return pairs


def _generate(pz: Any, requests: list[dict[str, Any]], batch_size: int, progress: Callable[[str], None] | None, label: str) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(requests), batch_size):
        texts += pz.chat_batch(requests[start : start + batch_size])
        if progress is not None:
            progress(f"{label}: {len(texts)}/{len(requests)}")
    return texts


def run_generate(
    pz: Any, config: GenerateConfig, progress: Callable[[str], None] | None = None, on_method: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Win rates of each method's answers over the generic answers, judged by hidden rewards.

    ``pz`` is an open :class:`~personalign.Personalizer` on an empty store (test users and
    their decoys are enrolled into it) with the FSPO adapter and the Persona-Plug projector
    it should use. ``on_method(result)`` runs after each method with the result so far (e.g. to
    save partial results of a long run).
    """
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValidationError("methods", f"{unknown} are not generation methods", f"use some of {list(METHODS)}", unknown)
    if any(m in NEEDS_FSPO for m in config.methods) and getattr(pz, "fspo_folder", None) is None:
        raise ValidationError("methods", "fspo-trained, fspo-shuffled and all need an FSPO adapter for this generator", "train one: personalign train fspo --out DIR, then pass --fspo DIR", config.methods)
    if any(m in NEEDS_PPLUG for m in config.methods) and getattr(pz, "plug", None) is None:
        raise ValidationError("methods", "pplug and all need a Persona-Plug projector for this generator", "train one: personalign train pplug --out DIR, then pass --pplug DIR", config.methods)
    split = generation_split(seed=config.seed, shots=config.shots)
    pairs = _plan_requests(split, config)
    users = list(dict.fromkeys(u.user for u, _ in pairs))
    test = [u for u in split.test if u.user in users]
    decoys = _decoys(test)
    for u in test:
        pz.enroll(u.user, u.shots)
        pz.remember(u.user, memory_items(u))
        decoy = decoys[u.user]
        pz.enroll(f"decoy-{u.user}", decoy.shots)
        pz.remember(f"decoy-{u.user}", memory_items(decoy))
    started = time.perf_counter()
    base = {"temperature": 0.0, "max_new_tokens": config.max_new_tokens}
    messages = {p: [{"role": "user", "content": p}] for _, p in pairs}
    generic_requests = [{"user": None, "messages": messages[p], **base} for p in dict.fromkeys(p for _, p in pairs)]
    generic = dict(zip(dict.fromkeys(p for _, p in pairs), _generate(pz, generic_requests, config.batch_size, progress, GENERIC), strict=True))
    timings = {GENERIC: time.perf_counter() - started}
    population = split.population
    result: dict[str, Any] = {"config": config.__dict__, "split": split.meta, "judge": "the test user's hidden reward (synthetic population)", "methods": {}, "seconds": timings}
    result["generic"] = {"mean_attributes": _mean_attributes(population, list(generic.values()))}
    for method in config.methods:
        if method == GENERIC:
            continue
        started = time.perf_counter()
        options = METHOD_OPTIONS[method]
        requests = []
        for u, p in pairs:
            owner = f"decoy-{u.user}" if method.endswith("-shuffled") else u.user
            steer = {} if config.user_steering else {"steer": {}}
            requests.append({"user": owner, "messages": messages[p], **base, **options, **steer})
        texts = _generate(pz, requests, config.batch_size, progress, method)
        timings[method] = time.perf_counter() - started
        scores = []
        per_user: dict[str, list[float]] = {}
        for (u, p), text in zip(pairs, texts, strict=True):
            mine, theirs = population.true_reward(u.user, [text, generic[p]])
            s = 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
            scores.append(s)
            per_user.setdefault(u.user, []).append(s)
        wins = float(sum(scores))
        low, high = wilson(wins, len(scores))
        result["methods"][method] = {
            "win_rate": wins / len(scores),
            "ci": [low, high],
            "n": len(scores),
            "per_user": {k: float(np.mean(v)) for k, v in per_user.items()},
            "users_above_half": int(sum(np.mean(v) > 0.5 for v in per_user.values())),
            "mean_attributes": _mean_attributes(population, texts),
            "seconds": timings[method],
            "example": {"user": pairs[0][0].user, "prompt": pairs[0][1], "answer": texts[0], "generic": generic[pairs[0][1]]},
        }
        if on_method is not None:
            on_method(result)
    return result


def _mean_attributes(population: SyntheticPopulation, texts: Sequence[str]) -> dict[str, float]:
    """Mean standardised attribute of the texts (the units the hidden rewards weigh)."""
    return {name: round(float(v), 3) for name, v in zip(ATTRIBUTES, population.attributes(texts).mean(axis=0), strict=True)}


def format_generate(result: dict[str, Any]) -> str:
    lines = ["| method | win rate over generic | 95% CI | n | users above 0.5 |", "|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        lines.append(f"| {method} | {r['win_rate']:.3f} | [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['n']} | {int(r['users_above_half'])}/{len(r['per_user'])} |")
    return "\n".join(lines)


def plot_generate(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    rates = [result["methods"][m]["win_rate"] for m in methods]
    lows = [r - result["methods"][m]["ci"][0] for m, r in zip(methods, rates, strict=True)]
    highs = [result["methods"][m]["ci"][1] - r for m, r in zip(methods, rates, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(methods, rates, yerr=[lows, highs], capsize=4, color="#4c72b0")
    ax.axhline(0.5, color="grey", linestyle=":", label="no better than generic")
    ax.axhline(0.75, color="#c44e52", linestyle="--", label="target 0.75")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate over the generic answer")
    split = result["split"]
    steering = "" if result.get("config", {}).get("user_steering", True) else "; the users' inferred steering off"
    ax.set_title(f"Synthetic users unseen in training, {split['shots']} shots each, held-out topics{steering}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    save_figure(fig, path, dpi=120)


def write_generate(result: dict[str, Any], json_path: str | Path | None, plot_path: str | Path | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=float))
    if plot_path:
        plot_generate(result, plot_path)


def merge_generate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of different methods on the same split, prompts and settings.

    Greedy decoding makes the generic answers of every run the same; runs whose split,
    users, prompts or generic answers differ are refused.
    """
    if not results:
        raise ValidationError("results", "is empty", "pass at least one eval generate result")
    first = results[0]
    keys = ("users", "prompts_per_user", "shots", "seed", "max_new_tokens")
    merged = {**first, "methods": {}, "seconds": {}}
    for index, r in enumerate(results):
        if r["split"] != first["split"] or any(r["config"][k] != first["config"][k] for k in keys) or r["generic"] != first["generic"]:
            raise ValidationError(f"results[{index}]", "was run with another split, settings or generic answers", "merge runs of the same eval generate settings")
        merged["methods"].update(r["methods"])
        merged["seconds"].update(r["seconds"])
    merged["config"] = {**first["config"], "methods": list(merged["methods"])}
    return merged
