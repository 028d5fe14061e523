"""Population references for rating data: how often item means order a user's own pairs.

For data where many people rate the same items (POPQUORN offensiveness), the natural
non-personal reference is the item's mean rating. A user's *pairs* are their items two by two
with different ratings; the reference "agrees" on a pair when the item with the higher mean
is the one the user rated higher. Two references:

- :func:`leave_one_out_agreement`: each item's mean over every *other* annotator. This is the
  figure the POPQUORN README quotes (78.2%): it uses the ratings of all other annotators,
  including the ones an evaluation holds out, so no model fitted on a subset can see as much.
- :func:`fit_only_agreement`: item means from a seeded ``1 - held_out`` share of the annotators
  (shrunk to the global mean by ``prior`` pseudo-ratings), scored on the held-out annotators'
  pairs: the population knowledge a deployed model has.

Pairs whose two reference means are equal are dropped (``ties="drop"``, as the README does) or
count half (``ties="half"``, as a model that must answer would score).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.populations import heldout_users, source_dir

Rating = tuple[str, str, float]  # (user, item, rating)


def read_popquorn_ratings(root: str | Path | None = None) -> list[Rating]:
    """``(user_id, instance_id, offensiveness)`` rows of POPQUORN's offensiveness file."""
    path = source_dir(root, "popquorn") / "offensiveness" / "raw_data.csv"
    rows: list[Rating] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["user_id"] and row["offensiveness"]:
                rows.append((row["user_id"], row["instance_id"], float(row["offensiveness"])))
    return rows


def _by_user(ratings: Iterable[Rating]) -> dict[str, list[tuple[str, float]]]:
    users: dict[str, list[tuple[str, float]]] = {}
    for user, item, rating in ratings:
        users.setdefault(user, []).append((item, rating))
    return users


def _item_sums(ratings: Iterable[Rating]) -> tuple[dict[str, float], dict[str, int]]:
    """Per item: the sum and the number of its ratings."""
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for _, item, rating in ratings:
        total[item] = total.get(item, 0.0) + rating
        count[item] = count.get(item, 0) + 1
    return total, count


def _agreement(
    users: Mapping[str, Sequence[tuple[str, float]]], reference: Mapping[str, Mapping[str, float]], ties: str
) -> tuple[float, int]:
    """Share of the users' non-tied pairs that ``reference[user]`` (item -> score) orders the same way."""
    if ties not in ("drop", "half"):
        raise ValidationError("ties", f"is {ties!r}", 'use "drop" or "half"', ties)
    hits, n = 0.0, 0
    for user, items in users.items():
        rated = np.array([r for _, r in items])
        score = np.array([reference[user][item] for item, _ in items])
        i, j = np.triu_indices(len(items), 1)
        differ = rated[i] != rated[j]
        agree = np.sign(score[i] - score[j]) == np.sign(rated[i] - rated[j])
        tied = score[i] == score[j]
        keep = differ & ~tied if ties == "drop" else differ
        hits += float((agree & keep & ~tied).sum()) + (
            0.5 * float((differ & tied).sum()) if ties == "half" else 0.0
        )
        n += int(keep.sum())
    if n == 0:
        raise ValidationError(
            "ratings",
            "give no pair of differently rated items",
            "pass users with at least two different ratings",
        )
    return hits / n, n


def leave_one_out_agreement(ratings: Sequence[Rating], ties: str = "drop") -> tuple[float, int]:
    """Agreement of each item's mean over the *other* annotators with every user's pairs.

    Returns ``(agreement, pairs)``. An item no one else rated gets the global mean rating.
    """
    total, count = _item_sums(ratings)
    mean = sum(total.values()) / max(sum(count.values()), 1)
    users = _by_user(ratings)
    reference = {
        user: {item: (total[item] - r) / (count[item] - 1) if count[item] > 1 else mean for item, r in items}
        for user, items in users.items()
    }
    return _agreement(users, reference, ties)


def fit_only_agreement(
    ratings: Sequence[Rating], held_out: float = 0.2, seed: int = 0, prior: float = 1.0, ties: str = "half"
) -> tuple[float, int]:
    """Item means of a seeded ``1 - held_out`` share of the users (:func:`heldout_users`, the
    split every harness uses), scored on the other users' pairs.

    Each mean is shrunk to the fit users' global mean by ``prior`` pseudo-ratings; an item no
    fit user rated gets the global mean. Returns ``(agreement, pairs)``.
    """
    if not 0.0 < held_out < 1.0:
        raise ValidationError(
            "held_out", f"is {held_out}", "give a fraction between 0 and 1, e.g. 0.2", held_out
        )
    users = _by_user(ratings)
    if len(users) < 2:
        raise ValidationError(
            "ratings",
            f"has {len(users)} user",
            "give at least two users: one to fit the item means on, one to test",
        )
    test = set(heldout_users(list(users), held_out, seed))
    fit = [(u, i, r) for u, i, r in ratings if u not in test]
    mean = float(np.mean([r for _, _, r in fit]))
    total, count = _item_sums(fit)
    item_mean = {item: (total[item] + prior * mean) / (count[item] + prior) for item in total}
    held = {u: users[u] for u in sorted(test)}
    reference = {u: {item: item_mean.get(item, mean) for item, _ in items} for u, items in held.items()}
    return _agreement(held, reference, ties)


def popquorn_reference(
    root: str | Path | None = None, seeds: int = 3, held_out: float = 0.2
) -> dict[str, object]:
    """The README's reference recomputed, and the fit-users-only reference over ``seeds`` splits."""
    ratings = read_popquorn_ratings(root)
    drop, pairs = leave_one_out_agreement(ratings, ties="drop")
    half, all_pairs = leave_one_out_agreement(ratings, ties="half")
    fit = [fit_only_agreement(ratings, held_out=held_out, seed=s) for s in range(seeds)]
    return {
        "ratings": len(ratings),
        "leave_one_out": {"ties_dropped": drop, "pairs": pairs, "ties_half": half, "all_pairs": all_pairs},
        "fit_users_only": {
            "held_out": held_out,
            "per_seed": [a for a, _ in fit],
            "mean": float(np.mean([a for a, _ in fit])),
            "pairs_per_seed": [n for _, n in fit],
        },
    }
