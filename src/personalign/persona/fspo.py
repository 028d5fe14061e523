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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from personalign.errors import ContextLengthError
from personalign.models import Encoder
from personalign.types import ChatMessage, Comparison, messages_text

SHOT_TEMPLATE = "## Question\n{question}\n## Preferred Response\n{chosen}\n## Dispreferred Response\n{rejected}\n"
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
        SHOT_TEMPLATE.format(question=s.comparison.prompt_text, chosen=s.comparison.chosen, rejected=s.comparison.rejected)
        for s in shots
    ]
    return "\n".join(blocks) + "\n" + TASK_LINE + "\n"


def render_memories(memories: Sequence[str]) -> str:
    return MEMORY_HEADER + "".join(f"- {m}\n" for m in memories)


def build_conversation(messages: Sequence[ChatMessage], shots: Sequence[Shot], memories: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages to feed the model: memories and shots prepended to the last user turn."""
    conversation = [m.model_dump() for m in messages]
    if not shots and not memories:
        return conversation
    parts = []
    if memories:
        parts.append(render_memories(memories))
    if shots:
        parts.append(render_shots(shots))
    parts.append(conversation[-1]["content"])
    conversation[-1] = {"role": "user", "content": "\n".join(parts)}
    return conversation


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
) -> Conditioning:
    """Build the conversation, dropping least relevant shots, then memories, until it fits.

    ``shots`` and ``memories`` must be ordered most relevant first. Raises
    :class:`ContextLengthError` when the bare conversation alone does not fit.
    """
    budget = context_length - max_new_tokens
    kept_shots, kept_memories = list(shots), list(memories)
    while True:
        conversation = build_conversation(messages, kept_shots, kept_memories)
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


def query_of(messages: Sequence[ChatMessage]) -> str:
    """The text used to retrieve shots and memories: the last user turn."""
    return messages_text(messages)

