"""The evaluation population type (:class:`EvalUser`, :class:`EvalPopulation`), where external
data is read from (:func:`data_root`) and the seeded user splits every harness shares."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from personalign.errors import ValidationError
from personalign.types import Comparison

DATA_ENV = "PERSONALIGN_DATA"


def data_root(root: str | Path | None = None) -> Path:
    """The folder holding the external sources: ``root``, ``$PERSONALIGN_DATA``, or ``../shared/data``."""
    if root is not None:
        return Path(root)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def source_dir(root: str | Path | None, name: str) -> Path:
    """The folder of external data source ``name`` under :func:`data_root` (a ``ValidationError``
    that says to set ``$PERSONALIGN_DATA`` when it is missing)."""
    folder = data_root(root) / name
    if not folder.is_dir():
        raise ValidationError(
            "data_root",
            f"has no {name}/ folder ({folder})",
            f"set ${DATA_ENV} to the folder that holds {name}/",
            str(data_root(root)),
        )
    return folder


def held_out_indices(n: int, fraction: float, seed: int) -> set[int]:
    """The seeded test share of ``n`` items: the first ``round(fraction * n)`` (at least 1, at
    most ``n - 1``) of ``default_rng(seed).permutation(n)``. Every split by user uses it."""
    order = np.random.default_rng(seed).permutation(n)
    return set(order[: max(1, min(n - 1, round(fraction * n)))].tolist())


def user_order(user_id: str) -> tuple[int, float | str]:
    """Sort key of raw user ids: numbers numerically, then the rest as text."""
    try:
        return (0, float(user_id))
    except ValueError:
        return (1, user_id)


def heldout_users(user_ids: Sequence[str], fraction: float = 0.2, seed: int = 0) -> list[str]:
    """The seeded held-out users of raw data: ids sorted (numerically where they are numbers),
    then :func:`held_out_indices`, as ``EvalPopulation.split`` does for its users."""
    ordered = sorted(set(user_ids), key=user_order)
    return sorted((ordered[i] for i in held_out_indices(len(ordered), fraction, seed)), key=user_order)


# --- the population type -----------------------------------------------------------------------


@dataclass
class EvalUser:
    """One evaluation user: enrolment pool (in order), held-out comparisons, hidden type."""

    user: str
    shots: list[Comparison]
    held_out: list[Comparison]
    group: str | None = None
    weights: np.ndarray | None = None  # the hidden reward weights of a synthetic user

    @property
    def comparisons(self) -> list[Comparison]:
        return [*self.shots, *self.held_out]


@dataclass
class EvalPopulation:
    """Users of one source, with how they were made (``meta`` goes into result JSON)."""

    name: str
    users: list[EvalUser]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    def population(self) -> dict[str, list[Comparison]]:
        """``{user: shots + held_out}``: everything, for fitting a population model."""
        return {u.user: u.comparisons for u in self.users}

    def rows(self) -> list[tuple[str, Comparison]]:
        """The preference format with a user column, as :func:`write_preferences` takes."""
        return [(u.user, c) for u in self.users for c in u.comparisons]

    def groups(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for u in self.users:
            counts[str(u.group)] = counts.get(str(u.group), 0) + 1
        return counts

    def split(
        self, test_fraction: float, seed: int, exclude: str = "prompt"
    ) -> tuple[EvalPopulation, EvalPopulation]:
        """``(fit, test)`` by user, seeded; no user is in both.

        Several sources reuse prompts and whole pairs across users, so the fit users lose
        every comparison that shares something with a test user's held-out comparisons:
        ``exclude="prompt"`` (the default) drops those with the same prompt, ``"pair"`` those
        with the same prompt and the same two responses, ``"none"`` nothing (synthetic
        populations share a small candidate pool by design; use ``"pair"`` there). The test
        users keep everything. The counts go into ``meta["split"]``.
        """
        if not 0.0 < test_fraction < 1.0:
            raise ValidationError("test_fraction", "must be in (0, 1)", "use e.g. 0.2", test_fraction)
        if exclude not in ("prompt", "pair", "none"):
            raise ValidationError(
                "exclude", "must be 'prompt', 'pair' or 'none'", "use 'prompt' for external data", exclude
            )
        test_idx = held_out_indices(len(self.users), test_fraction, seed)
        test = [u for i, u in enumerate(self.users) if i in test_idx]
        fit = [u for i, u in enumerate(self.users) if i not in test_idx]

        def key(c: Comparison) -> tuple[str, ...]:
            return (
                (c.prompt_text,) if exclude == "prompt" else (c.prompt_text, *sorted((c.chosen, c.rejected)))
            )

        removed = 0
        if exclude != "none":
            banned = {key(c) for u in test for c in u.held_out}
            kept = []
            for u in fit:
                shots = [c for c in u.shots if key(c) not in banned]
                held = [c for c in u.held_out if key(c) not in banned]
                removed += len(u.shots) + len(u.held_out) - len(shots) - len(held)
                if shots or held:
                    kept.append(EvalUser(u.user, shots, held, u.group, u.weights))
            fit = kept
        split = {"seed": seed, "test_fraction": test_fraction, "test_users": [u.user for u in test]}
        split.update(exclude=exclude, fit_comparisons_removed=removed)
        meta = {**self.meta, "split": split}
        return EvalPopulation(self.name + ":fit", fit, meta), EvalPopulation(self.name + ":test", test, meta)
