"""The drift evaluation harness (``personalign eval drift``): preferences and facts that change.

Preference drift. Synthetic users (:class:`~personalign.eval.populations.SyntheticPopulation`)
are split by user; a PAL is fitted on the fit users. Each test user answers ``pre`` comparisons
as themself, then *switches*: from then on another test user of a different archetype answers
for them (up to 8 comparisons, and ``held_out`` held-out pairs). Accuracy on the post-switch
held-out pairs after k = 1, 2, 4, 8 post-switch comparisons, for

    ``static``    the state inferred from all comparisons, equally weighted;
    ``recency``   recency-weighted comparisons (``half_life`` in comparisons);
    ``detector``  the change detector (re-infers from the comparisons since a detected change);
    ``fresh``     a new user enrolled on the k post-switch comparisons alone (the reference).

The same test users who never switch (their own ``pre + k`` comparisons, their own held-out
pairs) give each method's cost against ``static``, with a user-clustered bootstrap interval.

Memory timelines. Each synthetic person has facts that change (home, diet, job, tastes: 3-5
versions each, in varied phrasings) interleaved with distractor facts, written in time order to
a memory store: with keys (``key=<fact>``), without keys (conflicts reported, both kept, the
default), and without keys under ``on_conflict="supersede"``. For one question per fact: how
often the *current* version is the top search result, and how often an earlier version ranks
above it (default search: active memories only).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.populations import SyntheticConfig, SyntheticPopulation
from personalign.eval.stats import bootstrap_mean_ci, new_figure, save_figure
from personalign.models import Encoder
from personalign.preference.base import Featurizer
from personalign.preference.drift import STATIC, DriftConfig, infer_state
from personalign.preference.pal import PAL
from personalign.types import Comparison

Progress = Callable[[str], None]
METHODS = ("static", "recency", "detector")
COLORS = {"static": "tab:gray", "recency": "tab:blue", "detector": "tab:red", "fresh": "tab:green"}


@dataclass
class DriftEvalConfig:
    """What to run (the defaults are the reported run; tests shrink them)."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    pre: int = 16
    held_out: int = 32
    synthetic_users: int = 200
    test_fraction: float = 0.2
    seeds: int = 1
    half_life: float = 4.0
    threshold: float = 2.0
    memory_people: int = 20
    memory_distractors: int = 8

    def __post_init__(self) -> None:
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValidationError("ks", "must be positive integers", "e.g. --ks 1,2,4,8", self.ks)
        for name in ("pre", "held_out", "synthetic_users", "seeds"):
            if getattr(self, name) < 1:
                raise ValidationError(
                    name, "must be at least 1", "use a positive integer", getattr(self, name)
                )
        if self.memory_people < 0 or self.memory_distractors < 0:
            raise ValidationError(
                "memory_people",
                "must be >= 0",
                "use e.g. 20 (0 skips the memory timelines)",
                self.memory_people,
            )
        DriftConfig(half_life=self.half_life, threshold=self.threshold)  # validates them


def method_configs(config: DriftEvalConfig) -> dict[str, DriftConfig]:
    return {
        "static": STATIC,
        "recency": DriftConfig(half_life=config.half_life, detect=False),
        "detector": DriftConfig(detect=True, threshold=config.threshold),
    }


# --- preference drift ------------------------------------------------------------------------------


def _accuracy(embedder: Any, held: Sequence[Comparison], state: Any) -> float:
    prompts = [c.prompt_text for c in held]
    rewards = embedder.reward(prompts + prompts, [c.chosen for c in held] + [c.rejected for c in held], state)
    diff = np.asarray(rewards[: len(held)], np.float64) - np.asarray(rewards[len(held) :], np.float64)
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / len(held))


def _answers(synth: SyntheticPopulation, user: str, n: int, rng: np.random.Generator) -> list[Comparison]:
    return [synth.answer(user, p, a, b, rng) for p, a, b in synth.candidate_pairs(n, rng)]


def preference_drift(
    config: DriftEvalConfig, encoder: Encoder, seed: int, say: Progress
) -> list[dict[str, Any]]:
    """One row per (test user, scenario, k, method): accuracy on the scenario's held-out pairs."""
    synth = SyntheticPopulation(SyntheticConfig(n_users=config.synthetic_users, seed=seed))
    kmax = max(config.ks)
    population = synth.population(shots=config.pre + kmax, held_out=config.held_out)
    fit, test = population.split(config.test_fraction, seed, exclude="pair")
    featurizer = Featurizer(encoder)
    embedder = PAL(featurizer).fit(fit.population(), seed=seed)
    say(f"seed {seed}: PAL fitted on {len(fit.users)} users; {len(test.users)} test users")
    rng = np.random.default_rng(10_000 + seed)
    types = {u: int(synth.user_types[i]) for i, u in enumerate(synth.user_ids)}
    configs = method_configs(config)
    rows: list[dict[str, Any]] = []
    for user in test.users:
        others = [v.user for v in test.users if types[v.user] != types[user.user]]
        if not others:
            continue
        partner = others[int(rng.integers(len(others)))]
        pre = _answers(synth, user.user, config.pre, rng)
        scenarios = {
            "switch": (_answers(synth, partner, kmax, rng), _answers(synth, partner, config.held_out, rng)),
            "stay": (_answers(synth, user.user, kmax, rng), _answers(synth, user.user, config.held_out, rng)),
        }
        for scenario, (post, held) in scenarios.items():
            for k in config.ks:
                history = pre + post[:k]
                featurizer.pair_features(history)  # encoded once, so the timings compare inference only
                for method, drift in configs.items():
                    started = time.perf_counter()
                    state = infer_state(embedder, history, drift)
                    seconds = time.perf_counter() - started
                    change = state.extra.get("drift", {}).get("change_at")
                    row = {
                        "seed": seed,
                        "user": user.user,
                        "scenario": scenario,
                        "k": k,
                        "method": method,
                        "accuracy": _accuracy(embedder, held, state),
                    }
                    rows.append({**row, "change_at": change, "seconds": seconds})
                rows.append(
                    {
                        "seed": seed,
                        "user": user.user,
                        "scenario": scenario,
                        "k": k,
                        "method": "fresh",
                        "accuracy": _accuracy(embedder, held, embedder.infer(post[:k])),
                        "change_at": None,
                    }
                )
    return rows


def summarise_drift(rows: Sequence[Mapping[str, Any]], config: DriftEvalConfig, pre: int) -> dict[str, Any]:
    """Mean accuracy per (scenario, k, method), the ratio to fresh, and the stay-cost intervals."""
    table: dict[str, Any] = {}
    for scenario in ("switch", "stay"):
        for k in config.ks:
            cell: dict[str, Any] = {}
            for method in (*METHODS, "fresh"):
                values = [
                    r["accuracy"]
                    for r in rows
                    if r["scenario"] == scenario and r["k"] == k and r["method"] == method
                ]
                cell[method] = float(np.mean(values)) if values else math.nan
                if method != "fresh":
                    times = [
                        r["seconds"]
                        for r in rows
                        if r["scenario"] == scenario and r["k"] == k and r["method"] == method
                    ]
                    cell[f"{method}_ms"] = (
                        1000 * float(np.mean(times)) if times else math.nan
                    )  # one state inference
            fired = [
                r["change_at"]
                for r in rows
                if r["scenario"] == scenario and r["k"] == k and r["method"] == "detector"
            ]
            cell["detector_fired"] = float(np.mean([c is not None for c in fired])) if fired else math.nan
            cell["detector_at_switch"] = (
                float(np.mean([c == pre for c in fired])) if fired else math.nan
            )  # the change point found exactly
            cell["users"] = len(
                {(r["seed"], r["user"]) for r in rows if r["scenario"] == scenario and r["k"] == k}
            )
            for method in METHODS:
                cell[f"{method}_over_fresh"] = cell[method] / cell["fresh"] if cell["fresh"] else math.nan
            if scenario == "stay":
                for method in ("recency", "detector"):
                    diffs, groups = _paired(rows, k, method)
                    low, high = bootstrap_mean_ci(diffs, groups=groups) if diffs else (math.nan, math.nan)
                    cell[f"{method}_minus_static"] = float(np.mean(diffs)) if diffs else math.nan
                    cell[f"{method}_minus_static_ci95"] = [low, high]
            table.setdefault(scenario, {})[str(k)] = {key: _clean(value) for key, value in cell.items()}
    return table


def _paired(rows: Sequence[Mapping[str, Any]], k: int, method: str) -> tuple[list[float], list[str]]:
    by = {
        (r["seed"], r["user"], r["method"]): r["accuracy"]
        for r in rows
        if r["scenario"] == "stay" and r["k"] == k
    }
    keys = sorted({(s, u) for s, u, _ in by})
    return [by[(s, u, method)] - by[(s, u, "static")] for s, u in keys], [f"{s}:{u}" for s, u in keys]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# --- memory timelines ------------------------------------------------------------------------------

FACTS: dict[str, tuple[str, list[str], list[str]]] = {
    "home_city": (
        "Which city do I live in?",
        ["Paris", "Berlin", "Lisbon", "Toronto", "Osaka", "Nairobi", "Lima", "Oslo"],
        [
            "I live in {v}.",
            "I moved to {v}.",
            "I just relocated to {v}.",
            "These days my home is {v}.",
            "My new place is in {v}.",
        ],
    ),
    "diet": (
        "What kind of diet do I follow?",
        ["vegetarian", "vegan", "pescatarian", "on a keto diet", "eating everything again", "gluten-free"],
        [
            "I am {v}.",
            "I have become {v}.",
            "Now I am {v}.",
            "These days I'm {v}.",
            "I switched and I'm {v} now.",
        ],
    ),
    "job": (
        "What is my job?",
        ["a nurse", "a teacher", "a software engineer", "a chef", "an accountant", "a carpenter", "a pilot"],
        [
            "I work as {v}.",
            "I got a new job as {v}.",
            "I changed careers and I'm {v} now.",
            "These days I work as {v}.",
            "My job now: {v}.",
        ],
    ),
    "music": (
        "What music do I like?",
        ["jazz", "heavy metal", "classical music", "hip hop", "folk songs", "techno"],
        [
            "My favourite music is {v}.",
            "Lately I mostly listen to {v}.",
            "I'm really into {v} now.",
            "These days my favourite music is {v}.",
            "I prefer {v} now.",
        ],
    ),
    "sport": (
        "What sport do I play?",
        ["tennis", "football", "swimming", "rock climbing", "cycling", "basketball"],
        [
            "I play {v}.",
            "I took up {v}.",
            "My sport is {v} now.",
            "These days I do {v}.",
            "I switched to {v}.",
        ],
    ),
}
DISTRACTORS = [
    "My sister is called Maria.",
    "I have a dog named Rex.",
    "My birthday is in March.",
    "I drive a red hatchback.",
    "I am allergic to penicillin.",
    "My favourite colour is teal.",
    "I speak French and Spanish.",
    "I was born in a small village.",
    "My partner works night shifts.",
    "I have two kids.",
    "I collect old stamps.",
    "I wake up at six every day.",
    "I read a book every week.",
    "My phone is always on silent.",
    "I hate flying.",
    "I grew up near the sea.",
]
MEMORY_MODES = ("keys", "no_keys", "no_keys_supersede")


def timelines(people: int, distractors: int, seed: int) -> list[list[tuple[str | None, str]]]:
    """Per person: ``(fact key or None for a distractor, text)`` in time order; each fact has 3-5 versions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(people):
        events: list[tuple[str | None, str]] = []
        queues = {}
        for key, (_, values, phrasings) in FACTS.items():
            n = int(rng.integers(3, 6))
            chosen = rng.choice(len(values), size=n, replace=False)
            queues[key] = [phrasings[i % len(phrasings)].format(v=values[j]) for i, j in enumerate(chosen)]
        pool = [(key, text) for key, texts in queues.items() for text in texts]
        extra = [
            (None, DISTRACTORS[i])
            for i in rng.choice(len(DISTRACTORS), size=min(distractors, len(DISTRACTORS)), replace=False)
        ]
        # a random interleaving that keeps each fact's versions in order
        remaining = {key: list(texts) for key, texts in queues.items()}
        tokens = [key for key, _ in pool] + [None] * len(extra)
        rng.shuffle(tokens)
        extra_iter = iter(extra)
        for token in tokens:
            events.append((token, remaining[token].pop(0)) if token is not None else next(extra_iter))
        out.append(events)
    return out


def memory_timelines(config: DriftEvalConfig, encoder: Encoder, seed: int, say: Progress) -> dict[str, Any]:
    """Current-fact top-1 rate and superseded-outranks-current rate per mode."""
    from personalign.memory.chroma import MemoryStore
    from personalign.memory.lifecycle import MemoryLifecycle

    people = timelines(config.memory_people, config.memory_distractors, seed)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        store = MemoryStore(encoder, path=Path(folder) / "chroma")
        memories = MemoryLifecycle(store)
        for mode in MEMORY_MODES:
            top1 = outranked = questions = 0
            for p, events in enumerate(people):
                user = f"{mode.replace('_', '-')}-{seed}-{p}"
                for key, text in events:
                    if mode == "keys":
                        memories.add(user, text, key=key, source="timeline")
                    else:
                        memories.add(
                            user,
                            text,
                            on_conflict="supersede"
                            if mode == "no_keys_supersede" and key is not None
                            else "keep",
                            source="timeline",
                        )
                for key, (question, _, _) in FACTS.items():
                    versions = [t for k, t in events if k == key]
                    current, older = versions[-1], set(versions[:-1])
                    found = [
                        r["memory"]
                        for r in memories.search(user, question, top_k=10, threshold=-1.0)["results"]
                    ]
                    questions += 1
                    top1 += bool(found) and found[0] == current
                    rank = found.index(current) if current in found else len(found)
                    outranked += any(t in older for t in found[:rank])
            out[mode] = {
                "questions": questions,
                "current_top1": round(top1 / questions, 4),
                "superseded_outranks_current": round(outranked / questions, 4),
            }
            say(
                f"memory {mode}: current fact top-1 {top1}/{questions}, an earlier version above it {outranked}/{questions}"
            )
    return out


# --- the run ---------------------------------------------------------------------------------------


def run_drift(
    config: DriftEvalConfig, encoder: Encoder, out: str | Path | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run both parts for every seed; with ``out`` write ``drift.json`` and ``drift.png`` there."""
    from personalign import __version__

    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    previous = encoder.cache_size
    encoder.cache_size = max(previous, 200_000)
    try:
        rows = [row for seed in range(config.seeds) for row in preference_drift(config, encoder, seed, say)]
        memory = (
            [memory_timelines(config, encoder, seed, say) for seed in range(config.seeds)]
            if config.memory_people
            else []
        )
    finally:
        encoder.cache_size = previous
    result = {
        "package_version": __version__,
        "encoder": encoder.name,
        "config": asdict(config),
        "methods": {name: drift.to_dict() for name, drift in method_configs(config).items()},
        "preference": summarise_drift(rows, config, config.pre),
        "memory": _pool_memory(memory),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if out is not None:
        import json

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "drift.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        plot_drift(result, folder / "drift.png")
    return result


def _pool_memory(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not per_seed:
        return {}
    pooled: dict[str, Any] = {}
    for mode in MEMORY_MODES:
        n = sum(s[mode]["questions"] for s in per_seed)
        pooled[mode] = {
            "questions": n,
            "current_top1": round(
                sum(s[mode]["current_top1"] * s[mode]["questions"] for s in per_seed) / n, 4
            ),
            "superseded_outranks_current": round(
                sum(s[mode]["superseded_outranks_current"] * s[mode]["questions"] for s in per_seed) / n, 4
            ),
        }
    return pooled


def plot_drift(result: Mapping[str, Any], path: str | Path) -> Path:
    """Left: post-switch accuracy vs k per method (dashed: users who never switch). Right: memory rates."""
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    ks = [int(k) for k in result["preference"]["switch"]]
    for method in (*METHODS, "fresh"):
        left.plot(
            ks,
            [result["preference"]["switch"][str(k)][method] for k in ks],
            "o-",
            color=COLORS[method],
            label=f"{method} (switched)",
        )
        if method != "fresh":
            left.plot(
                ks,
                [result["preference"]["stay"][str(k)][method] for k in ks],
                "--",
                color=COLORS[method],
                alpha=0.6,
                label=f"{method} (never switched)",
            )
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_xlabel("comparisons after the switch (k)")
    left.set_ylabel("held-out accuracy")
    left.set_title("Preference drift (synthetic users, PAL)")
    left.legend(fontsize=7)
    memory = result.get("memory") or {}
    if memory:
        modes = list(memory)
        x = np.arange(len(modes))
        right.bar(
            x - 0.2,
            [memory[m]["current_top1"] for m in modes],
            0.4,
            label="current fact is top-1",
            color="tab:green",
        )
        right.bar(
            x + 0.2,
            [memory[m]["superseded_outranks_current"] for m in modes],
            0.4,
            label="an earlier version outranks it",
            color="tab:red",
        )
        right.set_xticks(x, modes)
        right.set_ylim(0, 1)
        right.set_title("Memory timelines (3-5 versions per fact)")
        right.legend(fontsize=7)
    return save_figure(fig, path)
