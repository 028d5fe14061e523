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
    pool: dict[str, list[str]] | None = None,
) -> GenerationSplit:
    """The seeded split by user and by topic that training and evaluation share.

    With ``pool`` (the generator's answers per prompt, :func:`~personalign.eval.onpolicy.answer_pool`)
    every comparison is on-policy: the same users, labelling pairs of pooled answers to the
    training prompts (:func:`~personalign.eval.onpolicy.onpolicy_population`); otherwise the
    templated candidates.
    """
    population = SyntheticPopulation(config)
    per_topic = PHRASINGS  # prompts are topic-major: every topic's phrasings in a row
    if not 0 < held_out_topics * per_topic < len(population.prompts):
        raise ValidationError(
            "held_out_topics",
            f"must leave training prompts among {len(population.prompts) // per_topic} topics",
            "use e.g. 5",
            held_out_topics,
        )
    prompts = population.prompts[-held_out_topics * per_topic :]
    banned = set(prompts)
    if pool is None:
        everyone = population.population(shots=8, held_out=16, seed=seed)
    else:
        from personalign.eval.onpolicy import onpolicy_population

        everyone = onpolicy_population(
            population, pool, [p for p in population.prompts if p not in banned], seed=seed
        )
    fit, test = everyone.split(test_fraction, seed, exclude="none")
    train = {u.user: [c for c in u.comparisons if c.prompt_text not in banned] for u in fit.users}
    enrolled = []
    for u in test.users:
        own = [c for c in u.comparisons if c.prompt_text not in banned]
        if len(own) >= shots:
            enrolled.append(EvalUser(u.user, own[:shots], [], u.group, u.weights))
    meta = {
        "comparisons": "templated" if pool is None else "onpolicy",
        "seed": seed,
        "shots": shots,
        "test_fraction": test_fraction,
        "held_out_topics": held_out_topics,
        "train_users": len(train),
        "test_users": len(enrolled),
        "prompts": prompts,
    }
    return GenerationSplit(population, train, enrolled, prompts, meta)


# --- the harness ------------------------------------------------------------------------------

GENERIC = "generic"
METHODS = (
    "generic",
    "memory",
    "memory-shuffled",
    "fspo-prompt",
    "fspo-describe",
    "fspo-trained",
    "fspo-shuffled",
    "pplug",
    "all",
    "user-rerank",
    "user-rerank-shuffled",
    "user-vas",
    "user-vas-shuffled",
    "user-vas-rerank",
    "user-vas-rerank-shuffled",
    "user-lora",
    "user-lora-raw",
    "user-lora-shuffled",
)
# Chat options per method; every conditioner is named so "off" is explicit.
_OFF = {"memory": False, "shots": False, "fspo": False, "user_vas": 0.0}
METHOD_OPTIONS: dict[str, dict[str, bool]] = {
    "memory": {**_OFF, "memory": True},
    "memory-shuffled": {**_OFF, "memory": True},  # another user's memories: the control
    "fspo-prompt": {**_OFF, "shots": True},
    "fspo-describe": {**_OFF, "shots": True, "describe": True},  # the user-description step, base model
    "fspo-trained": {**_OFF, "shots": True, "fspo": True},
    "fspo-shuffled": {**_OFF, "shots": True, "fspo": True},  # another user's shots: the control
    "pplug": {**_OFF, "pplug": True},
    "all": {"memory": True, "shots": True, "fspo": True, "pplug": True, "user_vas": 0.0},
    # decode-time guidance by the user's inferred reward; conditioners off, so the candidates are plain samples
    "user-rerank": {**_OFF, "pplug": False},
    "user-rerank-shuffled": {**_OFF, "pplug": False},  # another user's reward picks from the same candidates
}
RERANK = ("user-rerank", "user-rerank-shuffled", "user-vas-rerank", "user-vas-rerank-shuffled")
USER_VAS = (
    "user-vas",
    "user-vas-shuffled",
    "user-vas-rerank",
    "user-vas-rerank-shuffled",
)  # guided by the user's value heads
for _name in USER_VAS:
    METHOD_OPTIONS[_name] = {**_OFF, "pplug": False}
# per-user LoRA adapters (the user's own adapter is on by default in chat): each method's adapter
# sits on its own profile (enrolled with the user's shots) so that it never leaks into another method
USER_LORA = {"user-lora": "lora", "user-lora-raw": "loraraw", "user-lora-shuffled": "lorashuf"}
for _name in USER_LORA:
    METHOD_OPTIONS[_name] = {**_OFF, "pplug": False}
NEEDS_FSPO = ("fspo-trained", "fspo-shuffled", "all")
NEEDS_PPLUG = ("pplug", "all")


@dataclass
class GenerateConfig:
    methods: list[str] = field(
        default_factory=lambda: ["memory", "fspo-prompt", "fspo-trained", "fspo-shuffled", "pplug", "all"]
    )
    users: int = 16
    prompts_per_user: int = 4
    shots: int = 4
    seed: int = 0
    max_new_tokens: int = 128
    batch_size: int = 8
    user_steering: bool = True  # as chat does by default: the user's inferred verbosity steering rides along
    comparisons: str = "templated"  # what users compared to enrol: templated texts, or the generator's own answers ("onpolicy")
    rerank: int = 4  # candidates per answer for the user-rerank methods
    user_vas: float = 3.0  # guidance strength of the user-vas methods
    lora_pairs: int = 32  # amplified comparisons per user for user-lora
    lora_epochs: int = 2  # DPO epochs of user-lora on them

    def __post_init__(self) -> None:
        if self.comparisons not in ("templated", "onpolicy"):
            raise ValidationError(
                "comparisons", f"is {self.comparisons!r}", "use templated or onpolicy", self.comparisons
            )
        if not 2 <= self.rerank <= 16:
            raise ValidationError("rerank", "must be in [2, 16]", "use e.g. 4", self.rerank)


def memory_items(user: EvalUser) -> list[str]:
    """What a synthetic user's memory holds: the answers they preferred while enrolling."""
    return [f"An answer I liked to '{c.prompt_text}': {c.chosen}" for c in user.shots]


def decoys(users: Sequence[EvalUser]) -> dict[str, EvalUser]:
    """For each user, another test user of a different type (the shuffled-shots control)."""
    out = {}
    for i, u in enumerate(users):
        others = [v for v in users[i + 1 :] + users[:i] if v.group != u.group] or [
            v for v in users if v.user != u.user
        ]
        out[u.user] = others[0]
    return out


def plan_prompts(
    users: Sequence[EvalUser], prompts: Sequence[str], per_user: int, seed: int
) -> list[tuple[EvalUser, str]]:
    """``per_user`` distinct evaluation prompts for each user (seeded): the (user, prompt) pairs judged."""
    rng = np.random.default_rng(seed)
    pairs = []
    for u in users:
        for j in rng.choice(len(prompts), size=min(per_user, len(prompts)), replace=False):
            pairs.append((u, prompts[int(j)]))
    return pairs


def _generate(
    pz: Any,
    requests: list[dict[str, Any]],
    batch_size: int,
    progress: Callable[[str], None] | None,
    label: str,
) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(requests), batch_size):
        texts += pz.chat_batch(requests[start : start + batch_size])
        if progress is not None:
            progress(f"{label}: {len(texts)}/{len(requests)}")
    return texts


def run_generate(
    pz: Any,
    config: GenerateConfig,
    progress: Callable[[str], None] | None = None,
    on_method: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Win rates of each method's answers over the generic answers, judged by hidden rewards.

    ``pz`` is an open :class:`~personalign.Personalizer` on an empty store (test users and
    their decoys are enrolled into it) with the FSPO adapter and the Persona-Plug projector
    it should use. ``on_method(result)`` runs after each method with the result so far (e.g. to
    save partial results of a long run).
    """
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValidationError(
            "methods", f"{unknown} are not generation methods", f"use some of {list(METHODS)}", unknown
        )
    if any(m in NEEDS_FSPO for m in config.methods) and getattr(pz, "fspo_folder", None) is None:
        raise ValidationError(
            "methods",
            "fspo-trained, fspo-shuffled and all need an FSPO adapter for this generator",
            "train one: personalign train fspo --out DIR, then pass --fspo DIR",
            config.methods,
        )
    if any(m in USER_VAS for m in config.methods) and pz.user_heads() is None:
        raise ValidationError(
            "methods",
            "user-vas methods need value heads for this generator and embedder",
            "train them: personalign train user-vas, then pass --user-vas DIR (eval generate trains them with --user-vas fit)",
            config.methods,
        )
    if any(m in NEEDS_PPLUG for m in config.methods) and getattr(pz, "plug", None) is None:
        raise ValidationError(
            "methods",
            "pplug and all need a Persona-Plug projector for this generator",
            "train one: personalign train pplug --out DIR, then pass --pplug DIR",
            config.methods,
        )
    pool = None
    if config.comparisons == "onpolicy":
        from personalign.eval.onpolicy import answer_pool

        pool = answer_pool(pz.generator, SyntheticPopulation(SyntheticConfig(seed=0)).prompts)
    split = generation_split(seed=config.seed, shots=config.shots, pool=pool)
    pairs = plan_prompts(split.test[: config.users], split.prompts, config.prompts_per_user, config.seed)
    users = list(dict.fromkeys(u.user for u, _ in pairs))
    test = [u for u in split.test if u.user in users]
    others = decoys(test)
    for u in test:
        pz.enroll(u.user, u.shots)
        pz.remember(u.user, memory_items(u))
        decoy = others[u.user]
        pz.enroll(f"decoy-{u.user}", decoy.shots)
        pz.remember(f"decoy-{u.user}", memory_items(decoy))
    lora_report = (
        train_user_loras(pz, config, test, others, split, progress)
        if any(m in USER_LORA for m in config.methods)
        else None
    )
    started = time.perf_counter()
    base = {"temperature": 0.0, "max_new_tokens": config.max_new_tokens}
    messages = {p: [{"role": "user", "content": p}] for _, p in pairs}
    generic_requests = [
        {"user": None, "messages": messages[p], **base} for p in dict.fromkeys(p for _, p in pairs)
    ]
    generic = dict(
        zip(
            dict.fromkeys(p for _, p in pairs),
            _generate(pz, generic_requests, config.batch_size, progress, GENERIC),
            strict=True,
        )
    )
    timings = {GENERIC: time.perf_counter() - started}
    population = split.population
    result: dict[str, Any] = {
        "config": config.__dict__,
        "split": split.meta,
        "judge": "the test user's hidden reward (synthetic population)",
        "methods": {},
        "seconds": timings,
    }
    result["generic"] = {"mean_attributes": _mean_attributes(population, list(generic.values()))}
    for method in config.methods:
        if method == GENERIC:
            continue
        started = time.perf_counter()
        options = METHOD_OPTIONS[method]
        if method in RERANK:  # the same seed for own and shuffled: both pick from the same candidates
            options = {**options, "rerank": config.rerank, "seed": config.seed}
        if method in USER_VAS:
            options = {**options, "user_vas": config.user_vas}
        requests = []
        for u, p in pairs:
            owner = f"decoy-{u.user}" if method.endswith("-shuffled") else u.user
            if method in USER_LORA:
                owner = f"{USER_LORA[method]}-{u.user}"
            steer = (
                {}
                if config.user_steering and method not in (*RERANK, *USER_VAS, *USER_LORA)
                else {"steer": {}}
            )
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
            "scores": scores,
            "toward_user": _toward_user(population, pairs, texts, generic),
            "example": {
                "user": pairs[0][0].user,
                "prompt": pairs[0][1],
                "answer": texts[0],
                "generic": generic[pairs[0][1]],
            },
        }
        result["margins"] = personal_margins(result["methods"], [u.user for u, _ in pairs])
        if on_method is not None:
            on_method(result)
    result["seconds_per_answer"] = {
        m: t / (len(generic) if m == GENERIC else len(pairs)) for m, t in timings.items()
    }
    if lora_report is not None:
        result["user_lora"] = lora_report
    return result


def train_user_loras(
    pz: Any,
    config: GenerateConfig,
    test: Sequence[EvalUser],
    others: dict[str, EvalUser],
    split: GenerationSplit,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Adapters for the user-lora methods, each on its own profile enrolled with the user's shots.

    ``lora-<u>``: DPO on the user's shots plus ``lora_pairs`` amplified comparisons (pairs of the
    generator's pooled answers to the training prompts, labelled by the user's inferred reward);
    ``loraraw-<u>``: the shots alone (the LoRA a user gets without amplification);
    ``lorashuf-<u>``: the decoy's amplified adapter, imported (the control).
    """
    from personalign.adapters.amplify import AmplifyConfig
    from personalign.adapters.lora import LoraTrainConfig
    from personalign.eval.onpolicy import answer_pool

    pool = answer_pool(pz.generator, split.population.prompts)
    banned = set(split.prompts)
    answers = {p: texts for p, texts in pool.items() if p not in banned}
    wanted = set(config.methods)
    amplified_config = LoraTrainConfig(epochs=config.lora_epochs, seed=config.seed)
    report: dict[str, Any] = {"pairs": {}, "seconds": {}, "train_prompts": len(answers)}
    for i, u in enumerate(test):
        started = time.perf_counter()
        if wanted & {"user-lora", "user-lora-shuffled"}:
            pz.enroll(f"lora-{u.user}", u.shots)
            extra = pz.amplified_comparisons(u.user, answers, AmplifyConfig(pairs=config.lora_pairs))
            pz.train_adapter(f"lora-{u.user}", amplified_config, extra=extra)
            report["pairs"][u.user] = len(extra)
        if "user-lora-raw" in wanted:
            pz.enroll(f"loraraw-{u.user}", u.shots, adapter=True, adapter_config={"seed": config.seed})
        report["seconds"][u.user] = time.perf_counter() - started
        if progress is not None:
            progress(f"user-lora adapters: {i + 1}/{len(test)} ({report['seconds'][u.user]:.0f} s)")
    if "user-lora-shuffled" in wanted:
        for u in test:
            pz.enroll(f"lorashuf-{u.user}", u.shots)
            pz.import_adapter(f"lorashuf-{u.user}", pz.adapter_folder(f"lora-{others[u.user].user}"))
    return report


def _toward_user(
    population: SyntheticPopulation,
    pairs: Sequence[tuple[EvalUser, str]],
    texts: Sequence[str],
    generic: dict[str, str],
) -> dict[str, float]:
    """Per attribute: the mean of ``sign(w_u,k) * (a_k(answer) - a_k(generic))`` over the judged pairs.

    Positive: the answers moved, relative to the generic answer, the way the users' hidden weights
    point (a judge-side number; nothing here reaches the method).
    """
    answers = population.attributes(list(texts))  # (n, 6)
    generics = population.attributes([generic[p] for _, p in pairs])  # (n, 6)
    signs = np.stack(
        [np.sign(population.user_weights[population.user_ids.index(u.user)]) for u, _ in pairs]
    )  # (n, 6)
    moved = (signs * (answers - generics)).mean(axis=0)
    return {name: round(float(v), 4) for name, v in zip(ATTRIBUTES, moved, strict=True)}


def personal_margins(methods: dict[str, Any], users: Sequence[str]) -> dict[str, Any]:
    """For each method with a ``-shuffled`` control in ``methods``: own minus shuffled win rate, with a
    95% paired bootstrap interval clustered by user (the same (user, prompt) pairs in both)."""
    from personalign.eval.stats import bootstrap_mean_ci

    out = {}
    for name, r in methods.items():
        control = methods.get(f"{name}-shuffled") or methods.get(
            name.replace("-trained", "-shuffled") if name.endswith("-trained") else ""
        )
        if name.endswith("-shuffled") or not control or "scores" not in r or "scores" not in control:
            continue
        diff = np.asarray(r["scores"]) - np.asarray(control["scores"])
        low, high = bootstrap_mean_ci(diff, groups=list(users))
        out[name] = {"margin": float(diff.mean()), "ci": [low, high], "n": int(diff.size)}
    return out


def _mean_attributes(population: SyntheticPopulation, texts: Sequence[str]) -> dict[str, float]:
    """Mean standardised attribute of the texts (the units the hidden rewards weigh)."""
    return {
        name: round(float(v), 3)
        for name, v in zip(ATTRIBUTES, population.attributes(texts).mean(axis=0), strict=True)
    }


def format_generate(result: dict[str, Any]) -> str:
    lines = [
        "| method | win rate over generic | 95% CI | n | users above 0.5 | attributes toward the users | s per answer |",
        "|---|---|---|---|---|---|---|",
    ]
    per_answer = result.get("seconds_per_answer", {})
    for method, r in result["methods"].items():
        toward = r.get("toward_user", {})
        moved = ", ".join(k for k, v in toward.items() if v > 0) or "-"
        seconds = f"{per_answer[method]:.2f}" if method in per_answer else "-"
        lines.append(
            f"| {method} | {r['win_rate']:.3f} | [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['n']} | {int(r['users_above_half'])}/{len(r['per_user'])} | {moved} | {seconds} |"
        )
    if GENERIC in per_answer:
        lines.append(f"(generic: {per_answer[GENERIC]:.2f} s per answer)")
    for method, m in result.get("margins", {}).items():
        lines.append(
            f"personal margin {method}: {m['margin']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] (own minus shuffled, n={m['n']}, paired bootstrap by user)"
        )
    return "\n".join(lines)


def plot_generate(result: dict[str, Any], path: str | Path) -> None:
    from personalign.eval.stats import new_figure

    methods = list(result["methods"])
    rates = [result["methods"][m]["win_rate"] for m in methods]
    lows = [r - result["methods"][m]["ci"][0] for m, r in zip(methods, rates, strict=True)]
    highs = [result["methods"][m]["ci"][1] - r for m, r in zip(methods, rates, strict=True)]
    fig, ax = new_figure(figsize=(7, 3.8))
    ax.bar(methods, rates, yerr=[lows, highs], capsize=4, color="#4c72b0")
    ax.axhline(0.5, color="grey", linestyle=":", label="no better than generic")
    ax.axhline(0.75, color="#c44e52", linestyle="--", label="target 0.75")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate over the generic answer")
    split = result["split"]
    steering = (
        "" if result.get("config", {}).get("user_steering", True) else "; the users' inferred steering off"
    )
    ax.set_title(
        f"Synthetic users unseen in training, {split['shots']} shots each, held-out topics{steering}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.tick_params(axis="x", labelrotation=20)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    save_figure(fig, path, dpi=120)


def write_generate(
    result: dict[str, Any], json_path: str | Path | None, plot_path: str | Path | None
) -> None:
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
        if (
            r["split"] != first["split"]
            or any(r["config"][k] != first["config"][k] for k in keys)
            or r["generic"] != first["generic"]
        ):
            raise ValidationError(
                f"results[{index}]",
                "was run with another split, settings or generic answers",
                "merge runs of the same eval generate settings",
            )
        merged["methods"].update(r["methods"])
        merged["seconds"].update(r["seconds"])
    merged["config"] = {**first["config"], "methods": list(merged["methods"])}
    return merged
