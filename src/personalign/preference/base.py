"""The preference-embedder protocol, the user state, the featurizer and the artefact format.

Every preference embedder (``bt``, ``meandiff``, ``pal``, ``vpl``) has the same small surface:

    fit(population)                      learn the population model (users never tested on)
    prior()                              the state of a user with no comparisons
    infer(comparisons) -> UserState      who this user is, from their comparisons
    reward(prompts, responses, state)    (n,) rewards under that user
    prob(prompt, a, b, state)            p(user prefers a over b)
    save(dir) / load(dir, featurizer)    ``<name>_config.json`` + ``<name>.safetensors``

Features of ``(prompt, response)`` come from the frozen sentence encoder (:class:`Featurizer`).

The featurizer lives in :mod:`personalign.preference.featurizer` and the artefact format in
:mod:`personalign.preference.persistence`; every name stays importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from personalign.errors import ValidationError
from personalign.preference.featurizer import (
    DEFAULT_PARTS,
    FEATURE_PARTS,
    Featurizer,
    FeaturizerConfig,
)
from personalign.preference.persistence import (
    CONFIG_SUFFIX,
    FORMAT_VERSION,
    WEIGHTS_SUFFIX,
    artefact_paths,
    check_tensor_shapes,
    load_artefact,
    save_artefact,
)
from personalign.types import Comparison, validate_user_id

__all__ = [
    "Population",
    "FORMAT_VERSION",
    "CONFIG_SUFFIX",
    "WEIGHTS_SUFFIX",
    "as_population",
    "check_comparisons",
    "UserState",
    "check_candidate_arrays",
    "check_state",
    "FEATURE_PARTS",
    "DEFAULT_PARTS",
    "FeaturizerConfig",
    "Featurizer",
    "PreferenceEmbedder",
    "artefact_paths",
    "save_artefact",
    "load_artefact",
    "check_tensor_shapes",
    "PairArrays",
    "population_item_keys",
    "population_arrays",
    "feature_stats",
    "seeded",
]


Population = Mapping[str, Sequence[Comparison]]
"""Users' comparisons: ``{user_id: [Comparison, ...]}``."""


def as_population(rows: Population | Iterable[tuple[str | None, Comparison]]) -> dict[str, list[Comparison]]:
    """Normalise ``(user, comparison)`` rows (as :func:`read_preferences` returns) or a mapping.

    Rows without a user are rejected: a population model needs to know whose label is whose.
    """
    if isinstance(rows, Mapping):
        items: Iterable[tuple[Any, Any]] = ((user, c) for user, cs in rows.items() for c in cs)
    else:
        items = rows
    population: dict[str, list[Comparison]] = {}
    for index, (user, comparison) in enumerate(items):
        if user is None:
            raise ValidationError(
                f"population[{index}].user",
                "is missing",
                "give every comparison a user id (the `user` column)",
            )
        validate_user_id(user, f"population[{index}].user")
        if not isinstance(comparison, Comparison):
            raise ValidationError(
                f"population[{index}]", "is not a Comparison", "pass Comparison objects", comparison
            )
        population.setdefault(user, []).append(comparison)
    if not population:
        raise ValidationError("population", "is empty", "pass at least one user with comparisons")
    return population


def check_comparisons(comparisons: Sequence[Comparison], field_name: str = "comparisons") -> list[Comparison]:
    """Reject an empty list or non-Comparison items before anything is computed."""
    if isinstance(comparisons, Comparison):
        raise ValidationError(field_name, "is a single Comparison", "pass a list of comparisons")
    items = list(comparisons)
    if not items:
        raise ValidationError(
            field_name, "is empty", "pass at least one comparison (or use prior() for a new user)"
        )
    for index, item in enumerate(items):
        if not isinstance(item, Comparison):
            raise ValidationError(
                f"{field_name}[{index}]",
                "is not a Comparison",
                "build it with Comparison(prompt=..., chosen=..., rejected=...)",
                item,
            )
    return items


# --- user state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserState:
    """What an embedder knows about one user: a vector, and its variance where it has one.

    Attributes:
        method: the embedder that produced it (``"vpl"``, ``"pal"``, ...).
        vector: ``(d,)`` float32: VPL posterior mean, PAL mixture logits, MeanDiff direction.
        variance: ``(d,)`` float32 posterior variance (VPL), else ``None``.
        n_comparisons: how many comparisons it was inferred from.
    """

    method: str
    vector: np.ndarray
    variance: np.ndarray | None = None
    n_comparisons: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vector = np.asarray(self.vector, dtype=np.float32).reshape(-1)
        object.__setattr__(self, "vector", vector)
        if not np.all(np.isfinite(vector)):
            raise ValidationError(
                "state.vector",
                "contains NaN or infinite values",
                "re-infer the state from the user's comparisons",
            )
        if self.variance is not None:
            variance = np.asarray(self.variance, dtype=np.float32).reshape(-1)
            if variance.shape != vector.shape:
                raise ValidationError(
                    "state.variance",
                    f"has shape {variance.shape}, vector has {vector.shape}",
                    "give one variance per dimension",
                )
            if not np.all(np.isfinite(variance)) or np.any(variance <= 0):
                raise ValidationError(
                    "state.variance",
                    "must be finite and positive",
                    "re-infer the state from the user's comparisons",
                )
            object.__setattr__(self, "variance", variance)

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (floats are written exactly by ``repr``)."""
        return {
            "method": self.method,
            "vector": [float(v) for v in self.vector],
            "variance": None if self.variance is None else [float(v) for v in self.variance],
            "n_comparisons": self.n_comparisons,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserState:
        """Rebuild a state written by :meth:`to_dict`; NaN or malformed values raise ``ValidationError``."""
        try:
            vector = np.asarray(data["vector"], dtype=np.float32)
            variance = data.get("variance")
            return cls(
                method=str(data["method"]),
                vector=vector,
                variance=None if variance is None else np.asarray(variance, dtype=np.float32),
                n_comparisons=int(data.get("n_comparisons", 0)),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ValidationError):
                raise
            raise ValidationError(
                "state", f"is malformed ({err})", "re-infer the state from the user's comparisons"
            ) from None


def check_candidate_arrays(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> None:
    """One prompt, ``a`` and ``b`` per candidate, and at least one candidate."""
    if not (len(prompts) == len(a) == len(b)):
        raise ValidationError(
            "candidates",
            f"prompts, a and b have {len(prompts)}, {len(a)}, {len(b)} items",
            "pass one prompt, a and b per candidate",
        )
    if len(prompts) == 0:
        raise ValidationError("candidates", "is empty", "pass at least one candidate comparison")


def check_state(state: UserState, method: str, dim: int) -> UserState:
    """Check that ``state`` was produced by embedder ``method`` with a ``dim``-sized vector."""
    if not isinstance(state, UserState):
        raise ValidationError("state", "is not a UserState", "pass the result of infer() or prior()", state)
    if state.method != method:
        raise ValidationError(
            "state.method",
            f"is {state.method!r}, this embedder is {method!r}",
            f"infer the state with the {method} embedder",
            state.method,
        )
    if state.dim != dim:
        raise ValidationError(
            "state.vector",
            f"has {state.dim} dimensions, expected {dim}",
            "re-infer the state with this embedder",
            state.dim,
        )
    return state


# --- the protocol --------------------------------------------------------------------------------


@runtime_checkable
class PreferenceEmbedder(Protocol):
    """What every preference embedder provides. See the module docstring."""

    name: str
    featurizer: Featurizer

    def fit(self, population: Population, seed: int = 0) -> PreferenceEmbedder: ...

    def prior(self) -> UserState: ...

    def infer(self, comparisons: Sequence[Comparison]) -> UserState: ...

    def reward(self, prompts: Sequence[str], responses: Sequence[str], state: UserState) -> np.ndarray: ...

    def prob(self, prompt: str, a: str, b: str, state: UserState) -> float: ...

    def save(self, directory: str | Path) -> Path: ...


# --- shared helpers for embedders ------------------------------------------------------------------


@dataclass
class PairArrays:
    """A population's comparisons as feature arrays: row ``i`` is one comparison of ``users[user[i]]``."""

    chosen: np.ndarray  # (N, D)
    rejected: np.ndarray  # (N, D)
    weight: np.ndarray  # (N,)
    user: np.ndarray  # (N,) int64 index into ``users``
    users: list[str]

    def rows_of(self) -> list[np.ndarray]:
        """For each user, the indices of their rows."""
        order = np.argsort(self.user, kind="stable")
        bounds = np.searchsorted(self.user[order], np.arange(len(self.users) + 1))
        return [order[bounds[u] : bounds[u + 1]] for u in range(len(self.users))]


def population_item_keys(
    population: Population | Iterable[tuple[str | None, Comparison]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen, rejected)`` item keys in the row order of :func:`population_arrays`."""
    from personalign.preference.items import item_keys

    pop = as_population(population)
    flat = [c for u in pop for c in pop[u]]
    prompts = [c.prompt_text for c in flat]
    return item_keys(prompts, [c.chosen for c in flat]), item_keys(prompts, [c.rejected for c in flat])


def population_arrays(
    featurizer: Featurizer, population: Population | Iterable[tuple[str | None, Comparison]]
) -> PairArrays:
    """Validate a population and featurize all of it in one batch."""
    pop = as_population(population)
    users = list(pop)
    flat = [c for u in users for c in pop[u]]
    user_idx = np.array([i for i, u in enumerate(users) for _ in pop[u]], dtype=np.int64)
    chosen, rejected = featurizer.pair_features(flat)
    weight = np.array([c.weight for c in flat], dtype=np.float32)
    return PairArrays(chosen, rejected, weight, user_idx, users)


def feature_stats(arrays: PairArrays, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` of all response features and one overall scale, repeated to ``(D,)``.

    The scale is the root mean square per-dimension standard deviation: one number for all
    dimensions, so standardising keeps the geometry of the encoder space (per-dimension
    scaling would blow up the many near-constant dimensions of a sentence embedding).
    """
    both = np.concatenate([arrays.chosen, arrays.rejected], axis=0)
    scale = max(float(np.sqrt(both.var(axis=0).mean())), eps)
    return both.mean(axis=0).astype(np.float32), np.full(both.shape[1], scale, np.float32)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block and restore its state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
