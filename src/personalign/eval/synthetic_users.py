"""Synthetic users: hidden linear rewards over attributes measured from template texts, who label
any comparison Bradley-Terry (:class:`SyntheticPopulation`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.population_base import EvalPopulation, EvalUser
from personalign.types import Comparison

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
