"""PrefEval: does the generator follow a preference the user stated earlier in a long conversation?

PrefEval (Zhao et al., "Do LLMs Recognize Your Preferences?", ICLR 2025; CC BY-NC 4.0, read in
place from ``$PERSONALIGN_DATA/prefeval``, never copied). Each item is one user: an explicit
preference (``explicit_preference/<topic>.json``), a later question whose generic answer would
likely violate it, and four candidate answers (``mcq_options/<topic>.json``, option 0 is the
aligned one). The two files hold the same items in the same order.

The conversation, as in PrefEval's MCQ task: the user states the preference, the assistant
acknowledges it (a fixed sentence, :data:`ACKNOWLEDGEMENT`; PrefEval lets the model write it),
then ``filler_turns`` (user, assistant) exchanges taken in order from
``filtered_inter_turns.json`` (PrefEval's ``extract_multi_turn_conversation``), then the
question with the four options listed (:data:`MCQ_PROMPT`, PrefEval's wording), shuffled by a
seeded RNG per item; the permutation is recorded.

Conditions (what the model sees before the question):

``none``       nothing: the floor;
``no-memory``  the whole long conversation in the context;
``memory``     the conversation is written to the user's memory store (``pz.remember``; one
               memory per user turn, or per exchange with ``memory_unit="exchange"``) and only
               what :meth:`Personalizer.condition` retrieves for the question goes into the prompt;
``oracle``     the preference exchange right before the question, no filler: the ceiling.

Scoring: the model "picks" the option with the highest length-normalised log-likelihood (mean
log-probability per token, :func:`mean_logprob`) as the assistant's reply to the prompt. This
is fixed; for a 135M-parameter model the letter's probability would mostly measure its letter
and position priors rather than the preference (cloze scoring is how lm-evaluation-harness
scores small models on multiple choice). ``shift_correct`` is a secondary, contrastive choice
computed from the same scores (:func:`add_shift`). The prompt is scored once and its KV cache
reused for the four options (:func:`option_scores`; parity with full forward passes is tested).

Split: the four ``travel_*`` topics are the test set and took no part in any choice (prompt,
scoring, defaults); every other topic is the dev set. Each item is its own user
(``prefeval-<topic>-<index>``), so no item's memories can reach another item's prompt.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personalign.errors import ValidationError
from personalign.eval.adapters import wilson
from personalign.eval.populations import source_dir
from personalign.eval.stats import bootstrap_mean_ci, save_figure

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
# Paired accuracy differences reported per split: (a, b) means a minus b.
DIFFERENCES = (
    ("memory", "no-memory"),
    ("no-memory", "none"),
    ("memory", "none"),
    ("oracle", "no-memory"),
    ("oracle", "memory"),
)
CONDITION_COLORS = {
    "none": "tab:gray",
    "no-memory": "tab:orange",
    "memory": "tab:blue",
    "oracle": "tab:green",
}

Progress = Callable[[str], None]


@dataclass
class PrefEvalConfig:
    """What to run. ``test_items``/``dev_items``: items per topic (seeded sample; ``None`` = all)."""

    split: str = "both"
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    filler_turns: int = 3
    test_items: int | None = 10
    dev_items: int | None = 2
    n_memories: int = 5
    memory_threshold: float | None = 0.2
    memory_unit: str = "user"
    seed: int = 0
    topics: list[str] | None = None
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValidationError(
                "split", f"is not one of {SPLITS}", "use test (the travel_* topics), dev or both", self.split
            )
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise ValidationError(
                "conditions",
                f"must be distinct names from {CONDITIONS}",
                "e.g. --conditions none,no-memory,memory,oracle",
                self.conditions,
            )
        if self.filler_turns < 0:
            raise ValidationError("filler_turns", "must be >= 0", "use e.g. 3", self.filler_turns)
        for name in ("test_items", "dev_items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValidationError(name, "must be >= 1 (or None for every item)", "use e.g. 10", value)
        if not 1 <= self.n_memories <= 100:
            raise ValidationError("n_memories", "must be in 1..100", "use e.g. 5", self.n_memories)
        if self.memory_threshold is not None and not -1.0 <= self.memory_threshold <= 1.0:
            raise ValidationError(
                "memory_threshold",
                "must be a cosine similarity in [-1, 1] or None",
                "use e.g. 0.2",
                self.memory_threshold,
            )
        if self.memory_unit not in MEMORY_UNITS:
            raise ValidationError(
                "memory_unit",
                f"is not one of {MEMORY_UNITS}",
                "use user (one memory per user turn) or exchange",
                self.memory_unit,
            )


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


# --- scoring --------------------------------------------------------------------------------------


def mean_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-likelihood ``(1/T) sum_t log softmax(logits_t)[y_t]``.

    ``logits`` ``(T, V)`` are the predictions for the ``T`` target tokens ``targets`` ``(T,)``
    (row t predicts y_t). Returns a scalar tensor.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    return logp.gather(1, targets[:, None]).mean()  # ()


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes a KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def option_scores(model: Any, prompt_ids: Sequence[int], options: Sequence[Sequence[int]]) -> list[float]:
    """:func:`mean_logprob` of each option's tokens as the continuation of ``prompt_ids``.

    The prompt runs once; the options then run as one right-padded batch on a copy of its KV
    cache repeated per option (no attention mask is needed: a real token never attends to the
    padding after it). The cost is one prompt pass plus the option tokens. Equals scoring
    ``prompt + option`` in full (tested).
    """
    device = next(model.parameters()).device
    kwarg = _cache_kwarg(model)
    width = max(len(o) for o in options)
    batch = torch.zeros(
        (len(options), width), dtype=torch.long, device=device
    )  # (n, T), right-padded with id 0
    for row, option in enumerate(options):
        batch[row, : len(option)] = torch.tensor(list(option), device=device)
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True, logits_to_keep=1
        )
        last = out.logits[0, -1]  # (V,): predicts each option's first token
        cache = copy.deepcopy(getattr(out, kwarg))
        cache.batch_repeat_interleave(len(options))
        rest = model(input_ids=batch, use_cache=True, **{kwarg: cache}).logits  # (n, T, V)
    scores = []
    for row, option in enumerate(options):
        logits = torch.cat([last[None], rest[row, : len(option) - 1]])  # (T_row, V)
        scores.append(float(mean_logprob(logits, batch[row, : len(option)])))
    return scores


# --- the run --------------------------------------------------------------------------------------


def _plan(config: PrefEvalConfig) -> tuple[dict[str, list[str]], list[tuple[str, PrefEvalItem]]]:
    topics = list_topics(config.data_root)
    if config.topics is not None:
        missing = [t for t in config.topics if t not in topics]
        if missing:
            raise ValidationError(
                "topics", f"has unknown topic(s) {missing}", f"choose from {topics}", config.topics
            )
        topics = [t for t in topics if t in config.topics]
    dev, test = split_topics(topics)
    splits = (
        {"test": test, "dev": dev}
        if config.split == "both"
        else {config.split: test if config.split == "test" else dev}
    )
    plan = []
    for split, names in splits.items():
        per_topic = config.test_items if split == "test" else config.dev_items
        for topic in names:
            plan += [
                (split, item)
                for item in sample_items(load_items(topic, config.data_root), per_topic, config.seed)
            ]
    if not plan:
        raise ValidationError(
            "topics",
            f"leave no item in split {config.split!r}",
            "include a travel_* topic for test, another for dev",
        )
    return splits, plan


def _check_context(
    pz: Any,
    plan: Sequence[tuple[str, PrefEvalItem]],
    filler: Sequence[Mapping[str, str]],
    config: PrefEvalConfig,
) -> None:
    """Fail before any scoring when the long conversation does not fit the generator's context."""
    if "no-memory" not in config.conditions:
        return
    tokenizer, limit = pz.generator.tokenizer, pz.generator.context_length
    for _, item in plan:
        messages = condition_messages("no-memory", item, range(len(item.options)), filler)
        longest = max(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in item.options)
        n = len(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        if n + longest > limit:
            raise ValidationError(
                "filler_turns",
                f"makes item {item.key}'s conversation {n + longest} tokens, over the generator's context of {limit}",
                "use fewer filler turns, or drop the no-memory condition",
                config.filler_turns,
            )


def score_item(
    pz: Any, item: PrefEvalItem, condition: str, filler: Sequence[Mapping[str, str]], config: PrefEvalConfig
) -> dict[str, Any]:
    """One (item, condition) record. For ``memory`` the item's history must already be remembered."""
    from personalign.personalizer import ConditioningParams

    perm = permutation(item, config.seed)
    tokenizer = pz.generator.tokenizer
    option_ids = [tokenizer(item.options[i], add_special_tokens=False)["input_ids"] for i in perm]
    messages = condition_messages(condition, item, perm, filler)
    if condition == "memory":
        params = ConditioningParams(
            memory=True,
            shots=False,
            n_memories=config.n_memories,
            memory_threshold=config.memory_threshold,
            adapter=False,
        )
        cond = pz.condition(item.user, messages, max(map(len, option_ids)), params)
    else:
        cond = pz.condition(
            None,
            messages,
            max(map(len, option_ids)),
            ConditioningParams(memory=False, shots=False, adapter=False),
        )
    prompt = tokenizer.apply_chat_template(
        cond.conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    scores = option_scores(pz.generator.model, prompt, option_ids)
    choice = int(np.argmax(scores))
    record = {
        "topic": item.topic,
        "index": item.index,
        "user": item.user,
        "condition": condition,
        "permutation": perm,
        "aligned_position": perm.index(0),
        "scores": scores,
        "choice": choice,
        "correct": perm[choice] == 0,
        "prompt_tokens": len(prompt),
    }
    if condition == "memory":
        texts = memory_texts(item, filler, config.memory_unit)
        record["retrieved"] = [texts.index(m) if m in texts else -1 for m in cond.memories]
        record["preference_retrieved"] = 0 in record["retrieved"]
    return record


def run_prefeval(config: PrefEvalConfig, pz: Any, progress: Progress | None = None) -> dict[str, Any]:
    """Score every selected item under every condition; the JSON-ready result."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    splits, plan = _plan(config)
    filler = load_filler(config.filler_turns, config.data_root)
    _check_context(pz, plan, filler, config)
    say(
        f"prefeval: {len(plan)} items ({', '.join(f'{s}: {sum(1 for p, _ in plan if p == s)}' for s in splits)}), conditions {config.conditions}, {config.filler_turns} filler turns"
    )
    records: list[dict[str, Any]] = []
    seconds = dict.fromkeys(config.conditions, 0.0)
    for done, (split, item) in enumerate(plan, start=1):
        if "memory" in config.conditions:
            t0 = time.perf_counter()
            pz.remember(item.user, memory_texts(item, filler, config.memory_unit))
            seconds["memory"] += time.perf_counter() - t0
        for condition in config.conditions:
            t0 = time.perf_counter()
            records.append({"split": split, **score_item(pz, item, condition, filler, config)})
            seconds[condition] += time.perf_counter() - t0
        add_shift(records[-len(config.conditions) :])
        elapsed = time.perf_counter() - started
        marks = " ".join(
            f"{r['condition']}={'+' if r['correct'] else '-'}" for r in records[-len(config.conditions) :]
        )
        say(
            f"[{done}/{len(plan)}] {split} {item.key}: {marks} ({elapsed:.0f} s, ~{elapsed / done * (len(plan) - done):.0f} s left)"
        )
    from personalign import __version__

    return {
        "benchmark": "prefeval",
        "package_version": __version__,
        "generator": pz.generator.model_id,
        "encoder": pz.encoder.name,
        "config": {k: v for k, v in config.__dict__.items() if k != "data_root"},
        "scoring": "argmax over options of the mean per-token log-probability of the option as the assistant reply",
        "splits": splits,
        "records": records,
        "summary": summarise(records),
        "differences": differences(records, config.seed),
        "retrieval": retrieval(records),
        "seconds": {"total": time.perf_counter() - started, **seconds},
    }


def add_shift(item_records: Sequence[dict[str, Any]]) -> None:
    """The secondary, contrastive choice: the option whose score the context raised most over ``none``.

    For one item's records (same permutation): ``shift = scores_c - scores_none`` and
    ``shift_correct`` says whether its argmax is the aligned option. It removes each option's
    context-free fluency, so it isolates what the preference (or memory) changed. Needs the
    ``none`` condition; ``none`` itself gets no shift.
    """
    none = next((r for r in item_records if r["condition"] == "none"), None)
    if none is None:
        return
    for r in item_records:
        if r is not none:
            shift = np.asarray(r["scores"]) - np.asarray(none["scores"])  # (4,)
            r["shift_correct"] = r["permutation"][int(np.argmax(shift))] == 0


# --- summaries ------------------------------------------------------------------------------------


def _interval(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval, clipped to [0, 1] (it can round to -1e-17 at 0 of n)."""
    low, high = wilson(correct, n)
    return max(low, 0.0), min(high, 1.0)


def _row(split: str, condition: str, topic: str, rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    correct, n = sum(bool(r["correct"]) for r in rs), len(rs)
    low, high = _interval(correct, n)
    row = {
        "split": split,
        "condition": condition,
        "topic": topic,
        "correct": correct,
        "n": n,
        "accuracy": correct / n if n else math.nan,
        "ci95": [low, high],
    }
    if rs and all("shift_correct" in r for r in rs):
        shifted = sum(bool(r["shift_correct"]) for r in rs)
        row.update(shift_correct=shifted, shift_accuracy=shifted / n, shift_ci95=list(_interval(shifted, n)))
    return row


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy with a 95% Wilson interval per (split, condition), over all topics (``topic="all"``) and per topic."""
    rows = []
    for split in dict.fromkeys(r["split"] for r in records):
        for condition in [c for c in CONDITIONS if any(r["condition"] == c for r in records)]:
            rs = [r for r in records if r["split"] == split and r["condition"] == condition]
            if not rs:
                continue
            rows.append(_row(split, condition, "all", rs))
            for topic in sorted({r["topic"] for r in rs}):
                rows.append(_row(split, condition, topic, [r for r in rs if r["topic"] == topic]))
    return rows


def differences(records: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Paired accuracy differences between conditions on the same items, with a paired bootstrap
    interval, for the primary choice (``metric="ll"``) and the contrastive one (``"shift"``)."""
    out = []
    for metric, key in (("ll", "correct"), ("shift", "shift_correct")):
        for split in dict.fromkeys(r["split"] for r in records):
            by = {
                (r["condition"], r["topic"], r["index"]): bool(r[key])
                for r in records
                if r["split"] == split and key in r
            }
            for a, b in DIFFERENCES:
                keys = sorted({(t, i) for c, t, i in by if c == a} & {(t, i) for c, t, i in by if c == b})
                if not keys:
                    continue
                diffs = [float(by[(a, *k)]) - float(by[(b, *k)]) for k in keys]
                low, high = bootstrap_mean_ci(diffs, seed=seed)
                out.append(
                    {
                        "metric": metric,
                        "split": split,
                        "a": a,
                        "b": b,
                        "n": len(diffs),
                        "difference": float(np.mean(diffs)),
                        "ci95": [low, high],
                    }
                )
    return out


def retrieval(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per split: how often the memory condition retrieved the preference, and how many memories."""
    out = []
    for split in dict.fromkeys(r["split"] for r in records):
        rs = [r for r in records if r["split"] == split and r["condition"] == "memory"]
        if rs:
            hits = sum(r["preference_retrieved"] for r in rs)
            low, high = wilson(hits, len(rs))
            mean_k = float(np.mean([len(r["retrieved"]) for r in rs]))
            out.append(
                {
                    "split": split,
                    "n": len(rs),
                    "preference_retrieved": hits / len(rs),
                    "ci95": [low, high],
                    "mean_memories": mean_k,
                }
            )
    return out


def _cell(row: Mapping[str, Any] | None, prefix: str = "") -> str:
    if row is None or f"{prefix}accuracy" not in row:
        return "-".rjust(22)
    low, high = row[f"{prefix}ci95"]
    return f"{row[f'{prefix}accuracy']:.3f} [{low:.2f},{high:.2f}]".rjust(22)


def format_prefeval(result: Mapping[str, Any]) -> str:
    """Plain-text tables: accuracy per split and condition (test topics too), paired differences, retrieval."""
    summary = result["summary"]
    lines = []
    for split in dict.fromkeys(r["split"] for r in summary):
        topics = sorted({r["topic"] for r in summary if r["split"] == split and r["topic"] != "all"})
        shown = ["all", *topics] if split == "test" else ["all"]
        n_items = next(r["n"] for r in summary if r["split"] == split and r["topic"] == "all")
        for prefix, title in (
            ("", "MCQ accuracy (highest mean log-prob)"),
            ("shift_", "contrastive accuracy (largest gain over none)"),
        ):
            rows = {
                c: {r["topic"]: r for r in summary if r["split"] == split and r["condition"] == c}
                for c in CONDITIONS
            }
            if prefix and not any(
                f"{prefix}accuracy" in r for cells in rows.values() for r in cells.values()
            ):
                continue
            lines.append(f"{split} ({len(topics)} topics, {n_items} items): {title} [95% Wilson CI]")
            lines.append("  condition " + "".join(t[:22].rjust(22) for t in shown))
            for condition, cells in rows.items():
                if cells and not (prefix and condition == "none"):
                    lines.append(f"  {condition:9s} " + "".join(_cell(cells.get(t), prefix) for t in shown))
    if result.get("differences"):
        lines.append("paired differences (a - b, same items) [95% paired bootstrap CI]")
        for d in result["differences"]:
            lines.append(
                f"  {d['metric']:5s} {d['split']:4s} {d['a']:>9s} - {d['b']:9s} {d['difference']:+.3f} [{d['ci95'][0]:+.2f},{d['ci95'][1]:+.2f}] (n={d['n']})"
            )
    for r in result.get("retrieval", []):
        lines.append(
            f"memory retrieval {r['split']}: preference retrieved {r['preference_retrieved']:.2f} [{r['ci95'][0]:.2f},{r['ci95'][1]:.2f}], {r['mean_memories']:.1f} memories per prompt"
        )
    return "\n".join(lines)


def plot_prefeval(result: Mapping[str, Any], path: str | Path) -> Path:
    """Left: accuracy per condition and split (95% Wilson intervals); right: test accuracy per topic."""
    from personalign.eval.stats import new_figure

    summary = result["summary"]
    splits = list(dict.fromkeys(r["split"] for r in summary))
    conditions = [c for c in CONDITIONS if any(r["condition"] == c for r in summary)]
    if not conditions:
        raise ValidationError("result", "has no rows to plot", "run at least one condition")
    fig, axes = new_figure(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})

    def bars(ax: Any, groups: Sequence[str], rows_of: Callable[[str, str], Mapping[str, Any] | None]) -> None:
        width = 0.8 / len(conditions)
        for j, condition in enumerate(conditions):
            xs, ys, errs, shifted = [], [], [[], []], []
            for i, group in enumerate(groups):
                row = rows_of(group, condition)
                if row is None:
                    continue
                xs.append(i + (j - (len(conditions) - 1) / 2) * width)
                ys.append(row["accuracy"])
                errs[0].append(row["accuracy"] - row["ci95"][0])
                errs[1].append(row["ci95"][1] - row["accuracy"])
                if "shift_accuracy" in row:
                    shifted.append((xs[-1], row["shift_accuracy"]))
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=condition, color=CONDITION_COLORS[condition])
            if shifted:
                last = j == len(conditions) - 1
                ax.scatter(
                    *zip(*shifted, strict=True),
                    marker="D",
                    s=22,
                    color="black",
                    zorder=3,
                    label="contrastive (gain over none)" if last else None,
                )
        ax.axhline(0.25, color="black", lw=0.8, ls=":", label="chance (1 of 4)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("MCQ accuracy")
        ax.grid(axis="y", alpha=0.3)

    def find(split: str, topic: str, condition: str) -> Mapping[str, Any] | None:
        return next(
            (
                r
                for r in summary
                if r["split"] == split and r["topic"] == topic and r["condition"] == condition
            ),
            None,
        )

    ax = axes[0]
    bars(ax, splits, lambda split, c: find(split, "all", c))
    ax.set_xticks(range(len(splits)), [f"{s} (n={find(s, 'all', conditions[0])['n']})" for s in splits])  # type: ignore[index]
    ax.set_title(f"PrefEval, {result['config']['filler_turns']} filler turns: all topics")
    ax.legend(fontsize=8)
    ax = axes[1]
    focus = "test" if "test" in splits else splits[0]
    topics = sorted({r["topic"] for r in summary if r["split"] == focus and r["topic"] != "all"})
    bars(ax, topics, lambda topic, c: find(focus, topic, c))
    ax.set_xticks(range(len(topics)), [t.replace("_", "\n", 1) for t in topics], fontsize=8)
    ax.set_title(f"{focus} split per topic")
    return save_figure(fig, path)
