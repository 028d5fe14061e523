"""The enrollment evaluation harness: held-out pairwise accuracy per method and shot count.

For each source and seed the users are split (seeded, by user) into *fit* users, on whom the
population models are trained, and *test* users, who are only ever enrolled: the first ``n``
of a test user's enrolment pool are their ``n`` shots, and the method predicts their held-out
comparisons. The split (seed, test users, comparisons removed from the fit side because they
share a prompt or pair with a test user's held-out items) is recorded in the result.

Methods:
    ``bt``        one population Bradley-Terry reward, no personalisation;
    ``meandiff``  zero training: the user's direction is the mean feature difference of their shots;
    ``pal``       K prototype rewards, the user is a mixture fitted to their shots;
    ``vpl``       a Gaussian posterior over a user latent from a pair-set encoder;
    ``oracle``    a Bradley-Terry reward fitted on the fit users *of the test user's hidden type*
                  (the upper reference "told who the user is"); sources without a type skip it;
    ``lora``      a per-user LoRA on the generator trained with DPO on the shots (implicit reward);
    ``bank``      K basis LoRAs on clusters of fit users; the user fits only K weights.

``--active`` (synthetic populations, whose users can answer any question) adds, for each
method with a posterior (``pal``, ``vpl``), the accuracy curve when each next question is the
candidate with the largest expected information gain, against questions drawn at random.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.adapters import ADAPTER_METHODS, wilson
from personalign.eval.populations import (
    EvalPopulation,
    EvalUser,
    SyntheticConfig,
    SyntheticPopulation,
    load_population,
)
from personalign.eval.stats import save_figure
from personalign.models import Encoder
from personalign.preference import EMBEDDER_CLASSES
from personalign.preference.base import Featurizer, FeaturizerConfig, PreferenceEmbedder, UserState
from personalign.preference.bt import BradleyTerry, BradleyTerryConfig
from personalign.preference.pal import PAL, PALConfig

EMBEDDERS = EMBEDDER_CLASSES
METHODS = (*EMBEDDERS, "oracle", *ADAPTER_METHODS)
SOURCES = ("psoups", "hh", "popquorn", "prefeval", "synthetic")
ACTIVE_METHODS = ("pal", "vpl")
# What a fit user loses when it overlaps a test user's held-out items: the prompt, except where
# every item shares one prompt by construction (POPQUORN's single question, synthetic's pool).
EXCLUDE = {"synthetic": "pair", "popquorn": "pair"}

Progress = Callable[[str], None]
METHOD_COLORS = {
    "bt": "tab:gray",
    "meandiff": "tab:orange",
    "pal": "tab:red",
    "vpl": "tab:purple",
    "oracle": "tab:green",
    "lora": "tab:blue",
    "bank": "tab:brown",
}


@dataclass
class EnrollConfig:
    """What to run. ``shots`` per source default to 1, 2, 4 on P-SOUPS (4-item histories) and 1-8 elsewhere."""

    data: list[str]
    methods: list[str] = field(default_factory=lambda: ["bt", "meandiff", "pal", "vpl", "oracle"])
    shots: list[int] | None = None
    seeds: int = 3
    fit_data: str | None = None
    test_fraction: float = 0.2
    features: tuple[str, ...] = ("response", "prompt_x_response", "log_length")
    active: bool = False
    active_users: int = 40
    active_pool: int = 48
    active_steps: int = 8
    adapter_users: int = 20
    adapter_seeds: int = 1
    bank_k: int = 4
    bank_pairs: int = 32
    synthetic_users: int = 200
    item_effects: bool = False
    data_root: str | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValidationError(
                "data", "is empty", f"name a source ({', '.join(SOURCES)}) or a .jsonl file"
            )
        for name in self.data:
            if name not in SOURCES and not name.endswith(".jsonl"):
                raise ValidationError(
                    "data", f"has unknown source {name!r}", f"use {', '.join(SOURCES)} or a .jsonl path", name
                )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValidationError(
                "methods",
                f"has unknown method(s) {unknown}",
                f"choose from {', '.join(METHODS)}",
                self.methods,
            )
        if self.shots is not None and (not self.shots or any(n < 1 for n in self.shots)):
            raise ValidationError("shots", "must be positive integers", "e.g. --shots 1,2,4,8", self.shots)
        if self.seeds < 1:
            raise ValidationError("seeds", "must be at least 1", "e.g. --seeds 3", self.seeds)
        FeaturizerConfig(parts=self.features)  # validates the names

    def shots_for(self, source: str) -> list[int]:
        if self.shots is not None:
            return list(self.shots)
        return [1, 2, 4] if source == "psoups" else [1, 2, 4, 8]


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


# --- the run --------------------------------------------------------------------------------------


def _warm_features(featurizer: Featurizer, population: EvalPopulation) -> None:
    """Featurize every comparison of ``population`` in one batched call, so per-user calls hit the caches."""
    items = [c for u in population.users for c in u.comparisons]
    if items:
        featurizer.pair_features(items)


def _make_embedder(method: str, featurizer: Featurizer, item_effects: bool = False) -> PreferenceEmbedder:
    """An unfitted embedder; ``item_effects`` turns on per-item offsets where the method has them (bt, pal)."""
    if item_effects and method == "bt":
        return BradleyTerry(featurizer, BradleyTerryConfig(item_effects=True))
    if item_effects and method == "pal":
        return PAL(featurizer, PALConfig(item_effects=True))
    return EMBEDDERS[method](featurizer)


def _load(source: str, config: EnrollConfig, seed: int) -> tuple[EvalPopulation, SyntheticPopulation | None]:
    if source == "synthetic":
        synth = SyntheticPopulation(SyntheticConfig(n_users=config.synthetic_users, seed=seed))
        return synth.population(), synth
    return load_population(source, config.data_root, seed=seed), None


def run_enroll(
    config: EnrollConfig, encoder: Encoder, generator: Any = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every (source, seed, method, shots) cell; return the JSON-ready result."""
    say = progress or (lambda _msg: None)
    if "hidden" in config.features and generator is None:
        raise ValidationError(
            "features",
            "include 'hidden' but no generator was given",
            "pass the generator whose hidden states are the features",
        )
    featurizer = Featurizer(
        encoder, FeaturizerConfig(parts=config.features), generator if "hidden" in config.features else None
    )
    # Every text of a population is featurized several times (fit, each test user, each method):
    # keep them all cached for the run, then restore the encoder's own limit.
    previous_cache = encoder.cache_size
    encoder.cache_size = max(previous_cache, 500_000)
    try:
        return _run(config, encoder, generator, featurizer, say)
    finally:
        encoder.cache_size = previous_cache


def _run(
    config: EnrollConfig, encoder: Encoder, generator: Any, featurizer: Featurizer, say: Progress
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    splits: dict[str, list[dict[str, Any]]] = {}
    active: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for source in config.data:
        shots = config.shots_for(source)
        for seed in range(config.seeds):
            population, synth = _load(source, config, seed)
            if config.fit_data:
                fit_pop, _ = _load(config.fit_data, config, seed)
                test_ids = {u.user for u in population.users}
                fit = EvalPopulation(
                    fit_pop.name, [u for u in fit_pop.users if u.user not in test_ids], fit_pop.meta
                )
                test = population
                split = {
                    "seed": seed,
                    "fit_data": config.fit_data,
                    "test_users": [u.user for u in test.users],
                }
            else:
                fit, test = population.split(
                    config.test_fraction, seed, exclude=EXCLUDE.get(source, "prompt")
                )
                split = dict(test.meta["split"])
            if not fit.users:
                raise ValidationError(
                    "data",
                    f"{source}: no fit user keeps a comparison once those sharing a prompt with a test user's held-out items are removed",
                    "use more users or more distinct prompts, or fit on another source with --fit-data",
                )
            split.update(fit_users=len(fit.users), test_users_count=len(test.users))
            splits.setdefault(source, []).append(split)
            say(f"{source} seed {seed}: {len(fit.users)} fit users, {len(test.users)} test users")
            _warm_features(featurizer, test)
            for method in config.methods:
                started = time.perf_counter()
                if method in EMBEDDERS:
                    embedder = _make_embedder(method, featurizer, config.item_effects).fit(
                        fit.population(), seed=seed
                    )
                    cells = evaluate_embedder(embedder, test, shots)
                    if config.active and synth is not None and method in ACTIVE_METHODS:
                        active.setdefault(source, {}).setdefault(method, []).append(
                            {
                                "seed": seed,
                                **active_curve(
                                    embedder,
                                    synth,
                                    test,
                                    config.active_steps,
                                    config.active_pool,
                                    config.active_users,
                                    seed,
                                ),
                            }
                        )
                elif method == "oracle":
                    found = evaluate_oracle(featurizer, fit, test, shots, seed)
                    if found is None:
                        if seed == 0:
                            notes.append(f"{source}: no hidden user type, so no oracle")
                        continue
                    cells = found
                else:
                    if seed >= config.adapter_seeds:
                        continue
                    cells = _adapter_cells(method, generator, encoder, fit, test, shots, seed, config, say)
                seconds = time.perf_counter() - started
                for n, (correct, total, users) in cells.items():
                    row = record(source, method, n, seed, correct, total, users, seconds)
                    records.append(row)
                    say(
                        f"  {method:9s} {n} shot(s): {row['accuracy']:.3f} ({correct:g}/{total}, {users} users)"
                    )
    from personalign import __version__

    return {
        "package_version": __version__,
        "encoder": encoder.name,
        "features": {source: list(config.features) for source in config.data},
        "config": {k: v for k, v in config.__dict__.items() if k != "data_root"},
        "splits": splits,
        "records": records,
        "summary": summarise(records),
        "active": active,
        "notes": notes,
    }


def _adapter_cells(
    method: str,
    generator: Any,
    encoder: Encoder,
    fit: EvalPopulation,
    test: EvalPopulation,
    shots: Sequence[int],
    seed: int,
    config: EnrollConfig,
    say: Progress,
) -> dict[int, tuple[float, int, int]]:
    """Per-user LoRA or LoRA bank on the first ``adapter_users`` test users (they are slow)."""
    from personalign.adapters.lora import LoraTrainConfig
    from personalign.eval.adapters import eval_bank, eval_lora

    if generator is None:
        raise ValidationError(
            "generator",
            f"is required for method {method!r}",
            "pass a Generator (the CLI loads the embedded one)",
        )
    users = [u for u in test.users if u.held_out][: config.adapter_users]
    subset = EvalPopulation(test.name, users, test.meta)
    if method == "lora":
        rows = eval_lora(generator, subset, shots, LoraTrainConfig(epochs=4, seed=seed), seed, progress=say)
    else:
        rows, _info = eval_bank(
            generator,
            encoder,
            fit,
            subset,
            shots,
            LoraTrainConfig(epochs=2, seed=seed),
            seed,
            k=config.bank_k,
            max_pairs=config.bank_pairs,
            progress=say,
        )
    out = {}
    for row in rows:
        eligible = sum(1 for u in users if u.shots)
        out[row["shots"]] = (float(row["correct"]), int(row["n"]), eligible)
    return out


def merge_results(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from several runs (e.g. each source with its best features): rows concatenated, summary recomputed.

    Two runs with rows for the same (data, method, shots, seed) cell are refused: the merged
    table would count that cell twice.
    """
    if not results:
        raise ValidationError("results", "is empty", "pass at least one result JSON")
    merged: dict[str, Any] = {
        "package_version": results[0].get("package_version"),
        "encoder": results[0].get("encoder"),
        "features": {},
        "configs": [],
        "splits": {},
        "records": [],
        "active": {},
        "notes": [],
    }
    seen: set[tuple[Any, ...]] = set()
    for index, result in enumerate(results):
        for key in ("records", "splits", "features"):
            if key not in result:
                raise ValidationError(
                    f"results[{index}].{key}",
                    "is missing",
                    "pass JSON files written by `personalign eval enroll --json`",
                )
        for row in result["records"]:
            cell = (row["data"], row["method"], row["shots"], row["seed"])
            if cell in seen:
                raise ValidationError(
                    f"results[{index}]",
                    f"repeats the cell {cell}",
                    "merge runs that cover different sources or methods",
                )
            seen.add(cell)
            merged["records"].append(dict(row))
        features = result["features"]
        if isinstance(features, Mapping):
            merged["features"].update(features)
        merged["configs"].append(result.get("config", result.get("configs")))
        for source, splits in result["splits"].items():
            merged["splits"].setdefault(source, splits)
        for source, by_method in result.get("active", {}).items():
            merged["active"].setdefault(source, {}).update(by_method)
        merged["notes"].extend(result.get("notes", []))
    merged["summary"] = summarise(merged["records"])
    return merged


# --- plot ---------------------------------------------------------------------------------------


def plot_enroll(result: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per source (accuracy vs shots, 95% intervals) plus one per active-querying curve."""
    import matplotlib.ticker

    from personalign.eval.stats import new_figure

    summary = result["summary"]
    found = list(dict.fromkeys(r["data"] for r in summary))
    sources = [s for s in SOURCES if s in found] + [s for s in found if s not in SOURCES]
    active = [
        (s, m, curves) for s, by_method in result.get("active", {}).items() for m, curves in by_method.items()
    ]
    panels = len(sources) + len(active)
    if panels == 0:
        raise ValidationError("result", "has no rows to plot", "run at least one method on one source")
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig, axes = new_figure(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, source in zip(flat, sources, strict=False):
        present = {r["method"] for r in summary if r["data"] == source}
        for method in [m for m in METHODS if m in present]:
            rs = sorted(
                (r for r in summary if r["data"] == source and r["method"] == method),
                key=lambda r: r["shots"],
            )
            x = [r["shots"] for r in rs]
            y = [r["accuracy"] for r in rs]
            lo = [r["ci95"][0] for r in rs]
            hi = [r["ci95"][1] for r in rs]
            style = "--" if method in ("oracle", "bt") else ":" if method == "bank" else "-"
            color = METHOD_COLORS.get(method)
            ax.plot(x, y, style, marker="o", label=method, color=color)
            ax.fill_between(x, lo, hi, alpha=0.12, color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["shots"] for r in summary if r["data"] == source}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(source)
        ax.set_xlabel("enrolment comparisons (shots)")
        ax.set_ylabel("held-out pairwise accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, (source, method, curves) in zip(flat[len(sources) :], active, strict=False):
        for arm, style in (("active", "-"), ("random", "--")):
            steps = [p["questions"] for p in curves[0][arm]]
            acc = [
                sum(c[arm][i]["correct"] for c in curves) / max(sum(c[arm][i]["n"] for c in curves), 1)
                for i in range(len(steps))
            ]
            ax.plot(steps, acc, style, marker="o", label=f"{arm} questions")
        ax.set_title(f"{source}: {method}, active vs random")
        ax.set_xlabel("questions answered")
        ax.set_ylabel("held-out pairwise accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[panels:]:
        ax.axis("off")
    return save_figure(fig, path)


def _cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return f"{'-':>24s}"
    low, high = row["ci95"]
    return f"{row['accuracy']:.3f} [{low:.2f},{high:.2f}]".rjust(24)


def format_table(result: Mapping[str, Any]) -> str:
    """The summary as a plain-text table: one row per (data, method), one column per shot count."""
    summary = result["summary"]
    lines = []
    for source in dict.fromkeys(r["data"] for r in summary):
        shots = sorted({r["shots"] for r in summary if r["data"] == source})
        lines.append(f"{source}: held-out pairwise accuracy [95% CI], seeds pooled")
        lines.append("  method     " + "".join(f"{n} shot(s)".rjust(24) for n in shots))
        present = {r["method"] for r in summary if r["data"] == source}
        for method in [m for m in METHODS if m in present]:
            cells = {r["shots"]: r for r in summary if r["data"] == source and r["method"] == method}
            text = "".join(_cell(cells.get(n)) for n in shots)
            lines.append(f"  {method:10s} {text}")
    for source, by_method in result.get("active", {}).items():
        for method, curves in by_method.items():
            for arm in ("active", "random"):
                steps = len(curves[0][arm])
                acc = [
                    sum(c[arm][i]["correct"] for c in curves) / max(sum(c[arm][i]["n"] for c in curves), 1)
                    for i in range(steps)
                ]
                lines.append(
                    f"{source} {method} {arm:6s} questions 1..{steps}: " + " ".join(f"{a:.3f}" for a in acc)
                )
    return "\n".join(lines)
