"""Measurable objectives: attributes of a response text that a user can prefer more or less of.

Each objective maps a response to a number. A user's weight on an objective is inferred from
their comparisons as the squashed mean difference between chosen and rejected responses
(``tanh(mean(w_i * (a(chosen_i) - a(rejected_i))) / scale)``), so +1 means "clearly wants
more", -1 "clearly wants less", 0 "no signal".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from personalign.errors import ValidationError
from personalign.types import Comparison

_WORD = re.compile(r"\b\w+\b")
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|#+)\s+")
_ENUM_INLINE = re.compile(r"(?:^|\s)(?:\d+[.)]|first,|second,|third,|finally,)", re.IGNORECASE)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def verbosity(text: str) -> float:
    """Natural log of one plus the number of words."""
    return math.log1p(word_count(text))


def structure(text: str) -> float:
    """Enumerated steps per 100 words: list lines, headings, and inline "1." or "First," markers."""
    lines = sum(1 for line in text.splitlines() if _LIST_LINE.match(line))
    inline = len(_ENUM_INLINE.findall(text))
    return 100.0 * max(lines, inline) / max(word_count(text), 1)


_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_VOWELS = re.compile(r"[aeiouy]+")
_CONTRACTION = re.compile(r"\b\w+'(?:s|re|ve|ll|d|t|m)\b", re.IGNORECASE)
_FORMAL = frozenset(
    {
        "furthermore",
        "moreover",
        "therefore",
        "consequently",
        "however",
        "accordingly",
        "regarding",
        "thus",
        "hence",
        "nevertheless",
        "additionally",
        "subsequently",
    }
)
_INFORMAL = frozenset(
    {
        "yeah",
        "ok",
        "okay",
        "gonna",
        "wanna",
        "kinda",
        "stuff",
        "cool",
        "awesome",
        "hey",
        "lol",
        "totally",
        "pretty",
        "super",
        "basically",
    }
)
_POSITIVE = frozenset(
    {
        "good",
        "great",
        "wonderful",
        "enjoy",
        "love",
        "happy",
        "glad",
        "excellent",
        "rewarding",
        "fun",
        "easy",
        "helpful",
        "nice",
        "best",
        "amazing",
        "delightful",
    }
)
_NEGATIVE = frozenset(
    {
        "bad",
        "terrible",
        "frustrating",
        "tedious",
        "hate",
        "sad",
        "awful",
        "fail",
        "fails",
        "hard",
        "difficult",
        "annoying",
        "worst",
        "boring",
        "painful",
        "useless",
    }
)
_POLITE = (
    "please",
    "thank you",
    "thanks",
    "i hope this helps",
    "happy to help",
    "you're welcome",
    "kindly",
    "i'm sorry",
    "apologies",
)


def _sentences(text: str) -> int:
    return max(len(_SENTENCE_END.findall(text)), 1)


def _syllables(word: str) -> int:
    groups = len(_VOWELS.findall(word.lower()))
    return max(groups - (1 if word.lower().endswith("e") and groups > 1 else 0), 1)


def reading_level(text: str) -> float:
    """Flesch-Kincaid grade: 0.39 words per sentence + 11.8 syllables per word - 15.59 (0 for no words)."""
    words = _WORD.findall(text)
    if not words:
        return 0.0
    return (
        0.39 * len(words) / _sentences(text) + 11.8 * sum(_syllables(w) for w in words) / len(words) - 15.59
    )


def formality(text: str) -> float:
    """Formal connectives minus informal markers (slang, contractions, "!") per 100 words."""
    words = [w.lower() for w in _WORD.findall(text)]
    formal = sum(w in _FORMAL for w in words)
    informal = sum(w in _INFORMAL for w in words) + len(_CONTRACTION.findall(text)) + text.count("!")
    return 100.0 * (formal - informal) / max(len(words), 1)


def sentiment(text: str) -> float:
    """Positive minus negative lexicon words per sentence."""
    words = [w.lower() for w in _WORD.findall(text)]
    return (sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)) / _sentences(text)


def politeness(text: str) -> float:
    """Polite phrases ("please", "thank you", "I hope this helps", ...) per sentence."""
    lower = text.lower()
    return sum(lower.count(p) for p in _POLITE) / _sentences(text)


@dataclass(frozen=True)
class Objective:
    """A named attribute of a response and the difference that counts as a clear preference.

    ``measure`` maps a response to a number (more = more of the attribute); ``scale`` is the
    chosen-minus-rejected difference that reads as a clear preference (:func:`infer_weights`).
    ``steerable`` says whether a decode-time method for it is installed (see
    :mod:`personalign.steering.decoding`).
    """

    name: str
    measure: Callable[[str], float]
    scale: float
    description: str
    steerable: bool = False
    scorer: Callable[[str, str], float] | None = None  # prompt-aware scorers (learned reward heads)

    @property
    def learned(self) -> bool:
        return self.scorer is not None

    def value(self, prompt: str, response: str) -> float:
        """The objective's score of ``response`` to ``prompt``."""
        return (
            float(self.scorer(prompt, response)) if self.scorer is not None else float(self.measure(response))
        )


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("verbosity", verbosity, 0.5, "length: log(1 + words)", steerable=True),
        Objective("structure", structure, 2.0, "enumerated steps per 100 words"),
        Objective("reading_level", reading_level, 3.0, "Flesch-Kincaid grade level (technicality)"),
        Objective(
            "formality", formality, 3.0, "formal connectives minus slang, contractions and '!' per 100 words"
        ),
        Objective("sentiment", sentiment, 0.5, "positive minus negative words per sentence"),
        Objective("politeness", politeness, 0.3, "polite phrases per sentence"),
    )
}


def register(objective: Objective, replace: bool = False) -> Objective:
    """Add a custom measurable objective (``replace=True`` to overwrite one of the same name)."""
    if not isinstance(objective, Objective):
        raise ValidationError(
            "objective",
            "is not an Objective",
            "build it with Objective(name, measure, scale, description)",
            objective,
        )
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", objective.name):
        raise ValidationError(
            "objective.name",
            "must be lower-case letters, digits and _ (at most 41)",
            "e.g. 'humour'",
            objective.name,
        )
    if not (objective.scale > 0 and math.isfinite(objective.scale)):
        raise ValidationError(
            "objective.scale",
            "must be a finite number > 0",
            "use the difference that reads as a clear preference",
            objective.scale,
        )
    if objective.name in OBJECTIVES and not replace:
        raise ValidationError(
            "objective.name",
            f"{objective.name!r} is already registered",
            "pass replace=True or choose another name",
            objective.name,
        )
    OBJECTIVES[objective.name] = objective
    return objective


def measure(text: str) -> dict[str, float]:
    """Every measurable (not learned) objective's value for one response."""
    return {name: o.measure(text) for name, o in OBJECTIVES.items() if not o.learned}


def score(prompt: str, response: str, objectives: Sequence[str] | None = None) -> dict[str, float]:
    """``{objective: value}`` for one (prompt, response); all registered objectives by default.

    The measurable objectives read the response only; the prompt is part of the signature so
    learned, prompt-conditioned scorers fit the same call. Unknown names raise
    ``ValidationError`` listing the known ones.
    """
    if not isinstance(response, str):
        raise ValidationError("response", "must be a string", "pass the response text", response)
    names = list(OBJECTIVES) if objectives is None else list(objectives)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValidationError(
            "objectives", f"has unknown objective(s) {unknown}", f"use some of {sorted(OBJECTIVES)}", unknown
        )
    return {n: OBJECTIVES[n].value(prompt, response) for n in names}


def infer_weights(comparisons: Sequence[Comparison]) -> dict[str, float]:
    """Per-objective weights in [-1, 1] from a user's comparisons (empty input: all zero)."""
    weights: dict[str, float] = {}
    total = sum(c.weight for c in comparisons)
    for name, objective in OBJECTIVES.items():
        if objective.learned:
            continue  # learned heads need the encoder; enrollment infers the measurable ones
        if not comparisons:
            weights[name] = 0.0
            continue
        diff = (
            sum(c.weight * (objective.measure(c.chosen) - objective.measure(c.rejected)) for c in comparisons)
            / total
        )
        weights[name] = math.tanh(diff / objective.scale)
    return weights


def _learned_scorer(folder: str) -> Callable[[str, str], float]:
    def scorer(prompt: str, response: str) -> float:
        from personalign.steering.heads import head_scorer

        return head_scorer(folder)(prompt, response)

    return scorer


def register_head(folder: str | Path, replace: bool = False) -> Objective:
    """Register a learned reward head folder (``head_config.json`` + ``head.safetensors``) as an
    objective; its score is the calibrated reward (a difference of 1 is 1 log-odds of preference)."""
    import json

    folder = Path(folder)
    try:
        config = json.loads((folder / "head_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValidationError(
            "folder",
            f"has no readable head_config.json ({err})",
            "fit a head with personalign.steering.heads.fit_head and save it",
            str(folder),
        ) from None
    name = config["objective"]
    return register(
        Objective(
            name,
            lambda text: _learned_scorer(str(folder))("", text),
            1.0,
            config.get("description", f"learned {name} reward"),
            scorer=_learned_scorer(str(folder)),
        ),
        replace=replace,
    )


def _register_shipped_heads() -> None:
    """The learned heads that ship with the package (read lazily: nothing loads until scored)."""
    from importlib import resources

    root = Path(str(resources.files("personalign") / "data" / "heads"))
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if (folder / "head_config.json").is_file():
                register_head(folder, replace=True)


_register_shipped_heads()
