"""The preference-embedder protocol, the user state, the featurizer and the artefact format.

Every preference embedder (``bt``, ``meandiff``, ``pal``, ``vpl``) has the same small surface:

    fit(population)                      learn the population model (users never tested on)
    prior()                              the state of a user with no comparisons
    infer(comparisons) -> UserState      who this user is, from their comparisons
    reward(prompts, responses, state)    (n,) rewards under that user
    prob(prompt, a, b, state)            p(user prefers a over b)
    save(dir) / load(dir, featurizer)    ``<name>_config.json`` + ``<name>.safetensors``

Features of ``(prompt, response)`` come from the frozen sentence encoder (:class:`Featurizer`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from personalign.artefacts import atomic_save_safetensors, atomic_write_text
from personalign.errors import ValidationError
from personalign.models import Encoder
from personalign.preference.style import STYLE_FEATURES, style_features
from personalign.types import Comparison, validate_user_id

Population = Mapping[str, Sequence[Comparison]]
"""Users' comparisons: ``{user_id: [Comparison, ...]}``."""

FORMAT_VERSION = 1
CONFIG_SUFFIX = "_config.json"
WEIGHTS_SUFFIX = ".safetensors"


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


# --- features -----------------------------------------------------------------------------------

FEATURE_PARTS = ("response", "prompt_x_response", "log_length", "style", "hidden")
DEFAULT_PARTS = ("response", "prompt_x_response", "log_length")


@dataclass(frozen=True)
class FeaturizerConfig:
    """Which features describe a ``(prompt, response)`` pair.

    Parts, concatenated in this order:
        ``response``: the encoder vector e(y), unit norm (``dim`` numbers).
        ``prompt_x_response``: e(x) * e(y) elementwise, times sqrt(dim) so its norm is about 1
            (``dim`` numbers). A linear reward on it is a prompt-conditioned bilinear form
            e(x)^T diag(w) e(y): how the response fits what was asked.
        ``log_length``: (log(1 + characters) - 5) / 2, one number. The encoder truncates long
            texts, so it does not see length reliably.
        ``style``: stylometric measurements of the response (reading level, sentence length,
            exclamations, warm and cold words, person, lists, ...;
            :data:`personalign.preference.style.STYLE_FEATURES`). Off by default; it matters where
            users differ in how a text is written rather than what it is about.
        ``hidden``: the generator's last hidden state, mean-pooled over the response tokens
            of the chat-formatted (prompt, response), unit norm (``hidden_size`` numbers). Needs
            a generator; the texts are truncated to ``hidden_max_tokens`` (prompt) and
            ``hidden_max_tokens`` (response).
    """

    parts: tuple[str, ...] = DEFAULT_PARTS
    batch_size: int = 64
    hidden_max_tokens: int = 256

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        object.__setattr__(self, "parts", parts)
        unknown = [p for p in parts if p not in FEATURE_PARTS]
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ValidationError(
                "featurizer.parts",
                f"must be distinct names from {FEATURE_PARTS}",
                "e.g. parts=('response', 'log_length')",
                parts,
            )
        if self.batch_size < 1:
            raise ValidationError(
                "featurizer.batch_size", "must be at least 1", "use e.g. 64", self.batch_size
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": list(self.parts),
            "batch_size": self.batch_size,
            "hidden_max_tokens": self.hidden_max_tokens,
        }


class Featurizer:
    """Maps ``(prompt, response)`` pairs to fixed feature vectors with the frozen encoder.

    Texts are encoded once per call in batches, through the encoder's text cache, so repeated
    prompts and responses cost nothing.
    """

    def __init__(
        self, encoder: Encoder, config: FeaturizerConfig | None = None, generator: Any = None
    ) -> None:
        self.encoder = encoder
        self.config = config or FeaturizerConfig()
        self._enc_dim = encoder.dim
        self.generator = generator
        if "hidden" in self.config.parts and generator is None:
            raise ValidationError(
                "featurizer.parts",
                "includes 'hidden' but no generator was given",
                "pass generator=... or drop the 'hidden' part",
            )
        self._hidden_cache: dict[tuple[str, str], np.ndarray] = {}
        self._style_cache: dict[str, np.ndarray] = {}

    def _style(self, text: str) -> np.ndarray:
        cached = self._style_cache.get(text)
        if cached is None:
            if len(self._style_cache) > 100_000:
                self._style_cache.clear()
            cached = self._style_cache[text] = style_features(text)
        return cached

    @property
    def encoder_name(self) -> str:
        """The encoder, plus the generator when its hidden states are features."""
        if "hidden" in self.config.parts:
            return f"{self.encoder.name}+{self.generator.model_id}"
        return self.encoder.name

    def _hidden_dim(self) -> int:
        return int(self.generator.model.config.hidden_size) if self.generator is not None else 0

    def hidden(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``(n, hidden_size)`` unit-norm mean last hidden state over each response's tokens (cached)."""
        import torch

        keys = list(zip(prompts, responses, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in self._hidden_cache))
        if todo:
            tok = self.generator.tokenizer
            model = self.generator.model
            limit = self.config.hidden_max_tokens
            seqs = []
            for prompt, response in todo:
                head = tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
                )
                if not isinstance(head, list):
                    head = list(head["input_ids"])
                body = tok(response, add_special_tokens=False)["input_ids"][:limit]
                seqs.append((head[-limit:], body or [tok.eos_token_id]))
            order = sorted(range(len(todo)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            device = next(model.parameters()).device
            step = max(1, self.config.batch_size // 4)
            for start in range(0, len(order), step):
                chunk = order[start : start + step]
                width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                response_mask = torch.zeros((len(chunk), width), dtype=torch.float32)
                for row, i in enumerate(chunk):  # right padding
                    head, body = seqs[i]
                    ids[row, : len(head) + len(body)] = torch.tensor(head + body)
                    attention[row, : len(head) + len(body)] = 1
                    response_mask[row, len(head) : len(head) + len(body)] = 1.0
                with torch.no_grad():
                    out = model(
                        input_ids=ids.to(device),
                        attention_mask=attention.to(device),
                        output_hidden_states=True,
                    )
                last = out.hidden_states[-1].float().cpu()  # (b, T, H)
                pooled = (last * response_mask[..., None]).sum(1) / response_mask.sum(
                    1, keepdim=True
                )  # (b, H)
                pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
                for row, i in enumerate(chunk):
                    self._hidden_cache[todo[i]] = pooled[row].numpy().astype(np.float32)
        return np.stack([self._hidden_cache[k] for k in keys])

    @property
    def dim(self) -> int:
        sizes = {
            "response": self._enc_dim,
            "prompt_x_response": self._enc_dim,
            "log_length": 1,
            "style": len(STYLE_FEATURES),
            "hidden": self._hidden_dim(),
        }
        return sum(sizes[p] for p in self.config.parts)

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` float32 features of ``n`` (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValidationError(
                "prompts",
                f"has {len(prompts)} items, responses has {len(responses)}",
                "pass one prompt per response",
            )
        n = len(responses)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = self.config.parts
        needs_prompt = "prompt_x_response" in parts
        needs_encoder = needs_prompt or "response" in parts
        texts = (list(responses) + (list(prompts) if needs_prompt else [])) if needs_encoder else []
        unique = list(dict.fromkeys(texts))
        index = {t: i for i, t in enumerate(unique)}
        vectors = (
            self.encoder.encode(unique, batch_size=self.config.batch_size)
            if unique
            else np.zeros((0, self._enc_dim), np.float32)
        )  # (u, enc_dim)
        resp = vectors[[index[t] for t in responses]] if needs_encoder else vectors  # (n, enc_dim)
        out: list[np.ndarray] = []
        for part in parts:
            if part == "response":
                out.append(resp)
            elif part == "prompt_x_response":
                prom = vectors[[index[t] for t in prompts]]  # (n, enc_dim)
                out.append(prom * resp * math.sqrt(self._enc_dim))
            elif part == "style":
                out.append(np.stack([self._style(t) for t in responses]))
            elif part == "hidden":
                out.append(self.hidden(prompts, responses))
            else:
                chars = np.array([len(t) for t in responses], dtype=np.float32)
                out.append(((np.log1p(chars) - 5.0) / 2.0)[:, None])
        return np.concatenate(out, axis=1).astype(np.float32)

    def pair_features(self, comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
        """``(chosen, rejected)`` features, each ``(n, dim)``, encoded in one batch."""
        prompts = [c.prompt_text for c in comparisons]
        both = self.features(
            prompts + prompts, [c.chosen for c in comparisons] + [c.rejected for c in comparisons]
        )
        n = len(comparisons)
        return both[:n], both[n:]


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


# --- artefacts -----------------------------------------------------------------------------------


def artefact_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """``(<dir>/<name>_config.json, <dir>/<name>.safetensors)``."""
    directory = Path(directory)
    return directory / f"{name}{CONFIG_SUFFIX}", directory / f"{name}{WEIGHTS_SUFFIX}"


def save_artefact(
    directory: str | Path,
    name: str,
    featurizer: Featurizer,
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
) -> Path:
    """Write the config (stamped with package version, encoder and feature size) and the weights.

    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """

    import torch

    from personalign import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = artefact_paths(directory, name)
    stamped = {
        "method": name,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "encoder": featurizer.encoder_name,
        "feature_dim": featurizer.dim,
        "featurizer": featurizer.config.to_dict(),
        "config": dict(config),
    }
    cpu = {}
    for key, value in tensors.items():
        tensor = torch.as_tensor(value).detach().to("cpu")
        cpu[key] = (
            tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        ).contiguous()  # integer keys stay exact
    metadata = {"method": name, "package_version": __version__, "encoder": featurizer.encoder_name}
    atomic_save_safetensors(weights_path, cpu, metadata)
    atomic_write_text(config_path, json.dumps(stamped, indent=2, sort_keys=True) + "\n")
    return directory


def load_artefact(
    directory: str | Path, name: str, featurizer: Featurizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check an artefact written by :func:`save_artefact`; return ``(config, tensors)``.

    Raises ``ValidationError`` when the files are missing, were written by another method or
    encoder, or hold features of another size than ``featurizer`` produces.
    """
    from safetensors.torch import load_file

    config_path, weights_path = artefact_paths(directory, name)
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValidationError(
                "directory", f"has no {path.name}", f"pass a folder written by {name}.save()", str(directory)
            )
    try:
        stamped = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValidationError(
            config_path.name,
            f"is unreadable ({err})",
            f"re-save the embedder ({name}.save())",
            str(directory),
        ) from None
    if not isinstance(stamped, dict):
        raise ValidationError(
            config_path.name, "is not a JSON object", f"re-save the embedder ({name}.save())", str(directory)
        )
    if stamped.get("method") != name:
        raise ValidationError(
            f"{config_path.name}.method",
            f"is {stamped.get('method')!r}, not {name!r}",
            "load it with the matching embedder class",
        )
    if stamped.get("encoder") != featurizer.encoder_name:
        raise ValidationError(
            f"{config_path.name}.encoder",
            f"was trained on encoder {stamped.get('encoder')!r}, the featurizer uses {featurizer.encoder_name!r}",
            "load it with the encoder it was trained with, or retrain",
        )
    saved_parts = tuple(stamped.get("featurizer", {}).get("parts", ()))
    if saved_parts and saved_parts != featurizer.config.parts:
        raise ValidationError(
            f"{config_path.name}.featurizer.parts",
            f"is {saved_parts}, the featurizer uses {featurizer.config.parts}",
            "build the Featurizer with the saved parts",
        )
    if stamped.get("feature_dim") != featurizer.dim:
        raise ValidationError(
            f"{config_path.name}.feature_dim",
            f"is {stamped.get('feature_dim')}, the featurizer gives {featurizer.dim}",
            "load it with the encoder and feature parts it was trained with, or retrain",
        )
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # truncated or corrupted: safetensors raises its own error types
        raise ValidationError(
            weights_path.name,
            f"is unreadable ({type(err).__name__}: {err})",
            f"re-save or retrain the {name} embedder",
            str(directory),
        ) from None
    return stamped["config"], tensors


def check_tensor_shapes(
    tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Every expected tensor is present with exactly the expected shape."""
    for key, shape in expected.items():
        if key not in tensors:
            raise ValidationError(
                f"{where}.{key}", "is missing", "pass a folder written by save() of the same version"
            )
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValidationError(
                f"{where}.{key}",
                f"has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}",
                "retrain, or load with the matching featurizer",
            )


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
