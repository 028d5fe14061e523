"""Results of :mod:`personalign.eval.psoups_decode` as a table, pooled over seeds, as a figure and as files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.generate import personal_margins
from personalign.eval.psoups_decode_scores import summarise_scores, wilson_interval


def format_psoups_decode(result: dict[str, Any]) -> str:
    """The markdown table: each method's win rate over the generic answer, its control and margin."""
    judge, guide = result["judge"], result["guidance"]
    lines = [
        f"judge: {judge['model']} on {'+'.join(judge['features'])}; held-out accuracy {judge['accuracy']:.3f} [{judge['ci'][0]:.2f}, {judge['ci'][1]:.2f}] (n = {judge['n']} test users' held-out pairs)",
        f"guidance: {guide['embedder']} on {'+'.join(guide['features'])}; held-out accuracy {guide['accuracy']:.3f} (n = {guide['n']})"
        + (f", the shipped PAL {guide['shipped_accuracy']:.3f}" if "shipped_accuracy" in guide else ""),
        "",
        "| method | win rate over generic | 95% CI | n | "
        + " | ".join(sorted(next(iter(result["methods"].values()))["per_persona"]))
        + " | margin own - shuffled [95% CI] |",
    ]
    personas = sorted(next(iter(result["methods"].values()))["per_persona"])
    lines.append("|---" * (5 + len(personas)) + "|")
    rows = {**result["methods"], **{f"({name})": r for name, r in result["references"].items()}}
    for name, r in rows.items():
        m = result["margins"].get(name)
        margin = f"{m['margin']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]" if m else ""
        ci = "" if _no_interval(r) else f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
        cells = " | ".join(f"{r['per_persona'].get(p, float('nan')):.2f}" for p in personas)
        lines.append(f"| {name} | {r['win_rate']:.3f} | {ci} | {r['n']} | {cells} | {margin} |")
    for method, control in (("user-rerank", "user-rerank-shuffled"), ("user-vas", "user-vas-shuffled")):
        if method in result["methods"] and "picked" in result["methods"][method]:
            differ = picks_differ(result, method, control)
            lines.append(
                f"{method}: own and opposite-persona picks differ for "
                + ", ".join(f"{p} {d}/{n}" for p, (d, n) in differ.items())
            )
    for method, why in result.get("skipped", {}).items():
        lines.append(f"({method} not run: {why})")
    return "\n".join(lines)


def picks_differ(result: dict[str, Any], method: str, control: str) -> dict[str, tuple[int, int]]:
    """Per persona: for how many users the own pick and the control's pick differ (of how many)."""
    out: dict[str, list[int]] = {}
    for u, a, b in zip(
        result["users"],
        result["methods"][method]["picked"],
        result["methods"][control]["picked"],
        strict=True,
    ):
        out.setdefault(str(u["persona"]), []).append(int(a != b))
    return {p: (sum(v), len(v)) for p, v in sorted(out.items())}


def _no_interval(row: dict[str, Any]) -> bool:
    low = row["ci"][0]
    return low is None or (isinstance(low, float) and np.isnan(low))


def pool_psoups_decode(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs on different seeds with the same settings: every judged answer pooled,
    margins by a paired bootstrap clustered by user over all runs, the judge's and the guidance's
    held-out accuracies pooled over the runs' test users."""
    if not results:
        raise ValidationError("results", "is empty", "pass eval psoups-decode results of several seeds")
    keys = (
        "users",
        "files",
        "guidance",
        "judge_features",
        "fit_users",
        "rerank",
        "max_new_tokens",
        "test_fraction",
    )
    first = results[0]["config"]
    for index, r in enumerate(results):
        if any(r["config"][k] != first[k] for k in keys):
            raise ValidationError(
                f"results[{index}]",
                "was run with other settings",
                f"pool runs that differ only in seed (same {', '.join(keys)})",
            )
    users = [u["user"] for r in results for u in r["users"]]
    personas = [str(u["persona"]) for r in results for u in r["users"]]

    def pooled(section: str, name: str) -> dict[str, Any]:
        row = summarise_scores([s for r in results for s in r[section][name]["scores"]], users, personas)
        return {**row, "ci": [None, None]} if any(_no_interval(r[section][name]) for r in results) else row

    names = [m for m in results[0]["methods"] if all(m in r["methods"] for r in results)]
    methods = {m: pooled("methods", m) for m in names}
    for m in names:
        if all("picked" in r["methods"][m] for r in results):
            methods[m]["picked"] = [i for r in results for i in r["methods"][m]["picked"]]

    def accuracy(part: str) -> dict[str, Any]:
        correct, n = (
            sum(r[part]["accuracy"] * r[part]["n"] for r in results),
            sum(r[part]["n"] for r in results),
        )
        return {
            **results[0][part],
            "accuracy": correct / n,
            "ci": list(wilson_interval(round(correct), n)),
            "n": n,
            "per_seed": [r[part]["accuracy"] for r in results],
        }

    guidance = accuracy("guidance")
    if all("shipped_accuracy" in r["guidance"] for r in results):
        guidance["shipped_accuracy"] = (
            sum(r["guidance"]["shipped_accuracy"] * r["guidance"]["n"] for r in results) / guidance["n"]
        )
    return {
        "seeds": [r["config"]["seed"] for r in results],
        "config": {k: first[k] for k in keys},
        "split": {"decoded_users": len(users), "per_seed": [r["split"] for r in results]},
        "guidance": guidance,
        "judge": accuracy("judge"),
        "users": [u for r in results for u in r["users"]],
        "methods": methods,
        "references": {name: pooled("references", name) for name in results[0]["references"]},
        "margins": personal_margins(methods, users),
        "skipped": results[0].get("skipped", {}),
    }


def plot_psoups_decode(result: dict[str, Any], path: str | Path) -> Path:
    """Bars: each method's win rate over the generic answer with its Wilson interval (the controls
    grey), then the references (the judge's own pick of the candidates, a random candidate)."""
    from personalign.eval.stats import new_figure, save_figure

    rows = {**result["methods"], **{f"({name})": r for name, r in result["references"].items()}}
    names = list(rows)
    rates = np.array([rows[n]["win_rate"] for n in names])
    fig, ax = new_figure(figsize=(7, 3.8))
    colors = [
        "#8c8c8c" if n.endswith("-shuffled") else "#4c72b0" if n in result["methods"] else "#dd8452"
        for n in names
    ]
    ax.bar(names, rates, color=colors)
    for x, n in enumerate(names):
        if not _no_interval(rows[n]):
            low, high = rows[n]["ci"]
            ax.errorbar(
                x,
                rows[n]["win_rate"],
                yerr=[[rows[n]["win_rate"] - low], [high - rows[n]["win_rate"]]],
                color="black",
                capsize=4,
            )
    ax.axhline(0.5, color="grey", linestyle=":", label="no better than generic")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate over the generic answer")
    judge = result["judge"]
    seeds = f"seeds {result['seeds']}, " if "seeds" in result else ""
    ax.set_title(
        f"P-SOUPS test users ({seeds}{result['split']['decoded_users']}), held-out prompts; judge acc {judge['accuracy']:.2f} ({'+'.join(judge['features'])})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.tick_params(axis="x", labelrotation=20)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return save_figure(fig, path, dpi=120)


def write_psoups_decode(
    result: dict[str, Any], json_path: str | Path | None, plot_path: str | Path | None
) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if plot_path:
        plot_psoups_decode(result, plot_path)
