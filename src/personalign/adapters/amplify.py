"""Amplified comparisons: many pairs of the generator's own answers, labelled by a user's inferred
reward, to train that user's LoRA adapter.

A user enrols with a handful of comparisons, too few to fine-tune on; but their inferred reward
(``Personalizer.reward``) can label as many pairs of the generator's own answers as there are
answers. Training the user's adapter with DPO on those pairs distils the reward into weights: the
result is a plain PEFT adapter, so the personalisation survives export to vLLM or LoRAX, where
decode-time guidance does not.

Which pairs: per prompt, every pair of distinct answers is a candidate and its margin is the
difference of the user's rewards. The pairs with the largest margins are the clearest lessons;
taking them round-robin over prompts (the best pair of each prompt first, then the second best,
...) keeps one prompt's answers from filling the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ValidationError
from personalign.types import Comparison


class AmplifyConfig(BaseModel):
    """How many amplified pairs, and how clear each must be."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: int = Field(default=32, ge=1, le=4096, description="most amplified comparisons")
    min_margin: float = Field(default=0.0, ge=0.0, description="least reward difference of a kept pair")
    per_prompt: int = Field(default=4, ge=1, description="most pairs from one prompt")


def amplify(
    answers: Mapping[str, Sequence[str]],
    rewards: Mapping[str, Sequence[float]],
    config: AmplifyConfig | None = None,
) -> list[Comparison]:
    """Comparisons between answers to the same prompt, the higher-reward answer chosen.

    ``answers[prompt]``: the generator's answers; ``rewards[prompt]``: the user's reward of each.
    Pairs are ranked by margin within each prompt and taken round-robin over prompts (prompts in
    order of their best margin), at most ``per_prompt`` per prompt, until ``pairs`` are taken.
    Identical answers and pairs under ``min_margin`` are never taken.
    """
    config = config or AmplifyConfig()
    ranked: list[
        list[tuple[float, str, str, str]]
    ] = []  # per prompt: (margin, prompt, chosen, rejected), best first
    for prompt, texts in answers.items():
        scores = np.asarray(rewards.get(prompt, ()), dtype=np.float64)
        if scores.shape != (len(texts),):
            raise ValidationError(
                f"rewards[{prompt!r}]",
                f"has {scores.size} scores for {len(texts)} answers",
                "score every answer once",
            )
        if not np.all(np.isfinite(scores)):
            raise ValidationError(f"rewards[{prompt!r}]", "holds NaN or infinity", "check the user's state")
        pairs = []
        for i, j in combinations(range(len(texts)), 2):
            a, b = texts[i].strip(), texts[j].strip()
            margin = float(abs(scores[i] - scores[j]))
            if not a or not b or a == b or margin <= config.min_margin:
                continue
            hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
            pairs.append((margin, prompt, texts[hi], texts[lo]))
        if pairs:
            ranked.append(sorted(pairs, key=lambda p: -p[0])[: config.per_prompt])
    ranked.sort(key=lambda rows: -rows[0][0])
    out: list[Comparison] = []
    for depth in range(config.per_prompt):
        for rows in ranked:
            if depth < len(rows) and len(out) < config.pairs:
                _, prompt, chosen, rejected = rows[depth]
                out.append(Comparison(prompt=prompt, chosen=chosen, rejected=rejected))
    return out
