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

The items and prompts live in :mod:`personalign.eval.prefeval_items`, the tables and figure in
:mod:`personalign.eval.prefeval_report`; every name stays importable from here.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from personalign.errors import ValidationError
from personalign.eval.prefeval_items import (
    ACKNOWLEDGEMENT,
    CONDITIONS,
    LETTERS,
    MCQ_PROMPT,
    MEMORY_UNITS,
    SPLITS,
    TEST_PREFIX,
    PrefEvalItem,
    benchmark_dir,
    condition_messages,
    format_options,
    history,
    list_topics,
    load_filler,
    load_items,
    memory_texts,
    permutation,
    preference_turns,
    question_turn,
    sample_items,
    split_topics,
)
from personalign.eval.prefeval_report import (
    CONDITION_COLORS,
    DIFFERENCES,
    differences,
    format_prefeval,
    plot_prefeval,
    retrieval,
    summarise,
)

__all__ = [
    "CONDITIONS",
    "SPLITS",
    "MEMORY_UNITS",
    "TEST_PREFIX",
    "ACKNOWLEDGEMENT",
    "MCQ_PROMPT",
    "LETTERS",
    "DIFFERENCES",
    "CONDITION_COLORS",
    "Progress",
    "PrefEvalConfig",
    "PrefEvalItem",
    "benchmark_dir",
    "list_topics",
    "split_topics",
    "load_items",
    "load_filler",
    "sample_items",
    "permutation",
    "format_options",
    "question_turn",
    "preference_turns",
    "history",
    "memory_texts",
    "condition_messages",
    "mean_logprob",
    "option_scores",
    "score_item",
    "run_prefeval",
    "add_shift",
    "summarise",
    "differences",
    "retrieval",
    "format_prefeval",
    "plot_prefeval",
]


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
