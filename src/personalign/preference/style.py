"""Stylometric features of a response: cheap, model-free measurements of how a text is written.

A sentence encoder summarises what a response is about; users often differ in how it is
written (reading level, warmth, jokes, terseness), which a mean-pooled embedding of a long
text barely shows. These numbers are the ``style`` part of the featurizer. Each is scaled to a
spread of roughly 0.1-0.5 on ordinary answers, comparable to the featurizer's ``log_length``.
"""

from __future__ import annotations

import math
import re

import numpy as np

_WORD = re.compile(r"[A-Za-z']+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|#+)\s+")
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
_LAUGH = re.compile(r"\b(?:ha(?:ha)+|lol|lmao|hehe|haha|jk)\b|;\)|:\)|:D|xD", re.IGNORECASE)

_SECOND_PERSON = frozenset({"you", "your", "yours", "you're", "youre", "yourself", "ya", "u"})
_FIRST_PERSON = frozenset({"i", "me", "my", "mine", "i'm", "im", "we", "us", "our"})
_WARM = frozenset(
    {
        "great",
        "fun",
        "love",
        "awesome",
        "amazing",
        "wonderful",
        "happy",
        "glad",
        "enjoy",
        "friend",
        "buddy",
        "pal",
        "cool",
        "exciting",
        "delightful",
        "hope",
        "thanks",
        "thank",
        "please",
        "welcome",
        "fantastic",
        "super",
    }
)
_COLD = frozenset(
    {
        "obviously",
        "whatever",
        "stupid",
        "idiot",
        "boring",
        "annoying",
        "pointless",
        "useless",
        "ridiculous",
        "deal",
        "figure",
        "bother",
        "waste",
        "clearly",
        "duh",
        "seriously",
        "just",
        "simply",
        "fine",
        "nonsense",
        "lazy",
        "ugh",
    }
)
_HEDGE = frozenset(
    {"perhaps", "maybe", "might", "possibly", "generally", "typically", "often", "usually", "arguably"}
)

STYLE_FEATURES = (
    "words",
    "word_length",
    "syllables_per_word",
    "long_word_share",
    "sentence_length",
    "exclamations",
    "questions",
    "second_person",
    "first_person",
    "warm_words",
    "cold_words",
    "hedges",
    "laughs_emoji",
    "list_lines",
    "digits",
    "parentheses",
)


def _syllables(word: str) -> int:
    groups = len(_VOWEL_GROUP.findall(word.lower()))
    if word.lower().endswith("e") and groups > 1:
        groups -= 1
    return max(groups, 1)


def style_features(text: str) -> np.ndarray:
    """``(len(STYLE_FEATURES),)`` float32 measurements of ``text`` (see :data:`STYLE_FEATURES`)."""
    words = _WORD.findall(text)
    lower = [w.lower() for w in words]
    n = max(len(words), 1)
    sentences = max(len(_SENTENCE_END.findall(text)), 1)
    lines = [line for line in text.splitlines() if line.strip()]
    chars = max(len(text), 1)
    values = [
        (math.log1p(len(words)) - 4.0) / 2.0,
        (sum(len(w) for w in words) / n - 4.5) / 2.0,
        (sum(_syllables(w) for w in words) / n - 1.5),
        sum(len(w) >= 9 for w in words) / n * 2.0,
        (math.log1p(n / sentences) - 2.8),
        text.count("!") / sentences,
        text.count("?") / sentences,
        sum(w in _SECOND_PERSON for w in lower) / n * 5.0,
        sum(w in _FIRST_PERSON for w in lower) / n * 5.0,
        sum(w in _WARM for w in lower) / n * 10.0,
        sum(w in _COLD for w in lower) / n * 10.0,
        sum(w in _HEDGE for w in lower) / n * 10.0,
        min((len(_EMOJI.findall(text)) + len(_LAUGH.findall(text))) / sentences, 2.0),
        sum(bool(_LIST_LINE.match(line)) for line in lines) / max(len(lines), 1),
        sum(ch.isdigit() for ch in text) / chars * 10.0,
        text.count("(") / sentences,
    ]
    return np.asarray(values, dtype=np.float32)
