"""Steering harness: does each method move what was asked, and only that?

For every method, on held-out prompts (topics no recipe trained on):

Every request carries the same system prompt (``system``, by default "Answer in two or three
sentences."), so unsteered answers end well inside ``max_new_tokens`` and length can move both
ways.

- **sweep**: the first objective's weight over ``sweep`` values in ``[-1, 1]`` (others 0); the
  mean measured score per value, Spearman's rank correlation between requested and measured
  (over the sweep means, and over all answers), and how far every other objective moves from
  its unsteered mean (relative change).
- **front**: two objectives steered together along directions ``(cos t, sin t)`` for ``t`` in
  ``[0, 90]`` degrees (a leading ``-`` on an objective name means "less of it" is better);
  the measured points, each method's Pareto front, and whether it dominates the prompting
  baseline's points.

Every answer is generated through ``Personalizer.chat_batch`` with the same seeded sampling
settings, so methods differ only in their steering.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ValidationError
from personalign.steering.methods import steerable_by_method
from personalign.steering.objectives import OBJECTIVES
from personalign.steering.prompts import split

Progress = Callable[[str], None]


class SteerEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objectives: list[str] = Field(default_factory=lambda: ["verbosity", "-structure"])
    methods: list[str] = Field(default_factory=lambda: ["prompt", "logit", "vas", "vas-model", "mix"])
    sweep: int = Field(default=7, ge=3, le=41)
    directions: int = Field(default=5, ge=2, le=41)
    prompts: int = Field(default=12, ge=1, le=200)
    max_new_tokens: int = Field(default=192, ge=8, le=2048)
    system: str = Field(
        default="Answer in two or three sentences.",
        description="the operating point every method starts from",
    )
    temperature: float = Field(default=0.7, ge=0.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    seed: int = 0
    seeds: int = Field(
        default=1, ge=1, le=16, description="answers per prompt and point, with seeds seed, seed + 1, ..."
    )
    front: bool = True


def _name(signed: str) -> tuple[str, float]:
    sign = -1.0 if signed.startswith("-") else 1.0
    name = signed.lstrip("-+")
    if name not in OBJECTIVES:
        raise ValidationError(
            "objectives", f"{name!r} is not a known objective", f"use some of {sorted(OBJECTIVES)}", signed
        )
    return name, sign


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties (``scipy.stats.spearmanr``); nan when either
    side is constant (where rho is undefined), without scipy's warning."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates: more is better)."""
    return [
        i for i, p in enumerate(points) if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
    ]


def dominates(front: Sequence[tuple[float, float]], points: Sequence[tuple[float, float]]) -> bool:
    """Whether every point is weakly dominated by some point of ``front``."""
    return all(any(f[0] >= p[0] and f[1] >= p[1] for f in front) for p in points)


def _mark_domination(fronts: dict[str, Any]) -> None:
    """Set each method's ``dominates_prompt``: its Pareto front weakly dominates every prompting point."""
    if "prompt" not in fronts:
        return
    prompt_xy = [(p["x"], p["y"]) for p in fronts["prompt"]["points"]]
    for entry in fronts.values():
        xy = [(p["x"], p["y"]) for p in entry["points"]]
        entry["dominates_prompt"] = dominates([xy[i] for i in entry["front"]], prompt_xy)


def _generate(pz: Any, prompts: Sequence[str], steer: dict[str, Any], config: SteerEvalConfig) -> list[str]:
    """Answers seed-major: ``seeds`` rounds over ``prompts``, round ``j`` sampled with ``seed + j``."""
    texts: list[str] = []
    for j in range(config.seeds):
        requests = [
            {
                "user": None,
                "messages": ([{"role": "system", "content": config.system}] if config.system else [])
                + [{"role": "user", "content": p}],
                "steer": steer,
                "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "seed": config.seed + j,
                "memory": False,
                "shots": False,
            }
            for p in prompts
        ]
        texts += [r.text for r in pz.respond_batch(requests)]
    return texts


def paired_drift(steered: Sequence[float], unsteered: Sequence[float]) -> tuple[float, float, float]:
    """Relative change of a mean, ``(mean(s) - mean(u)) / |mean(u)|``, with a 95% interval.

    The answers are paired (same prompt and seed), so the interval is the normal one of the
    mean paired difference, ``1.96 * sd(d) / sqrt(n)``, over ``|mean(u)|``. With ``n < 2`` or a
    zero unsteered mean the interval is infinite.
    """
    if len(steered) != len(unsteered) or not steered:
        raise ValidationError(
            "steered",
            f"has {len(steered)} answers, unsteered {len(unsteered)}",
            "pair every steered answer with its unsteered one",
        )
    base = abs(statistics.fmean(unsteered))
    diffs = [a - b for a, b in zip(steered, unsteered, strict=True)]
    mean = statistics.fmean(diffs)
    if base == 0.0:
        return (0.0 if mean == 0.0 else math.copysign(math.inf, mean)), -math.inf, math.inf
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return mean / base, (mean - half) / base, (mean + half) / base


def _scores(texts: Sequence[str]) -> dict[str, list[float]]:
    return {name: [o.measure(t) for t in texts] for name, o in OBJECTIVES.items()}


def run_steer_eval(config: SteerEvalConfig, pz: Any, progress: Progress | None = None) -> dict[str, Any]:
    """Run the sweep (and the front) for every method; a JSON-ready dict."""
    say = progress or (lambda _: None)
    (first, _), *rest = [_name(o) for o in config.objectives]
    steerable = steerable_by_method(pz.generator.model_id)
    prompts = split()[1][: config.prompts]
    values = [round(-1.0 + 2.0 * i / (config.sweep - 1), 6) for i in range(config.sweep)]
    started = time.perf_counter()
    unsteered = _scores(_generate(pz, prompts, {}, config))
    base_means = {k: statistics.fmean(v) for k, v in unsteered.items()}
    result: dict[str, Any] = {
        "config": config.model_dump(),
        "prompts": prompts,
        "unsteered": base_means,
        "sweep": {},
        "front": {},
    }
    for method in config.methods:
        if first not in steerable.get(method, ()):
            say(f"sweep: {method} cannot steer {first} here, skipped")
            continue
        points = []
        for w in values:
            scores = (
                _scores(_generate(pz, prompts, {"weights": {first: w}, "method": method}, config))
                if w != 0.0
                else unsteered
            )
            drift = {k: paired_drift(scores[k], unsteered[k]) for k in OBJECTIVES if k != first}
            points.append(
                {
                    "weight": w,
                    "mean": {k: statistics.fmean(v) for k, v in scores.items()},
                    first: scores[first],
                    "drift": drift,
                }
            )
            say(f"sweep {method} {first}={w:+.2f}: {statistics.fmean(scores[first]):.3f}")
        means = [p["mean"][first] for p in points]
        per_answer_w = [p["weight"] for p in points for _ in p[first]]
        per_answer = [s for p in points for s in p[first]]
        # the point of largest drift of each other objective, with its paired 95% interval
        worst = {
            k: max((p["drift"][k] for p in points), key=lambda d: abs(d[0])) for k in OBJECTIVES if k != first
        }
        drift = {k: abs(d[0]) if base_means[k] else float("inf") for k, d in worst.items()}
        result["sweep"][method] = {
            "values": values,
            "means": means,
            "spearman_means": spearman(values, means),
            "spearman_answers": spearman(per_answer_w, per_answer),
            "max_relative_drift": drift,
            "max_drift_interval": {k: list(v) for k, v in worst.items()},
            "points": [
                {
                    "weight": p["weight"],
                    "mean": p["mean"],
                    "drift": {k: list(v) for k, v in p["drift"].items()},
                }
                for p in points
            ],
        }
    if config.front and rest:
        (a, sa), (b, sb) = _name(config.objectives[0]), rest[0]
        angles = [90.0 * i / (config.directions - 1) for i in range(config.directions)]
        for method in config.methods:
            if not {a, b} <= set(steerable.get(method, ())):
                say(f"front: {method} cannot steer both {a} and {b}, skipped")
                continue
            pts = []
            for t in angles:
                weights = {a: sa * math.cos(math.radians(t)), b: sb * math.sin(math.radians(t))}
                weights = {k: round(v, 6) for k, v in weights.items() if abs(v) > 1e-9}
                scores = _scores(_generate(pz, prompts, {"weights": weights, "method": method}, config))
                pts.append(
                    {
                        "angle": t,
                        "weights": weights,
                        "x": sa * statistics.fmean(scores[a]),
                        "y": sb * statistics.fmean(scores[b]),
                    }
                )
                say(f"front {method} angle {t:.0f}: {pts[-1]['x']:.3f}, {pts[-1]['y']:.3f}")
            xy = [(p["x"], p["y"]) for p in pts]
            result["front"][method] = {"points": pts, "front": pareto_front(xy)}
        _mark_domination(result["front"])
        result["front_axes"] = [config.objectives[0], config.objectives[1]]
    result["seconds"] = time.perf_counter() - started
    return result


def format_steer(result: dict[str, Any]) -> str:
    first = result["config"]["objectives"][0].lstrip("-+")
    lines = [
        f"sweep of {first}: Spearman(requested, measured) over the sweep means and over all answers; largest drift of the other objectives",
        "",
    ]
    lines.append(
        "| method | "
        + " | ".join(f"{v:+.2f}" for v in next(iter(result["sweep"].values()))["values"])
        + " | rho (means) | rho (answers) | max drift reading_level | max drift structure |"
    )
    lines.append("|---" * (len(next(iter(result["sweep"].values()))["values"]) + 5) + "|")
    for method, s in result["sweep"].items():
        drift = s["max_relative_drift"]
        interval = s.get("max_drift_interval", {})

        def cell(
            name: str, drift: dict[str, float] = drift, interval: dict[str, list[float]] = interval
        ) -> str:
            text = f"{drift.get(name, float('nan')):.0%}"
            if name in interval:
                _, low, high = interval[name]
                text += f" [{low:+.0%}, {high:+.0%}]"
            return text

        lines.append(
            f"| {method} | "
            + " | ".join(f"{m:.2f}" for m in s["means"])
            + f" | {s['spearman_means']:.3f} | {s['spearman_answers']:.3f} | {cell('reading_level')} | {cell('structure')} |"
        )
    if result.get("front"):
        ax = result["front_axes"]
        lines += [
            "",
            f"front over ({ax[0]}, {ax[1]}) (signed: more is better on both axes)",
            "",
            "| method | points (x, y) | dominates prompt |",
            "|---|---|---|",
        ]
        for method, f in result["front"].items():
            pts = ", ".join(f"({p['x']:.2f}, {p['y']:.2f})" for p in f["points"])
            verdict = "(the baseline)" if method == "prompt" else f.get("dominates_prompt", "")
            lines.append(f"| {method} | {pts} | {verdict} |")
    return "\n".join(lines)


def plot_steer(result: dict[str, Any], path: Path | str) -> Path:
    """Two panels: the sweep (requested vs measured) and the two-objective fronts."""
    from personalign.eval.stats import new_figure

    first = result["config"]["objectives"][0].lstrip("-+")
    fig, axes = new_figure(
        1, 2 if result.get("front") else 1, figsize=(11 if result.get("front") else 5.5, 4.2), squeeze=False
    )
    methods = list(dict.fromkeys([*result["sweep"], *result.get("front", {})]))
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method in both panels
    ax = axes[0][0]
    for method, s in result["sweep"].items():
        ax.plot(
            s["values"],
            s["means"],
            marker="o",
            color=color[method],
            label=f"{method} (rho {s['spearman_means']:.2f})",
        )
    ax.axhline(result["unsteered"][first], color="grey", lw=0.8, ls="--", label="unsteered")
    ax.set_xlabel(f"requested {first} weight")
    ax.set_ylabel(f"measured {first}")
    ax.set_title(f"Sweep: {first}")
    ax.legend(fontsize=7)
    if result.get("front"):
        ax = axes[0][1]
        for method, f in result["front"].items():
            xs = [p["x"] for p in f["points"]]
            ys = [p["y"] for p in f["points"]]
            ax.scatter(xs, ys, label=method, s=18, color=color[method])
            front = sorted((xs[i], ys[i]) for i in f["front"])
            ax.plot([p[0] for p in front], [p[1] for p in front], color=color[method], lw=1)
        ax.set_xlabel(result["front_axes"][0] + " (signed)")
        ax.set_ylabel(result["front_axes"][1] + " (signed)")
        ax.set_title("Two-objective fronts (up and right is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def merge_steer(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same config but different methods (each method once).

    The runs must share objectives, prompts, sweep values and decoding settings, so their
    unsteered answers are identical; the front's domination of the prompting baseline is
    recomputed over the merged methods.
    """
    if not results:
        raise ValidationError("results", "is empty", "pass at least one eval steer result")
    keys = (
        "objectives",
        "sweep",
        "directions",
        "prompts",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "system",
    )
    first = results[0]
    merged = {**first, "sweep": {}, "front": {}, "config": {**first["config"], "methods": []}, "seconds": 0.0}
    defaults = {"seeds": 1}  # runs written before the option existed
    for result in results:
        for key in (*keys, "seeds"):
            value = result["config"].get(key, defaults.get(key))
            if value != first["config"].get(key, defaults.get(key)):
                raise ValidationError(
                    f"config.{key}",
                    "differs between the runs",
                    "merge only runs made with the same settings",
                    value,
                )
        for part in ("sweep", "front"):
            for method, entry in result.get(part, {}).items():
                if method in merged[part]:
                    raise ValidationError(
                        part, f"has {method!r} twice", "merge runs of different methods", method
                    )
                merged[part][method] = entry
        merged["config"]["methods"] += [
            m for m in result["config"]["methods"] if m not in merged["config"]["methods"]
        ]
        merged["seconds"] += result.get("seconds", 0.0)
        if "front_axes" in result:
            merged["front_axes"] = result["front_axes"]
    _mark_domination(merged["front"])
    return merged
