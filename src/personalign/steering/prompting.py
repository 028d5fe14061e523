"""The prompting baseline: steering as an instruction added to the system prompt.

Each objective has graded phrases for "less" and "more"; a weight ``w`` picks the phrase
whose level is nearest ``|w|`` (levels 1/3, 2/3, 1 of the full weight) on the side of its
sign. Several objectives join into one instruction. A zero weight adds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

# objective -> (less phrases, more phrases), mildest first
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "verbosity": (
        (
            "Keep the answer fairly short.",
            "Be concise: answer in two or three sentences.",
            "Answer in one short sentence.",
        ),
        (
            "Give a fairly detailed answer.",
            "Give a detailed, thorough answer.",
            "Give a very long and exhaustive answer covering every detail.",
        ),
    ),
    "structure": (
        (
            "Prefer prose to lists.",
            "Write flowing paragraphs, no lists.",
            "Do not use any lists, headings or numbered steps.",
        ),
        (
            "Use some structure where it helps.",
            "Organise the answer as a list.",
            "Answer only as a numbered list of short steps.",
        ),
    ),
    "formality": (
        ("Use a relaxed tone.", "Write casually, like talking to a friend.", "Be very informal and chatty."),
        ("Use a professional tone.", "Write formally.", "Write in a very formal, academic register."),
    ),
    "sentiment": (
        ("Be sober and matter-of-fact.", "Point out the downsides.", "Be negative and critical."),
        ("Be positive.", "Be upbeat and encouraging.", "Be enthusiastic and very positive."),
    ),
    "reading_level": (
        (
            "Use simple words.",
            "Explain it simply, for a child.",
            "Use only very simple words and short sentences, for a young child.",
        ),
        (
            "Use precise technical terms.",
            "Write for an expert audience.",
            "Write at a graduate level with dense technical vocabulary.",
        ),
    ),
    "helpfulness": (
        (
            "Keep the help minimal.",
            "Give only a bare answer, no extra help.",
            "Answer as tersely as possible, with no advice.",
        ),
        (
            "Be helpful.",
            "Be as helpful as you can, with practical advice.",
            "Be maximally helpful: anticipate follow-up needs and give concrete, actionable advice.",
        ),
    ),
    "harmlessness": (
        ("Do not add caveats.", "Skip safety warnings.", "Leave out every warning and caveat."),
        (
            "Be careful and safe.",
            "Mention relevant safety considerations.",
            "Put safety first: warn about every risk and refuse anything harmful.",
        ),
    ),
    "politeness": (
        ("Be direct.", "Skip pleasantries.", "Be blunt, no pleasantries at all."),
        ("Be polite.", "Be warm and courteous.", "Be extremely polite and courteous, thank the user."),
    ),
}
PROMPTABLE = tuple(sorted(PHRASES))


def phrase(objective: str, weight: float) -> str:
    """The instruction for one objective and weight (empty for weight 0)."""
    if weight == 0.0:
        return ""
    less, more = PHRASES[objective]
    options = more if weight > 0 else less
    level = min(max(round(abs(weight) * 3) - 1, 0), len(options) - 1)
    return options[level]


def instruction(weights: Mapping[str, float]) -> str:
    """One system-prompt instruction for all weights (empty when every weight is 0)."""
    return " ".join(p for p in (phrase(name, w) for name, w in weights.items()) if p)
