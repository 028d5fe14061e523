"""POPQUORN email rewriting: does a user's own history make the rewrite closer to theirs?

POPQUORN (Pei & Jurgens, LAW-XVII @ ACL 2023; research-only, read in place from
``$PERSONALIGN_DATA/popquorn/email_rewriting/raw_data.csv``, never copied): real Prolific
annotators each rewrote about 10 Enron-style emails "to be more polite and professional". The
LaMP-7-style task: for a user and one of their emails, rewrite the email the way this user
would, and score the output against the user's real rewrite.

Users: rows without a ``user_id`` are dropped; a seeded 20% of the user ids (seed 0, the
README's suggestion; :func:`heldout_users`) are the test users and took no part in any choice;
the others are the dev users. For each user, ``k`` of their emails (a seeded sample) are
targets; for a target the user's *other* (original, revised) pairs are their history.

Arms (same instruction, :data:`INSTRUCTION`, same greedy decoding, steering off):

``generic``  the instruction and the email, nothing else (``user=None``);
``fspo-prompt``   the history enrolled as comparisons ``(prompt = instruction + original,
                 chosen = the user's rewrite, rejected = the original)`` under a user id of its
                 own per target, and the request made with ``shots=True``:
                 :meth:`Personalizer.condition` ranks them by similarity to the email and lays
                 the ``n_shots`` most similar out in the FSPO few-shot format
                 (:mod:`personalign.conditioning.fspo`: question, preferred response, dispreferred
                 response, then the task line). The base generator, no adapter;
``fspo-trained``  (optional) the same prompt through the installed FSPO meta-trained adapter
                 (``personalign train fspo``); refused when none is installed;
``memory``        (optional) the history remembered as ``"Original email: ... / My rewrite: ..."``
                 memories and the request made with ``memory=True`` (retrieval picks
                 ``n_memories`` of them, no similarity threshold).

Scores: ROUGE-L F1 (:func:`rouge_l_f1`, LCS over lower-cased alphanumeric tokens, no stemming,
as ``rouge_score``'s default tokenizer) and the cosine similarity of the encoder's embeddings,
each against the user's real rewrite; the unrewritten original email is scored the same way
(``copy``) as a reference point. Reported: the mean per arm, the paired difference to
``generic`` with a paired bootstrap interval (over emails, and clustered by user), and the win
rate (a tie counts half) with a Wilson interval.
"""

from __future__ import annotations

import csv
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.adapters import wilson
from personalign.eval.populations import heldout_users, source_dir, user_order
from personalign.eval.stats import bootstrap_mean_ci, save_figure, win_rate

INSTRUCTION = "Rewrite this email to be more polite and professional."
ARMS = ("generic", "fspo-prompt", "fspo-trained", "memory")
SPLITS = ("test", "dev")
ARM_COLORS = {
    "generic": "tab:gray",
    "fspo-prompt": "tab:blue",
    "fspo-trained": "tab:green",
    "memory": "tab:purple",
}

Progress = Callable[[str], None]


@dataclass
class RewriteConfig:
    """What to run: ``k`` target emails per user, for ``users`` users (``None``: all) of ``split``."""

    split: str = "test"
    arms: list[str] = field(default_factory=lambda: ["generic", "fspo-prompt"])
    k: int = 2
    users: int | None = None
    n_shots: int = 3
    n_memories: int = 4
    max_new_tokens: int = 128
    batch_size: int = 8
    test_fraction: float = 0.2
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValidationError(
                "split", f"is not one of {SPLITS}", "use test (the held-out users) or dev", self.split
            )
        unknown = [a for a in self.arms if a not in ARMS]
        if (
            unknown
            or "generic" not in self.arms
            or len(self.arms) < 2
            or len(set(self.arms)) != len(self.arms)
        ):
            raise ValidationError(
                "arms",
                f"must be generic plus at least one of {ARMS[1:]}, each once",
                "e.g. --arms generic,fspo-prompt",
                self.arms,
            )
        if self.k < 1:
            raise ValidationError("k", "must be >= 1", "use e.g. 2", self.k)
        if self.users is not None and self.users < 1:
            raise ValidationError("users", "must be >= 1 (or None for all)", "use e.g. 20", self.users)
        if not 1 <= self.n_shots <= 64:
            raise ValidationError("n_shots", "must be in 1..64", "use e.g. 3", self.n_shots)
        if not 1 <= self.n_memories <= 100:
            raise ValidationError("n_memories", "must be in 1..100", "use e.g. 4", self.n_memories)
        if not 1 <= self.max_new_tokens <= 2048:
            raise ValidationError("max_new_tokens", "must be in 1..2048", "use e.g. 128", self.max_new_tokens)
        if self.batch_size < 1:
            raise ValidationError("batch_size", "must be >= 1", "use e.g. 8", self.batch_size)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValidationError(
                "test_fraction", "must be in (0, 1)", "use 0.2 (the README's split)", self.test_fraction
            )


# --- ROUGE-L ---------------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of ``[a-z0-9]`` (``rouge_score``'s default tokenizer without stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len a * len b))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): ``P = LCS / |candidate|``, ``R = LCS / |reference|``, ``F = 2PR / (P + R)``; 0 when either is empty."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmailPair:
    instance_id: str
    user_id: str
    original: str
    revised: str


def load_email_rewrites(root: str | Path | None = None) -> dict[str, list[EmailPair]]:
    """``{user_id: [EmailPair, ...]}`` in file order; unattributed rows (empty ``user_id``) are dropped."""
    path = source_dir(root, "popquorn") / "email_rewriting" / "raw_data.csv"
    users: dict[str, list[EmailPair]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if not row["user_id"].strip():
                continue
            users.setdefault(row["user_id"], []).append(
                EmailPair(row["instance_id"], row["user_id"], row["original email"], row["revised email"])
            )
    return users


def task_message(original: str) -> str:
    return f"{INSTRUCTION}\n\n{original}"


def targets_of(pairs: Sequence[EmailPair], k: int, seed: int) -> list[int]:
    """Indices of a user's ``k`` target emails (seeded by the user id), in file order."""
    user = pairs[0].user_id
    rng = np.random.default_rng([seed, zlib.crc32(user.encode())])
    usable = [i for i, p in enumerate(pairs) if p.revised.strip() and p.original.strip()]
    picked = rng.permutation(len(usable))[:k]
    return sorted(usable[i] for i in picked)


def history_comparisons(pairs: Sequence[EmailPair], target: int) -> list[Any]:
    """The user's other pairs as comparisons (their rewrite over the unrewritten email); unchanged rewrites skipped."""
    from personalign.types import Comparison

    return [
        Comparison(prompt=task_message(p.original), chosen=p.revised, rejected=p.original)
        for i, p in enumerate(pairs)
        if i != target
        and p.revised.strip()
        and p.original.strip()
        and p.revised.strip() != p.original.strip()
    ]


def history_memories(pairs: Sequence[EmailPair], target: int) -> list[str]:
    return [
        f"Original email: {p.original}\nMy rewrite: {p.revised}"
        for i, p in enumerate(pairs)
        if i != target and p.revised.strip() and p.original.strip()
    ]


def target_user(pair: EmailPair, target: int) -> str:
    """The store user for one target: its own id, so a target never sees another target's history (nor itself)."""
    return f"rewrite-{re.sub(r'[^A-Za-z0-9]', '_', pair.user_id)}-{target}"


# --- the run ---------------------------------------------------------------------------------------


def _request(arm: str, user: str, original: str, config: RewriteConfig) -> dict[str, Any]:
    """One ``respond_batch`` request: greedy, steering off, no per-user adapter."""
    from personalign.personalizer import ConditioningParams

    base = {
        "messages": [{"role": "user", "content": task_message(original)}],
        "steer": {},
        "temperature": 0.0,
        "max_new_tokens": config.max_new_tokens,
        "adapter": False,
    }
    if arm == "generic":
        return {**base, "user": None, "memory": False, "shots": False}
    if arm == "memory":
        return {
            **base,
            "user": user,
            "memory": True,
            "shots": False,
            "n_memories": config.n_memories,
            "memory_threshold": None,
        }
    shots = {**base, "user": user, "memory": False, "shots": True, "n_shots": config.n_shots}
    if "fspo" in ConditioningParams.model_fields:  # whether the installed FSPO adapter runs the shots
        shots["fspo"] = arm == "fspo-trained"
    return shots


def _cosines(encoder: Any, outputs: Sequence[str], references: Sequence[str]) -> list[float]:
    vectors_out = encoder.encode([o if o.strip() else " " for o in outputs])  # (n, dim), unit norm
    vectors_ref = encoder.encode(list(references))  # (n, dim)
    return [
        float(v) if o.strip() else 0.0
        for v, o in zip((vectors_out * vectors_ref).sum(axis=1), outputs, strict=True)
    ]


def run_rewrite(config: RewriteConfig, pz: Any, progress: Progress | None = None) -> dict[str, Any]:
    """Rewrite each target email under every arm; score against the user's own rewrite."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    emails = load_email_rewrites(config.data_root)
    test = heldout_users(list(emails), config.test_fraction, config.seed)
    users = (
        test if config.split == "test" else [u for u in sorted(emails, key=user_order) if u not in set(test)]
    )
    users = users[: config.users] if config.users is not None else users
    # A target needs a history to condition on (a user whose other rewrites all equal the email has none).
    candidates = [(u, t) for u in users for t in targets_of(emails[u], config.k, config.seed)]
    targets = [(u, t) for u, t in candidates if history_comparisons(emails[u], t)]
    if "fspo-trained" in config.arms and getattr(pz, "fspo_folder", None) is None:
        raise ValidationError(
            "arms",
            "include fspo-trained but no FSPO adapter is installed",
            "train one with `personalign train fspo`, or drop the arm",
        )
    say(f"rewrite: {len(users)} {config.split} users, {len(targets)} target emails, arms {config.arms}")
    for u, t in targets:  # the history of each target under its own user id
        store_user = target_user(emails[u][t], t)
        if {"fspo-prompt", "fspo-trained"} & set(config.arms):
            pz.enroll(store_user, history_comparisons(emails[u], t))
        if "memory" in config.arms:
            pz.remember(store_user, history_memories(emails[u], t))
    outputs: dict[str, list[Any]] = {}
    seconds: dict[str, float] = {}
    for arm in config.arms:
        t0 = time.perf_counter()
        requests = [
            _request(arm, target_user(emails[u][t], t), emails[u][t].original, config) for u, t in targets
        ]
        results = []
        for start in range(0, len(requests), config.batch_size):
            results += pz.respond_batch(requests[start : start + config.batch_size])
            say(f"  {arm}: {len(results)}/{len(requests)} ({time.perf_counter() - t0:.0f} s)")
        outputs[arm] = results
        seconds[arm] = time.perf_counter() - t0
    references = [emails[u][t].revised for u, t in targets]
    originals = [emails[u][t].original for u, t in targets]
    records = []
    cosine = {arm: _cosines(pz.encoder, [r.text for r in outputs[arm]], references) for arm in config.arms}
    copy_cosine = _cosines(pz.encoder, originals, references)
    for i, (u, t) in enumerate(targets):
        row: dict[str, Any] = {
            "user_id": u,
            "instance_id": emails[u][t].instance_id,
            "history": len(emails[u]) - 1,
        }
        # The reference point of no rewriting at all: the original email scored as the output.
        row["copy"] = {"rouge_l": rouge_l_f1(originals[i], references[i]), "cosine": copy_cosine[i]}
        for arm in config.arms:
            r = outputs[arm][i]
            row[arm] = {
                "rouge_l": rouge_l_f1(r.text, references[i]),
                "cosine": cosine[arm][i],
                "words": len(r.text.split()),
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "truncated": r.completion_tokens >= config.max_new_tokens,
                "shots": len(r.shots),
                "memories": len(r.memories),
            }
        records.append(row)
    from personalign import __version__

    result = {
        "benchmark": "popquorn-email-rewriting",
        "package_version": __version__,
        "generator": pz.generator.model_id,
        "encoder": pz.encoder.name,
        "config": {k: v for k, v in config.__dict__.items() if k != "data_root"},
        "instruction": INSTRUCTION,
        "fspo_adapter": str(getattr(pz, "fspo_folder", None)) if "fspo-trained" in config.arms else None,
        "users": users,
        "targets_without_history": len(candidates) - len(targets),
        "records": records,
        "summary": summarise_rewrite(records, config.arms, config.seed),
        "reference_words": float(np.mean([len(r.split()) for r in references])),
        "seconds": {"total": time.perf_counter() - started, **seconds},
    }
    result["texts"] = [
        {
            "user_id": u,
            "instance_id": emails[u][t].instance_id,
            "reference": references[i],
            **{arm: outputs[arm][i].text for arm in config.arms},
        }
        for i, (u, t) in enumerate(targets)
    ]
    return result


def summarise_rewrite(
    records: Sequence[Mapping[str, Any]], arms: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """Per arm: mean of each metric with a bootstrap interval; per personalised arm: the paired
    difference to ``generic`` (intervals over emails and clustered by user) and the win rate."""
    users = [r["user_id"] for r in records]
    out: dict[str, Any] = {"n": len(records), "users": len(set(users)), "arms": {}, "vs_generic": {}}
    for arm in arms:
        entry = {}
        for metric in ("rouge_l", "cosine"):
            values = [r[arm][metric] for r in records]
            entry[metric] = {
                "mean": float(np.mean(values)),
                "ci95": list(bootstrap_mean_ci(values, seed=seed)),
            }
        entry["words"] = float(np.mean([r[arm]["words"] for r in records]))
        entry["truncated"] = int(sum(r[arm]["truncated"] for r in records))
        entry["prompt_tokens"] = float(np.mean([r[arm]["prompt_tokens"] for r in records]))
        out["arms"][arm] = entry
    if records and all("copy" in r for r in records):
        out["copy"] = {
            m: {
                "mean": float(np.mean([r["copy"][m] for r in records])),
                "ci95": list(bootstrap_mean_ci([r["copy"][m] for r in records], seed=seed)),
            }
            for m in ("rouge_l", "cosine")
        }
    for arm in [a for a in arms if a != "generic"]:
        entry = {}
        for metric in ("rouge_l", "cosine"):
            a = np.array([r[arm][metric] for r in records])
            b = np.array([r["generic"][metric] for r in records])
            wins, n = win_rate(a, b)
            entry[metric] = {
                "difference": float((a - b).mean()),
                "ci95": list(bootstrap_mean_ci(a - b, seed=seed)),
                "ci95_by_user": list(bootstrap_mean_ci(a - b, groups=users, seed=seed)),
                "win_rate": wins / n,
                "win_ci95": list(wilson(int(round(wins)), n)),
            }
        out["vs_generic"][arm] = entry
    return out


def format_rewrite(result: Mapping[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"POPQUORN email rewriting, {result['config']['split']} users: {s['users']} users, {s['n']} emails; mean [95% bootstrap CI]"
    ]
    lines.append(f"  {'arm':12s} {'ROUGE-L F1':>22s} {'cosine':>22s} {'words':>6s} {'truncated':>9s}")
    for arm, e in s["arms"].items():
        r, c = e["rouge_l"], e["cosine"]
        lines.append(
            f"  {arm:12s} {r['mean']:9.3f} [{r['ci95'][0]:.3f},{r['ci95'][1]:.3f}] {c['mean']:9.3f} [{c['ci95'][0]:.3f},{c['ci95'][1]:.3f}] {e['words']:6.1f} {e['truncated']:9d}"
        )
    if "copy" in s:
        r, c = s["copy"]["rouge_l"], s["copy"]["cosine"]
        lines.append(
            f"  {'(copy)':12s} {r['mean']:9.3f} [{r['ci95'][0]:.3f},{r['ci95'][1]:.3f}] {c['mean']:9.3f} [{c['ci95'][0]:.3f},{c['ci95'][1]:.3f}]   the original email itself, unrewritten"
        )
    lines.append(f"  (reference rewrites: {result['reference_words']:.1f} words)")
    for arm, e in s["vs_generic"].items():
        for metric, d in e.items():
            lines.append(
                f"  {arm} - generic, {metric}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}] "
                f"(by user [{d['ci95_by_user'][0]:+.3f},{d['ci95_by_user'][1]:+.3f}]), win rate {d['win_rate']:.2f} [{d['win_ci95'][0]:.2f},{d['win_ci95'][1]:.2f}]"
            )
    return "\n".join(lines)


def plot_rewrite(result: Mapping[str, Any], path: str | Path) -> Path:
    """Left: ROUGE-L of each personalised arm vs generic per email; right: means with 95% intervals."""
    from personalign.eval.stats import new_figure

    records, summary = result["records"], result["summary"]
    arms = list(summary["arms"])
    if not records:
        raise ValidationError("result", "has no records to plot", "run at least one target email")
    fig, axes = new_figure(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    generic = [r["generic"]["rouge_l"] for r in records]
    for arm in [a for a in arms if a != "generic"]:
        wr = summary["vs_generic"][arm]["rouge_l"]["win_rate"]
        ax.scatter(
            generic,
            [r[arm]["rouge_l"] for r in records],
            s=14,
            alpha=0.7,
            color=ARM_COLORS[arm],
            label=f"{arm} (win rate {wr:.2f})",
        )
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("generic ROUGE-L F1")
    ax.set_ylabel("personalised ROUGE-L F1")
    ax.set_title("Per email (above the diagonal: personalised closer)")
    ax.legend(fontsize=8)
    ax = axes[1]
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        for i, metric in enumerate(("rouge_l", "cosine")):
            e = summary["arms"][arm][metric]
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.bar(
                x,
                e["mean"],
                width,
                yerr=[[e["mean"] - e["ci95"][0]], [e["ci95"][1] - e["mean"]]],
                capsize=3,
                color=ARM_COLORS[arm],
                label=arm if i == 0 else None,
            )
    if "copy" in summary:
        for i, metric in enumerate(("rouge_l", "cosine")):
            ax.hlines(
                summary["copy"][metric]["mean"],
                i - 0.45,
                i + 0.45,
                colors="black",
                linestyles="--",
                label="copy the original email" if i == 0 else None,
            )
    ax.set_xticks([0, 1], ["ROUGE-L F1", "embedding cosine"])
    ax.set_ylim(0, 1)
    ax.set_title(
        f"{summary['n']} emails of {summary['users']} {result['config']['split']} users (95% bootstrap CI)"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def split_texts(result: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(result without texts, texts)``: the texts quote the data, so they go to a separate file
    the caller chooses (never into the repository)."""
    texts = result.get("texts", [])
    return {k: v for k, v in result.items() if k != "texts"}, texts
