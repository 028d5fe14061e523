"""PrefEval's items and the conversations built from them: reading the benchmark files, the
seeded sample and option order, and the messages each condition shows (see :mod:`personalign.eval.prefeval`)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.population_base import source_dir

CONDITIONS = ("none", "no-memory", "memory", "oracle")
SPLITS = ("test", "dev", "both")
MEMORY_UNITS = ("user", "exchange")
TEST_PREFIX = "travel_"
ACKNOWLEDGEMENT = "Thank you for telling me. I will keep that in mind."
MCQ_PROMPT = (
    "{question}\n\nI'm trying to decide on this and here are 4 options for my query:\n{options}\n"
    "Now, I'd like you to pick one of them as your top recommendation for me."
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefEvalItem:
    """One PrefEval item: a user with one stated preference, a question and 4 options (0 aligned)."""

    topic: str
    index: int
    preference: str
    question: str
    options: tuple[str, ...]

    @property
    def user(self) -> str:
        return f"prefeval-{self.topic}-{self.index}"

    @property
    def key(self) -> str:
        return f"{self.topic}/{self.index}"


def benchmark_dir(root: str | Path | None = None) -> Path:
    return source_dir(root, "prefeval") / "benchmark_dataset"


def list_topics(root: str | Path | None = None) -> list[str]:
    """Topic names with MCQ options (the stray ``travel_hotel copy.json`` is skipped)."""
    return sorted(p.stem for p in (benchmark_dir(root) / "mcq_options").glob("*.json") if " " not in p.stem)


def split_topics(topics: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(dev, test)``: the ``travel_*`` topics are the test set, all others the dev set."""
    test = [t for t in topics if t.startswith(TEST_PREFIX)]
    return [t for t in topics if not t.startswith(TEST_PREFIX)], test


def load_items(topic: str, root: str | Path | None = None) -> list[PrefEvalItem]:
    """A topic's items: the explicit preference and question, with the MCQ options of the same item."""
    folder = benchmark_dir(root)
    explicit = json.loads((folder / "explicit_preference" / f"{topic}.json").read_text(encoding="utf-8"))
    mcq = json.loads((folder / "mcq_options" / f"{topic}.json").read_text(encoding="utf-8"))
    if len(explicit) != len(mcq):
        raise ValidationError(
            f"prefeval/{topic}",
            f"has {len(explicit)} explicit items but {len(mcq)} MCQ items",
            "use the unchanged PrefEval files",
        )
    items = []
    for index, (e, m) in enumerate(zip(explicit, mcq, strict=True)):
        options = tuple(m["classification_task_options"])
        if e["question"] != m["question"] or len(options) != 4 or len(set(options)) != 4:
            raise ValidationError(
                f"prefeval/{topic}[{index}]",
                "does not pair a question with 4 distinct options",
                "use the unchanged PrefEval files",
            )
        items.append(PrefEvalItem(topic, index, e["preference"], e["question"], options))
    return items


def load_filler(turns: int, root: str | Path | None = None) -> list[dict[str, str]]:
    """The first ``turns`` (user, assistant) exchanges of the concatenated filler conversations."""
    conversations = json.loads(
        (benchmark_dir(root) / "filtered_inter_turns.json").read_text(encoding="utf-8")
    )
    messages = [
        {"role": m["role"], "content": m["content"]} for c in conversations for m in c["conversation"]
    ]
    if 2 * turns > len(messages):
        raise ValidationError(
            "filler_turns",
            f"asks for {turns} exchanges but the filler file has {len(messages) // 2}",
            "use fewer filler turns",
            turns,
        )
    picked = messages[: 2 * turns]
    for i, message in enumerate(picked):
        if message["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValidationError(
                "filtered_inter_turns.json",
                f"message {i} is a {message['role']} turn out of order",
                "use the unchanged PrefEval file",
            )
    return picked


def sample_items(items: Sequence[PrefEvalItem], n: int | None, seed: int) -> list[PrefEvalItem]:
    """``n`` items of one topic, a seeded sample in file order (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    topic = items[0].topic
    rng = np.random.default_rng([seed, zlib.crc32(topic.encode())])
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False).tolist())]


# --- prompts --------------------------------------------------------------------------------------


def permutation(item: PrefEvalItem, seed: int) -> list[int]:
    """The shown order of the options: ``perm[j]`` is the file index of the option shown j-th.

    Seeded by ``(seed, crc32(topic), index)``, so it does not depend on which other items run.
    """
    rng = np.random.default_rng([seed, zlib.crc32(item.topic.encode()), item.index])
    return rng.permutation(len(item.options)).tolist()


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def question_turn(item: PrefEvalItem, perm: Sequence[int]) -> dict[str, str]:
    shown = [item.options[i] for i in perm]
    return {
        "role": "user",
        "content": MCQ_PROMPT.format(question=item.question, options=format_options(shown)),
    }


def preference_turns(item: PrefEvalItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": item.preference}, {"role": "assistant", "content": ACKNOWLEDGEMENT}]


def history(item: PrefEvalItem, filler: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The long conversation before the question: the preference exchange, then the filler."""
    return [*preference_turns(item), *(dict(m) for m in filler)]


def memory_texts(item: PrefEvalItem, filler: Sequence[Mapping[str, str]], unit: str = "user") -> list[str]:
    """What the memory condition writes: each user turn of the history, or each exchange."""
    turns = history(item, filler)
    if unit == "user":
        return [m["content"] for m in turns if m["role"] == "user"]
    return [
        f"User: {turns[i]['content']}\nAssistant: {turns[i + 1]['content']}" for i in range(0, len(turns), 2)
    ]


def condition_messages(
    condition: str, item: PrefEvalItem, perm: Sequence[int], filler: Sequence[Mapping[str, str]]
) -> list[dict[str, str]]:
    """The caller's messages for a condition (``memory`` adds its retrieved memories later)."""
    question = question_turn(item, perm)
    if condition == "no-memory":
        return [*history(item, filler), question]
    if condition == "oracle":
        return [*preference_turns(item), question]
    return [question]
