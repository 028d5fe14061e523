"""Results of :mod:`personalign.eval.enroll`: several runs merged into one, the plain-text table and the figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personalign.errors import ValidationError
from personalign.eval.enroll_config import METHODS, SOURCES
from personalign.eval.enroll_scoring import summarise
from personalign.eval.stats import save_figure

METHOD_COLORS = {
    "bt": "tab:gray",
    "meandiff": "tab:orange",
    "pal": "tab:red",
    "vpl": "tab:purple",
    "oracle": "tab:green",
    "lora": "tab:blue",
    "bank": "tab:brown",
}


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
