"""PrefEval results as tables and a figure: accuracy per split, condition and topic (Wilson
intervals), paired differences (bootstrap), memory retrieval (see :mod:`personalign.eval.prefeval`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.adapters import wilson
from personalign.eval.prefeval_items import CONDITIONS
from personalign.eval.stats import bootstrap_mean_ci, save_figure

# Paired accuracy differences reported per split: (a, b) means a minus b.
DIFFERENCES = (
    ("memory", "no-memory"),
    ("no-memory", "none"),
    ("memory", "none"),
    ("oracle", "no-memory"),
    ("oracle", "memory"),
)
CONDITION_COLORS = {
    "none": "tab:gray",
    "no-memory": "tab:orange",
    "memory": "tab:blue",
    "oracle": "tab:green",
}


# --- summaries ------------------------------------------------------------------------------------


def _interval(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval, clipped to [0, 1] (it can round to -1e-17 at 0 of n)."""
    low, high = wilson(correct, n)
    return max(low, 0.0), min(high, 1.0)


def _row(split: str, condition: str, topic: str, rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    correct, n = sum(bool(r["correct"]) for r in rs), len(rs)
    low, high = _interval(correct, n)
    row = {
        "split": split,
        "condition": condition,
        "topic": topic,
        "correct": correct,
        "n": n,
        "accuracy": correct / n if n else math.nan,
        "ci95": [low, high],
    }
    if rs and all("shift_correct" in r for r in rs):
        shifted = sum(bool(r["shift_correct"]) for r in rs)
        row.update(shift_correct=shifted, shift_accuracy=shifted / n, shift_ci95=list(_interval(shifted, n)))
    return row


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy with a 95% Wilson interval per (split, condition), over all topics (``topic="all"``) and per topic."""
    rows = []
    for split in dict.fromkeys(r["split"] for r in records):
        for condition in [c for c in CONDITIONS if any(r["condition"] == c for r in records)]:
            rs = [r for r in records if r["split"] == split and r["condition"] == condition]
            if not rs:
                continue
            rows.append(_row(split, condition, "all", rs))
            for topic in sorted({r["topic"] for r in rs}):
                rows.append(_row(split, condition, topic, [r for r in rs if r["topic"] == topic]))
    return rows


def differences(records: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Paired accuracy differences between conditions on the same items, with a paired bootstrap
    interval, for the primary choice (``metric="ll"``) and the contrastive one (``"shift"``)."""
    out = []
    for metric, key in (("ll", "correct"), ("shift", "shift_correct")):
        for split in dict.fromkeys(r["split"] for r in records):
            by = {
                (r["condition"], r["topic"], r["index"]): bool(r[key])
                for r in records
                if r["split"] == split and key in r
            }
            for a, b in DIFFERENCES:
                keys = sorted({(t, i) for c, t, i in by if c == a} & {(t, i) for c, t, i in by if c == b})
                if not keys:
                    continue
                diffs = [float(by[(a, *k)]) - float(by[(b, *k)]) for k in keys]
                low, high = bootstrap_mean_ci(diffs, seed=seed)
                out.append(
                    {
                        "metric": metric,
                        "split": split,
                        "a": a,
                        "b": b,
                        "n": len(diffs),
                        "difference": float(np.mean(diffs)),
                        "ci95": [low, high],
                    }
                )
    return out


def retrieval(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per split: how often the memory condition retrieved the preference, and how many memories."""
    out = []
    for split in dict.fromkeys(r["split"] for r in records):
        rs = [r for r in records if r["split"] == split and r["condition"] == "memory"]
        if rs:
            hits = sum(r["preference_retrieved"] for r in rs)
            low, high = wilson(hits, len(rs))
            mean_k = float(np.mean([len(r["retrieved"]) for r in rs]))
            out.append(
                {
                    "split": split,
                    "n": len(rs),
                    "preference_retrieved": hits / len(rs),
                    "ci95": [low, high],
                    "mean_memories": mean_k,
                }
            )
    return out


def _cell(row: Mapping[str, Any] | None, prefix: str = "") -> str:
    if row is None or f"{prefix}accuracy" not in row:
        return "-".rjust(22)
    low, high = row[f"{prefix}ci95"]
    return f"{row[f'{prefix}accuracy']:.3f} [{low:.2f},{high:.2f}]".rjust(22)


def format_prefeval(result: Mapping[str, Any]) -> str:
    """Plain-text tables: accuracy per split and condition (test topics too), paired differences, retrieval."""
    summary = result["summary"]
    lines = []
    for split in dict.fromkeys(r["split"] for r in summary):
        topics = sorted({r["topic"] for r in summary if r["split"] == split and r["topic"] != "all"})
        shown = ["all", *topics] if split == "test" else ["all"]
        n_items = next(r["n"] for r in summary if r["split"] == split and r["topic"] == "all")
        for prefix, title in (
            ("", "MCQ accuracy (highest mean log-prob)"),
            ("shift_", "contrastive accuracy (largest gain over none)"),
        ):
            rows = {
                c: {r["topic"]: r for r in summary if r["split"] == split and r["condition"] == c}
                for c in CONDITIONS
            }
            if prefix and not any(
                f"{prefix}accuracy" in r for cells in rows.values() for r in cells.values()
            ):
                continue
            lines.append(f"{split} ({len(topics)} topics, {n_items} items): {title} [95% Wilson CI]")
            lines.append("  condition " + "".join(t[:22].rjust(22) for t in shown))
            for condition, cells in rows.items():
                if cells and not (prefix and condition == "none"):
                    lines.append(f"  {condition:9s} " + "".join(_cell(cells.get(t), prefix) for t in shown))
    if result.get("differences"):
        lines.append("paired differences (a - b, same items) [95% paired bootstrap CI]")
        for d in result["differences"]:
            lines.append(
                f"  {d['metric']:5s} {d['split']:4s} {d['a']:>9s} - {d['b']:9s} {d['difference']:+.3f} [{d['ci95'][0]:+.2f},{d['ci95'][1]:+.2f}] (n={d['n']})"
            )
    for r in result.get("retrieval", []):
        lines.append(
            f"memory retrieval {r['split']}: preference retrieved {r['preference_retrieved']:.2f} [{r['ci95'][0]:.2f},{r['ci95'][1]:.2f}], {r['mean_memories']:.1f} memories per prompt"
        )
    return "\n".join(lines)


def plot_prefeval(result: Mapping[str, Any], path: str | Path) -> Path:
    """Left: accuracy per condition and split (95% Wilson intervals); right: test accuracy per topic."""
    from personalign.eval.stats import new_figure

    summary = result["summary"]
    splits = list(dict.fromkeys(r["split"] for r in summary))
    conditions = [c for c in CONDITIONS if any(r["condition"] == c for r in summary)]
    if not conditions:
        raise ValidationError("result", "has no rows to plot", "run at least one condition")
    fig, axes = new_figure(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})

    def bars(ax: Any, groups: Sequence[str], rows_of: Callable[[str, str], Mapping[str, Any] | None]) -> None:
        width = 0.8 / len(conditions)
        for j, condition in enumerate(conditions):
            xs, ys, errs, shifted = [], [], [[], []], []
            for i, group in enumerate(groups):
                row = rows_of(group, condition)
                if row is None:
                    continue
                xs.append(i + (j - (len(conditions) - 1) / 2) * width)
                ys.append(row["accuracy"])
                errs[0].append(row["accuracy"] - row["ci95"][0])
                errs[1].append(row["ci95"][1] - row["accuracy"])
                if "shift_accuracy" in row:
                    shifted.append((xs[-1], row["shift_accuracy"]))
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=condition, color=CONDITION_COLORS[condition])
            if shifted:
                last = j == len(conditions) - 1
                ax.scatter(
                    *zip(*shifted, strict=True),
                    marker="D",
                    s=22,
                    color="black",
                    zorder=3,
                    label="contrastive (gain over none)" if last else None,
                )
        ax.axhline(0.25, color="black", lw=0.8, ls=":", label="chance (1 of 4)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("MCQ accuracy")
        ax.grid(axis="y", alpha=0.3)

    def find(split: str, topic: str, condition: str) -> Mapping[str, Any] | None:
        return next(
            (
                r
                for r in summary
                if r["split"] == split and r["topic"] == topic and r["condition"] == condition
            ),
            None,
        )

    ax = axes[0]
    bars(ax, splits, lambda split, c: find(split, "all", c))
    ax.set_xticks(range(len(splits)), [f"{s} (n={find(s, 'all', conditions[0])['n']})" for s in splits])  # type: ignore[index]
    ax.set_title(f"PrefEval, {result['config']['filler_turns']} filler turns: all topics")
    ax.legend(fontsize=8)
    ax = axes[1]
    focus = "test" if "test" in splits else splits[0]
    topics = sorted({r["topic"] for r in summary if r["split"] == focus and r["topic"] != "all"})
    bars(ax, topics, lambda topic, c: find(focus, topic, c))
    ax.set_xticks(range(len(topics)), [t.replace("_", "\n", 1) for t in topics], fontsize=8)
    ax.set_title(f"{focus} split per topic")
    return save_figure(fig, path)
