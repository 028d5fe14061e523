"""External sources read in place and mapped to an :class:`EvalPopulation`: P-SOUPS, relabeled
HH-RLHF, POPQUORN and PrefEval (the mappings are described in :mod:`personalign.eval.populations`)."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.population_base import EvalPopulation, EvalUser, source_dir
from personalign.types import Comparison

PSOUPS_FILES = ("student_phd", "friendly_unfriendly")
PSOUPS_TYPES = {
    "Generate a response that can be easily understood by an elementary school student.": "elementary",
    "Generate a response that only a PhD Student in that specific field could understand.": "phd",
    "Generate a response that is friendly, witty, funny, and humorous, like a close friend.": "friendly",
    "Generate a response in an unfriendly manner.": "unfriendly",
}
POPQUORN_PROMPT = "Which of these comments is more offensive?"


def _comparison(prompt: str, chosen: str, rejected: str) -> Comparison | None:
    """A Comparison, or ``None`` where the source row cannot be one (empty or equal responses)."""
    if not prompt.strip() or not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
        return None
    return Comparison(prompt=prompt, chosen=chosen, rejected=rejected)


# --- external sources ----------------------------------------------------------------------------


def load_psoups(root: str | Path | None = None, files: Sequence[str] = PSOUPS_FILES) -> EvalPopulation:
    """P-SOUPS (AlignX packaging): one user per item, de-duplicated shots, one held-out pair."""
    folder = source_dir(root, "psoups_alignx")
    users: list[EvalUser] = []
    dropped = {"test_prompt_in_history": 0, "duplicate_shots": 0, "invalid_pairs": 0}
    for name in files:
        if name not in PSOUPS_FILES:
            raise ValidationError(
                "files", f"has unknown file {name!r}", f"use names from {PSOUPS_FILES}", name
            )
        items = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        for index, item in enumerate(items):
            history = item["Pair-wise Comparative Feedback"]
            if item["prompt"] in {h["prompt"] for h in history}:
                dropped["test_prompt_in_history"] += 1
                continue
            test = _comparison(item["prompt"], item["chosen"], item["rejected"])
            if test is None:
                dropped["invalid_pairs"] += 1
                continue
            seen: set[tuple[str, str, str]] = set()
            shots: list[Comparison] = []
            for h in history:
                key = (h["prompt"], h["chosen"], h["rejected"])
                if key in seen:
                    dropped["duplicate_shots"] += 1
                    continue
                seen.add(key)
                shot = _comparison(*key)
                if shot is None:
                    dropped["invalid_pairs"] += 1
                    continue
                shots.append(shot)
            group = PSOUPS_TYPES.get(item["ground_truth_persona"], item["ground_truth_persona"])
            users.append(EvalUser(f"psoups-{name}-{index}", shots, [test], group))
    return EvalPopulation(
        "psoups", users, {"source": "psoups_alignx", "files": list(files), "dropped": dropped}
    )


def load_relabeled_hh(
    root: str | Path | None = None, shots: int = 8, held_out: int = 8, seed: int = 0
) -> EvalPopulation:
    """Relabeled HH-RLHF: disjoint users of ``shots + held_out`` pairs of one objective each."""
    folder = source_dir(root, "relabeled_hh_rlhf")
    by_objective: dict[str, list[Comparison]] = {}
    invalid = 0
    with gzip.open(folder / "both" / "test.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            label = int(row["label"])
            pair = _comparison(row["prompt"], row["responses"][label], row["responses"][1 - label])
            if pair is None:
                invalid += 1
                continue
            by_objective.setdefault(row["objective"], []).append(pair)
    rng = np.random.default_rng(seed)
    size = shots + held_out
    users: list[EvalUser] = []
    for objective in sorted(by_objective):
        pairs = by_objective[objective]
        order = rng.permutation(len(pairs))
        for u in range(len(pairs) // size):
            chunk = [pairs[i] for i in order[u * size : (u + 1) * size]]
            users.append(EvalUser(f"hh-{objective}-{u}", chunk[:shots], chunk[shots:], objective))
    meta = {
        "source": "relabeled_hh_rlhf",
        "shots": shots,
        "held_out": held_out,
        "seed": seed,
        "invalid_pairs": invalid,
    }
    return EvalPopulation("hh", users, meta)


def load_popquorn(
    root: str | Path | None = None, shots: int = 8, held_out: int = 128, seed: int = 0
) -> EvalPopulation:
    """POPQUORN offensiveness: annotators' ratings turned into within-user pairs (see module doc)."""
    folder = source_dir(root, "popquorn")
    ratings: dict[str, list[tuple[str, float]]] = {}
    with (folder / "offensiveness" / "raw_data.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["user_id"] == "" or row["offensiveness"] == "":
                continue
            ratings.setdefault(row["user_id"], []).append((row["text"], float(row["offensiveness"])))
    rng = np.random.default_rng(seed)

    def pairs_of(items: list[tuple[str, float]], limit: int) -> list[Comparison]:
        candidates = [
            (i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i][1] != items[j][1]
        ]
        out: list[Comparison] = []
        for k in rng.permutation(len(candidates)):
            i, j = candidates[k]
            (ta, ra), (tb, rb) = items[i], items[j]
            pair = _comparison(POPQUORN_PROMPT, ta, tb) if ra > rb else _comparison(POPQUORN_PROMPT, tb, ta)
            if pair is not None:
                out.append(pair)
            if len(out) == limit:
                break
        return out

    users: list[EvalUser] = []
    for user_id in sorted(ratings, key=lambda u: int(u) if u.isdigit() else u):
        items = ratings[user_id]
        order = rng.permutation(len(items))
        half = len(items) // 2
        enrol, test = [items[i] for i in order[:half]], [items[i] for i in order[half:]]
        shot_pairs, test_pairs = pairs_of(enrol, shots), pairs_of(test, held_out)
        if shot_pairs and test_pairs:
            users.append(EvalUser(f"popquorn-{user_id}", shot_pairs, test_pairs, None))
    meta = {
        "source": "popquorn/offensiveness",
        "shots": shots,
        "held_out": held_out,
        "seed": seed,
        "prompt": POPQUORN_PROMPT,
    }
    return EvalPopulation("popquorn", users, meta)


def load_prefeval(root: str | Path | None = None, topics: Sequence[str] | None = None) -> EvalPopulation:
    """PrefEval MCQ: the aligned option over each violating option, per (topic, item) user."""
    folder = source_dir(root, "prefeval") / "benchmark_dataset" / "mcq_options"
    names = (
        sorted(p.stem for p in folder.glob("*.json") if " " not in p.stem) if topics is None else list(topics)
    )
    users: list[EvalUser] = []
    for topic in names:
        items = json.loads((folder / f"{topic}.json").read_text(encoding="utf-8"))
        for index, item in enumerate(items):
            options = item["classification_task_options"]
            pairs = [
                p
                for p in (_comparison(item["question"], options[0], o) for o in options[1:])
                if p is not None
            ]
            if len(pairs) >= 2:
                users.append(EvalUser(f"prefeval-{topic}-{index}", pairs[:-1], pairs[-1:], topic))
    return EvalPopulation("prefeval", users, {"source": "prefeval/mcq_options", "topics": names})
