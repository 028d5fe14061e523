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
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from personalign.errors import ValidationError
from personalign.types import Comparison

DATA_ENV = "PERSONALIGN_DATA"
PSOUPS_FILES = ("student_phd", "friendly_unfriendly")
PSOUPS_TYPES = {
    "Generate a response that can be easily understood by an elementary school student.": "elementary",
    "Generate a response that only a PhD Student in that specific field could understand.": "phd",
    "Generate a response that is friendly, witty, funny, and humorous, like a close friend.": "friendly",
    "Generate a response in an unfriendly manner.": "unfriendly",
}
POPQUORN_PROMPT = "Which of these comments is more offensive?"


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


# --- synthetic populations ------------------------------------------------------------------------

ATTRIBUTES = ("length", "structure", "formality", "technicality", "sentiment", "politeness")

_TECH_WORDS = {
    "parameters",
    "empirically",
    "benchmark",
    "variance",
    "protocol",
    "subsystems",
    "optimize",
    "latency",
    "throughput",
    "quantify",
    "calibrate",
    "algorithm",
    "heuristic",
    "iteration",
    "baseline",
    "metrics",
    "systematically",
    "configuration",
    "dependencies",
    "regression",
}
_POSITIVE = {
    "wonderful",
    "rewarding",
    "great",
    "fun",
    "love",
    "enjoy",
    "delightful",
    "exciting",
    "fantastic",
    "happy",
}
_NEGATIVE = {
    "frustrating",
    "tedious",
    "disappointing",
    "annoying",
    "hard",
    "boring",
    "painful",
    "messy",
    "fail",
    "worse",
}
_INFORMAL = {"super", "gonna", "kinda", "stuff", "yeah", "awesome", "totally", "ok", "hey", "lol"}
_FORMAL = {
    "certainly",
    "therefore",
    "furthermore",
    "recommended",
    "regarding",
    "consequently",
    "accordingly",
    "subsequently",
    "moreover",
    "advisable",
}
_POLITE = ("please", "thank you", "i hope this helps", "happy to help", "kindly")

_TOPICS = (
    "baking sourdough bread",
    "setting up a home network",
    "learning Spanish",
    "training for a 10k run",
    "starting a vegetable garden",
    "writing a cover letter",
    "learning to play guitar",
    "saving for retirement",
    "cleaning a cast iron pan",
    "planning a road trip",
    "learning Python",
    "painting with watercolors",
    "brewing coffee at home",
    "fixing a leaky faucet",
    "preparing for a job interview",
    "organizing a closet",
    "caring for a houseplant",
    "learning to swim",
    "editing a podcast",
    "choosing a laptop",
)
_PROMPTS = ("How do I get started with {t}?", "Any advice on {t}?", "What should I know about {t}?")
PHRASINGS = len(_PROMPTS)  # synthetic prompts per topic
_OPENERS = {
    "formal": "Certainly. Regarding {t}, the following approach is recommended.",
    "informal": "Hey, {t} is super fun stuff, yeah!",
    "neutral": "Here is how to approach {t}.",
}
_PLAIN = (
    "Start with the basics and keep it simple.",
    "Do a little bit every day.",
    "Ask someone who has done it before.",
    "Write down what works for you.",
    "Take breaks when you feel tired.",
    "Watch a short video to see how it is done.",
    "Buy only what you need at first.",
    "Be patient with yourself.",
)
_TECHNICAL = (
    "Establish a baseline and quantify the variance across each iteration.",
    "Optimize the key parameters empirically with a controlled protocol.",
    "Benchmark the subsystems separately to isolate latency and throughput.",
    "Calibrate your configuration systematically before scaling up.",
    "Track metrics over time to detect regression early.",
    "Map the dependencies first, then apply a simple heuristic to prioritise.",
    "Treat each attempt as an iteration and compare it against the baseline.",
    "Use a consistent protocol so that the metrics remain comparable.",
)
_FORMAL_LINK = ("Furthermore, ", "Moreover, ", "Consequently, ", "Accordingly, ")
_INFORMAL_LINK = ("Also, ", "And yeah, ", "Totally worth it, ", "Ok so ")
_SENTIMENT = {
    "positive": "Honestly it is a wonderful, rewarding thing and you will enjoy it.",
    "negative": "Honestly it can be frustrating and tedious, and the first tries often fail.",
    "neutral": "",
}
_CLOSERS = {
    "polite": "I hope this helps, and thank you for asking!",
    "curt": "That is all.",
    "none": "",
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def measure_attributes(text: str) -> np.ndarray:
    """The raw attribute vector of a text, in :data:`ATTRIBUTES` order (no model needed).

    length: log(1 + words); structure: share of lines that are list items; formality: (formal -
    informal markers, counting "!" and contractions as informal) per sentence; technicality:
    share of jargon words; sentiment: (positive - negative words) per sentence; politeness:
    polite phrases per sentence.
    """
    words = _words(text)
    n_words = max(len(words), 1)
    sentences = max(len(re.findall(r"[.!?](\s|$)", text)), 1)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    listed = sum(bool(re.match(r"\s*(- |\* |\d+[.)] )", ln)) for ln in lines)
    lower = text.lower()
    informal = sum(w in _INFORMAL for w in words) + text.count("!") + sum("'" in w for w in words)
    return np.array(
        [
            math.log1p(len(words)),
            listed / max(len(lines), 1),
            (sum(w in _FORMAL for w in words) - informal) / sentences,
            sum(w in _TECH_WORDS for w in words) / n_words,
            (sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)) / sentences,
            sum(lower.count(p) for p in _POLITE) / sentences,
        ],
        dtype=np.float64,
    )


def _compose(topic: str, rng: np.random.Generator) -> str:
    """One candidate response with randomly chosen tone, content, structure, length, sentiment, closing."""
    tone = str(rng.choice(list(_OPENERS)))
    technical_share = float(rng.choice([0.0, 0.5, 1.0]))
    n_points = int(rng.integers(1, 7))
    points = []
    plain, tech = rng.permutation(len(_PLAIN)), rng.permutation(len(_TECHNICAL))
    for i in range(n_points):
        points.append(_TECHNICAL[tech[i]] if rng.random() < technical_share else _PLAIN[plain[i]])
    bullets = rng.random() < 0.4
    if bullets:
        body = (
            "\n".join(f"{i + 1}. {p}" for i, p in enumerate(points))
            if rng.random() < 0.5
            else "\n".join(f"- {p}" for p in points)
        )
    else:
        links = _FORMAL_LINK if tone == "formal" else _INFORMAL_LINK if tone == "informal" else ("",)
        joined = []
        for i, point in enumerate(points):
            link = "" if i == 0 else str(rng.choice(links))
            joined.append(link + point[0].lower() + point[1:] if link else point)
        body = " ".join(joined)
    sentiment = _SENTIMENT[str(rng.choice(list(_SENTIMENT)))]
    closer = _CLOSERS[str(rng.choice(list(_CLOSERS)))]
    parts = [_OPENERS[tone].format(t=topic), body, sentiment, closer]
    return ("\n" if bullets else " ").join(p for p in parts if p)


@dataclass(frozen=True)
class SyntheticConfig:
    """``n_types`` user archetypes; a user's weights are shared + type centroid + noise.

    ``rationality`` beta: labels are y ~ Bernoulli(sigmoid(beta * (r(a) - r(b)))) with r the
    user's reward on standardised attributes.
    """

    n_users: int = 200
    n_types: int = 4
    shared_scale: float = 0.5
    type_scale: float = 1.5
    user_noise: float = 0.3
    rationality: float = 3.0
    candidates_per_prompt: int = 12
    n_prompts: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_types", "candidates_per_prompt", "n_prompts"):
            if getattr(self, name) < 1:
                raise ValidationError(
                    f"synthetic.{name}", "must be >= 1", "use a positive integer", getattr(self, name)
                )
        if self.candidates_per_prompt < 2:
            raise ValidationError(
                "synthetic.candidates_per_prompt", "must be >= 2", "use e.g. 12", self.candidates_per_prompt
            )
        for name in ("shared_scale", "type_scale", "user_noise", "rationality"):
            if not getattr(self, name) >= 0:
                raise ValidationError(
                    f"synthetic.{name}", "must be >= 0", "use a non-negative number", getattr(self, name)
                )


class SyntheticPopulation:
    """Users with known rewards over measured text attributes, who can answer any comparison.

    Candidates: for each prompt (the first ``n_prompts`` of 3 phrasings x 20 topics),
    ``candidates_per_prompt`` responses
    composed from templates with random tone, technicality, structure, length, sentiment and
    closing. Attributes are measured from the text (:func:`measure_attributes`) and
    standardised over all candidates. User u's reward is ``w_u . a(y)``.
    """

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = cfg = config or SyntheticConfig()
        rng = np.random.default_rng(cfg.seed)
        self.prompts = [p.format(t=t) for t in _TOPICS for p in _PROMPTS][: cfg.n_prompts]
        topic_of = [t for t in _TOPICS for _ in _PROMPTS][: cfg.n_prompts]
        self.candidates: dict[str, list[str]] = {}
        for prompt, topic in zip(self.prompts, topic_of, strict=True):
            texts: list[str] = []
            while len(texts) < cfg.candidates_per_prompt:
                text = _compose(topic, rng)
                if text not in texts:
                    texts.append(text)
            self.candidates[prompt] = texts
        raw = np.stack([measure_attributes(t) for ts in self.candidates.values() for t in ts])
        self.attr_mean, self.attr_std = raw.mean(axis=0), np.maximum(raw.std(axis=0), 1e-6)
        k = len(ATTRIBUTES)
        shared = cfg.shared_scale * rng.standard_normal(k)
        self.type_centroids = shared + cfg.type_scale * rng.standard_normal((cfg.n_types, k))
        self.user_types = rng.integers(0, cfg.n_types, size=cfg.n_users)
        self.user_weights = self.type_centroids[self.user_types] + cfg.user_noise * rng.standard_normal(
            (cfg.n_users, k)
        )
        self.user_ids = [f"synth-{i}" for i in range(cfg.n_users)]
        self._index = {u: i for i, u in enumerate(self.user_ids)}

    def attributes(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, len(ATTRIBUTES))`` standardised attributes."""
        return (np.stack([measure_attributes(t) for t in texts]) - self.attr_mean) / self.attr_std

    def true_reward(self, user: str, texts: Sequence[str]) -> np.ndarray:
        """``(n,)`` the user's hidden reward of each text."""
        return self.attributes(texts) @ self.user_weights[self._index[user]]

    def prob(self, user: str, a: str, b: str) -> float:
        """p(user prefers a over b) under the hidden Bradley-Terry model."""
        ra, rb = self.true_reward(user, [a, b])
        return float(1.0 / (1.0 + math.exp(-self.config.rationality * (ra - rb))))

    def answer(self, user: str, prompt: str, a: str, b: str, rng: np.random.Generator) -> Comparison:
        """The user's labelled comparison of a and b, drawn Bradley-Terry."""
        first = rng.random() < self.prob(user, a, b)
        return Comparison(prompt=prompt, chosen=a if first else b, rejected=b if first else a)

    def candidate_pairs(self, n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        """``n`` unlabelled ``(prompt, a, b)`` candidates (random prompt, two distinct responses)."""
        out = []
        for _ in range(n):
            prompt = self.prompts[int(rng.integers(len(self.prompts)))]
            i, j = rng.choice(len(self.candidates[prompt]), size=2, replace=False)
            out.append((prompt, self.candidates[prompt][i], self.candidates[prompt][j]))
        return out

    def population(self, shots: int = 8, held_out: int = 16, seed: int | None = None) -> EvalPopulation:
        """Every user answers ``shots + held_out`` random candidate pairs (seeded)."""
        rng = np.random.default_rng(self.config.seed + 1 if seed is None else seed)
        users = []
        for i, user in enumerate(self.user_ids):
            answered = [
                self.answer(user, p, a, b, rng) for p, a, b in self.candidate_pairs(shots + held_out, rng)
            ]
            users.append(
                EvalUser(
                    user,
                    answered[:shots],
                    answered[shots:],
                    f"type-{self.user_types[i]}",
                    self.user_weights[i].copy(),
                )
            )
        meta = {
            "source": "synthetic",
            "config": self.config.__dict__,
            "shots": shots,
            "held_out": held_out,
            "attributes": list(ATTRIBUTES),
        }
        return EvalPopulation("synthetic", users, meta)


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
