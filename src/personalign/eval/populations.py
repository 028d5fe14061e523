"""Evaluation populations: external sources mapped to the preference format, and synthetic users.

Every loader returns an :class:`EvalPopulation`: users, each with an ordered enrolment pool
(``shots``; the first k are the k-shot enrolment), held-out comparisons, and the hidden user
type where the source has one. ``rows()`` gives the preference format with a ``user`` column.
Data is read in place from the data root (``$PERSONALIGN_DATA``, default ``../shared/data``
beside the repository); nothing is copied.

Mappings (one per source; see each source's README for its licence and caveats):

``psoups`` (P-SOUPS as packaged by AlignX, ``psoups_alignx/*.json``):
    one item = one user. shots = the item's 4 history pairs, de-duplicated (exact prompt,
    chosen, rejected) in their order; held out = the item's test pair. Items whose test
    prompt occurs in their own history are dropped. type = the P-SOUPS persona
    (``elementary``/``phd``/``friendly``/``unfriendly``).
``hh`` (relabeled HH-RLHF test split, ``relabeled_hh_rlhf/both/test.jsonl.gz``):
    the objective (helpful/harmless) is the hidden type. Each objective's pairs are shuffled
    (seeded) and cut into disjoint users of ``shots + held_out`` pairs. prompt = the
    conversation up to the final assistant turn; chosen = ``responses[label]``.
``popquorn`` (POPQUORN offensiveness, real annotators):
    one annotator = one user. Their rated comments are split (seeded) in two halves; shots
    are non-tied pairs within the first half, held-out pairs within the second, so held-out
    comments are never seen at enrolment. prompt = :data:`POPQUORN_PROMPT`; chosen = the
    comment the annotator rated *more* offensive (the reward is their perceived
    offensiveness). Up to 8 shot pairs and 128 held-out pairs per user (the held-out pairs of
    fit users are what population models learn item orderings from). No type (the population
    ordering agrees with a user 78.2% of the time).
``prefeval`` (PrefEval MCQ options): one item = one user; the question with the aligned
    option (option 0) preferred over each of the 3 violating ones. shots = the first two such
    pairs, held out = the third; they share the question, so it tests option ranking, not
    transfer across prompts. type = the topic.
``synthetic``: :class:`SyntheticPopulation`, users with hidden linear rewards over measured
    text attributes; labels drawn Bradley-Terry from them.

The parts: :mod:`personalign.eval.population_base` (the population type, the data root, seeded
user splits), :mod:`personalign.eval.population_sources` (the external loaders) and
:mod:`personalign.eval.synthetic_users` (the synthetic population). Every name stays importable from here.
"""

from __future__ import annotations

from pathlib import Path

from personalign.errors import ValidationError
from personalign.eval.population_base import (
    DATA_ENV,
    EvalPopulation,
    EvalUser,
    data_root,
    held_out_indices,
    heldout_users,
    source_dir,
    user_order,
)
from personalign.eval.population_sources import (
    POPQUORN_PROMPT,
    PSOUPS_FILES,
    PSOUPS_TYPES,
    load_popquorn,
    load_prefeval,
    load_psoups,
    load_relabeled_hh,
)
from personalign.eval.synthetic_users import (
    ATTRIBUTES,
    PHRASINGS,
    SyntheticConfig,
    SyntheticPopulation,
    measure_attributes,
)
from personalign.types import Comparison

__all__ = [
    "DATA_ENV",
    "PSOUPS_FILES",
    "PSOUPS_TYPES",
    "POPQUORN_PROMPT",
    "data_root",
    "source_dir",
    "held_out_indices",
    "user_order",
    "heldout_users",
    "EvalUser",
    "EvalPopulation",
    "load_psoups",
    "load_relabeled_hh",
    "load_popquorn",
    "load_prefeval",
    "ATTRIBUTES",
    "PHRASINGS",
    "measure_attributes",
    "SyntheticConfig",
    "SyntheticPopulation",
    "load_population",
]


def load_population(name: str, root: str | Path | None = None, seed: int = 0) -> EvalPopulation:
    """A population by source name (``psoups``, ``hh``, ``popquorn``, ``prefeval``, ``synthetic``) or a .jsonl path.

    A ``.jsonl`` file in the preference format with a ``user`` column becomes one user per
    user id: the first half of each user's rows are shots, the rest held out.
    """
    if name == "psoups":
        return load_psoups(root)
    if name == "hh":
        return load_relabeled_hh(root, seed=seed)
    if name == "popquorn":
        return load_popquorn(root, seed=seed)
    if name == "prefeval":
        return load_prefeval(root)
    if name == "synthetic":
        return SyntheticPopulation(SyntheticConfig(seed=seed)).population()
    if name.endswith(".jsonl"):
        from personalign.types import read_preferences

        by_user: dict[str, list[Comparison]] = {}
        for index, (user, comparison) in enumerate(read_preferences(name)):
            if user is None:
                raise ValidationError(
                    f"{Path(name).name}:{index + 1}.user", "is missing", "add a user column to every row"
                )
            by_user.setdefault(user, []).append(comparison)
        users = [
            EvalUser(u, cs[: len(cs) // 2], cs[len(cs) // 2 :]) for u, cs in by_user.items() if len(cs) >= 2
        ]
        return EvalPopulation(Path(name).stem, users, {"source": str(name)})
    raise ValidationError(
        "data",
        f"is not a known source ({name!r})",
        "use psoups, hh, popquorn, prefeval, synthetic or a .jsonl path",
        name,
    )
