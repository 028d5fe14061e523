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


@dataclass(frozen=True)
class Objective:
    """A named attribute and the difference that counts as a clear preference."""

    name: str
    measure: Callable[[str], float]
    scale: float
    description: str


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("verbosity", verbosity, 0.5, "length: log(1 + words)"),
        Objective("structure", structure, 2.0, "enumerated steps per 100 words"),
    )
}


def measure(text: str) -> dict[str, float]:
    """Every objective's value for one response."""
    return {name: o.measure(text) for name, o in OBJECTIVES.items()}


def infer_weights(comparisons: Sequence[Comparison]) -> dict[str, float]:
    """Per-objective weights in [-1, 1] from a user's comparisons (empty input: all zero)."""
    weights: dict[str, float] = {}
    total = sum(c.weight for c in comparisons)
    for name, objective in OBJECTIVES.items():
        if not comparisons:
            weights[name] = 0.0
            continue
        diff = sum(c.weight * (objective.measure(c.chosen) - objective.measure(c.rejected)) for c in comparisons) / total
        weights[name] = math.tanh(diff / objective.scale)
    return weights
