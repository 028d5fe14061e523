"""Few-shot conditioning in the FSPO layout (Singh et al. 2025, arXiv 2502.19312).

The user's own comparisons go into the prompt as shots: for each, the question, the preferred
response and the dispreferred response; then a task line and the current question. Shots are
the user's comparisons most relevant to the current message (encoder cosine similarity, ties
broken by recency). Retrieved memories go in the same user turn, above the shots. When the
conversation does not fit the model's context, the least relevant shots are dropped first,
then the least relevant memories.

With no shots and no memories the conversation is returned unchanged, so generation equals
plain ``generate`` on the caller's messages.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ContextLengthError, ValidationError
from personalign.functional.dpo import ipo_loss, sequence_logps
from personalign.models import Encoder, hub_id
from personalign.training.adapters import add_lora, save_adapter
from personalign.training.loop import LoopConfig, LoopReport, train_loop
from personalign.training.samples import right_pad
from personalign.types import ChatMessage, Comparison, messages_text

SHOT_TEMPLATE = (
    "## Question\n{question}\n## Preferred Response\n{chosen}\n## Dispreferred Response\n{rejected}\n"
)
TASK_LINE = "# Task\nGiven the examples above, generate a preferred response to the following question."
MEMORY_HEADER = "# About me\n"


@dataclass(frozen=True)
class Shot:
    """A comparison chosen as a shot, with its relevance to the current message."""

    comparison: Comparison
    relevance: float


def rank_shots(comparisons: Sequence[Comparison], query: str, encoder: Encoder, k: int) -> list[Shot]:
    """The ``k`` comparisons whose prompts are closest to ``query``, most relevant first.

    Relevance is cosine similarity of encoder vectors (rounded to 1e-6 so float noise does not
    decide ties); ties go to the more recent comparison (``created_at``, then position).
    """
    if k <= 0 or not comparisons:
        return []
    vectors = encoder.encode([query, *(c.prompt_text for c in comparisons)])  # (1 + n, dim), unit norm
    sims = vectors[1:] @ vectors[0]  # (n,)
    order = sorted(
        range(len(comparisons)),
        key=lambda i: (-round(float(sims[i]), 6), -(comparisons[i].created_at or 0.0), -i),
    )
    return [Shot(comparisons[i], float(sims[i])) for i in order[:k]]


def render_shots(shots: Sequence[Shot]) -> str:
    """The FSPO few-shot block followed by the task line."""
    blocks = [
        SHOT_TEMPLATE.format(
            question=s.comparison.prompt_text, chosen=s.comparison.chosen, rejected=s.comparison.rejected
        )
        for s in shots
    ]
    return "\n".join(blocks) + "\n" + TASK_LINE + "\n"


def render_memories(memories: Sequence[str]) -> str:
    return MEMORY_HEADER + "".join(f"- {m}\n" for m in memories)


def build_conversation(
    messages: Sequence[ChatMessage], shots: Sequence[Shot], memories: Sequence[str], turn: str = "last"
) -> list[dict[str, str]]:
    """The chat messages to feed the model: memories and shots prepended to the last user turn
    (``turn="first"``: to the first user turn, so a conversation's later prompts extend its earlier ones)."""
    conversation = [m.model_dump() for m in messages]
    if not shots and not memories:
        return conversation
    parts = []
    if memories:
        parts.append(render_memories(memories))
    if shots:
        parts.append(render_shots(shots))
    at = _user_turn(conversation, turn)
    parts.append(conversation[at]["content"])
    conversation[at] = {"role": "user", "content": "\n".join(parts)}
    return conversation


def _user_turn(conversation: Sequence[Mapping[str, Any]], turn: str) -> int:
    """Index of the first or last user turn (the last message when there is none)."""
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    if not users:
        return len(conversation) - 1
    return users[0] if turn == "first" else users[-1]


DESCRIBE_LINE = (
    "# Task\nGiven the examples above, describe in one sentence what kind of answers this user prefers "
    "(length, tone, level of detail, formality). Answer with the sentence only."
)
DESCRIPTION_PREFIX = "What this user prefers: "


def describe_conversation(shots: Sequence[Shot]) -> list[dict[str, str]]:
    """The FSPO user-description step (RAT): the shots, then a request for a one-line description."""
    blocks = [
        SHOT_TEMPLATE.format(
            question=s.comparison.prompt_text, chosen=s.comparison.chosen, rejected=s.comparison.rejected
        )
        for s in shots
    ]
    return [{"role": "user", "content": "\n".join(blocks) + "\n" + DESCRIBE_LINE}]


def first_sentence(text: str, limit: int = 300) -> str:
    """The description as used: the first non-empty line, cut after its first sentence."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for end in (". ", "! ", "? "):
        if end in line:
            line = line.split(end, 1)[0] + end.strip()
            break
    return line[:limit]


def with_description(conversation: list[dict[str, str]], description: str) -> list[dict[str, str]]:
    """``conversation`` with the user description added to (or as) the system message."""
    if not description:
        return conversation
    text = DESCRIPTION_PREFIX + description
    if conversation and conversation[0]["role"] == "system":
        return [
            {**conversation[0], "content": f"{conversation[0]['content']}\n\n{text}".strip()},
            *conversation[1:],
        ]
    return [{"role": "system", "content": text}, *conversation]


def count_prompt_tokens(tokenizer: Any, conversation: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


@dataclass(frozen=True)
class Conditioning:
    """What went into the prompt: the conversation and the shots and memories that fit."""

    conversation: list[dict[str, str]]
    shots: list[Shot]
    memories: list[str]
    prompt_tokens: int


def fit_to_context(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    shots: Sequence[Shot],
    memories: Sequence[str],
    context_length: int,
    max_new_tokens: int,
    turn: str = "last",
) -> Conditioning:
    """Build the conversation, dropping least relevant shots, then memories, until it fits.

    ``shots`` and ``memories`` must be ordered most relevant first. Raises
    :class:`ContextLengthError` when the bare conversation alone does not fit.
    """
    budget = context_length - max_new_tokens
    kept_shots, kept_memories = list(shots), list(memories)
    while True:
        conversation = build_conversation(messages, kept_shots, kept_memories, turn)
        tokens = count_prompt_tokens(tokenizer, conversation)
        if tokens <= budget:
            return Conditioning(conversation, kept_shots, kept_memories, tokens)
        if kept_shots:
            kept_shots.pop()
        elif kept_memories:
            kept_memories.pop()
        else:
            raise ContextLengthError(
                f"messages: the conversation takes {tokens} tokens and max_new_tokens is {max_new_tokens}, "
                f"over the model's context of {context_length}. Fix: shorten the conversation or lower max_new_tokens"
            )


def query_of(messages: Sequence[ChatMessage], turn: str = "last") -> str:
    """The text used to retrieve shots and memories: the last user turn (``turn="first"``: the first)."""
    if turn == "first":
        first = next((m for m in messages if m.role == "user"), None)
        if first is not None:
            return first.content
    return messages_text(messages)


# --- meta-training ----------------------------------------------------------------------------
#
# FSPO treats every user as a task: the policy sees N of a user's comparisons as shots and
# is trained on a held-out (N+1)-th comparison of the same user. Stage 1 is SFT on the
# preferred response (the official code also trains on the dispreferred one, a quirk we do
# not copy); stage 2 is IPO on (preferred, dispreferred) with the SFT adapter as reference.
# The result is one LoRA on the generator that ``chat`` applies with the user's shots.

ADAPTER_NAME = "fspo"
FSPO_CONFIG = "fspo_config.json"
FSPO_ENV = "PERSONALIGN_FSPO_DIR"


class FspoTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shots: int = Field(default=4, ge=1, le=16, description="N: the user's comparisons in each task's prompt")
    tasks_per_user: int = Field(
        default=2,
        ge=1,
        description="tasks drawn per training user (each a fresh window of N + 1 comparisons)",
    )
    sft_tasks: int = Field(default=128, ge=1, description="tasks in the SFT stage (seeded subsample)")
    ipo_tasks: int = Field(default=48, ge=0, description="tasks in the IPO stage (0 skips it)")
    beta: float = Field(
        default=0.01, gt=0.0, description="IPO beta; the target log-ratio margin is 1 / (2 beta)"
    )
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    max_length: int = Field(default=1536, ge=64, description="tasks longer than this many tokens are skipped")
    sft: LoopConfig = Field(
        default_factory=lambda: LoopConfig(epochs=1, learning_rate=5e-4, batch_size=2, name="fspo-sft")
    )
    ipo: LoopConfig = Field(
        default_factory=lambda: LoopConfig(epochs=1, learning_rate=1e-4, batch_size=2, name="fspo-ipo")
    )
    seed: int = 0


@dataclass(frozen=True)
class FspoTask:
    """N shots of one user and a held-out comparison of the same user."""

    user: str
    shots: tuple[Comparison, ...]
    query: Comparison


def fspo_tasks(
    users: Mapping[str, Sequence[Comparison]], shots: int, per_user: int, seed: int
) -> list[FspoTask]:
    """Windows of ``shots + 1`` distinct comparisons per user (seeded); the query's prompt is
    never one of its shots' prompts. Users with fewer than ``shots + 1`` comparisons are skipped."""
    rng = random.Random(seed)
    tasks = []
    for user in sorted(users):
        comparisons = list(users[user])
        if len(comparisons) < shots + 1:
            continue
        for _ in range(per_user):
            order = rng.sample(range(len(comparisons)), len(comparisons))
            query = comparisons[order[0]]
            context = [comparisons[i] for i in order[1:] if comparisons[i].prompt_text != query.prompt_text][
                :shots
            ]
            if len(context) == shots:
                tasks.append(FspoTask(user, tuple(context), query))
    rng.shuffle(tasks)
    return tasks


def task_prompt_ids(tokenizer: Any, task: FspoTask) -> list[int]:
    """The task's prompt in the chat layout ``chat`` uses: shots, task line, question."""
    shots = [Shot(c, 1.0) for c in task.shots]
    conversation = build_conversation([ChatMessage(role="user", content=task.query.prompt_text)], shots, [])
    return list(
        tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def response_ids(
    tokenizer: Any, prompt_ids: Sequence[int], conversation_prompt: str, response: str, task: FspoTask
) -> list[int]:
    """Token ids of ``response`` as the assistant turn after ``prompt_ids`` (end-of-turn included)."""
    shots = [Shot(c, 1.0) for c in task.shots]
    conversation = build_conversation([ChatMessage(role="user", content=conversation_prompt)], shots, [])
    full = list(
        tokenizer.apply_chat_template(
            [*conversation, {"role": "assistant", "content": response}], tokenize=True, return_dict=True
        )["input_ids"]
    )
    if full[: len(prompt_ids)] != list(prompt_ids):
        raise ValidationError(
            "model",
            "the chat template does not render the assistant turn after the generation prompt",
            "use a chat model whose template appends turns",
            None,
        )
    return full[len(prompt_ids) :]


@dataclass(frozen=True)
class _Encoded:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _encode(tokenizer: Any, tasks: Sequence[FspoTask], max_length: int) -> list[_Encoded]:
    out = []
    for task in tasks:
        prompt = task_prompt_ids(tokenizer, task)
        chosen = response_ids(tokenizer, prompt, task.query.prompt_text, task.query.chosen, task)
        rejected = response_ids(tokenizer, prompt, task.query.prompt_text, task.query.rejected, task)
        if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
            out.append(_Encoded(prompt, chosen, rejected))
    return out


def _logps(
    model: Any, rows: Sequence[tuple[list[int], list[int]]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs ``(B,)`` and response token counts ``(B,)``."""
    ids, attention, response = right_pad(rows, pad)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (B, T, V)
    return sequence_logps(logits, ids.to(device), response.to(device)), response[:, 1:].sum(dim=-1).to(device)


@dataclass
class FspoReport:
    tasks: int
    sft: LoopReport
    ipo: LoopReport | None
    heldout_sft_nll: float | None = None
    heldout_ipo_accuracy: float | None = None


def train_fspo(
    generator: Any, users: Mapping[str, Sequence[Comparison]], config: FspoTrainConfig
) -> tuple[Any, FspoReport]:
    """Add adapter ``fspo`` to ``generator`` and meta-train it on the users' comparisons.

    Returns the PEFT model (adapter active) and a report with each stage's epoch losses.
    """
    tokenizer = generator.tokenizer
    tasks = fspo_tasks(users, config.shots, config.tasks_per_user, config.seed)
    encoded = _encode(tokenizer, tasks, config.max_length)
    if not encoded:
        raise ValidationError(
            "users",
            f"give no task of {config.shots} shots plus a query within {config.max_length} tokens",
            "give each user at least shots + 1 comparisons, or raise max_length",
            len(users),
        )
    sft_rows = encoded[: config.sft_tasks]
    ipo_rows = encoded[-config.ipo_tasks :] if config.ipo_tasks else []
    torch.manual_seed(config.seed)
    model = add_lora(generator, ADAPTER_NAME, config.rank, config.alpha, config.target_modules)
    for name, p in model.named_parameters():
        p.requires_grad_(f".{ADAPTER_NAME}." in name and "lora_" in name)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pad = tokenizer.pad_token_id

    def sft_loss(idx: list[int]) -> torch.Tensor:
        logps, counts = _logps(model, [(sft_rows[i].prompt, sft_rows[i].chosen) for i in idx], pad)
        return -(logps / counts.clamp(min=1)).mean()  # mean token NLL of the preferred response

    model.train()
    sft_report = train_loop(
        params, len(sft_rows), sft_loss, config.sft.model_copy(update={"seed": config.seed})
    )
    ipo_report = None
    if ipo_rows:
        model.eval()
        with torch.no_grad():  # the reference is the SFT adapter, as in the official recipe
            refs = [_logps(model, [(r.prompt, r.chosen), (r.prompt, r.rejected)], pad)[0] for r in ipo_rows]
        ref = torch.stack(refs)  # (n, 2)

        def ipo_batch(idx: list[int]) -> torch.Tensor:
            rows = [(ipo_rows[i].prompt, ipo_rows[i].chosen) for i in idx] + [
                (ipo_rows[i].prompt, ipo_rows[i].rejected) for i in idx
            ]
            logps, _ = _logps(model, rows, pad)
            chosen, rejected = logps.chunk(2)
            r = ref[idx].to(chosen.device)
            return ipo_loss(chosen, rejected, r[:, 0], r[:, 1], config.beta).mean()

        model.train()
        ipo_report = train_loop(
            params, len(ipo_rows), ipo_batch, config.ipo.model_copy(update={"seed": config.seed})
        )
    model.eval()
    for p in params.values():
        p.requires_grad_(False)
    return model, FspoReport(tasks=len(encoded), sft=sft_report, ipo=ipo_report)


def save_fspo(
    model: Any, folder: Path | str, generator_id: str, config: FspoTrainConfig, report: FspoReport, data: str
) -> Path:
    """Write the adapter as a plain PEFT folder plus ``fspo_config.json`` (base model, recipe, losses, data).

    ``adapter_config.json`` names the real base (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the
    embedded model, :func:`personalign.models.hub_id`); ``fspo_config.json`` keeps personalign's
    id as ``base_model``. Folders written before, naming the pseudo-id, still load (its alias).
    Where loop checkpoints were kept is not recorded (a machine path, not part of the recipe).
    """
    scratch = {"checkpoint_dir"}
    meta = {
        "base_model": generator_id,
        "recipe": "fspo",
        "config": config.model_dump(exclude={"sft": scratch, "ipo": scratch}),
        "tasks": report.tasks,
        "sft_epoch_loss": report.sft.epoch_loss,
        "ipo_epoch_loss": report.ipo.epoch_loss if report.ipo else [],
        "data": data,
    }
    return save_adapter(model, ADAPTER_NAME, folder, FSPO_CONFIG, meta)


def fspo_dir() -> Path:
    """Where the FSPO adapter is looked up: ``$PERSONALIGN_FSPO_DIR`` or the package's ``data/fspo``."""
    env = os.environ.get(FSPO_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data" / "fspo"


def fspo_adapter_meta(folder: Path | str, model_id: str) -> dict[str, Any] | None:
    """The adapter's recorded config when ``folder`` holds an FSPO adapter for ``model_id`` (or
    for the hub model it names, :func:`personalign.models.hub_id`), else ``None``."""
    path = Path(folder) / FSPO_CONFIG
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return meta if hub_id(meta.get("base_model") or "") == hub_id(model_id) else None
